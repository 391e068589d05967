"""Collect ``bench_*.py`` here (the repo's ``python_files`` only matches ``test_*.py``), share the
device, shapes and the measuring helper with the benchmark modules, and with ``--bench-out FILE``
write every timed case (median and 20th/80th percentile of its rounds) as FILE.json and the table
rendered from it as FILE.md:

    pytest benches/ --benchmark-enable --bench-out benches/results/cpu.md
"""

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
from record import fmt, publish, summary  # noqa: E402

CASES: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--bench-out", default=None,
                     help="write the timed cases to this file (.json data and .md table beside it)")


def render(doc: dict) -> list[str]:
    lines = ["# Benchmark suite (pytest-benchmark)", "",
             f"Device {doc['device']}; median (20th-80th percentile) of the rounds in ms, input sets rotated. "
             "Ratio = eager median / this median (> 1 is faster).", "",
             "| op | provider | backend | median ms (p20-p80) | rounds | GB/s (min bytes) | vs eager |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    eager = {c["group"]: c["ms"]["median"] for c in doc["cases"] if c["provider"] == "eager"}
    for c in doc["cases"]:
        ratio = f"{eager[c['group']] / c['ms']['median']:.2f}" if c["group"] in eager else ""
        lines.append(f"| {c['group']} | {c['provider']} | {c['backend']} | {fmt(c['ms'], digits=3)} | "
                     f"{c['ms']['n']} | {c['GB/s']:.1f} | {ratio} |")
    return lines


def pytest_sessionfinish(session):
    out = session.config.getoption("--bench-out", default=None)
    if out and CASES:
        publish(out, {"device": str(DEVICE), "cases": CASES}, render)


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself: collecting it here too would
    # run (and record) every case twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and file_path.name != "bench_providers.py" and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def measure(benchmark, request):
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
            CASES.append({"group": group, "provider": request.node.callspec.id, "backend": backend_label,
                          "ms": summary(1e3 * t for t in benchmark.stats.stats.data), "bytes": n_bytes,
                          "GB/s": benchmark.extra_info["GB/s"],
                          "peak_extra_MiB": benchmark.extra_info.get("peak_extra_MiB")})

    return run_benchmark
