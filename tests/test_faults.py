"""Trainer faults lose no more than the work since the last good checkpoint, overwrite nothing,
and say so: reused run names, resume with nothing to resume, damaged and tampered checkpoints,
torn metrics, kill -9 during a checkpoint write, bad configs (checked before any work)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from ppo_fast.trainer import CheckpointError, ConfigError, PPOConfig, train  # noqa: E402
from ppo_fast.trainer.checkpoint import _sha256  # noqa: E402

from helpers import subprocess_env  # noqa: E402

HERE = Path(__file__).resolve().parent
QUICK = dict(warmup_steps=30, reward_train_steps=60, rollout_batch_size=8, minibatch_size=8,
             micro_batch_size=8, eval_prompts=8)
TIMING = {"seconds_generate", "seconds_score", "seconds_train", "generate_share",
          "tokens_per_second_generate", "tokens_per_second_train"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One default-task cache for the module: its warm-up is built once."""
    return str(tmp_path_factory.mktemp("cache"))


def fields(tmp_path, cache, **overrides):
    return {**QUICK, "output_dir": str(tmp_path), "cache_dir": cache, **overrides}


def cli(tmp_path, cache, **overrides):
    flags = [f"--{key.replace('_', '-')}={value}"
             for key, value in fields(tmp_path, cache, **overrides).items()]
    return subprocess.run([sys.executable, "-m", "ppo_fast.cli", "train", *flags],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_reused_run_name_is_refused_and_the_earlier_run_is_untouched(tmp_path, cache):
    train(PPOConfig(**fields(tmp_path, cache, run_name="r", steps=2)))
    before = snapshot(tmp_path / "r")
    with pytest.raises(ConfigError, match=r"run directory .*r exists already: pass resume .* overwrite"):
        train(PPOConfig(**fields(tmp_path, cache, run_name="r", steps=3)))
    assert snapshot(tmp_path / "r") == before


@pytest.mark.slow
def test_overwrite_replaces_the_earlier_run_and_says_so(tmp_path, cache):
    train(PPOConfig(**fields(tmp_path, cache, run_name="r", steps=3)))
    said = []
    train(PPOConfig(**fields(tmp_path, cache, run_name="r", steps=2, overwrite=True)), log=said.append)
    assert any("overwrite: deleting the existing run directory" in line for line in said)
    assert [r["step"] for r in rows(tmp_path / "r")] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step*")) == ["step2"]


@pytest.mark.slow
def test_without_a_run_name_each_run_gets_a_fresh_directory(tmp_path, cache):
    first = train(PPOConfig(**fields(tmp_path, cache, steps=1)))
    second = train(PPOConfig(**fields(tmp_path, cache, steps=1)))
    assert first["run_dir"] != second["run_dir"]
    assert Path(first["run_dir"]).parent == Path(second["run_dir"]).parent == tmp_path
    assert not any((tmp_path / name).exists() for name in ("default_task",))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["../escape", "a/b", "/tmp/abs", ".hidden", "-x", ".."])
def test_run_names_are_names_not_paths(tmp_path, cache, name):
    proc = cli(tmp_path, cache, run_name=name, steps=1)
    assert proc.returncode == 2 and "run_name must be a plain name" in proc.stderr
    assert not any(tmp_path.iterdir())
    assert not (tmp_path.parent / "escape").exists()


@pytest.mark.slow
def test_resume_with_nothing_to_resume_is_an_error(tmp_path, cache):
    proc = cli(tmp_path, cache, run_name="never", resume="true", steps=2)
    assert proc.returncode == 2 and "does not exist to resume from" in proc.stderr
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------------------------
# Checkpoints: damage, tampering, torn metrics, kill -9 while saving
# --------------------------------------------------------------------------------------------


def _trained(tmp_path, cache, steps=4):
    config = PPOConfig(**fields(tmp_path, cache, run_name="run", steps=steps, save_every=2,
                                eval_every=2))
    train(config)
    return tmp_path / "run", rows(tmp_path / "run")


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing file", "no manifest"])
def test_a_damaged_checkpoint_is_passed_over_for_the_previous_one(tmp_path, cache, damage):
    run, expected = _trained(tmp_path, cache)
    newest = run / "checkpoints" / "step4"
    target = newest / "actor" / "mp_rank_00_model_states.pt"
    if damage == "flipped byte":
        _flip_a_byte(target)
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "missing file":
        target.unlink()
    else:
        (newest / "manifest.json").unlink()
    said = []
    train(PPOConfig(**fields(tmp_path, cache, run_name="run", steps=4, save_every=2, eval_every=2,
                             resume=True)), log=said.append)
    assert any(line.startswith("checkpoint step4 is damaged, passed over:") for line in said), said
    assert any(line.startswith("resumed from step 2") for line in said), said
    assert rows(run) == expected  # steps 3-4 redone exactly as the first time


@pytest.mark.slow
def test_no_intact_checkpoint_is_an_error_naming_every_file(tmp_path, cache):
    run, _ = _trained(tmp_path, cache)
    for step in (2, 4):
        _flip_a_byte(run / "checkpoints" / f"step{step}" / "trainer" / "rank0.pt")
    with pytest.raises(CheckpointError, match=r"(?s)no intact checkpoint.*step4.*rank0\.pt.*step2.*rank0\.pt"):
        train(PPOConfig(**fields(tmp_path, cache, run_name="run", steps=4, resume=True)))


class _Planted:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
@pytest.mark.parametrize("file, how", [
    ("trainer/rank0.pt", "torch.save"), ("actor/mp_rank_00_model_states.pt", "torch.save"),
    ("critic/mp_rank_00_model_states.pt", "torch.save"), ("trainer/rank0.pt", "pickle"),
])
def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path, cache, file, how):
    """Even with the manifest forged to match (a manifest detects damage, not tampering)."""
    run, _ = _trained(tmp_path, cache, steps=2)
    checkpoint = run / "checkpoints" / "step2"
    marker = tmp_path / "pwned"
    if how == "torch.save":
        torch.save({"state": _Planted(marker)}, checkpoint / file)
    else:
        with open(checkpoint / file, "wb") as f:
            pickle.dump({"state": _Planted(marker)}, f)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][file] = {"size": (checkpoint / file).stat().st_size,
                               "sha256": _sha256(checkpoint / file)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    proc = cli(tmp_path, cache, run_name="run", steps=3, save_every=2, eval_every=2, resume="true")
    assert not marker.exists(), "the planted pickle ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot load {checkpoint / file}" in proc.stderr
    if how == "torch.save":
        assert "holds a posix.system object" in proc.stderr and "refused" in proc.stderr


@pytest.mark.slow
def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, cache):
    run, expected = _trained(tmp_path, cache)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "sco')
    said = []
    train(PPOConfig(**fields(tmp_path, cache, run_name="run", steps=5, save_every=2, eval_every=2,
                             resume=True)), log=said.append)
    assert any("dropped 0 rows" in line and "1 unreadable lines" in line for line in said), said
    assert [r["step"] for r in rows(run)] == [0, 1, 2, 3, 4, 5]
    assert rows(run)[:5] == expected


@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_written_loses_only_the_steps_since_the_previous_one(tmp_path, cache):
    config = fields(tmp_path, cache, steps=8, save_every=2, eval_every=4)
    train(PPOConfig(**{**config, "run_name": "straight"}))
    proc = subprocess.run([sys.executable, str(HERE / "kill_in_save_worker.py"),
                           json.dumps({**config, "run_name": "killed"}), "6"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr[-2000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert (checkpoints / ".step6.partial" / "actor").is_dir() and not (checkpoints / "step6").exists()
    assert (checkpoints / "latest").read_text() == "step4"
    resumed = cli(tmp_path, cache, run_name="killed", steps=8, save_every=2, eval_every=4, resume="true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 4" in resumed.stdout
    assert rows(tmp_path / "killed") == rows(tmp_path / "straight")
    assert not (checkpoints / ".step6.partial").exists() and (checkpoints / "step8").is_dir()


def _weights(directory):
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


@pytest.mark.slow
def test_a_best_policy_published_after_the_last_checkpoint_is_the_one_the_resumed_run_reports(tmp_path, cache):
    """Killed right after publishing a new best (step 6 or 8) and before its next checkpoint, the
    run resumes from step 4: its summary describes the policy in best_policy/, also when it ends
    before redoing that step, and that policy is the uninterrupted run's at that step."""
    config = fields(tmp_path, cache, steps=8, save_every=4, eval_every=2)
    proc = subprocess.run([sys.executable, str(HERE / "kill_after_best_worker.py"),
                           json.dumps({**config, "run_name": "killed"}), "4"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == -9, "no new best after step 4 to be killed at: " + proc.stdout[-2000:]
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / "latest").read_text() == "step4"
    record = json.loads((killed / "best_policy" / "best.json").read_text())
    assert record["step"] in (6, 8) and record["measure"] == "gold_reward"

    # A time limit ends the resumed run after one step, before it redoes the best's.
    resumed = cli(tmp_path, cache, run_name="killed", steps=8, save_every=4, eval_every=2, resume="true",
                  max_minutes=1e-6)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"holds the best evaluation so far, of step {record['step']}" in resumed.stdout
    summary = json.loads((killed / "summary.json").read_text())
    assert (summary["steps"], summary["stopped_by"]) == (5, "time")
    assert summary["best_policy"] == record == json.loads((killed / "best_policy" / "best.json").read_text())

    straight = train(PPOConfig(**{**config, "run_name": "straight", "steps": record["step"]}))
    expected = _weights(Path(straight["run_dir"]) / "final_policy")
    got = _weights(killed / "best_policy")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    (evaluated,) = [r for r in rows(tmp_path / "straight") if r["step"] == record["step"]]
    assert {f"eval_{k}": v for k, v in record["metrics"].items()} == {
        k: v for k, v in evaluated.items() if k.startswith("eval_")}

    # Resumed to the end: the redone evaluation of that step ties with the record and keeps it.
    finished = cli(tmp_path, cache, run_name="killed", steps=8, save_every=4, eval_every=2, resume="true",
                   max_minutes=0)
    assert finished.returncode == 0, finished.stderr[-2000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["best_policy"] == json.loads((killed / "best_policy" / "best.json").read_text())
    assert summary["best_policy"]["step"] >= record["step"]


def test_a_kill_between_the_renames_of_a_best_policy_swap_leaves_the_new_one_for_the_resume(tmp_path):
    from types import SimpleNamespace

    from ppo_fast.trainer.loop import BEST_RECORD, PPOTrainer

    trainer = SimpleNamespace(rank=0, world=1, run_dir=tmp_path)
    trainer._best_directories = lambda: PPOTrainer._best_directories(trainer)
    # The previous best moved aside, the new one complete (its record written last) beside it.
    old, new = tmp_path / ".best_policy.old", tmp_path / ".best_policy.partial"
    for directory, step in ((old, 2), (new, 6)):
        directory.mkdir()
        (directory / "model.safetensors").write_text(f"policy of step {step}")
        (directory / BEST_RECORD).write_text(json.dumps({"step": step}))
    assert PPOTrainer._published_best(trainer) == {"step": 6}
    assert (tmp_path / "best_policy" / "model.safetensors").read_text() == "policy of step 6"
    assert [p.name for p in tmp_path.iterdir()] == ["best_policy"]
    # A next best still being written (no record yet) is dropped; the published one stays.
    new.mkdir()
    (new / "model.safetensors").write_text("half of the policy of step 8")
    assert PPOTrainer._published_best(trainer) == {"step": 6}
    assert [p.name for p in tmp_path.iterdir()] == ["best_policy"]


@pytest.mark.slow
def test_the_summary_of_a_resumed_run_times_every_process(tmp_path, cache):
    first = train(PPOConfig(**fields(tmp_path, cache, run_name="r", steps=2, save_every=2, eval_every=0)))
    assert first["this_process"] == {"from_step": 0, "steps": 2, "seconds": first["seconds_total"]}
    checkpointed = torch.load(tmp_path / "r" / "checkpoints" / "step2" / "trainer" / "rank0.pt",
                              weights_only=True)["seconds_wall"]
    assert 0 < checkpointed <= first["seconds_total"]
    said = []
    summary = train(PPOConfig(**fields(tmp_path, cache, run_name="r", steps=4, save_every=2, eval_every=0,
                                       resume=True)), log=said.append)
    part = summary["this_process"]
    assert (summary["steps"], part["from_step"], part["steps"]) == (4, 2, 2)
    assert summary["seconds_total"] == pytest.approx(checkpointed + part["seconds"])
    assert any(f"4 steps in {summary['seconds_total']:.0f} s (this process resumed it at step 2: 2 steps in "
               f"{part['seconds']:.0f} s)" in line for line in said), said


# --------------------------------------------------------------------------------------------
# Config: checked field by field, before anything expensive
# --------------------------------------------------------------------------------------------


def test_yaml_values_are_coerced_or_rejected_by_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("actor_lr: 1e-3\nresume: 'false'\nsteps: '7'\nadaptive_kl: 0\n")
    config = PPOConfig.from_yaml(str(path))
    assert (config.actor_lr, config.resume, config.steps, config.adaptive_kl) == (0.001, False, 7, False)
    for text, match in [("steps: ten\n", "steps must be an integer, got 'ten'"),
                        ("steps: 2.5\n", "steps must be an integer"),
                        ("resume: maybe\n", "resume must be true or false"),
                        ("run_name: 2024\n", "run_name must be a string, got int 2024"),
                        ("actor_lr: .nan\n", "actor_lr must be a finite number"),
                        ("[1, 2]\n", "must hold a mapping")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            PPOConfig.from_yaml(str(path))


@pytest.mark.parametrize("overrides, match", [
    (dict(micro_batch_size=0), "micro_batch_size must be >= 1"),
    (dict(rollout_batch_size=-8), "rollout_batch_size must be >= 1"),
    (dict(minibatch_size=6), r"minibatch_size \(6\) must be a multiple of micro_batch_size \(8\)"),
    (dict(rollout_batch_size=12, minibatch_size=4, micro_batch_size=4, eval_prompts=4), None),
    (dict(save_every=-1), "save_every must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(zero_stage=4), "zero_stage must be 0, 1, 2 or 3"),
    (dict(loss_agg="mean"), "loss_agg must be one of"),
    (dict(kl_estimator="k9"), "kl_estimator must be one of"),
    (dict(resume=True), "resume needs run_name"),
    (dict(task="sorting"), "task must be one of vowels, arithmetic, arithmetic-hackable"),
    (dict(alarm_length_r2=1.5), r"alarm_length_r2 must be in \[0, 1\]"),
    (dict(samples_per_prompt=-1), "samples_per_prompt must be >= 0"),
    (dict(max_minutes=-1), "max_minutes must be >= 0"),
])
def test_config_ranges(tmp_path, overrides, match):
    if match is None:
        PPOConfig(**fields(tmp_path, "", **overrides))
        return
    with pytest.raises(ConfigError, match=match):
        PPOConfig(**fields(tmp_path, "", **overrides))


@pytest.mark.slow
@pytest.mark.parametrize("overrides, match", [
    (dict(prompts_file="missing.txt"), "prompts_file: missing.txt does not exist"),
    (dict(policy_model="nowhere"), "policy_model: nowhere does not exist"),
    (dict(ds_config="missing.json"), "ds_config: cannot read missing.json"),
    (dict(eval_prompts_file="held_out.jsonl"), "eval_prompts_file: held_out.jsonl does not exist"),
    (dict(reward="no_such_rm_dir"), "reward: 'no_such_rm_dir' is neither a reward-model directory"),
    (dict(gold="rules.py:exact"), "gold: 'rules.py:exact': rules.py does not exist"),
])
def test_missing_files_are_reported_before_any_work(tmp_path, overrides, match):
    proc = cli(tmp_path, str(tmp_path / "cache"), run_name="r", steps=1, **overrides)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]
    assert "warming up" not in proc.stdout and not (tmp_path / "cache").exists()
    assert not (tmp_path / "r").exists()


def test_a_prompt_too_long_for_the_context_with_max_new_tokens_is_refused_before_any_work(tmp_path):
    cache = tmp_path / "cache"
    # The default task's prompts are 6-10 tokens and its policy's context 64 tokens.
    with pytest.raises(ConfigError, match=r"^task: prompt \d+ of the vowels task's training prompts \('\w{8}'\) "
                       r"is 10 tokens; with max_new_tokens=60 its sequences reach 70 tokens, beyond the context "
                       r"of the vowels task's policy \(64 tokens, its max_position_embeddings\): at most 54 new "
                       r"tokens fit \(\d+ of the 4096 prompts do not fit\)$"):
        train(PPOConfig(**fields(tmp_path, str(cache), run_name="r", steps=1, max_new_tokens=60)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("abc", "a" * 40, "b" * 35)))
    with pytest.raises(ConfigError, match=rf"^prompts_file: prompt 1 of {prompts} \('a{{40}}'\) is 42 tokens; with "
                       r"max_new_tokens=30 its sequences reach 72 tokens, beyond the context of the vowels task's "
                       r"policy \(64 tokens, its max_position_embeddings\): at most 22 new tokens fit \(2 of the 3 "
                       r"prompts do not fit\)$"):
        train(PPOConfig(**fields(tmp_path, str(cache), run_name="r", steps=1, prompts_file=str(prompts),
                                 max_prompt_len=64, max_new_tokens=30)))
    # Checked before any work: no warm-up, and no run directory that would refuse the corrected rerun.
    assert not (tmp_path / "r").exists() and not cache.exists()


@pytest.mark.slow
def test_save_every_and_eval_every_zero_mean_never(tmp_path, cache):
    summary = train(PPOConfig(**fields(tmp_path, cache, run_name="r", steps=3, save_every=0,
                                       eval_every=0)))
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step*")) == ["step3"]
    assert not any("eval_proxy_reward" in r for r in rows(tmp_path / "r"))
    assert summary["proxy_reward_before"] is None and summary["steps"] == 3


# --------------------------------------------------------------------------------------------
# Found by probing the CLI as a user would
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_keeps_the_runs_settings_and_refuses_to_change_them(tmp_path, cache):
    straight = fields(tmp_path, cache, run_name="straight", steps=6, save_every=2, eval_every=2)
    train(PPOConfig(**straight))
    train(PPOConfig(**{**straight, "run_name": "r", "steps": 4}))
    changed = cli(tmp_path, cache, run_name="r", resume="true", steps=6, seed=5)
    assert changed.returncode == 2
    assert "these differ from them: seed=5 (the run has 0)" in changed.stderr
    # Only where the run is and how far to go: everything else comes from the run itself.
    proc = subprocess.run([sys.executable, "-m", "ppo_fast.cli", "train", f"--output-dir={tmp_path}",
                           "--run-name=r", "--resume=true", "--steps=6"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rows(tmp_path / "r") == rows(tmp_path / "straight")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["warmup_steps"] == QUICK["warmup_steps"]


@pytest.mark.slow
def test_a_run_being_written_by_another_process_is_refused(tmp_path, cache):
    from ppo_fast.trainer import rundir

    rundir._lock(tmp_path, "busy")  # as another process writing run "busy" would hold it
    try:
        proc = cli(tmp_path, cache, run_name="busy", steps=1)
    finally:
        rundir.release(PPOConfig(output_dir=str(tmp_path), run_name="busy"))
    assert proc.returncode == 2 and "is being written by another process" in proc.stderr
    assert not (tmp_path / "busy").exists()


@pytest.mark.slow
@pytest.mark.parametrize("manifest", ['{"step": 4, "files": []}', '{"step": 4, "files": {"a": 5}}',
                                      '[]', '{"step": "4", "files": {}}'])
def test_a_malformed_manifest_is_passed_over(tmp_path, cache, manifest):
    run, expected = _trained(tmp_path, cache)
    (run / "checkpoints" / "step4" / "manifest.json").write_text(manifest)
    said = []
    train(PPOConfig(**fields(tmp_path, cache, run_name="run", steps=4, save_every=2, eval_every=2,
                             resume=True)), log=said.append)
    assert any(line.startswith("checkpoint step4 is damaged, passed over") for line in said), said
    assert rows(run) == expected


@pytest.mark.slow
def test_a_checkpoint_under_another_steps_name_is_passed_over(tmp_path, cache):
    run, _ = _trained(tmp_path, cache)
    shutil.copytree(run / "checkpoints" / "step2", run / "checkpoints" / "step10")
    said = []
    train(PPOConfig(**fields(tmp_path, cache, run_name="run", steps=5, save_every=2, eval_every=2,
                             resume=True)), log=said.append)
    assert any("the manifest is of step 2, not step10" in line for line in said), said
    assert any(line.startswith("resumed from step 4") for line in said), said
    assert [r["step"] for r in rows(run)] == [0, 1, 2, 3, 4, 5]


@pytest.mark.slow
def test_garbled_metrics_lines_are_rewritten_from_the_checkpoint(tmp_path, cache):
    run, expected = _trained(tmp_path, cache)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    garbled = lines[:2] + ['[1, 2]', '{"note": "x"}'] + lines[3:] + ["\udcff"]
    (run / "metrics.jsonl").write_bytes("\n".join(garbled).encode("utf-8", errors="surrogateescape"))
    said = []
    train(PPOConfig(**fields(tmp_path, cache, run_name="run", steps=4, save_every=2, eval_every=2,
                             resume=True)), log=said.append)
    assert any("rewritten from the checkpoint" in line for line in said), said
    assert rows(run) == expected


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(tmp_path, cache):
    run, _ = _trained(tmp_path, cache)
    before = snapshot(run)
    said = []
    result = train(PPOConfig(**fields(tmp_path, cache, run_name="run", steps=4, save_every=2,
                                      eval_every=2, resume=True)), log=said.append)
    assert result == {"finished_at": 4}
    assert any("has done its 4 steps already; nothing to do" in line for line in said)
    assert snapshot(run) == before


@pytest.mark.slow
@pytest.mark.parametrize("setup, overrides, match", [
    (lambda d: (d / "bad.yaml").write_text("steps: [1\n"), dict(config="bad.yaml"), "is not valid YAML"),
    (lambda d: (d / "bad.yaml").write_text("steps: 2\nsteps: 3\n"), dict(config="bad.yaml"),
     "the key 'steps' is given twice"),
    (lambda d: (d / "bad.yaml").write_bytes(b"run_name: \xff\xfe\n"), dict(config="bad.yaml"), "is not valid YAML"),
    (lambda d: (d / "ds.json").write_text("[]"), dict(ds_config="ds.json"), "must be a JSON object"),
    (lambda d: (d / "ds.json").write_text('{"optimizer": {"params": {}}, "zero_optimization": "banana"}'),
     dict(ds_config="ds.json"), "zero_optimization in ds.json must be a JSON object"),
    (lambda d: (d / "p.txt").write_text("\n\n"), dict(prompts_file="p.txt"), "holds no prompts"),
    (lambda d: None, dict(seed=2**32), r"seed must be in [0, 2**32)"),
    (lambda d: None, dict(run_name="x" * 300), "at most 128 characters"),
    (lambda d: (d / "afile").write_text(""), dict(output_dir="afile"), "is a file, not a directory"),
    (lambda d: (d / "out").mkdir() or (d / "out" / "r").write_text(""), dict(output_dir="out", run_name="r"),
     "exists and is a file"),
])
def test_bad_configs_and_places_are_one_line_errors_before_any_work(tmp_path, cache, setup, overrides, match):
    setup(tmp_path)
    proc = cli(tmp_path, cache, steps=1, **overrides)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "warming up" not in proc.stdout


@pytest.mark.slow
def test_an_unknown_backend_is_refused_before_any_work(tmp_path, cache):
    proc = subprocess.run([sys.executable, "-m", "ppo_fast.cli", "train", f"--output-dir={tmp_path}",
                           f"--cache-dir={cache}", "--run-name=r", "--steps=1"],
                          env={**subprocess_env(), "PPO_FAST_BACKEND": "garbage"}, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2 and "PPO_FAST_BACKEND must be one of" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_abandoned_default_task_builds_are_removed(tmp_path):
    cache = tmp_path / "cache"
    abandoned = cache / "default_task" / ".vowels-seed0-warmup30-rm60.partial-999999999"
    abandoned.mkdir(parents=True)
    train(PPOConfig(**fields(tmp_path, str(cache), run_name="r", steps=1)))
    assert not abandoned.exists() and (cache / "default_task" / "vowels-seed0-warmup30-rm60").is_dir()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, cache):
    import signal
    import time

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in
             fields(tmp_path, cache, run_name="r", steps=40, save_every=100, eval_every=100).items()]
    proc = subprocess.Popen([sys.executable, "-m", "ppo_fast.cli", "train", *flags], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:]
    assert "continue with --resume" in out
    (checkpoint,) = (tmp_path / "r" / "checkpoints").glob("step*")
    assert not (tmp_path / "r" / "summary.json").exists() and int(checkpoint.name[4:]) >= 2
