"""Collect ``bench_*.py`` here (the repo's ``python_files`` only matches ``test_*.py``) and share
the device, shapes and the measuring helper with the benchmark modules."""

from __future__ import annotations

import itertools
import os

# Inductor's pool of compile workers keeps running after the first torch.compile and steals
# cores from whatever is timed next (seen here: a 0.7 ms case measured at 40 ms on 2 cores).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402

from bench_providers import SUITE_DEVICE as DEVICE  # noqa: E402
from bench_providers import Unavailable  # noqa: E402
from floors import peak_extra_bytes, sync  # noqa: E402


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and file_path.name != "bench_providers.py":
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def measure(benchmark):
    """measure(group, provider, make, input_sets, n_bytes, backend_label): benchmark
    ``make(inputs)()`` rotating over the input sets; record the backend that ran, the peak extra
    memory and the achieved bandwidth in ``extra_info``."""

    def run_benchmark(group, provider, make, input_sets, n_bytes, backend_label):
        try:
            runs = [make(inputs) for inputs in input_sets]
            runs[0]()  # compiles / autotunes outside the timing; fails early if unsupported
        except Unavailable as exc:
            pytest.skip(str(exc))
        except Exception as exc:  # torch.compile failures surface at the first call
            if provider == "compiled":
                pytest.skip(f"torch.compile failed here: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        benchmark.group = group
        benchmark.extra_info["device"] = str(DEVICE)
        benchmark.extra_info["backend"] = backend_label
        benchmark.extra_info["bytes"] = n_bytes
        if DEVICE.type == "cuda":
            benchmark.extra_info["peak_extra_MiB"] = peak_extra_bytes(runs[0], DEVICE) / 2**20
        rotation = itertools.cycle(runs)

        def one_call():
            out = next(rotation)()
            sync(DEVICE)
            return out

        benchmark(one_call)
        if benchmark.stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["GB/s"] = n_bytes / benchmark.stats.stats.median / 1e9

    return run_benchmark
