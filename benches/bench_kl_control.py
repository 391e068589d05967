"""How well the adaptive KL controller holds its target on the embedded default run, over seeds.

    python benches/bench_kl_control.py --seeds 0 1 2 --out benches/results/kl_control_cpu.md [--flag value ...]

Each seed is `ppo-fast train --seed S [flags]` in a fresh process (the default run unless flags
are given). The question is the issue's: after the first few steps (--settle), is the rollout KL
(nats per sequence, the `kl` of metrics.jsonl, which the controller reads) within ±50% of
target_kl at every step, and does any reward-hacking alarm fire? The per-step KL, β and
evaluation KL of every seed go to a JSON file beside the markdown report.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_trainer import train_run
from record import publish


def render(doc: dict) -> list[str]:
    target, settle = doc["target_kl"], doc["settle"]
    lines = [
        "# The adaptive KL controller on the default run (`ppo-fast train`)",
        "",
        ("Reported from finished run directories (their wall time is not known)." if doc["from_run_dirs"]
         else "One process per seed, one after another."),
        "",
        f"Target KL {target:g} nats per sequence; band ±50%: [{0.5 * target:g}, {1.5 * target:g}], checked "
        f"from step {settle + 1} on.",
        "",
        "| seed | first step in band | steps outside the band after settling | max KL after settling (step) | "
        "KL at the end | final β | gold before → after | alarms | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in doc["runs"]:
        steps = [r for r in run["steps"] if r["step"] > 0]
        inside = [abs(r["kl"] / target - 1) <= 0.5 for r in steps]
        first = next((r["step"] for r, ok in zip(steps, inside) if ok), None)
        late = [r for r in steps if r["step"] > settle]
        outside = [r["step"] for r in late if abs(r["kl"] / target - 1) > 0.5]
        peak = max(late, key=lambda r: r["kl"])
        s = run["summary"]
        alarms = ", ".join(f"{k} at step {v}" for k, v in s["alarms"].items()) or "none"
        lines.append(f"| {run['seed']} | {first} | {len(outside)} {outside if outside else ''} | "
                     f"{peak['kl']:.1f} ({peak['step']}) | {steps[-1]['kl']:.1f} | {steps[-1]['kl_coef']:.3f} | "
                     f"{s['gold_reward_before']:.2f} → {s['gold_reward_after']:.2f} | {alarms} | "
                     f"{'-' if run['wall_seconds'] is None else format(run['wall_seconds'], '.0f')} |")
    runs = doc["runs"]
    lines += ["", "Rollout KL per step (nats per sequence):", "",
              "| step | " + " | ".join(f"seed {run['seed']} KL | β" for run in runs) + " |",
              "| --- | " + " | ".join("--- | ---" for _ in runs) + " |"]
    for i, step in enumerate(r["step"] for r in runs[0]["steps"]):
        if step == 0:
            continue
        cells = [f"{run['steps'][i]['kl']:.1f} | {run['steps'][i]['kl_coef']:.3f}" for run in runs]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settle", type=int, default=8, help="steps before the ±50%% band is checked")
    parser.add_argument("--out", default=None)
    parser.add_argument("--run-dirs", nargs="+", default=None,
                        help="report these finished run directories (one per seed, in --seeds order) instead of "
                             "training; their wall time is not known")
    args, flags = parser.parse_known_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(args.seeds):
            start = time.perf_counter()
            if args.run_dirs:
                run_dir = Path(args.run_dirs[i])
                summary = json.loads((run_dir / "summary.json").read_text())
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            else:
                summary, rows = train_run(Path(tmp), f"seed{seed}", ["--seed", str(seed), *flags])
            runs.append({"seed": seed, "wall_seconds": None if args.run_dirs else time.perf_counter() - start,
                         "summary": summary,
                         "steps": [{k: r[k] for k in ("step", "kl", "kl_coef") if k in r}
                                   | ({"eval_kl": r["eval_kl"]} if "eval_kl" in r else {}) for r in rows]})
    publish(args.out, {"target_kl": runs[0]["summary"]["kl_target"], "settle": args.settle,
                       "from_run_dirs": bool(args.run_dirs), "runs": runs}, render)


if __name__ == "__main__":
    sys.exit(main())
