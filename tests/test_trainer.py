"""The PPO trainer on the embedded default task: a short run in one process and under the deepspeed
launcher with ZeRO-3, resume after kill -9, faults, and bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

import ppo_fast as pf  # noqa: E402
from ppo_fast.trainer import (ConfigError, PPOConfig, PPOTrainer, TrainingStopped,  # noqa: E402
                              build_components, load_prompts, train)

from helpers import DEEPSPEED_LAUNCHER, poison_actor_loss, subprocess_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICK = dict(warmup_steps=60, reward_train_steps=120, rollout_batch_size=16, minibatch_size=8,
             micro_batch_size=8, eval_prompts=32)
KL_SETTLE_STEPS = 8
"""Steps the default run's KL takes to rise from 0 to its target before it is held to ±50%."""
TIMING = {"seconds_generate", "seconds_score", "seconds_train", "generate_share",
          "tokens_per_second_generate", "tokens_per_second_train"}


def _config(tmp_path, **overrides):
    return PPOConfig(output_dir=str(tmp_path), **{"run_name": "default", **QUICK, **overrides})


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _cli(args):
    return [sys.executable, "-m", "ppo_fast.cli", *args], subprocess_env()


def _quick_flags(tmp_path, run_name, **extra):
    flags = {**QUICK, "output_dir": str(tmp_path), "run_name": run_name, **extra}
    return [item for key, value in flags.items() for item in (f"--{key.replace('_', '-')}", str(value))]


@pytest.mark.slow
def test_default_run_raises_the_gold_reward_and_writes_its_files(tmp_path):
    summary = train(_config(tmp_path, steps=10, save_every=5, eval_every=5))
    run = tmp_path / "default"
    for key in ("gold_reward_before", "gold_reward_after", "proxy_reward_before", "proxy_reward_after",
                "kl_final", "seconds_total", "tokens_per_second_generate", "tokens_per_second_train"):
        assert key in summary, key
    assert summary["gold_reward_after"] > summary["gold_reward_before"] + 1.0
    assert summary["proxy_reward_after"] > summary["proxy_reward_before"]
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "rewards.png").stat().st_size > 1000
    assert (run / "checkpoints" / "latest").read_text() == "step10"
    assert (run / "final_policy" / "config.json").exists()
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(11))
    for name in ("score", "kl", "entropy", "clipfrac", "approx_kl", "vf_loss", "explained_variance",
                 "response_length", "tokens_per_second_generate", "seconds_generate",
                 "seconds_train", "generate_share", "kl_coef"):
        assert name in rows[-1], name


@pytest.mark.slow
def test_the_default_run_holds_its_kl_target_and_fires_no_alarm(tmp_path):
    """The real default run (`ppo-fast train`, seed 0, warm-up and reward model included: about 40 s
    on 2 idle cores, 455 s on 2 cores shared with other jobs at a load of 5-8): after its first
    KL_SETTLE_STEPS steps the rollout KL stays within ±50% of target_kl, and no reward-hacking
    alarm fires (Ziegler's controller alone let it reach twice the target). Seeds 0-2:
    benches/results/kl_control_cpu.md."""
    summary = train(PPOConfig(output_dir=str(tmp_path), run_name="default"))
    target = PPOConfig().target_kl
    late = [r["kl"] for r in _rows(tmp_path / "default") if r["step"] > KL_SETTLE_STEPS]
    assert len(late) == PPOConfig().steps - KL_SETTLE_STEPS
    assert all(0.5 * target <= kl <= 1.5 * target for kl in late), late
    assert summary["alarms"] == {}


@pytest.mark.slow
def test_resume_after_kill_9_reproduces_the_uninterrupted_run(tmp_path):
    steps = ["--steps", "8", "--save-every", "2", "--eval-every", "4"]
    cmd, env = _cli(["train", *_quick_flags(tmp_path, "straight"), *steps])
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600, cwd=tmp_path)

    cmd, env = _cli(["train", *_quick_flags(tmp_path, "killed"), *steps])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:  # steps 0..5 logged
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = (tmp_path / "killed" / "checkpoints" / "latest").read_text()
    assert latest in ("step4", "step6"), latest

    cmd, env = _cli(["train", *_quick_flags(tmp_path, "killed"), *steps, "--resume", "true"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {latest[4:]}" in out.stdout

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    assert strip(_rows(tmp_path / "killed")) == strip(_rows(tmp_path / "straight"))


@pytest.mark.slow
def test_two_ranks_with_zero3_through_the_deepspeed_launcher(tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*DEEPSPEED_LAUNCHER, "--num_gpus", "2", "--master_port", str(29700 + os.getpid() % 200), "--module",
         "ppo_fast.cli", "train", *_quick_flags(tmp_path, "zero3"), "--zero-stage", "3",
         "--steps", "3", "--save-every", "3"],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "zero3" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["gold_reward_after"] is not None
    checkpoint = tmp_path / "zero3" / "checkpoints" / "step3"
    assert (checkpoint / "actor").is_dir() and (checkpoint / "trainer" / "rank1.pt").is_file()
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert {"trainer/rank0.pt", "trainer/rank1.pt"} <= set(manifest)
    assert sum(name.startswith("actor/") and "optim_states" in name for name in manifest) == 2


@pytest.mark.slow
def test_batch_invariant_runs_use_the_rollouts_logprobs_and_change_nothing(tmp_path, monkeypatch):
    """Under batch_invariant the rollout's log-probs are the trainer's, so taking them instead of
    recomputing them (the default then) gives the same run, row for row, with one actor forward
    of a micro-batch per step instead of the whole rollout's."""
    actor_rows = []
    original = PPOTrainer._token_logprobs

    def counting(self, name, model, sequences, *args):
        if name == "actor":
            actor_rows.append(len(sequences))
        return original(self, name, model, sequences, *args)

    monkeypatch.setattr(PPOTrainer, "_token_logprobs", counting)
    runs = {}
    for old_logprobs in ("recompute", "auto"):
        actor_rows.clear()
        train(_config(tmp_path, run_name=old_logprobs, steps=2, eval_every=0, batch_invariant=True,
                      old_logprobs=old_logprobs, micro_batch_size=4))
        runs[old_logprobs] = _rows(tmp_path / old_logprobs)
        scored = QUICK["rollout_batch_size"] * PPOConfig().samples_per_prompt
        assert actor_rows == ([scored] * 2 if old_logprobs == "recompute" else [4] * 2), actor_rows
    assert not pf.is_batch_invariant(), "the run left the mode on"

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    assert strip(runs["auto"]) == strip(runs["recompute"])
    for row in runs["recompute"][1:]:
        assert row["rollout_logp_max_abs_diff"] == row["rollout_logp_unequal_fraction"] == row["rollout_kl"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_batch_invariant_under_zero_on_two_ranks(tmp_path, zero_stage):
    """Stages 1 and 2 partition the optimizer state and the gradients, which no forward reads: their
    forwards are stage 0's; stage 3 gathers the parameters for each forward."""
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*DEEPSPEED_LAUNCHER, "--num_gpus", "2", "--master_port", str(29600 + os.getpid() % 90), "--module",
         "ppo_fast.cli", "train", *_quick_flags(tmp_path, "exact"), "--zero-stage", str(zero_stage), "--steps", "2",
         "--save-every", "0", "--eval-every", "0", "--batch-invariant", "true", "--old-logprobs", "recompute",
         "--micro-batch-size", "4"],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in _rows(tmp_path / "exact")[1:]:
        assert row["rollout_logp_max_abs_diff"] == row["rollout_logp_unequal_fraction"] == 0, row


def test_batch_invariant_and_old_logprobs_are_checked():
    from ppo_fast.trainer.config import ConfigError

    with pytest.raises(ConfigError, match="old_logprobs must be one of auto, recompute, rollout, got 'both'"):
        PPOConfig(old_logprobs="both").check()
    assert PPOConfig(batch_invariant=True).old_logprobs_from_rollout
    assert not PPOConfig().old_logprobs_from_rollout and PPOConfig(old_logprobs="rollout").old_logprobs_from_rollout


def _trainer(tmp_path, **overrides):
    config = _config(tmp_path, **{"steps": 3, "save_every": 100, **overrides})
    return config, build_components(config)


@pytest.mark.slow
def test_reward_fn_with_the_wrong_shape_or_nan_is_a_clear_error(tmp_path):
    config, components = _trainer(tmp_path)
    components.reward_model = None
    components.reward_fn = lambda prompts, completions: [1.0] * (len(prompts) - 1)
    with pytest.raises(ValueError, match=r"reward_fn must return (\d+) scores \(one per completion\), got shape"):
        PPOTrainer(config, components).train()
    config, components = _trainer(tmp_path, run_name="nan")
    components.reward_model = None
    components.reward_fn = lambda prompts, completions: [float("nan")] * len(prompts)
    with pytest.raises(ValueError, match="the reward is not finite"):
        PPOTrainer(config, components).train()


@pytest.mark.slow
def test_empty_prompt_file_and_too_long_prompts(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(str(empty))
    with pytest.raises(ConfigError, match=r"^task: prompt 0 of the vowels task's training prompts .* longer than "
                       r"max_prompt_len=4$"):
        _trainer(tmp_path, max_prompt_len=4)
    # Prompts handed over in Components are checked as they are encoded.
    config, components = _trainer(tmp_path)
    with pytest.raises(ValueError, match="longer than max_prompt_len=4"):
        PPOTrainer(dataclasses.replace(config, max_prompt_len=4), components).train()


@pytest.mark.slow
def test_non_finite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    config, components = _trainer(tmp_path, steps=5, max_nonfinite_in_a_row=3)
    # Micro-batches 5 and later are poisoned: the first step (4 micro-batches) trains.
    poison_actor_loss(after=4, patch=monkeypatch.setattr)
    trainer = PPOTrainer(config, components)
    with pytest.raises(TrainingStopped, match="3 updates in a row had a non-finite loss") as info:
        trainer.train()
    assert "A checkpoint of step" in str(info.value)
    assert trainer.nonfinite_total == 3
    latest = (tmp_path / "default" / "checkpoints" / "latest").read_text()
    assert latest == f"step{trainer.step}"
    assert torch.isfinite(torch.stack([p.detach().abs().sum() for p in trainer.models.actor.module.parameters()])).all()


def test_train_help_documents_every_field():
    from dataclasses import fields

    out = subprocess.run([sys.executable, "-m", "ppo_fast.cli", "train", "--help"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    for f in fields(PPOConfig):
        assert f"--{f.name.replace('_', '-')}" in out, f.name


def test_yaml_config_and_overrides(tmp_path):
    from argparse import ArgumentParser

    from ppo_fast.trainer.config import add_arguments, from_args

    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\nactor_lr: 0.001\nadaptive_kl: false\n")
    parser = ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(["--config", str(path), "--steps", "9"]))
    assert (config.steps, config.actor_lr, config.adaptive_kl) == (9, 0.001, False)
    path.write_text("stepz: 7\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        PPOConfig.from_yaml(str(path))


@pytest.mark.slow
def test_old_logprobs_use_the_sampling_temperature(tmp_path):
    """Rollouts sample from softmax(z / T); old and reference log-probs must score that
    distribution, not softmax(z)."""
    from ppo_fast.sequences import position_ids

    config = _config(tmp_path, temperature=0.7)
    trainer = PPOTrainer(config, build_components(config))
    exp, stats = trainer.make_experience(trainer.sampler.next_batch())
    # The rollout (token by token) and the trainer (full sequences) agree to rounding.
    assert 0 <= stats["rollout_logp_max_abs_diff"] < 1e-4 and 0 <= stats["rollout_kl"] < 1e-8
    assert (stats["rollout_logp_unequal_fraction"] == 0) == (stats["rollout_logp_max_abs_diff"] == 0)
    P = exp.prompt_length
    with torch.no_grad():
        logits = trainer.models.actor.module(input_ids=exp.sequences, attention_mask=exp.attention_mask,
                                      position_ids=position_ids(exp.attention_mask)).logits[:, P - 1:-1]
        tempered = pf.token_logprobs(logits, exp.sequences[:, P:], temperature=0.7)
        plain = pf.token_logprobs(logits, exp.sequences[:, P:])
    torch.testing.assert_close(exp.old_logp, tempered)
    assert not torch.allclose(exp.old_logp, plain)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nan", "interrupt", "terminate"])
def test_a_fault_on_one_rank_stops_both_ranks_together(mode, tmp_path):
    """A NaN loss, a Ctrl-C, or a Ctrl-C followed by SIGTERM seen by rank 1 only: both ranks stop after the same step with the
    same checkpoint, and the launcher exits (no rank left waiting in a collective)."""
    proc = subprocess.run(
        [*DEEPSPEED_LAUNCHER, "--num_gpus", "2", "--master_port", str(29900 + os.getpid() % 90),
         str(ROOT / "tests" / "trainer_worker.py"), "--mode", mode, "--out", str(tmp_path)],
        env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
        cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"]
    assert ranks[0]["latest"] == ranks[1]["latest"] == f"step{ranks[0]['step']}"
    if mode == "nan":
        assert all("non-finite loss" in r["stopped"] for r in ranks)
        assert ranks[0]["nonfinite_total"] == ranks[1]["nonfinite_total"] == 2
    else:
        assert all(r["returned"] == {"interrupted_at": 2} for r in ranks)


@pytest.mark.slow
def test_offloaded_frozen_models_give_the_same_run(tmp_path):
    """Reference and reward models as ZeRO-3 inference engines with parameters in CPU memory
    score as the plain modules do: exactly in float32 on the CPU. On a GPU both run in bf16 and
    round differently (an H100 gave a step-0 proxy reward of -7.977 offloaded, -7.972 plain), so
    there the rows agree to bf16 precision. The actor loss carries the full KL, whose reference
    head is read whole from inside its partitioned forward."""
    kl_loss = dict(kl_loss_coef=0.05, kl_loss_estimator="full")
    plain = _config(tmp_path, steps=2, run_name="plain", save_every=100, eval_every=2, **kl_loss)
    offload = _config(tmp_path, steps=2, run_name="offload", save_every=100, eval_every=2,
                      offload_frozen=True, **kl_loss)
    train(plain)
    train(offload)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    got, expected = strip(_rows(tmp_path / "offload")), strip(_rows(tmp_path / "plain"))
    if not torch.cuda.is_available():
        assert got == expected
        return
    assert [r.keys() for r in got] == [r.keys() for r in expected]
    for row, want in zip(got, expected):
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=2e-2, abs=2e-2), (row["step"], key)


@pytest.mark.slow
def test_training_from_hugging_face_directories(tmp_path):
    """The general path: policy, critic trunk and reward model loaded from local Hugging Face
    directories (here the ones the default task exports, tokenizer included), prompts from a file."""
    train(_config(tmp_path, steps=1, run_name="source", save_every=100))
    source = tmp_path / "source"
    (reward_dir,) = (tmp_path / ".cache" / "default_task").glob("*/reward_model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nworld\nabcdef\nqrstu\n")
    (tmp_path / "held_out.jsonl").write_text('{"prompt": "zyx"}\n{"prompt": "mnop"}\n')
    # A weighted list: the reward model, and a function from a module beside the working directory.
    (tmp_path / "brevity.py").write_text("def score(prompts, completions):\n"
                                         "    return [-0.1 * len(c) for c in completions]\n")
    cmd, env = _cli(["train", "--policy-model", str(source / "final_policy"), "--reward",
                     f"{reward_dir},0.5*brevity:score", "--gold", "brevity:score",
                     "--prompts-file", str(prompts), "--eval-prompts-file", "held_out.jsonl",
                     "--output-dir", str(tmp_path),
                     "--run-name", "dirs", "--steps", "2", "--rollout-batch-size", "8",
                     "--minibatch-size", "8", "--micro-batch-size", "8", "--eval-prompts", "4"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "dirs" / "summary.json").read_text())
    assert summary["gold_reward_before"] is not None and summary["steps"] == 2
    rows = _rows(tmp_path / "dirs")
    assert [r["step"] for r in rows if "eval_proxy_reward" in r] == [0, 2]
    # Each term is logged with its own (unweighted) score.
    assert "score[0.5*brevity:score]" in rows[1] and f"eval_reward[{reward_dir}]" in rows[2]
    assert rows[2]["eval_proxy_reward"] == pytest.approx(
        rows[2][f"eval_reward[{reward_dir}]"] + 0.5 * rows[2]["eval_reward[0.5*brevity:score]"], rel=1e-5)
    assert rows[2]["eval_gold_reward"] == pytest.approx(rows[2]["eval_reward[0.5*brevity:score]"], rel=1e-5)
    assert (tmp_path / "dirs" / "final_policy" / "tokenizer.json").exists()


@pytest.mark.slow
def test_the_full_kl_loss_gives_the_same_run_through_the_fused_head_and_the_logits(tmp_path):
    """kl_loss_estimator="full": the actor loss's KL over the whole vocabulary, from the reference's
    hidden states and head beside the actor's, or from both models' logits with the fused head
    off: the same run to rounding, and the KL term positive once the policy has moved."""
    rows = {}
    for fused in (True, False):
        config = _config(tmp_path, run_name=f"full_{fused}", steps=2, save_every=0, eval_every=0, fused_head=fused,
                         kl_loss_coef=0.05, kl_loss_estimator="full")
        train(config)
        rows[fused] = _rows(tmp_path / f"full_{fused}")
    assert len(rows[True]) == len(rows[False]) == 3
    assert rows[True][-1]["kl_loss"] > 0
    for on, off in zip(rows[True], rows[False]):
        for name in ("score", "kl", "actor_loss", "kl_loss", "entropy"):
            if name in off:
                assert on[name] == pytest.approx(off[name], rel=1e-4, abs=1e-6), (on["step"], name)


@pytest.mark.slow
def test_the_fused_head_gives_the_logits_paths_run(tmp_path):
    """On by default (the default policy's logits are its head's output), off by the switch: the
    same run either way, to rounding (the fused head's GEMMs are chunked differently)."""
    logs = {}
    rows = {}
    for fused in (True, False):
        lines = []
        config = _config(tmp_path, run_name=f"fused_{fused}", steps=3, save_every=0, eval_every=0,
                         fused_head=fused)
        trainer = PPOTrainer(config, build_components(config), log=lines.append)
        trainer.train()
        logs[fused] = "\n".join(str(line) for line in lines)
        rows[fused] = _rows(tmp_path / f"fused_{fused}")
    assert "actor: fused head" in logs[True] and "reference: fused head" in logs[True]
    assert "actor: logits path (fused_head is off)" in logs[False]
    assert len(rows[True]) == len(rows[False]) == 4
    for on, off in zip(rows[True], rows[False]):
        for name in ("score", "kl", "entropy", "clipfrac", "approx_kl", "actor_loss", "vf_loss"):
            if name in off:
                assert on[name] == pytest.approx(off[name], rel=1e-4, abs=1e-6), name
