"""Shared test helpers."""

import os
from contextlib import contextmanager

import torch


@contextmanager
def backend(name):
    previous = os.environ.get("PPO_FAST_BACKEND")
    os.environ["PPO_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PPO_FAST_BACKEND"]
        else:
            os.environ["PPO_FAST_BACKEND"] = previous


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def grad_of(fn, *inputs, upstream=None):
    """Gradients of ``(fn(*inputs) * upstream).sum()`` w.r.t. the inputs that require grad."""
    out = fn(*inputs)
    if upstream is None:
        upstream = torch.randn_like(out)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad((out * upstream).sum(), leaves)


def subprocess_env(**extra):
    """The environment for a child run: CPU only, unbuffered, and without the rendezvous variables
    an in-process test may have set (a child would reuse the parent's port)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **extra)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PPO_FAST_BACKEND"):
        env.pop(name, None)
    return env
