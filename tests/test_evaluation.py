"""``ppo-fast eval``: samples, scores, win rates and KL of a policy against a reference."""

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from helpers import subprocess_env  # noqa: E402

from ppo_fast.trainer import default_task  # noqa: E402
from ppo_fast.trainer.config import ConfigError  # noqa: E402
from ppo_fast.trainer.evaluation import EvalConfig, evaluate  # noqa: E402


def cli(args, cwd):
    """``ppo-fast ARGS`` in a process of its own (a command tears its process group down)."""
    return subprocess.run([sys.executable, "-m", "ppo_fast.cli", *args], env=subprocess_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    for name, steps in (("a", 30), ("b", 5)):
        default_task.warm_up_policy(steps, 0, log=lambda *a: None, task="arithmetic").save_pretrained(root / name)
        default_task.char_tokenizer(default_task.DIGITS).save_pretrained(root / name)
    # A model of another tokenizer: policy a's weights, the letters' tokenizer.
    shutil.copytree(root / "a", root / "letters")
    default_task.char_tokenizer().save_pretrained(root / "letters")
    return root


@pytest.mark.slow
def test_a_policy_against_itself_ties_with_zero_kl(policies, tmp_path):
    config = EvalConfig(policy=str(policies / "a"), reference=str(policies / "a"), task="arithmetic",
                        output_dir=str(tmp_path), run_name="self", num_prompts=20, max_new_tokens=6,
                        batch_size=8)
    summary = evaluate(config, log=lambda *a: None)
    assert summary["win_rate_reward"] == 0.5 and summary["win_rate_gold"] == 0.5
    assert summary["policy"]["kl"] == 0.0
    assert summary["policy"]["gold_reward"] == summary["reference"]["gold_reward"]
    records = [json.loads(line) for line in (tmp_path / "self" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 20 and records[0]["policy"]["completion"] == records[0]["reference"]["completion"]
    assert set(records[0]["policy"]) == {"completion", "length", "reward", "gold", "kl"}
    assert (tmp_path / "self" / "eval.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_command_line_scores_with_a_weighted_reward_and_a_gold_function(policies, tmp_path):
    (tmp_path / "rules.py").write_text(
        "def exact(prompts, completions):\n"
        "    return [float(c.strip() == str(eval(p.rstrip('=')))) for p, c in zip(prompts, completions)]\n"
        "def length(prompts, completions):\n"
        "    return [float(len(c)) for c in completions]\n")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{b}="}) + "\n"
                                                    for a in range(4) for b in range(3)))
    out = cli(["eval", "--policy", str(policies / "a"), "--reference", str(policies / "b"),
               "--prompts", "prompts.jsonl", "--reward", "rules:exact,0.1*rules:length", "--gold", "rules:exact",
               "--output-dir", str(tmp_path), "--run-name", "cli", "--max-new-tokens", "6"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    policy = summary["policy"]
    assert summary["prompts"] == 12 and 0 <= summary["win_rate_gold"] <= 1
    assert policy["proxy_reward"] == pytest.approx(policy["reward[rules:exact]"]
                                                   + 0.1 * policy["reward[0.1*rules:length]"])
    assert policy["gold_reward"] == policy["reward[rules:exact]"]
    assert summary["policy_dir"] == str(policies / "a") and summary["reference_dir"] == str(policies / "b")
    assert "win rate gold of the policy over the reference" in out.stdout


@pytest.mark.slow
def test_without_a_reference_and_with_a_failing_reward(policies, tmp_path):
    (tmp_path / "rules.py").write_text("def nan(prompts, completions):\n    return [float('nan')] * len(prompts)\n")
    out = cli(["eval", "--policy", str(policies / "a"), "--task", "arithmetic", "--num-prompts", "8",
               "--max-new-tokens", "6", "--output-dir", str(tmp_path), "--run-name", "alone"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert summary["reference_dir"] is None and "reference" not in summary and "kl" not in summary["policy"]
    out = cli(["eval", "--policy", str(policies / "a"), "--task", "arithmetic", "--reward", "rules:nan",
               "--num-prompts", "8", "--max-new-tokens", "6", "--output-dir", str(tmp_path), "--run-name", "nan"],
              cwd=tmp_path)
    assert out.returncode == 2 and "the reward is not finite: rules:nan gave nan" in out.stderr
    assert not (tmp_path / "nan" / "summary.json").exists()


@pytest.mark.slow
def test_eval_errors_name_the_field(policies, tmp_path):
    with pytest.raises(ConfigError, match="policy is required"):
        EvalConfig(prompts="p.txt", gold="x:y")
    with pytest.raises(ConfigError, match="nothing to score with"):
        EvalConfig(policy="p", prompts="p.txt")
    with pytest.raises(ConfigError, match="reference: .* tokenizes differently from the policy"):
        evaluate(EvalConfig(policy=str(policies / "a"), reference=str(policies / "letters"), task="arithmetic",
                            output_dir=str(tmp_path), num_prompts=4, max_new_tokens=6), log=lambda *a: None)
    with pytest.raises(ConfigError, match="task: the rules of task 'vowels' read the token ids of its own"):
        evaluate(EvalConfig(policy=str(policies / "a"), task="vowels", output_dir=str(tmp_path), num_prompts=4,
                            max_new_tokens=6), log=lambda *a: None)
    out = cli(["eval", "--policy", str(tmp_path / "absent"), "--task", "arithmetic"], cwd=tmp_path)
    assert out.returncode == 2 and "policy: " in out.stderr


def test_prompts_beyond_the_policys_context_are_refused_before_any_work(tmp_path):
    """Each prompt with max_new_tokens must fit the policy's context: checked from its config before
    the run directory is made or a model loads."""
    from transformers import LlamaForCausalLM

    policy = tmp_path / "policy"
    tokenizer = default_task.char_tokenizer(default_task.DIGITS)
    LlamaForCausalLM(default_task.llama_config(tokenizer.vocab_size, max_position_embeddings=16)).save_pretrained(
        policy)
    tokenizer.save_pretrained(policy)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("1+2=", "12345+678=", "3+4=")))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=rf"^prompts: prompt 1 of {prompts} \('12345\+678='\) is 12 tokens; with "
                       r"max_new_tokens=8 its sequences reach 20 tokens, beyond the context of policy .*policy "
                       r"\(16 tokens, its max_position_embeddings\): at most 4 new tokens fit \(1 of the 3 prompts"):
        evaluate(EvalConfig(policy=str(policy), prompts=str(prompts), task="arithmetic", output_dir=str(out),
                            run_name="e", max_new_tokens=8), log=lambda *a: None)
    with pytest.raises(ConfigError, match=r"^task: prompt 0 of the arithmetic task's held-out prompts \('\d\+\d='\) "
                       r"is 6 tokens; with max_new_tokens=12 .* at most 10 new tokens fit \(20 of the 20 prompts"):
        evaluate(EvalConfig(policy=str(policy), task="arithmetic", output_dir=str(out), run_name="e", num_prompts=20,
                            max_new_tokens=12), log=lambda *a: None)
    assert not out.exists()
