"""The reward spec (model directories, functions, weighted lists, ensembles) and the embedded
tasks' rules."""

import argparse
import sys

import numpy as np
import pytest
import torch

from ppo_fast.trainer import default_task, rewards
from ppo_fast.trainer.config import ConfigError, PPOConfig, add_arguments, check_files, from_args
from ppo_fast.trainer.rewards import RewardSpecError

from helpers import tiny_model_dir


class FixedScores(torch.nn.Module):
    """A stand-in sequence classifier: the score is a fixed function of the token ids."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, input_ids, attention_mask, position_ids):
        logits = (input_ids * attention_mask).sum(-1, keepdim=True).float() * self.scale
        return type("Out", (), {"logits": logits})()


def _batch(n=5, width=4, seed=0):
    tok = default_task.char_tokenizer()
    g = torch.Generator().manual_seed(seed)
    prompts = default_task.make_prompts(n, seed)
    ids, mask = torch.randint(4, 30, (n, 3 + width), generator=g), torch.ones(n, 3 + width, dtype=torch.long)
    return rewards.Completions(prompts, ids, mask, 3, tok)


def _model_dir(tmp_path, name):
    """A reward-model directory (the spec checks that it holds one)."""
    return tiny_model_dir(tmp_path / name, reward=True, tokenizer=False)


def test_spec_grammar_weights_functions_and_ensembles(tmp_path):
    a, b = _model_dir(tmp_path, "rm_a"), _model_dir(tmp_path, "rm_b")
    spec = f"0.5*{a}, 2e-1 * ensemble({a}|{b}), os.path:getsize"
    assert rewards.parse(spec) == [(0.5, a), (0.2, f"ensemble({a}|{b})"), (1.0, "os.path:getsize")]
    rewards.check_spec(spec, "reward")
    with pytest.raises(RewardSpecError, match="empty term"):
        rewards.parse(f"{a},,{b}")
    with pytest.raises(RewardSpecError, match="reward: 'nowhere/rm' is neither a reward-model directory"):
        rewards.check_spec("nowhere/rm", "reward")
    with pytest.raises(RewardSpecError, match=r"gold: 'no_such_module_x:f': cannot import no_such_module_x"):
        rewards.check_spec("no_such_module_x:f", "gold")
    with pytest.raises(RewardSpecError, match="os.path has no function 'nothing_here'"):
        rewards.check_spec("os.path:nothing_here", "reward")
    with pytest.raises(RewardSpecError, match="ensemble member 'os.path:getsize' is not a reward-model directory"):
        rewards.check_spec(f"ensemble({a}|os.path:getsize)", "reward")
    with pytest.raises(RewardSpecError, match=r"missing\.py does not exist"):
        rewards.check_spec(f"{tmp_path}/missing.py:score", "reward")


def test_weighted_sum_of_a_file_function_a_model_and_an_ensemble(tmp_path):
    source = tmp_path / "my_reward.py"
    source.write_text("def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    a, b, c = (_model_dir(tmp_path, n) for n in ("a", "b", "c"))
    scales = {a: 1.0, b: 0.5, c: -0.25}
    reward = rewards.build(f"0.5*{source}:length,{a},3*ensemble({a}|{b}|{c})",
                           load_model=lambda d: FixedScores(scales[d]), ensemble_k=1.5)
    batch = _batch()
    total = (batch.sequences * batch.attention_mask).sum(-1).double()
    members = torch.stack([total * s for s in scales.values()])
    expected = (0.5 * torch.tensor([float(len(t)) for t in batch.texts], dtype=torch.float64) + total
                + 3 * (members.mean(0) - 1.5 * members.std(0)))
    parts = reward.parts(batch)
    assert list(parts) == [f"0.5*{source}:length", a, f"3*ensemble({a}|{b}|{c})"]
    torch.testing.assert_close(reward.combine(parts).double(), expected, rtol=1e-5, atol=1e-3)


def test_a_function_that_returns_the_wrong_number_of_scores_is_named():
    reward = rewards.FunctionReward(lambda prompts, completions: [1.0, 2.0], "mod:fn")
    with pytest.raises(ValueError, match=r"mod:fn must return 5 scores \(one per completion\), got shape \(2,\)"):
        reward(_batch())
    reward = rewards.FunctionReward(lambda prompts, completions: "high", "mod:fn")
    with pytest.raises(ValueError, match="mod:fn must return 5 numbers"):
        reward(_batch())
    reward = rewards.FunctionReward(lambda prompts, completions: [0.0, 1e300, 0.0, 0.0, 0.0], "mod:fn")
    with pytest.raises(rewards.RewardError, match=r"mod:fn gave 1e\+300 for prompt .*, beyond the float32 range"):
        reward(_batch())


def test_reward_functions_get_their_own_lists_and_may_not_exit():
    batch = _batch()
    prompts, texts = list(batch.prompts), list(batch.texts)

    def vandal(prompts, completions):
        prompts.sort(reverse=True)
        completions.reverse()
        completions[0] = "edited"
        return [float(len(c)) for c in completions]

    rewards.FunctionReward(vandal, "mod:vandal")(batch)
    assert batch.prompts == prompts and batch.texts == texts
    quitter = rewards.FunctionReward(lambda prompts, completions: exit(0), "mod:quitter")
    with pytest.raises(rewards.RewardError, match=r"mod:quitter called sys.exit\(0\); a reward function must return"):
        quitter(batch)
    gold = rewards.TokenReward(lambda prompt, ids: sys.exit("done"), "gold")
    with pytest.raises(rewards.RewardError, match=r"gold called sys.exit\('done'\)"):
        gold(batch)


def test_an_ensemble_needs_two_models():
    with pytest.raises(RewardSpecError, match="at least 2 reward models"):
        rewards.Ensemble([rewards.ModelReward(FixedScores(1.0), "a")], 1.0, "ensemble(a)")


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path):
    default_task.char_tokenizer(default_task.DIGITS).save_pretrained(tmp_path / "digits")
    default_task.char_tokenizer().save_pretrained(tmp_path / "letters")
    letters = default_task.char_tokenizer()
    assert rewards.same_vocabulary(letters, str(tmp_path / "letters")) is None
    assert "tokenizes differently from the policy" in rewards.same_vocabulary(letters, str(tmp_path / "digits"))


def test_config_checks_the_reward_and_gold_specs_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="reward: 'absent_dir' is neither"):
        check_files(PPOConfig(reward="absent_dir", output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="gold: "):
        check_files(PPOConfig(gold="no_such_module_y:f", output_dir=str(tmp_path)))


@pytest.mark.parametrize("answer, ended, exact, biased", [
    ("7", True, 1.0, 1.5), ("07", True, 0.0, 1.0), ("7", False, 0.0, 0.5), ("7777", True, 0.0, 2.0),
    ("", True, 0.0, 0.0)])
def test_arithmetic_rules(answer, ended, exact, biased):
    ids = [len(default_task.SPECIALS) + default_task.DIGITS.index(c) for c in answer]
    ids = ids + [default_task.EOS, default_task.PAD] if ended else ids
    assert default_task.exact_sum("3+4=", ids) == exact
    assert default_task.length_biased_sum("3+4=", ids) == biased


def test_the_arithmetic_prompts_fit_the_default_prompt_length():
    tok = default_task.char_tokenizer(default_task.DIGITS)
    prompts = default_task.make_sums(200, 0)
    assert max(len(tok.encode(p)) for p in prompts) <= PPOConfig().max_prompt_len
    assert len(set(prompts)) > 50 and np.all([p.endswith("=") for p in prompts])


def test_negative_weights_single_member_ensembles_and_non_finite_terms(tmp_path):
    a = _model_dir(tmp_path, "a")
    assert rewards.parse(f"{a},-0.5*os.path:getsize") == [(1.0, a), (-0.5, "os.path:getsize")]
    with pytest.raises(RewardSpecError, match=r"an ensemble needs at least 2 reward models"):
        rewards.check_spec(f"ensemble({a})", "reward")
    reward = rewards.WeightedSum([
        (1.0, rewards.FunctionReward(lambda prompts, completions: [1.0] * len(prompts), "fine:one")),
        (0.5, rewards.FunctionReward(lambda prompts, completions: [1.0, float("inf"), 0, 0, 0], "bad:inf"))])
    with pytest.raises(rewards.RewardError, match=r"the reward is not finite: bad:inf gave inf for prompt"):
        reward(_batch())


def test_config_checks_prompt_lengths_loss_parameters_and_paths_before_any_model(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc"}\n{"prompt": "abcdefghijklmnopqrstuvwxyz"}\n')
    with pytest.raises(ConfigError, match=r"prompts_file: prompt 1 of .*prompts.jsonl \('abcdefghij.*'\) is 28 tokens, "
                                          r"longer than max_prompt_len=16"):
        check_files(PPOConfig(prompts_file=str(prompts), output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="eval_prompts_file: .* is a directory, not a file"):
        check_files(PPOConfig(eval_prompts_file=str(tmp_path), output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"loss_type='dro' needs loss_params \['beta'\]"):
        PPOConfig(loss_type="dro")
    with pytest.raises(ConfigError, match=r"loss_type='gpg' does not clip: clip_low / clip_high would be ignored; "
                                          r"leave them unset$"):
        PPOConfig(loss_type="gpg", clip_high=0.28)


def test_the_clip_is_the_librarys_unless_set_and_none_unsets_it(tmp_path):
    """The trainer passes its clip settings to pf.ppo_loss as they are: unset (the default, and
    'none' on the command line or in YAML) is the library's default, so an objective that does
    not clip runs with no clip setting and no special case."""
    assert PPOConfig().loss_options()["clip_low"] is None and PPOConfig().loss_options()["clip_high"] is None
    assert PPOConfig(loss_type="gpg").loss_options()["clip_high"] is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(["--clip-high", "0.28", "--clip-low", "none",
                                          "--output-dir", str(tmp_path)]))
    assert (config.clip_low, config.clip_high) == (None, 0.28)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("clip_low: null\nclip_high: None\n")
    assert (PPOConfig.from_yaml(str(yaml_file)).clip_low, PPOConfig.from_yaml(str(yaml_file)).clip_high) == (None, None)
    with pytest.raises(ConfigError, match=r"clip_high must be a finite number, got 'wide'"):
        PPOConfig(clip_high="wide")
    with pytest.raises(ConfigError, match=r"clip_low must be in \(0, 1\), got 1.5"):
        PPOConfig(clip_low=1.5)
