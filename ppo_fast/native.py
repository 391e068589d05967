"""The native CPU kernels (``csrc/``): built on first use, cached, and never in the way.

    python -m ppo_fast.native build      # build now (a minute on 2 cores) and say where
    python -m ppo_fast.native status     # built or not, and why

The C++ sources ship inside the package (``ppo_fast/csrc``, mapped from the repository's
``csrc/``), so an installed wheel builds them too; ``pip install`` itself compiles nothing. The
first CPU call of an op that has a native kernel builds the extension with torch's C++ extension
tooling (ninja) into ``$PPO_FAST_NATIVE_DIR`` (default ``~/.cache/ppo_fast/native``), keyed by
the sources, torch's version and the CPU flags, as DeepSpeed's op builder does; later processes
load the cached build. Without a compiler or ninja, or when the build fails, ``import ppo_fast``
still works: one warning says why and how to build, and the ops run their reference.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch


def _source_directory() -> Path:
    spec = importlib.util.find_spec("ppo_fast.csrc")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "csrc"  # a source checkout, not installed


SOURCES = [_source_directory() / "ppo_fast_cpu.cpp", _source_directory() / "batch_invariant_cpu.cpp"]


def _flags() -> list[str]:
    """Compiler flags: ATen's AVX2 vectors (its exp is SLEEF's, 1 ULP) where the CPU has AVX2, its
    portable ones otherwise; OpenMP, which at::parallel_for runs on."""
    flags = ["-O3", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                  "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif capability == "AVX2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


FLAGS = _flags()

_module = None
_failure: str | None = None


def build_directory() -> Path:
    root = Path(os.environ.get("PPO_FAST_NATIVE_DIR", Path.home() / ".cache" / "ppo_fast" / "native"))
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update(" ".join([torch.__version__, sys.version, *FLAGS]).encode())
    return root / digest.hexdigest()[:16]


def load(verbose: bool = False):
    """The extension module, built if needed; raises RuntimeError saying why it cannot be."""
    global _module, _failure
    if _module is not None:
        return _module
    if _failure is not None:
        raise RuntimeError(_failure)
    try:
        missing = [str(s) for s in SOURCES if not s.is_file()]
        if missing:
            raise RuntimeError(f"the sources are not installed ({', '.join(missing)})")
        directory = build_directory()
        if not (directory / LIBRARY).is_file():
            _build(directory, verbose)
        _module = _import(directory / LIBRARY)
        return _module
    except Exception as exc:  # a missing compiler or ninja, a failed build: all mean "not here"
        _failure = f"the native CPU kernels could not be built: {type(exc).__name__}: {str(exc).strip()[:300]}"
        warnings.warn(f"{_failure}. ppo_fast runs its reference ops on the CPU instead; build them with "
                      "`python -m ppo_fast.native build` (needs a C++ compiler and `pip install ninja`)",
                      stacklevel=3)
        raise RuntimeError(_failure) from None


LIBRARY = "ppo_fast_native.so"


def _build(directory: Path, verbose: bool) -> None:
    """Build in a directory of this process's own, then publish it by one rename: a build killed
    half-way leaves no lock behind for the next process to wait on (torch's own build lock would),
    and two processes building at once both succeed."""
    import shutil

    from torch.utils import cpp_extension

    for abandoned in directory.parent.glob(f"{directory.name}.partial-*"):
        try:
            os.kill(int(abandoned.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:  # its builder died
            shutil.rmtree(abandoned, ignore_errors=True)
        except (PermissionError, ValueError):
            pass
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    print(f"ppo_fast: building the native CPU kernels once, into {directory} (about a minute)", file=sys.stderr)
    cpp_extension.load(name="ppo_fast_native", sources=[str(s) for s in SOURCES], extra_cflags=FLAGS,
                       extra_ldflags=["-fopenmp"], build_directory=str(partial), verbose=verbose,
                       is_python_module=False)
    try:
        os.replace(partial, directory)
    except OSError:  # another process published its build first
        shutil.rmtree(partial, ignore_errors=True)


def _import(library: Path):
    import importlib.machinery

    loader = importlib.machinery.ExtensionFileLoader("ppo_fast_native", str(library))
    spec = importlib.util.spec_from_file_location("ppo_fast_native", library, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def unavailable(build: bool = True) -> str | None:
    """Why the native kernels cannot run here (None: they can; builds them on first use). With
    ``build=False`` (while torch.compile traces, which cannot follow a build) a build not yet
    tried counts as available: the op's first run outside the trace builds it."""
    if os.environ.get("PPO_FAST_NATIVE", "1") == "0":
        return "switched off by PPO_FAST_NATIVE=0"
    if not build and _module is None and _failure is None:
        return None
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def release_cache() -> None:
    """Give back the gradient buffer the native backward keeps between steps (the last freed
    ``[tokens, vocab]`` dlogits of 16 MiB or more, reused by the next backward of a size that fits;
    see ``empty_gradient_like`` in csrc/ppo_fast_cpu.cpp). A no-op when the kernels are not loaded."""
    if _module is not None:
        _module.release_gradient_cache()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        load(verbose=True)
        print(f"native CPU kernels built in {build_directory()}")
        return 0
    reason = unavailable()
    print("native CPU kernels: " + ("available" if reason is None else reason))
    return 0 if reason is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
