"""The embedded default run over several seeds: gold-reward gain, KL, seconds per PPO step and the
share of each phase.

    python benches/bench_trainer.py --seeds 0 1 2 --out benches/results/trainer_cpu.md

Each seed is the README's main job (`ppo-fast train --seed S`) in a fresh process, timed whole
(warm-up and reward-model training included) and per phase from its metrics.jsonl.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import fmt, publish, summary


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


def run_seed(seed: int, workdir: Path, extra: list[str]) -> dict:
    start = time.perf_counter()
    run_summary, steps = train_run(workdir, f"seed{seed}", ["--seed", str(seed), *extra])
    wall = time.perf_counter() - start
    steps = [r for r in steps if "seconds_train" in r]
    phases = {name: statistics.mean(r[f"seconds_{name}"] for r in steps)
              for name in ("generate", "score", "train")}
    step_seconds = summary(sum(r[f"seconds_{name}"] for name in phases) for r in steps)
    return {"seed": seed, "wall": wall, "summary": run_summary, "phases": phases, "step_seconds": step_seconds}


def render(doc: dict) -> list[str]:
    lines = [
        "# Embedded default run (`ppo-fast train`) over seeds",
        "",
        "One process per seed, one after another. Wall time includes start-up, the supervised warm-up and the "
        "reward model's training; phase shares are of the mean PPO step; s/step is the median (20th-80th "
        "percentile) over the PPO steps.",
        "",
        "| seed | gold before | gold after | proxy before | proxy after | KL final (nats/seq) | "
        "wall s | s/step | generate | score | train |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["runs"]:
        s, p = r["summary"], r["phases"]
        step = sum(p.values())
        lines.append(
            f"| {r['seed']} | {s['gold_reward_before']:.2f} | {s['gold_reward_after']:.2f} | "
            f"{s['proxy_reward_before']:.2f} | {s['proxy_reward_after']:.2f} | {s['kl_final']:.1f} | "
            f"{r['wall']:.0f} | {fmt(r['step_seconds'], digits=3)} | {100 * p['generate'] / step:.0f}% | "
            f"{100 * p['score'] / step:.0f}% | {100 * p['train'] / step:.0f}% |")
    gains = doc["gold_gain"]
    lines += ["", f"Gold-reward gain: median {fmt(gains, digits=2)}, mean {gains['mean']:.2f}, min "
              f"{gains['min']:.2f} (the gold reward counts vowels in the response, about 1.4 for the warm-up "
              "policy)."]
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None)
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_seed(s, Path(tmp), extra) for s in args.seeds]
    gains = [r["summary"]["gold_reward_after"] - r["summary"]["gold_reward_before"] for r in results]
    publish(args.out, {"runs": results, "gold_gain": {**summary(gains), "mean": statistics.mean(gains),
                                                      "min": min(gains)}}, render)


if __name__ == "__main__":
    main()
