"""Package discovery, in the one place that can combine it with a directory mapping.

The Triton kernels live in the top-level ``kernels/`` folder (the project's layout) and install
as ``ppo_fast.kernels``: a top-level package named ``kernels`` would collide with the PyPI package
of that name. Every other subpackage is found under ``ppo_fast/``, so a new one ships without an
edit here. Everything else about the package is in pyproject.toml.
"""

from setuptools import find_packages, setup

KERNELS = {"ppo_fast.kernels": "kernels"}

setup(
    packages=find_packages(include=["ppo_fast", "ppo_fast.*"])
    + list(KERNELS)
    + [f"ppo_fast.kernels.{name}" for name in find_packages("kernels")],
    package_dir=KERNELS,
)
