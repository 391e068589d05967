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
