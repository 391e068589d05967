"""Shared test helpers."""

import os
import sys

DEEPSPEED_LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]
"""The ``deepspeed`` launcher, run as the module its console script runs: found wherever pip put
the package, also when its scripts went to a folder off the PATH (``pip install --target``)."""


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def subprocess_env(**extra):
    """The environment for a child run: CPU only, unbuffered, and without the rendezvous variables
    an in-process test may have set (a child would reuse the parent's port)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **extra)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PPO_FAST_BACKEND"):
        env.pop(name, None)
    return env
