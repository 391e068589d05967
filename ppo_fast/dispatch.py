"""Which implementation serves an op: each op module of :mod:`ppo_fast.ops` registers its table of
implementations here, and :func:`choose` picks from that table.

Backends: ``reference`` (PyTorch on any device), ``triton`` (fused kernels on CUDA; on the CPU
only under ``TRITON_INTERPRET=1``, which is how the tests run them) and ``native`` (C++ CPU
kernels from ``csrc/``, built on first use: :mod:`ppo_fast.native`).

By default a CUDA call takes ``triton`` and a CPU call ``native`` where it is built; anything
else runs ``reference``. ``PPO_FAST_BACKEND=reference|triton|native`` forces a backend, read at
every call; a forced backend that cannot serve the call raises :class:`BackendUnavailable`
listing every backend and why. Every op in the table has all three backends; the functions that
only have a PyTorch implementation are not in it and run their spec on any backend setting.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import native as _native

BACKENDS = ("reference", "triton", "native")
ENV_VAR = "PPO_FAST_BACKEND"

TABLE: dict[str, dict[str, object]] = {}
"""op → {backend: its implementation}, filled by :func:`register` as each op module loads."""

_DEFAULT_ORDER = {"cuda": ("triton", "reference"), "cpu": ("native", "reference")}

# Looked up without importing triton, so `import ppo_fast` stays light.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op on these inputs."""


def register(op: str, implementations: dict[str, object]) -> dict[str, object]:
    """Enter ``op``'s implementations (one per backend) in :data:`TABLE`; returns them."""
    missing = set(BACKENDS) - set(implementations)
    if missing:
        raise ValueError(f"{op} must have an implementation for every backend; missing {sorted(missing)}")
    TABLE[op] = implementations
    return implementations


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


def reasons(device) -> dict[str, str | None]:
    """Why each backend cannot serve a call on ``device`` (None: it can)."""
    device = torch.device(device)
    return {name: _device_reason(name, device) for name in BACKENDS}


def choose(op: str, device) -> str:
    """The backend that serves ``op`` for tensors on ``device``; raises
    :class:`BackendUnavailable` when the forced backend cannot serve them."""
    device = torch.device(device)
    forced = forced_backend()
    if forced is None:
        for name in _DEFAULT_ORDER.get(device.type, ("reference",)):
            if _device_reason(name, device) is None:
                return name
        return "reference"
    reason = _device_reason(forced, device)
    if reason is not None:
        listing = "; ".join(f"{name}: {why or 'available'}" for name, why in reasons(device).items())
        raise BackendUnavailable(f"{ENV_VAR}={forced} cannot run {op} on {device.type} tensors: "
                                 f"{reason}. Backends: {listing}")
    return forced


def implementation(op: str, device):
    """The implementation of ``op`` that serves tensors on ``device`` (from :data:`TABLE`)."""
    return TABLE[op][choose(op, device)]


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
        why = reasons(device)
        for op in TABLE:
            try:
                chosen = choose(op, device)
            except BackendUnavailable:
                chosen = None
            lines.append(f"  {op:{width - 2}}" + "".join(f"{cell(why[name], name == chosen):12}"
                                                         for name in BACKENDS).rstrip())
        lines.append("")
    lines += [f"[{i}] {reason}" for i, reason in enumerate(notes, 1)]
    from .batch_invariant import batch_invariant_bfloat16_gemm

    gemm = batch_invariant_bfloat16_gemm()
    if gemm is not None:
        lines.append(f"batch_invariant() multiplies bfloat16 on the CPU with the {'AMX tiles' if gemm == 'amx' else 'vector kernel'} "
                     "in this process (PPO_FAST_AMX=0: the vector kernel).")
    lines.append("Every other function (policy_loss, value_loss, kl_penalty, masked_whiten, masked_mean, "
                 "group_advantages, advantages, rollout_correction) runs its PyTorch spec on any device.")
    return "\n".join(lines)
