"""What every benchmark here measures the same way: device sync, a median timer, peak extra
memory, and the two ceilings that floors divide by (copy bandwidth and matmul rate), measured on
the machine at hand rather than read from a datasheet."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from record import summary


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Milliseconds of ``fn()``: CUDA events through ``triton.testing.do_bench`` on a GPU, a host
    clock around synchronised calls elsewhere. ``measure`` gives the median with the 20th/80th
    percentiles, calling the timer gives the median."""

    def __init__(self, device, repeats: int = 5):
        self.device = torch.device(device)
        self.repeats = repeats

    def measure(self, fn) -> dict:
        if self.device.type == "cuda":
            import triton.testing

            # do_bench keeps its samples to itself: it returns the quantiles asked for.
            median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
            return {"median": float(median), "p20": float(p20), "p80": float(p80), "n": None}
        fn()
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            sync(self.device)
            samples.append((time.perf_counter() - start) * 1e3)
        return summary(samples)

    def __call__(self, fn) -> float:
        return self.measure(fn)["median"]


def peak_extra_bytes(run, device) -> int | None:
    """Bytes allocated above what was live before one call of ``run``, at the peak (CUDA only)."""
    if torch.device(device).type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = run()
    sync(device)
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def copy_bandwidth(device, timer: Timer, n_bytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write."""
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n_bytes / (ms * 1e-3)


def matmul_rate(device, timer: Timer, size: int = 1024) -> float:
    """FLOP/s of a square matmul on random data (bf16 on CUDA, float32 elsewhere)."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = timer(lambda: a @ b)
    return 2 * size**3 / (ms * 1e-3)


def l2_bytes(device) -> int:
    if torch.device(device).type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20))


def process_status_bytes(field: str) -> int:
    """A memory field of this process's /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")
