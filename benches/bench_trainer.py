"""The embedded default run over several seeds: gold-reward gain, KL, seconds per PPO step and the
share of each phase.

    python benches/bench_trainer.py --seeds 0 1 2 --out benches/results/trainer_cpu.md

Each seed is the README's main job (`ppo-fast train --seed S`) in a fresh process, timed whole
(warm-up and reward-model training included) and per phase from its metrics.jsonl.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train_run(workdir: Path, name: str, flags: list[str]) -> tuple[dict, list[dict]]:
    """``ppo-fast train --run-name NAME --output-dir WORKDIR FLAGS`` in a fresh process: its summary
    and its metrics rows (the benches of the trainer share this)."""
    out = subprocess.run([sys.executable, "-m", "ppo_fast.cli", "train", "--run-name", name, "--output-dir",
                          str(workdir), *flags], env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=workdir,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if out.returncode:
        raise RuntimeError(f"run {name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    return json.loads((workdir / name / "summary.json").read_text()), rows


def publish(lines: list[str], out: str | None) -> None:
    """Print a bench's report and write it to ``out`` when given (the benches share this)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


def run_seed(seed: int, workdir: Path, extra: list[str]) -> dict:
    start = time.perf_counter()
    summary, steps = train_run(workdir, f"seed{seed}", ["--seed", str(seed), *extra])
    wall = time.perf_counter() - start
    steps = [r for r in steps if "seconds_train" in r]
    phases = {name: statistics.mean(r[f"seconds_{name}"] for r in steps)
              for name in ("generate", "score", "train")}
    return {"seed": seed, "wall": wall, "summary": summary, "phases": phases}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None)
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_seed(s, Path(tmp), extra) for s in args.seeds]
    lines = [
        "# Embedded default run (`ppo-fast train`) over seeds",
        "",
        f"Measured with `python benches/bench_trainer.py --seeds {' '.join(map(str, args.seeds))}` on "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), one process per seed, "
        "one after another. Wall time includes start-up, the supervised warm-up and the reward "
        "model's training; step times are means over the PPO steps.",
        "",
        "| seed | gold before | gold after | proxy before | proxy after | KL final (nats/seq) | "
        "wall s | s/step | generate | score | train |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        s, p = r["summary"], r["phases"]
        step = sum(p.values())
        lines.append(
            f"| {r['seed']} | {s['gold_reward_before']:.2f} | {s['gold_reward_after']:.2f} | "
            f"{s['proxy_reward_before']:.2f} | {s['proxy_reward_after']:.2f} | {s['kl_final']:.1f} | "
            f"{r['wall']:.0f} | {step:.3f} | {100 * p['generate'] / step:.0f}% | "
            f"{100 * p['score'] / step:.0f}% | {100 * p['train'] / step:.0f}% |")
    gains = [r["summary"]["gold_reward_after"] - r["summary"]["gold_reward_before"] for r in results]
    lines += ["", f"Gold-reward gain: mean {statistics.mean(gains):.2f}, min {min(gains):.2f} "
              f"(the gold reward counts vowels in the response, about 1.4 for the warm-up policy)."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
