"""What exact rollouts cost in the trainer: seconds per PPO step of the embedded default task with
batch_invariant off, on (old log-probs recomputed), and on with the rollout's log-probs serving as
the old ones (the actor forward they save), steps alternating so all three see the same machine.

    python benches/bench_on_policy.py --out benches/results/on_policy_cpu.md

Three trainers of the default task (its cached models, the README's main job) are built side by
side; each round runs one PPO step of each. The first round warms up and is dropped. The ratio
columns divide each round's time by the same round's mode-off time.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import ppo_fast as pf
from ppo_fast.trainer import PPOConfig, PPOTrainer, build_components

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import fmt, publish, summary  # noqa: E402

SETTINGS = {
    "off": dict(batch_invariant=False, old_logprobs="recompute"),
    "on, recomputed": dict(batch_invariant=True, old_logprobs="recompute"),
    "on, from the rollout": dict(batch_invariant=True, old_logprobs="rollout"),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench_on_policy_"))
    trainers = {}
    for i, (name, setting) in enumerate(SETTINGS.items()):
        config = PPOConfig(output_dir=str(workdir), run_name=f"run{i}", steps=args.rounds + 1, eval_every=0,
                           save_every=0, **setting)
        trainers[name] = PPOTrainer(config, build_components(config))
    seconds = {name: [] for name in SETTINGS}
    mismatch = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds + 1):
        for name, trainer in trainers.items():
            if trainer.config.batch_invariant:
                pf.enable_batch_invariant()
            try:
                start = time.perf_counter()
                row = trainer.one_step()
                took = time.perf_counter() - start
            finally:
                if trainer.config.batch_invariant:
                    pf.disable_batch_invariant()
            if round_:
                seconds[name].append(took)
                mismatch[name].append(row["rollout_logp_max_abs_diff"])
    config = next(iter(trainers.values())).config
    data = {"rounds": args.rounds, "threads": torch.get_num_threads(),
            "rollout": config.rollout_batch_size * config.samples_per_prompt, "max_new_tokens": config.max_new_tokens, "settings": {}}
    for name in SETTINGS:
        data["settings"][name] = {
            "step_seconds": summary(seconds[name]),
            "ratio_to_off": summary(t / off for t, off in zip(seconds[name], seconds["off"])),
            "max_abs_logp_mismatch": max(mismatch[name]),
        }
    publish(args.out, data, render)


def render(doc):
    lines = ["# Exact rollouts in the trainer: seconds per PPO step, batch_invariant off vs on", "",
             f"The embedded default task (the README's main job: {doc['rollout']} sequences a step, up to "
             f"{doc['max_new_tokens']} new tokens each), one step of each setting per round, "
             f"{doc['rounds']} rounds after one warm-up round, {doc.get('threads', '?')} torch threads. Medians "
             "(20th-80th percentile); the ratio is "
             "each round's time over the same round's mode-off time. The mismatch is the largest "
             "|rollout log-prob − trainer log-prob| of any step (measured on one micro-batch when the "
             "old log-probs come from the rollout).", "",
             "| setting | s/step | time ÷ off | max \\|Δlogp\\| |", "| --- | --- | --- | --- |"]
    for name, s in doc["settings"].items():
        lines.append(f"| {name} | {fmt(s['step_seconds'], digits=3)} | {fmt(s['ratio_to_off'], digits=2)}× | "
                     f"{s['max_abs_logp_mismatch']:.3g} |")
    return lines


if __name__ == "__main__":
    main()
