"""Triton kernels of ppo_fast (installed as ``ppo_fast.kernels``): ``@triton.jit`` functions and
their launchers only. Autograd, dispatch and validation live in ``ppo_fast``."""

if __name__ == "kernels":
    # This folder was found as a top-level package because the repository root is on sys.path
    # (`python -m ...` or `python -c ...` run from the root puts it first). The name `kernels`
    # belongs to the PyPI package that transformers imports, so the import is handed to that one:
    # from the root, `import kernels` gives what it gives anywhere else.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    del sys.modules["kernels"]
    if _spec is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is ppo_fast.kernels, "
            "not the top-level package of that name)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["kernels"]
        raise
