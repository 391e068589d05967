"""Triton kernels of ppo_fast (installed as ``ppo_fast.kernels``): ``@triton.jit`` functions and
their launchers only. Autograd, dispatch and validation live in ``ppo_fast``."""
