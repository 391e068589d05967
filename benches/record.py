"""What every benchmark here writes beside its numbers, and how: the median with the 20th and 80th
percentiles of its samples, and the provenance of a run (commit, exact command, machine, library
versions), so a figure can be traced to the code and the machine that produced it and marked
stale when that code changes.

Each bench builds its results as plain data and calls ``publish(out, data, render)``: the data and
the metadata go to ``<out>.json``, and ``render`` turns the data, read back from that JSON, into the
markdown written to ``<out>.md`` (so the table can never say what the data does not).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
LIBRARIES = ("ppo_fast", "torch", "triton", "transformers", "deepspeed", "liger-kernel")


def summary(samples) -> dict:
    """Median, 20th and 80th percentiles (linear interpolation between order statistics) and count."""
    samples = sorted(float(s) for s in samples)
    if not samples:
        raise ValueError("summary() needs at least one sample, got none")
    if len(samples) == 1:
        return {"median": samples[0], "p20": samples[0], "p80": samples[0], "n": 1}
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return {"median": statistics.median(samples), "p20": deciles[1], "p80": deciles[7], "n": len(samples)}


def commit() -> str:
    """The commit measured: PPO_FAST_BENCH_COMMIT when the caller knows it (gpu.sh runs from a copy
    of the benches with no .git), else this checkout's HEAD, with "+dirty" when tracked files differ."""
    if os.environ.get("PPO_FAST_BENCH_COMMIT"):
        return os.environ["PPO_FAST_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def command() -> str:
    """This process's command line as it was typed: ``python -m pytest ...`` rather than the path of
    pytest's ``__main__.py``, a console script by its name."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "__main__.py":
        head = ["python", "-m", argv0.parent.name]
    elif argv0.suffix == ".py":
        head = ["python", os.path.relpath(argv0) if argv0.is_absolute() else str(argv0)]
    else:
        head = [argv0.name]
    return shlex.join([*head, *sys.argv[1:]])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata() -> dict:
    """Provenance of this process's measurements."""
    torch = sys.modules.get("torch")
    versions = {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}}
    if torch is not None:  # the running build (e.g. 2.11.0+cu130), which pip metadata may not name
        versions["torch"] = torch.__version__
    return {
        "commit": commit(),
        "command": command(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads() if torch is not None else None,
                    "gpu": _gpu_name(), "os": platform.platform()},
        "versions": versions,
    }


def provenance_lines(meta: dict) -> list[str]:
    """The metadata as a markdown paragraph."""
    machine = meta["machine"]
    where = f"{machine['cpu']} ({machine['cores']} cores"
    where += f", {machine['threads']} threads)" if machine.get("threads") else ")"
    if machine.get("gpu"):
        where += f", GPU {machine['gpu']}"
    versions = ", ".join(f"{name} {version}" for name, version in meta["versions"].items() if version)
    return [f"Commit `{meta['commit']}`, {meta['date']}: `{meta['command']}` on {where}; {versions}. "
            "Data (medians with 20th/80th percentiles) in the JSON file of the same name."]


def fmt(stats: dict, scale: float = 1.0, digits: int = 1) -> str:
    """``median (p20-p80)`` of a summary, each value times ``scale``."""
    return (f"{stats['median'] * scale:.{digits}f} ({stats['p20'] * scale:.{digits}f}-"
            f"{stats['p80'] * scale:.{digits}f})")


def publish(out: str | Path | None, data: dict, render: Callable[[dict], list[str]]) -> str:
    """Write ``data`` with the metadata to ``out`` (``.json``) and its markdown (``.md``), print the
    markdown, and return it. ``out`` may name either file or neither (print only)."""
    doc = json.loads(json.dumps({"metadata": metadata(), **data}))
    lines = render(doc)
    title = 1 if lines and lines[0].startswith("#") else 0
    text = "\n".join([*lines[:title], "", *provenance_lines(doc["metadata"]), *lines[title:]]) + "\n"
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)
    return text
