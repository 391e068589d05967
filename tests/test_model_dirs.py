"""Every command that loads a model refuses a model directory that is broken (no weights, a
truncated weight file, a missing shard, no tokenizer) or that is not what its option needs (a
causal LM as a reward model), naming the option, the directory and what is wrong, before its run
directory is made."""

import shutil
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("datasets")
pytest.importorskip("transformers")

from helpers import SAMPLE_BASE, tiny_model_dir  # noqa: E402

from ppo_fast import cli  # noqa: E402
from ppo_fast.trainer import train  # noqa: E402
from ppo_fast.trainer.config import ConfigError, PPOConfig, check_files  # noqa: E402
from ppo_fast.trainer.evaluation import EvalConfig, evaluate  # noqa: E402
from ppo_fast.trainer.modeldir import check_model_dir, check_reward_model, load_reward_model  # noqa: E402
from ppo_fast.trainer.supervised import RMConfig, SFTConfig, run_rm, run_sft  # noqa: E402

SAMPLE = SAMPLE_BASE.parent
# Short runs, should a check let a broken directory through: the test then fails in seconds.
QUICK_TRAIN = dict(steps=1, rollout_batch_size=4, minibatch_size=4, micro_batch_size=4, max_new_tokens=4,
                   eval_every=0, save_every=0, algorithm="grpo", samples_per_prompt=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    tiny_model_dir(root / "lm")
    tiny_model_dir(root / "rm", reward=True)
    tiny_model_dir(root / "no_tokenizer", tokenizer=False)
    (root / "config_only").mkdir()
    shutil.copy(SAMPLE_BASE / "config.json", root / "config_only")
    weights = shutil.copytree(root / "lm", root / "truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return {path.name: str(path) for path in root.iterdir()}


def _sft(model, out):
    run_sft(SFTConfig(model=model, data=str(SAMPLE / "sft.jsonl"), output_dir=out))


def _rm(model, out):
    run_rm(RMConfig(model=model, data=str(SAMPLE / "prefs.jsonl"), output_dir=out))


def _train(dirs, out, **fields):
    train(PPOConfig(**{"policy_model": dirs["lm"], "reward": dirs["rm"], "prompts_file": str(SAMPLE / "prompts.jsonl"),
                       **QUICK_TRAIN, **fields}, output_dir=out), log=lambda *a: None)


def _eval(dirs, out, **fields):
    evaluate(EvalConfig(**{"policy": dirs["lm"], "reward": dirs["rm"], "prompts": str(SAMPLE / "eval_prompts.jsonl"),
                           "num_prompts": 4, "max_new_tokens": 4, **fields}, output_dir=out), log=lambda *a: None)


NO_WEIGHTS = r"holds no weights \(none of model.safetensors, model.safetensors.index.json, pytorch_model.bin"
TRUNCATED = r"truncated/model.safetensors is truncated or not a safetensors file \(\d+ bytes; safetensors: "
NO_TOKENIZER = r"holds no tokenizer \(none of tokenizer.json, tokenizer_config.json"
NOT_A_REWARD_MODEL = (r"lm is not a reward model: its checkpoint \(LlamaForCausalLM\) has no weights for the score "
                      r"head \(score.weight\), which would start random")

CASES = [
    # sft starts a directory without weights afresh, but not one without a tokenizer.
    ("sft model", lambda d, out: _sft(d["config_only"], out), rf"^model: .*config_only {NO_TOKENIZER}"),
    ("sft model", lambda d, out: _sft(d["truncated"], out), rf"^model: .*{TRUNCATED}"),
    ("sft model", lambda d, out: _sft(d["no_tokenizer"], out), rf"^model: .*no_tokenizer {NO_TOKENIZER}"),
    ("rm model", lambda d, out: _rm(d["config_only"], out), r"^model: .*config_only holds no weights"),
    ("rm model", lambda d, out: _rm(d["truncated"], out), rf"^model: .*{TRUNCATED}"),
    ("rm model", lambda d, out: _rm(d["no_tokenizer"], out), rf"^model: .*no_tokenizer {NO_TOKENIZER}"),
    ("train policy_model", lambda d, out: _train(d, out, policy_model=d["config_only"]),
     rf"^policy_model: .*config_only {NO_WEIGHTS}"),
    ("train policy_model", lambda d, out: _train(d, out, policy_model=d["truncated"]), rf"^policy_model: .*{TRUNCATED}"),
    ("train policy_model", lambda d, out: _train(d, out, policy_model=d["no_tokenizer"]),
     rf"^policy_model: .*no_tokenizer {NO_TOKENIZER}"),
    ("train critic_model", lambda d, out: _train(d, out, critic_model=d["truncated"], algorithm="ppo",
                                                 samples_per_prompt=1), rf"^critic_model: .*{TRUNCATED}"),
    ("train reward", lambda d, out: _train(d, out, reward=d["config_only"]), rf"^reward: .*config_only {NO_WEIGHTS}"),
    ("train reward", lambda d, out: _train(d, out, reward=d["truncated"]), rf"^reward: .*{TRUNCATED}"),
    ("train reward", lambda d, out: _train(d, out, reward=d["lm"]), rf"^reward: .*{NOT_A_REWARD_MODEL}"),
    ("train reward", lambda d, out: _train(d, out, reward=f"0.5*{d['rm']},0.5*{d['lm']}"),
     rf"^reward: .*{NOT_A_REWARD_MODEL}"),
    ("train reward", lambda d, out: _train(d, out, reward=f"ensemble({d['rm']}|{d['lm']})"),
     rf"^reward: .*{NOT_A_REWARD_MODEL}"),
    ("train gold", lambda d, out: _train(d, out, gold=d["lm"]), rf"^gold: .*{NOT_A_REWARD_MODEL}"),
    ("eval policy", lambda d, out: _eval(d, out, policy=d["config_only"]), rf"^policy: .*config_only {NO_WEIGHTS}"),
    ("eval policy", lambda d, out: _eval(d, out, policy=d["truncated"]), rf"^policy: .*{TRUNCATED}"),
    ("eval policy", lambda d, out: _eval(d, out, policy=d["no_tokenizer"]), rf"^policy: .*no_tokenizer {NO_TOKENIZER}"),
    ("eval reference", lambda d, out: _eval(d, out, reference=d["config_only"]),
     rf"^reference: .*config_only {NO_WEIGHTS}"),
    ("eval reference", lambda d, out: _eval(d, out, reference=d["truncated"]), rf"^reference: .*{TRUNCATED}"),
    ("eval reward", lambda d, out: _eval(d, out, reward=d["config_only"]), rf"^reward: .*config_only {NO_WEIGHTS}"),
    ("eval reward", lambda d, out: _eval(d, out, reward=d["lm"]), rf"^reward: .*{NOT_A_REWARD_MODEL}"),
    ("eval reward", lambda d, out: _eval(d, out, reward=f"ensemble({d['lm']}|{d['rm']})"),
     rf"^reward: .*{NOT_A_REWARD_MODEL}"),
    ("eval gold", lambda d, out: _eval(d, out, gold=f"2*{d['lm']}"), rf"^gold: .*{NOT_A_REWARD_MODEL}"),
]


@pytest.mark.parametrize("option, run, message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_broken_or_wrong_model_directory_is_refused_before_the_run_directory(dirs, tmp_path, option, run, message):
    with pytest.raises(ConfigError, match=message):
        run(dirs, str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_the_command_line_names_the_option_and_exits_with_status_2(dirs, tmp_path, capsys):
    out = str(tmp_path / "runs")
    assert cli.main(["eval", "--policy", dirs["lm"], "--prompts", str(SAMPLE / "eval_prompts.jsonl"),
                     "--reward", dirs["lm"], "--output-dir", out]) == 2
    assert capsys.readouterr().err.startswith(f"ppo-fast: reward: {dirs['lm']} is not a reward model")
    assert cli.main(["train", "--policy-model", dirs["truncated"], "--reward", dirs["rm"], "--prompts-file",
                     str(SAMPLE / "prompts.jsonl"), "--output-dir", out]) == 2
    assert capsys.readouterr().err.startswith(f"ppo-fast: policy_model: {dirs['truncated']}/model.safetensors is "
                                              "truncated")
    assert not Path(out).exists()


def test_whole_directories_pass_and_every_weight_format_is_read(dirs, tmp_path):
    check_files(PPOConfig(policy_model=dirs["lm"], reward=f"0.5*{dirs['rm']},ensemble({dirs['rm']}|{dirs['rm']})",
                          gold=dirs["rm"], prompts_file=str(SAMPLE / "prompts.jsonl"), output_dir=str(tmp_path)))
    assert check_model_dir("model", str(SAMPLE_BASE), weights=False) is False  # sft's fresh start

    # Sharded safetensors: every shard the index names must be there and whole.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(dirs["rm"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    check_reward_model("reward", str(tmp_path / "sharded"))
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ConfigError, match=rf"^reward: .*{shards[-1].name} is missing \(.*model.safetensors.index.json "
                                          "lists it\\)"):
        check_reward_model("reward", str(tmp_path / "sharded"))

    # The names as transformers renames them when it loads: a head saved under the base model's
    # prefix is the head.
    from safetensors.torch import load_file, save_file

    prefixed = Path(shutil.copytree(dirs["rm"], tmp_path / "prefixed")) / "model.safetensors"
    weights = load_file(prefixed)
    weights["model.score.weight"] = weights.pop("score.weight")
    save_file(weights, prefixed, metadata={"format": "pt"})
    check_reward_model("reward", str(prefixed.parent))
    assert not AutoModelForSequenceClassification.from_pretrained(prefixed.parent, output_loading_info=True)[1][
        "missing_keys"]

    # A .bin checkpoint: its names are read too, and a truncated one is named.
    import torch

    (tmp_path / "bin").mkdir()
    shutil.copy(Path(dirs["lm"]) / "config.json", tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    check_reward_model("gold", str(tmp_path / "bin"))
    data = (tmp_path / "bin" / "pytorch_model.bin").read_bytes()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(ConfigError, match=r"^gold: .*pytorch_model.bin is truncated or not a PyTorch checkpoint"):
        check_reward_model("gold", str(tmp_path / "bin"))

    # An adapter's weights are not a model's: not taken for a directory without weights.
    (tmp_path / "adapter").mkdir()
    shutil.copy(SAMPLE_BASE / "config.json", tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^model: .*adapter holds adapter_model.safetensors but none of the weight "
                                          "files transformers loads"):
        check_model_dir("model", str(tmp_path / "adapter"), weights=False)


def test_loading_refuses_a_reward_model_whose_weights_transformers_would_initialise(dirs):
    # The check of every load, for what the checkpoint's names could not show beforehand.
    with pytest.raises(ConfigError, match=r"^reward: .*lm is not a whole reward model: transformers would initialise "
                                          r"1 of its weights afresh \(score.weight\)"):
        load_reward_model("reward", dirs["lm"])
    assert load_reward_model("reward", dirs["rm"]).config.num_labels == 1
