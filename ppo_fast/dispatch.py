"""Which implementation serves an op: one table, one :func:`resolve`.

Backends: ``reference`` (PyTorch on any device, from the spec), ``triton`` (fused kernels on
CUDA; on the CPU only under ``TRITON_INTERPRET=1``, which is how the tests run them) and
``native`` (C++ CPU kernels from ``csrc/``, built on first use: :mod:`ppo_fast.native`).

By default a CUDA call takes ``triton`` where the op has it and a CPU call ``native`` where it is
built; everything else runs ``reference``. ``PPO_FAST_BACKEND=reference|triton|native`` forces a
backend, read at every call: an op that has the forced backend uses it, or raises
:class:`BackendUnavailable` listing every backend and why it cannot serve; an op without it runs
its reference and says so once, in a warning naming the op.

Ops with a ``torch.library`` schema (:mod:`ppo_fast.ops`) resolve inside their per-device
implementation, so autograd, device dispatch and ``torch.compile`` see one op. The others resolve
in :mod:`ppo_fast.functional`; while ``torch.compile`` traces them the warning is left out
(Dynamo cannot trace ``warnings.warn``); they have only a reference implementation anyway.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from types import ModuleType
from typing import NamedTuple

import torch

from . import native as _native
from .backends import native as _native_backend  # noqa: F401  (loaded before any trace; builds nothing)
from .backends import reference as _reference_backend  # noqa: F401  (loaded before any trace)

BACKENDS = ("reference", "triton", "native")
ENV_VAR = "PPO_FAST_BACKEND"

_REFERENCE = "ppo_fast.backends.reference"
_TRITON = "ppo_fast.backends.triton"
_NATIVE = "ppo_fast.backends.native"

TABLE: dict[str, dict[str, str]] = {
    "token_logprobs": {"reference": _REFERENCE, "triton": _TRITON, "native": _NATIVE},
    "ppo_loss": {"reference": _REFERENCE, "triton": _TRITON, "native": _NATIVE},
    "linear_logprobs": {"reference": _REFERENCE, "triton": _TRITON, "native": _NATIVE},
    "gae": {"reference": _REFERENCE, "triton": _TRITON, "native": _NATIVE},
    "policy_loss": {"reference": _REFERENCE},
    "value_loss": {"reference": _REFERENCE},
    "kl_penalty": {"reference": _REFERENCE},
    "masked_whiten": {"reference": _REFERENCE},
    "masked_mean": {"reference": _REFERENCE},
    "group_advantages": {"reference": _REFERENCE},
    "advantages": {"reference": _REFERENCE},
    "rollout_correction": {"reference": _REFERENCE},
}
"""op → {backend: the module implementing it} (see :mod:`ppo_fast.backends` for the contract)."""

_DEFAULT_ORDER = {"cuda": ("triton", "reference"), "cpu": ("native", "reference")}

# Looked up without importing triton, so `import ppo_fast` stays light.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op on these inputs."""


class Resolved(NamedTuple):
    backend: str
    impl: ModuleType


def forced_backend() -> str | None:
    """The backend ``PPO_FAST_BACKEND`` forces, or None (unset, empty or ``auto``)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("", "auto"):
        return None
    if forced not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)} or auto; got {forced!r}")
    return forced


def _device_reason(backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "native":
        if device.type != "cpu":
            return f"tensors are on {device.type}; the native kernels are for the CPU"
        return _native.unavailable(build=not torch.compiler.is_compiling())
    if not _TRITON_INSTALLED:
        return "triton is not installed (pip install 'ppo-fast[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("tensors are on the CPU and TRITON_INTERPRET is not 1 (Triton compiles for GPUs; "
                "its interpreter runs on the CPU, slowly)")
    return f"tensors are on {device.type}; the Triton kernels target CUDA"


def reasons(op: str, device) -> dict[str, str | None]:
    """Why each backend cannot serve ``op`` on ``device`` (None: it can)."""
    device = torch.device(device)
    why = {}
    for name in BACKENDS:
        device_reason = _device_reason(name, device)
        if name == "native" and device_reason is not None:
            why[name] = device_reason
        elif name not in TABLE[op]:
            why[name] = f"no {name} kernel for this op"
        else:
            why[name] = device_reason
    return why


def _load(op: str, backend: str) -> Resolved:
    path = TABLE[op][backend]
    # sys.modules first: torch.compile traces a dict lookup, not an import.
    return Resolved(backend, sys.modules.get(path) or importlib.import_module(path))


def choose(op: str, device) -> str:
    """The backend that serves ``op`` for tensors on ``device``; raises
    :class:`BackendUnavailable` when a forced backend that the op has cannot serve them."""
    device = torch.device(device)
    implemented = TABLE[op]
    forced = forced_backend()
    if forced is None:
        for name in _DEFAULT_ORDER.get(device.type, ("reference",)):
            if name in implemented and _device_reason(name, device) is None:
                return name
        return "reference"
    if forced not in implemented:
        return "reference"
    why = reasons(op, device)
    if why[forced] is not None:
        listing = "; ".join(f"{name}: {reason or 'available'}" for name, reason in why.items())
        raise BackendUnavailable(f"{ENV_VAR}={forced} cannot run {op} on {device.type} tensors: "
                                 f"{why[forced]}. Backends: {listing}")
    return forced


_warned: set[tuple[str, str]] = set()


def resolve(op: str, device, stacklevel: int = 3) -> Resolved:
    """The backend and implementation module that serve ``op`` for tensors on ``device``.

    ``stacklevel`` places the once-per-op warning about a forced backend the op lacks; the public
    functions resolve before any work, so it points at the user's call.
    """
    backend = choose(op, device)
    forced = forced_backend()
    if forced is not None and forced != backend and (op, forced) not in _warned \
            and not torch.compiler.is_compiling():
        _warned.add((op, forced))
        warnings.warn(f"{ENV_VAR}={forced}: {op} has no {forced} implementation and runs its "
                      "reference (PyTorch)", stacklevel=stacklevel)
    return _load(op, backend)


def describe() -> str:
    """The op × backend table for each device, with the reason for every gap: ``ppo-fast
    backends``."""
    notes: list[str] = []

    def cell(reason: str | None, chosen: bool) -> str:
        if reason is None:
            return "yes *" if chosen else "yes"
        if reason not in notes:
            notes.append(reason)
        return f"no [{notes.index(reason) + 1}]"

    forced = os.environ.get(ENV_VAR, "").strip() or "unset"
    width = max(map(len, TABLE)) + 4
    lines = [f"{ENV_VAR}={forced}; * marks the backend that serves a call on that device.", ""]
    for device in ("cpu", "cuda"):
        here = "" if device == "cpu" or torch.cuda.is_available() else " (none here)"
        lines.append((f"{device + here:{width}}" + "".join(f"{name:12}" for name in BACKENDS)).rstrip())
        for op in TABLE:
            try:
                chosen = choose(op, device)
            except BackendUnavailable:
                chosen = None
            why = reasons(op, device)
            lines.append(f"  {op:{width - 2}}" + "".join(f"{cell(why[name], name == chosen):12}"
                                                         for name in BACKENDS).rstrip())
        lines.append("")
    lines += [f"[{i}] {reason}" for i, reason in enumerate(notes, 1)]
    return "\n".join(lines)
