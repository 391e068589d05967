"""Which implementation serves a call: ``reference`` (PyTorch), ``triton`` or ``native``.

By default CUDA tensors go to the Triton kernels and everything else to the reference ops. The
environment variable ``PPO_FAST_BACKEND=reference|triton|native`` forces one; a forced backend
that cannot serve an input raises :class:`BackendUnavailable` listing every backend and why it
can or cannot serve (read at every call, so it can be changed at run time).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("reference", "triton", "native")
ENV_VAR = "PPO_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op on these inputs."""


# Looked up once without importing triton, so `import ppo_fast` stays light.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_reason(device: torch.device) -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed (pip install 'ppo-fast[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("tensors are on the CPU and TRITON_INTERPRET is not 1 "
                "(Triton compiles for GPUs; its interpreter runs on the CPU, slowly)")
    return f"tensors are on {device.type}; the Triton kernels target CUDA"


def _native_reason(device: torch.device) -> str | None:
    return "this build has no native (csrc/) kernels; use reference on the CPU"


def reasons(device: torch.device) -> dict[str, str | None]:
    """Why each backend cannot serve inputs on ``device`` (None: it can)."""
    return {"reference": None, "triton": _triton_reason(device), "native": _native_reason(device)}


def select(op: str, device: torch.device) -> str:
    forced = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if forced not in BACKENDS + ("auto",):
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)} or auto; got {forced!r}")
    why = reasons(device)
    if forced == "auto":
        return "triton" if device.type == "cuda" and why["triton"] is None else "reference"
    if why[forced] is not None:
        listing = "; ".join(f"{name}: {reason or 'available'}" for name, reason in why.items())
        raise BackendUnavailable(
            f"{ENV_VAR}={forced} cannot run {op} on {device.type} tensors: {why[forced]}. "
            f"Backends: {listing}"
        )
    return forced
