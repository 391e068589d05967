"""Package discovery, in the one place that can combine it with a directory mapping.

The Triton kernels live in the top-level ``kernels/`` folder (the project's layout) and install
as ``ppo_fast.kernels``: a top-level package named ``kernels`` would collide with the PyPI package
of that name. The C++ sources in ``csrc/`` install as ``ppo_fast.csrc``, so a wheel can build them. Every other subpackage is found under ``ppo_fast/``, so a new one ships without an
edit here. Everything else about the package is in pyproject.toml.
"""

from setuptools import find_packages, setup

MAPPED = {"ppo_fast.kernels": "kernels", "ppo_fast.csrc": "csrc"}

setup(
    packages=find_packages(include=["ppo_fast", "ppo_fast.*"])
    + list(MAPPED)
    + [f"ppo_fast.kernels.{name}" for name in find_packages("kernels")],
    package_dir=MAPPED,
    # The native kernels' sources, built on first use (ppo_fast/native.py).
    package_data={"ppo_fast.csrc": ["*.cpp"]},
)
