"""Critic-free training (verl's estimator names), the arithmetic tasks, the reward-hacking alarms
in a run, and the time budget."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from ppo_fast.trainer import ConfigError, PPOConfig, PPOTrainer, build_components, train  # noqa: E402
from ppo_fast.trainer.config import ALGORITHMS, check_files  # noqa: E402

# The settings of benches/bench_hacking.py: the honest run learns (gold 0.41 -> 0.67 in 60 steps
# at seed 0) and the hackable one games its proxy within 20.
ARITHMETIC = dict(task="arithmetic", algorithm="grpo", samples_per_prompt=4, rollout_batch_size=32,
                  minibatch_size=64, micro_batch_size=64, ppo_epochs=1, actor_lr=1e-3, eval_prompts=64)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "ppo"])
def test_every_critic_free_algorithm_trains_without_a_critic(algorithm, tmp_path, cache):
    config = PPOConfig(output_dir=str(tmp_path), cache_dir=cache, run_name=algorithm, task="arithmetic",
                       algorithm=algorithm, samples_per_prompt=2, rollout_batch_size=4, minibatch_size=8,
                       micro_batch_size=4, steps=1, eval_every=0, save_every=1)
    components = build_components(config)
    assert components.critic is None
    summary = PPOTrainer(config, components).train()
    assert summary["algorithm"] == algorithm and summary["steps"] == 1
    (row,) = _rows(tmp_path / algorithm)[1:]
    assert "critic_loss" not in row and "vf_loss" not in row and "explained_variance" not in row
    assert torch.isfinite(torch.tensor([row["actor_loss"], row["score"], row["kl"]])).all()
    checkpoint = tmp_path / algorithm / "checkpoints" / "step1"
    assert (checkpoint / "actor").is_dir() and not (checkpoint / "critic").exists()


@pytest.mark.slow
def test_grpo_resumes_from_its_checkpoint_and_takes_loss_options(tmp_path, cache):
    fields = dict(output_dir=str(tmp_path), cache_dir=cache, run_name="g", **ARITHMETIC, save_every=2,
                  eval_every=0, loss_type="gspo", kl_loss_coef=0.01)
    train(PPOConfig(**fields, steps=2))
    summary = train(PPOConfig(**fields, steps=3, resume=True))
    rows = _rows(tmp_path / "g")
    assert summary["steps"] == 3 and [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["kl_loss"] >= 0 for r in rows[1:])  # the KL term of the actor loss is on


def test_group_estimators_default_to_a_group_of_four_and_the_summary_says_so():
    from ppo_fast.cli import _build_parser
    from ppo_fast.trainer.config import GROUP_SIZE, GROUPED, from_args
    from ppo_fast.trainer.reporting import format_summary

    assert GROUP_SIZE == 4
    for algorithm in ALGORITHMS:
        assert PPOConfig(algorithm=algorithm).samples_per_prompt == (4 if algorithm in GROUPED else 1), algorithm
    assert PPOConfig(algorithm="rloo", samples_per_prompt=2).samples_per_prompt == 2
    args = _build_parser().parse_args(["train", "--algorithm", "grpo"])  # what `ppo-fast train --algorithm grpo` runs
    assert from_args(args).samples_per_prompt == 4
    summary = dict(algorithm="grpo", samples_per_prompt=4, gold_reward_before=None, gold_reward_after=None,
                   proxy_reward_before=None, proxy_reward_after=None, kl_final=0.0, kl_target=10.0, steps=1,
                   seconds_total=1.0, tokens_per_second_generate=1.0, tokens_per_second_train=1.0,
                   generate_share=0.5, run_dir="runs/r")
    assert "grpo: 4 completions per prompt (the group its advantages compare; samples_per_prompt)" in \
        format_summary(summary)
    assert "\nppo: 1 completion per prompt\n" in format_summary({**summary, "algorithm": "ppo",
                                                                  "samples_per_prompt": 1})


def test_the_progress_bar_names_the_algorithm(tmp_path):
    from ppo_fast.trainer.reporting import Reporter

    bar = Reporter(tmp_path, 0).progress(10, 0, "grpo")
    assert bar.desc == "GRPO"
    bar.close()


def test_config_errors_of_the_algorithms(tmp_path):
    with pytest.raises(ConfigError, match="algorithm grpo compares the completions of one prompt: "
                                          "samples_per_prompt must be >= 2, got 1"):
        PPOConfig(algorithm="grpo", samples_per_prompt=1)
    with pytest.raises(ConfigError, match=r"rollout_batch_size \* samples_per_prompt \(4 \* 3 = 12 sequences\) "
                                          r"must be a multiple of minibatch_size \(8\)"):
        PPOConfig(algorithm="rloo", samples_per_prompt=3, rollout_batch_size=4, minibatch_size=8, micro_batch_size=8)
    with pytest.raises(ConfigError, match="algorithm must be one of ppo, grpo"):
        PPOConfig(algorithm="optimal_token_baseline")
    with pytest.raises(ConfigError, match="loss_type must be one of vanilla"):
        PPOConfig(loss_type="ppo2")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="critic_model: algorithm grpo is critic-free"):
        check_files(PPOConfig(algorithm="grpo", samples_per_prompt=2, critic_model=str(tmp_path),
                              output_dir=str(tmp_path)))


@pytest.mark.slow
def test_the_length_hack_fires_the_alarms_and_stops_keeping_the_best_policy(tmp_path, cache):
    """arithmetic-hackable: the proxy pays 0.5 per answer token, so the policy learns long wrong
    answers; the alarms fire and stop_on_alarm ends the run with the best-gold policy kept."""
    lines = []
    # Ziegler's controller alone, as the scenario was measured: the trainer's default PI controller
    # holds the KL near its target, and at seed 0 the policy had not taken the hack by step 40.
    config = PPOConfig(output_dir=str(tmp_path), cache_dir=cache, run_name="hack", **{
        **ARITHMETIC, "task": "arithmetic-hackable"}, steps=40, eval_every=5, stop_on_alarm=True,
        kl_coef=0.1, kl_proportional=0.0, kl_hold_until_target=False)
    summary = train(config, log=lines.append)
    assert summary["steps"] < 40 and "length" in summary["alarms"] and summary["stopped_by"] == "alarm"
    log = "\n".join(map(str, lines))
    assert "reward-hacking alarm 'length'" in log and "stop_on_alarm: stopped at step" in log
    rows = _rows(tmp_path / "hack")
    fired = rows[-1]
    assert fired["alarm_length"] == 1.0 and fired["eval_length_r2"] > 0.5
    assert fired["eval_gold_reward"] < rows[0]["eval_gold_reward"] < rows[0]["eval_proxy_reward"]
    best = json.loads((tmp_path / "hack" / "best_policy" / "best.json").read_text())
    assert best["step"] < fired["step"] and best["measure"] == "gold_reward"
    assert best["value"] == max(r["eval_gold_reward"] for r in rows if "eval_gold_reward" in r)
    assert summary["best_policy"] == best


@pytest.mark.slow
def test_the_honest_rule_reward_stays_quiet(tmp_path, cache):
    """Trained on the rule that is also gold, the reward-hacking alarms cannot fire whatever the
    training noise: proxy = gold leaves nothing for length to explain beyond gold (length_r2 is
    exactly 0 then, not the ±3e-31 of round-off that made this test depend on the batch), and the
    proxy cannot rise while gold falls. The KL alarm is a budget on drift, not on the reward, and an
    honest run's KL does depend on the noise (seed 1 of benches/results/hacking_cpu.md reached
    7.2 nats at step 20 where the others stayed below 1.5; an unlucky run once passed the budget of
    20 here): it is held to its rule at every evaluation instead of to a guess about the trajectory."""
    summary = train(PPOConfig(output_dir=str(tmp_path), cache_dir=cache, run_name="honest", **ARITHMETIC,
                              steps=20, eval_every=5))
    assert "divergence" not in summary["alarms"] and "length" not in summary["alarms"]
    rows = [r for r in _rows(tmp_path / "honest") if "eval_gold_reward" in r]
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    assert all(r["eval_gold_reward"] == r["eval_proxy_reward"] and r["eval_length_r2"] == 0.0 for r in rows)
    assert all(r["alarm_divergence"] == r["alarm_length"] == 0.0 for r in rows)
    budget = 2 * PPOConfig().target_kl
    assert all(r["alarm_kl"] == float(r["eval_kl"] > budget) for r in rows)


@pytest.mark.slow
def test_max_minutes_ends_the_run_as_a_finished_one(tmp_path, cache):
    lines = []
    summary = train(PPOConfig(output_dir=str(tmp_path), cache_dir=cache, run_name="timed", **ARITHMETIC,
                              steps=50, eval_every=0, max_minutes=1e-4), log=lines.append)
    assert summary["steps"] == 1 and (tmp_path / "timed" / "final_policy" / "config.json").exists()
    assert any("max_minutes" in str(line) for line in lines)


@pytest.mark.slow
def test_grpo_and_sft_on_two_ranks_through_the_deepspeed_launcher(tmp_path):
    """Each rank groups its own prompts' completions; the checkpoint holds no critic; SFT shards
    its batches over the ranks and publishes one model."""
    import os
    import subprocess

    from helpers import DEEPSPEED_LAUNCHER, subprocess_env

    def launch(*args):
        port = str(29500 + os.getpid() % 200 + len(args))
        out = subprocess.run([*DEEPSPEED_LAUNCHER, "--num_gpus", "2", "--master_port", port, "--module",
                              "ppo_fast.cli", *args], env=subprocess_env(), capture_output=True, text=True,
                             timeout=900, cwd=Path(__file__).resolve().parent.parent)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    flags = {**ARITHMETIC, "rollout_batch_size": 8, "minibatch_size": 16, "micro_batch_size": 16,
             "warmup_steps": 30, "eval_prompts": 16}
    launch("train", *[item for k, v in flags.items() for item in (f"--{k.replace('_', '-')}", str(v))],
           "--zero-stage", "2", "--steps", "2", "--eval-every", "2", "--output-dir", str(tmp_path),
           "--run-name", "grpo2")
    summary = json.loads((tmp_path / "grpo2" / "summary.json").read_text())
    checkpoint = tmp_path / "grpo2" / "checkpoints" / "step2"
    assert summary["steps"] == 2 and (checkpoint / "trainer" / "rank1.pt").is_file()
    assert not (checkpoint / "critic").exists()
    launch("sft", "--model", "examples/sample/base", "--data", "examples/sample/sft.jsonl", "--max-steps", "4",
           "--zero-stage", "3", "--output-dir", str(tmp_path), "--run-name", "sft2")
    assert (tmp_path / "sft2" / "model" / "config.json").is_file()
