"""PPO against a critic-free algorithm on the embedded default task, seeds side by side, each run
given the same wall-clock budget of training.

    python benches/bench_algorithms.py --seeds 0 1 2 --minutes 0.25 --out benches/results/algorithms_cpu.md

Each run is `ppo-fast train --seed S --algorithm A --max-minutes M` in a fresh process (steps are
not capped: the budget decides how many fit), one after another. PPO rolls out 32 prompts per step
and trains a critic; GRPO rolls out 8 prompts x 4 samples (the same 32 sequences per step) and
trains none. Everything else is the default.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

from bench_trainer import train_run
from record import fmt, publish, summary

ALGORITHMS = {
    "ppo": [],
    "grpo": ["--samples-per-prompt", "4", "--rollout-batch-size", "8"],
}


def run(algorithm: str, seed: int, minutes: float, workdir: Path, cache: Path) -> dict:
    summary, _ = train_run(workdir, f"{algorithm}-seed{seed}", [
        "--seed", str(seed), "--algorithm", algorithm, *ALGORITHMS[algorithm], "--steps", "100000",
        "--max-minutes", str(minutes), "--save-every", "0", "--cache-dir", str(cache)])
    return summary


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=0.25)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        runs = [{"algorithm": a, "seed": s, "summary": run(a, s, args.minutes, workdir, workdir / "cache")}
                for s in args.seeds for a in ALGORITHMS]
    gains = {}
    for algorithm in ALGORITHMS:
        g = [r["summary"]["gold_reward_after"] - r["summary"]["gold_reward_before"] for r in runs
             if r["algorithm"] == algorithm]
        gains[algorithm] = {**summary(g), "mean": statistics.mean(g), "min": min(g)}
    publish(args.out, {"minutes": args.minutes, "runs": runs, "gold_gain": gains}, render)


def render(doc: dict) -> list[str]:
    lines = [
        f"# PPO and GRPO on the embedded default, {60 * doc['minutes']:g} s of training each",
        "",
        "One process per run, one after another. The budget counts the training steps (evaluations included), "
        "not the start-up or the cached warm-up. GRPO: 8 prompts x 4 samples per step, no critic; PPO: 32 "
        "prompts, GAE with a critic. Gold: vowels per response (evaluation only).",
        "",
        "| algorithm | seed | steps | gold before | gold after | proxy before | proxy after | KL final (nats/seq) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["runs"]:
        s = r["summary"]
        lines.append(f"| {r['algorithm']} | {r['seed']} | {s['steps']} | {s['gold_reward_before']:.2f} | "
                     f"{s['gold_reward_after']:.2f} | {s['proxy_reward_before']:.2f} | {s['proxy_reward_after']:.2f} | "
                     f"{s['kl_final']:.1f} |")
    lines.append("")
    for algorithm, g in doc["gold_gain"].items():
        lines.append(f"{algorithm}: gold gain median {fmt(g, digits=2)}, mean {g['mean']:.2f}, min {g['min']:.2f}.")
    return lines


if __name__ == "__main__":
    main()
