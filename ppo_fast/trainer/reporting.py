"""What a run reports: a row per step in ``metrics.jsonl`` (and TensorBoard when installed), a
progress bar on rank 0, and at the end ``summary.json``, ``rewards.png`` and a short table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .config import GROUPED


def _is_row(line: str) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and isinstance(row.get("step"), int)


class Reporter:
    """Rank 0 writes; every rank keeps the history (it is checkpointed with the trainer state)."""

    def __init__(self, run_dir: Path, rank: int, log=print):
        self.run_dir, self.rank, self.log = run_dir, rank, log
        self.history: list[dict] = []
        self._tensorboard = None

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def start_fresh(self) -> None:
        if self.rank == 0:
            self.metrics_path.write_text("")

    def restore(self, history: list[dict]) -> None:
        """Resume with the rows a checkpoint holds. ``metrics.jsonl`` is rewritten from them in
        one atomic replace: rows of steps after the checkpoint (lost with the crash, redone now)
        go, and so do lines a kill tore or that something else garbled, with a warning."""
        self.history = list(history)
        if self.rank != 0:
            return
        expected = [json.dumps(row) for row in self.history]
        on_disk = []
        if self.metrics_path.exists():
            text = self.metrics_path.read_bytes().decode("utf-8", errors="replace")
            on_disk = [line for line in text.splitlines() if line.strip()]
        unreadable = sum(1 for line in on_disk if not _is_row(line))
        if on_disk[:len(expected)] != expected:
            self.log(f"warning: {self.metrics_path} did not match the checkpoint's rows "
                     f"({len(on_disk)} lines, {unreadable} of them not a metrics row, e.g. torn by "
                     f"a kill); rewritten from the checkpoint ({len(expected)} rows)")
        elif len(on_disk) > len(expected):
            dropped = len(on_disk) - len(expected) - unreadable
            self.log(f"{self.metrics_path}: dropped {dropped} rows of steps after the checkpoint "
                     f"(they are redone) and {unreadable} unreadable lines (torn by a kill)")
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in expected))
        os.replace(tmp, self.metrics_path)

    def write_config(self, config: dict) -> None:
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(json.dumps(config, indent=2))

    def row(self, row: dict) -> None:
        self.history.append(row)
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")  # one write: a kill tears at most this line
            f.flush()
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self._tensorboard = False
        if self._tensorboard:
            for name, value in row.items():
                if isinstance(value, (int, float)) and name != "step":
                    self._tensorboard.add_scalar(name, value, row["step"])

    def progress(self, total: int, initial: int, algorithm: str):
        if self.rank != 0:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=initial, desc=algorithm.upper(), unit="step", dynamic_ncols=True)

    def summary(self, steps_done: int, seconds: float, checkpoint: Path,
                nonfinite_skipped: int) -> dict:
        steps = [r for r in self.history if r["step"] > 0]
        evals = [r for r in self.history if "eval_proxy_reward" in r]
        first, last = (evals[0], evals[-1]) if evals else ({}, {})

        def mean(name):
            return float(np.mean([r[name] for r in steps])) if steps else 0.0

        return {
            "run_dir": str(self.run_dir),
            "steps": steps_done,
            "gold_reward_before": first.get("eval_gold_reward"),
            "gold_reward_after": last.get("eval_gold_reward"),
            "proxy_reward_before": first.get("eval_proxy_reward"),
            "proxy_reward_after": last.get("eval_proxy_reward"),
            "kl_final": steps[-1]["kl"] if steps else 0.0,
            "seconds_total": seconds,
            "tokens_per_second_generate": mean("tokens_per_second_generate"),
            "tokens_per_second_train": mean("tokens_per_second_train"),
            "generate_share": mean("generate_share"),
            "nonfinite_skipped": nonfinite_skipped,
            "checkpoint": str(checkpoint),
        }

    def finish(self, summary: dict) -> None:
        if self.rank != 0:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._plot()
        self.log(format_summary(summary))

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("matplotlib is not installed: no plot (pip install 'ppo-fast[train]')")
            return
        evals = [r for r in self.history if "eval_proxy_reward" in r]
        steps = [r for r in self.history if "kl" in r]
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        (ax1, ax2), (ax3, ax4) = axes
        at = [r["step"] for r in evals]
        if evals and "eval_gold_reward" in evals[0]:
            ax1.plot(at, [r["eval_gold_reward"] for r in evals], "o-", label="gold reward")
        ax1.plot(at, [r["eval_proxy_reward"] for r in evals], "s--", label="trained reward (proxy)")
        ax1.set_title("reward on held-out prompts")
        ax2.plot([r["step"] for r in steps], [r["kl"] for r in steps], label="KL to reference, rollouts (nats/seq)")
        if evals and "eval_kl" in evals[0]:
            ax2.plot(at, [r["eval_kl"] for r in evals], "o", label="KL on held-out prompts")
        ax2.set_title("KL")
        if evals and "eval_length_r2" in evals[0]:
            ax3.plot(at, [r["eval_length_r2"] for r in evals], "o-", label="length R² of the trained reward")
            ax3.plot(at, [r["eval_distinct_2"] for r in evals], "s--", label="distinct-2")
            ax3.plot(at, [r["eval_repetition"] for r in evals], "^:", label="repetition")
            ax4.plot(at, [r["eval_response_length"] for r in evals], "o-", label="response length (tokens)")
            ax4.plot(at, [r["eval_reward_per_token"] for r in evals], "s--", label="trained reward per token")
        ax3.set_title("reward-hacking diagnostics")
        ax4.set_title("length")
        for ax in axes.flat:
            ax.set_xlabel("step")
            for name in ("divergence", "length", "kl"):
                fired = [r["step"] for r in evals if r.get(f"alarm_{name}")]
                if fired:
                    ax.axvline(fired[0], color="red", alpha=0.4, linestyle=":")
            if ax.has_data():
                ax.legend(fontsize=8)
        fig.suptitle("red dotted lines: first step of a reward-hacking alarm" if any(
            r.get(f"alarm_{n}") for r in evals for n in ("divergence", "length", "kl")) else "")
        fig.tight_layout()
        fig.savefig(self.run_dir / "rewards.png", dpi=100)
        plt.close(fig)


def _this_process(s: dict) -> str:
    """This process's share of a resumed run (nothing for a run done in one process)."""
    part = s.get("this_process")
    if not part or not part["from_step"]:
        return ""
    return (f" (this process resumed it at step {part['from_step']}: {part['steps']} steps in "
            f"{part['seconds']:.0f} s)")


def format_summary(s: dict) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    rows = [("gold reward", s["gold_reward_before"], s["gold_reward_after"]),
            ("proxy reward", s["proxy_reward_before"], s["proxy_reward_after"])]
    lines = [""]
    if "algorithm" in s:
        group = s["samples_per_prompt"]
        lines.append(f"{s['algorithm']}: {group} completion{'s' if group > 1 else ''} per prompt"
                     + (" (the group its advantages compare; samples_per_prompt)" if s["algorithm"] in GROUPED
                        else ""))
    lines.append(f"{'':14}{'before':>10}{'after':>10}")
    lines += [f"{name:14}{fmt(a):>10}{fmt(b):>10}" for name, a, b in rows]
    target = f" (target {s['kl_target']:g})" if s.get("kl_target") else ""
    lines += [f"KL to the reference at the end: {fmt(s['kl_final'])} nats per sequence{target}",
              f"{s['steps']} steps in {s['seconds_total']:.0f} s{_this_process(s)}; generation "
              f"{s['tokens_per_second_generate']:.0f} tokens/s, training "
              f"{s['tokens_per_second_train']:.0f} tokens/s, {100 * s['generate_share']:.0f}% of "
              f"each step generating",
              f"run directory: {s['run_dir']} (metrics.jsonl, summary.json, rewards.png, "
              f"checkpoints/, final_policy/{', best_policy/' if s.get('best_policy') else ''})"]
    alarms = s.get("alarms") or {}
    lines.append("reward-hacking alarms: " + (", ".join(f"{name} (first at step {step})" for name, step in
                                                        alarms.items()) if alarms else "none"))
    return "\n".join(lines)
