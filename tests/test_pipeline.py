"""The README's chain on the sample data, sft → rm → train → eval, through the command line, with
fewer steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from helpers import subprocess_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = "examples/sample"


def main(args: list[str]) -> int:
    """``ppo-fast ARGS`` from the repository root (the chain names its files from there, as in the
    README), in a process of its own as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "ppo_fast.cli", *args], env=subprocess_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.returncode


@pytest.mark.slow
def test_the_sample_chain_runs_end_to_end(tmp_path):
    out = ["--output-dir", str(tmp_path)]
    assert main(["sft", "--model", f"{SAMPLE}/base", "--data", f"{SAMPLE}/sft.jsonl", "--run-name", "sft",
                 "--max-steps", "40", *out]) == 0
    assert main(["rm", "--model", str(tmp_path / "sft" / "model"), "--data", f"{SAMPLE}/prefs.jsonl",
                 "--run-name", "rm", "--max-steps", "20", *out]) == 0
    assert main(["train", "--config", f"{SAMPLE}/train.yaml", "--policy-model", str(tmp_path / "sft" / "model"),
                 "--reward", str(tmp_path / "rm" / "model"), "--run-name", "grpo", "--steps", "2",
                 "--eval-every", "2", *out]) == 0
    train = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert train["algorithm"] == "grpo" and train["gold_reward_after"] is not None
    assert not (tmp_path / "grpo" / "checkpoints" / "step2" / "critic").exists()
    assert main(["eval", "--policy", str(tmp_path / "grpo" / "final_policy"), "--reference",
                 str(tmp_path / "sft" / "model"), "--prompts", f"{SAMPLE}/eval_prompts.jsonl",
                 "--samples-per-prompt", "2", "--max-new-tokens", "12", "--reward", str(tmp_path / "rm" / "model"),
                 "--gold", f"{SAMPLE}/reward.py:exact_sum", "--run-name", "eval", *out]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["prompts"] == 20 and summary["samples"] == 40
    assert {"win_rate_reward", "win_rate_gold"} <= set(summary)
    assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 40


def test_the_chain_script_names_the_files_the_test_uses():
    script = (ROOT / SAMPLE / "chain.sh").read_text()
    for name in ("base", "sft.jsonl", "prefs.jsonl", "train.yaml", "eval_prompts.jsonl", "reward.py:exact_sum"):
        assert f"{SAMPLE}/{name}" in script, name
