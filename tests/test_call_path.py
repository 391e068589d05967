"""How many of our files one ``pf.ppo_loss`` call passes through, counted per backend: the host
code of the call, forward and backward, after a warm-up call has built, compiled and imported
everything it needs. Each backend has a ceiling, so a change that spreads the call over more
files fails here. Before the ops moved into one module each the counts were 9 (reference),
9 (native) and 12 (Triton); the goal is 6 on each.

The package's files a call passes through are at most 6 on every backend: the two op modules
(ops/ppo_loss.py holds ``pf.ppo_loss``; its backward is ops/token_logprobs.py's row backward),
arguments.py (the checks and LossOptions), spec.py (the one reduction), dispatch.py, and on
the reference path objectives.py (the spec's objective) or on the native path native.py (the
build). The Triton implementation's host code is counted apart, as csrc/ is for the native one:
kernels/ppo_loss.py (the fused forward), kernels/logprobs.py (the row backward) and
kernels/launch.py (every launch goes through its plan), 8 files in all on CUDA.

Bodies of ``@triton.jit`` functions are device code: on CUDA they run on the GPU, not in Python;
under ``TRITON_INTERPRET=1`` the interpreter runs them in Python, so they are left out of the
count, and the Triton case stands in for the CUDA call's path.
"""

import os
import sys

import torch

import ppo_fast as pf

from helpers import random_labels, random_logits

MAX_PACKAGE_FILES = 6
MAX_KERNEL_FILES = {"reference": 0, "native": 0, "triton": 3}

_PACKAGE = os.path.dirname(os.path.realpath(pf.__file__))


def _kernels_directory() -> str:
    import ppo_fast.kernels

    return os.path.dirname(os.path.realpath(ppo_fast.kernels.__file__))


def _device_code() -> set:
    """The code objects of every ``@triton.jit`` function in ``ppo_fast.kernels``."""
    import importlib
    import pkgutil

    import ppo_fast.kernels

    codes = set()
    for info in pkgutil.iter_modules(ppo_fast.kernels.__path__):
        module = importlib.import_module(f"ppo_fast.kernels.{info.name}")
        for value in vars(module).values():
            fn = getattr(value, "fn", None)
            if callable(fn) and hasattr(fn, "__code__") and type(value).__module__.startswith("triton"):
                codes.add(fn.__code__)
    return codes


def files_of_one_call(call) -> list[str]:
    """Our files (relative to the package or kernels/) whose host code runs during ``call()``."""
    roots = (_PACKAGE, _kernels_directory())
    device = _device_code()
    seen: set[str] = set()
    cache: dict[str, bool] = {}

    def ours(filename: str) -> bool:
        if filename not in cache:
            real = os.path.realpath(filename)
            cache[filename] = any(real.startswith(root + os.sep) for root in roots)
        return cache[filename]

    def profile(frame, event, arg):
        if event == "call" and frame.f_code not in device and ours(frame.f_code.co_filename):
            seen.add(os.path.realpath(frame.f_code.co_filename))

    import threading

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return sorted(os.path.relpath(f, os.path.dirname(_PACKAGE)) for f in seen)


def _ppo_loss_call(device):
    logits = random_logits((2, 5, 33), torch.float32, device).requires_grad_()
    labels = random_labels((2, 5), 33, device)
    old_logp = torch.randn(2, 5, device=device) - 3
    advantages = torch.randn(2, 5, device=device)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    ref_logp = torch.randn(2, 5, device=device) - 3

    def call():
        loss, _ = pf.ppo_loss(logits, labels, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=0.1,
                              entropy_coef=0.01)
        loss.backward()

    return call


def test_ppo_loss_passes_through_few_files(backend, device):
    call = _ppo_loss_call(device)
    call()
    files = files_of_one_call(call)
    assert files, "the profiler saw none of our files: the count would pass for any layout"
    kernel_directory = os.path.relpath(_kernels_directory(), os.path.dirname(_PACKAGE)) + os.sep
    kernels = [f for f in files if f.startswith(kernel_directory)]
    package = [f for f in files if f not in kernels]
    assert len(package) <= MAX_PACKAGE_FILES, f"{backend}: pf.ppo_loss passes through {len(package)} files: {package}"
    assert len(kernels) <= MAX_KERNEL_FILES[backend], f"{backend}: the kernels' host code is in {kernels}"
