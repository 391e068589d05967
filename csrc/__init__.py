"""The C++ sources of the native CPU kernels, installed as ``ppo_fast.csrc`` so that a wheel
carries them (``ppo_fast.native`` builds them on first use)."""
