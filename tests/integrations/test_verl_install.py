"""``ppo_fast.integrations.verl.install()`` through verl 0.9.1's own entry points: the actor's loss
code (``verl.workers.utils.losses.ppo_loss``) for every loss mode, the trainer's
``compute_advantage`` for every estimator, and the FSDP engine's logits → log-prob / entropy / Σπ²
step. Each must give verl's own result, and ppo_fast's code must be what ran."""

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402
from helpers import subprocess_env  # noqa: E402

import ppo_fast.integrations.verl as pf_verl  # noqa: E402
from ppo_fast import correction, dispatch, estimators, objectives  # noqa: E402
from ppo_fast.integrations.verl import advantages as verl_advantages  # noqa: E402
from ppo_fast.integrations.verl import rollout_correction as verl_rollout_correction  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    core_algos = peers.verl("trainer.ppo.core_algos")
    verl_config = peers.verl("workers.config")
    actor_losses = peers.verl("workers.utils.losses")
    ray_trainer = peers.verl("trainer.ppo.ray_trainer")
    fsdp_engine = peers.verl("workers.engine.fsdp.transformer_impl")
    verl_F = peers.verl("utils.torch_functional")
    tensordict_utils = peers.verl("utils.tensordict_utils")
    from tensordict import TensorDict
    from verl import DataProto
    from verl.trainer.config import AlgoConfig


@pytest.fixture
def ran(monkeypatch):
    """What of ppo_fast ran during the test: the ops of the dispatch table, once per call that
    chose their backend; ``objective`` for each per-token policy objective; ``advantages`` and
    ``rollout_correction`` once code of those modules (ours or their verl adapters) ran."""
    seen = []
    choose, policy_terms = dispatch.choose, objectives.policy_terms
    modules = {os.path.realpath(module.__file__): name for module, name in (
        (estimators, "advantages"), (verl_advantages, "advantages"), (correction, "rollout_correction"),
        (verl_rollout_correction, "rollout_correction"))}

    def choose_spy(op, device):
        seen.append(op)
        return choose(op, device)

    def objective_spy(*args, **kwargs):
        seen.append("objective")
        return policy_terms(*args, **kwargs)

    def profile(frame, event, arg):
        if event == "call":
            name = modules.get(os.path.realpath(frame.f_code.co_filename))
            if name is not None and name not in seen:
                seen.append(name)

    monkeypatch.setattr(dispatch, "choose", choose_spy)
    monkeypatch.setattr(objectives, "policy_terms", objective_spy)
    sys.setprofile(profile)
    yield seen
    sys.setprofile(None)


@pytest.fixture
def installed():
    report = pf_verl.install()
    yield report
    pf_verl.uninstall()


def test_install_reaches_every_target_and_uninstall_restores_verl():
    verl_vanilla = core_algos.POLICY_LOSS_REGISTRY["vanilla"]
    verl_gae = core_algos.compute_gae_advantage_return
    verl_logprobs = fsdp_engine.logprobs_from_logits
    report = pf_verl.install()
    try:
        assert set(core_algos.POLICY_LOSS_REGISTRY) >= set(pf_verl.POLICY_LOSSES)
        for name, fn in pf_verl.POLICY_LOSSES.items():
            assert core_algos.POLICY_LOSS_REGISTRY[name] is fn
        assert set(core_algos.ADV_ESTIMATOR_REGISTRY) == set(pf_verl.ESTIMATORS)
        for name, fn in pf_verl.ESTIMATORS.items():
            assert core_algos.ADV_ESTIMATOR_REGISTRY[name] is fn
        assert core_algos.compute_gae_advantage_return is pf_verl.compute_gae_advantage_return
        assert actor_losses.agg_loss is pf_verl.agg_loss
        assert fsdp_engine.logprobs_from_logits is pf_verl.logprobs_from_logits
        assert verl_F.entropy_from_logits is pf_verl.entropy_from_logits
        assert report["verl.workers.engine.fsdp.transformer_impl"].startswith("patched")
        # Megatron is not installed here: reported, not fatal.
        assert pf_verl.installed()
    finally:
        pf_verl.uninstall()
    assert core_algos.POLICY_LOSS_REGISTRY["vanilla"] is verl_vanilla
    assert core_algos.compute_gae_advantage_return is verl_gae
    assert fsdp_engine.logprobs_from_logits is verl_logprobs
    assert not pf_verl.installed()


# --------------------------------------------------------------------------------------------
# The actor's loss code
# --------------------------------------------------------------------------------------------


def _actor_batch(seed):
    g = torch.Generator().manual_seed(seed)
    B, P, R = 4, 3, 6
    attention = torch.ones(B, P + R, dtype=torch.long)
    for row, length in enumerate([6, 2, 4, 5]):
        attention[row, P + length:] = 0
    nnz = int(attention.sum())
    log_probs = -(torch.rand(nnz, generator=g, dtype=torch.float64) + 0.1)
    entropy = torch.rand(nnz, generator=g, dtype=torch.float64)
    data = TensorDict({
        "prompts": torch.randint(0, 50, (B, P), generator=g),
        "responses": torch.randint(0, 50, (B, R), generator=g),
        "attention_mask": attention,
        "response_mask": attention[:, P:],
        "old_log_probs": -(torch.rand(B, R, generator=g, dtype=torch.float64) + 0.1),
        "advantages": torch.randn(B, R, generator=g, dtype=torch.float64),
        "ref_log_prob": -(torch.rand(B, R, generator=g, dtype=torch.float64) + 0.1),
        "rollout_is_weights": torch.rand(B, R, generator=g, dtype=torch.float64) + 0.5,
    }, batch_size=[B])
    tensordict_utils.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    return log_probs, entropy, data


def _actor_config(loss_mode):
    correction = verl_config.RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold=1.5,
                                                     rollout_rs="token_k1", rollout_rs_threshold="0.5_2.0",
                                                     loss_type="reinforce") \
        if hasattr(verl_config, "RolloutCorrectionConfig") else None
    policy = verl_config.PolicyLossConfig(loss_mode=loss_mode, dro_beta=0.1, kl_cov_ratio=0.2,
                                          clip_cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=1.0,
                                          **({"rollout_correction": correction} if correction else {}))
    return verl_config.FSDPActorConfig(policy_loss=policy, rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                                       entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05,
                                       kl_loss_type="low_var_kl", loss_agg_mode="seq-mean-token-mean")


def _actor_step(loss_mode):
    log_probs, entropy, data = _actor_batch(0)
    log_probs.requires_grad_(True)
    torch.manual_seed(11)
    loss, metrics = actor_losses.ppo_loss(_actor_config(loss_mode), {"log_probs": log_probs,
                                                                     "entropy": entropy}, data)
    (grad,) = torch.autograd.grad(loss, log_probs)
    return loss.detach(), {k: _numbers(v) for k, v in metrics.items()}, grad


def _numbers(metric):
    values = metric.values if hasattr(metric, "values") else [metric]
    return [float(x) for x in values]


@pytest.mark.parametrize("loss_mode", list(pf_verl.POLICY_LOSSES))
def test_actor_loss_code_runs_ours_and_gives_verls_result(loss_mode, ran):
    verl_result = _actor_step(loss_mode)
    assert not ran, "without install, verl's own code ran"
    pf_verl.install()
    try:
        ours = _actor_step(loss_mode)
    finally:
        pf_verl.uninstall()
    assert "objective" in ran
    if loss_mode == "bypass_mode":
        assert "rollout_correction" in ran
    torch.testing.assert_close(ours[0], verl_result[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(ours[2], verl_result[2], rtol=0, atol=1e-9)
    assert ours[1].keys() == verl_result[1].keys()
    for key in verl_result[1]:
        assert ours[1][key] == pytest.approx(verl_result[1][key], abs=1e-9, nan_ok=True), key


# --------------------------------------------------------------------------------------------
# The trainer's compute_advantage
# --------------------------------------------------------------------------------------------


def _advantage_data(seed, with_extras, singleton=True):
    g = torch.Generator().manual_seed(seed)
    B, T, P = 8, 6, 3
    mask = torch.ones(B, T, dtype=torch.int64)
    lengths = [6, 3, 5, 1, 6, 4, 2, 6]
    for row, length in enumerate(lengths):
        mask[row, length:] = 0
    rewards = torch.zeros(B, T, dtype=torch.float64)
    rewards[torch.arange(B), torch.tensor(lengths) - 1] = torch.randn(B, generator=g, dtype=torch.float64)
    tensors = {"token_level_rewards": rewards, "response_mask": mask,
               "values": torch.randn(B, T, generator=g, dtype=torch.float64),
               "reward_baselines": torch.randn(B, generator=g, dtype=torch.float64),
               "old_log_probs": -(torch.rand(B, T, generator=g, dtype=torch.float64) + 0.1),
               "sum_pi_squared": torch.rand(B, T, generator=g, dtype=torch.float64) * 0.5 + 0.1,
               "prompts": torch.randint(0, 50, (B, P), generator=g),
               "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.int64), mask], 1)}
    groups = [0, 0, 1, 1, 2, 2, 0, 3 if singleton else 2]
    uid = np.array([f"prompt-{i}" for i in groups], dtype=object)
    non_tensors = {"uid": uid, "accuracy": np.linspace(0, 1, B).astype(np.float32),
                   "format": np.linspace(1, 0, B).astype(np.float32)}
    if not with_extras:
        for key in ("reward_baselines",):
            tensors.pop(key)
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


@pytest.mark.parametrize("estimator", list(pf_verl.ESTIMATORS))
def test_compute_advantage_runs_ours_and_gives_verls_result(estimator, ran):
    config = AlgoConfig(gamma=0.95, lam=0.9, gdpo_reward_keys=["accuracy", "format"])
    kwargs = dict(adv_estimator=estimator, gamma=0.95, lam=0.9, norm_adv_by_std_in_grpo=True, config=config)
    extras = estimator == "remax"
    singleton = estimator != "grpo_passk"  # pass@k needs two samples per group
    if estimator == "grpo_passk":
        kwargs["config"] = AlgoConfig(norm_adv_by_std_in_grpo=True)
    verl_out = ray_trainer.compute_advantage(_advantage_data(0, extras, singleton), **kwargs)
    assert not ran
    pf_verl.install()
    try:
        ours = ray_trainer.compute_advantage(_advantage_data(0, extras, singleton), **kwargs)
    finally:
        pf_verl.uninstall()
    assert "advantages" in ran or "gae" in ran, ran
    # grpo_vectorized's group statistics and gdpo's per-key scores are float32 inside verl.
    tol = 2e-6 if estimator in ("grpo_vectorized", "gdpo") else 1e-9
    for key in ("advantages", "returns"):
        torch.testing.assert_close(ours.batch[key], verl_out.batch[key], rtol=0, atol=tol, msg=key)


# --------------------------------------------------------------------------------------------
# The FSDP engine's logits → log-probs, entropy, Σπ²
# --------------------------------------------------------------------------------------------


def _engine_outputs():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 3, 7])
    nnz, vocab = int(lengths.sum()), 93
    logits = 3 * torch.randn(1, nnz, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (nnz,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    input_ids = torch.nested.nested_tensor_from_jagged(labels.clone(), offsets)
    micro_batch = TensorDict({"input_ids": input_ids}, batch_size=[3])
    tensordict_utils.assign_non_tensor(micro_batch, calculate_entropy=True, calculate_sum_pi_squared=True)
    engine = SimpleNamespace(use_ulysses_sp=False, compute_entropy_from_logits=verl_F.entropy_from_logits,
                             engine_config=SimpleNamespace(entropy_checkpointing=False,
                                                           entropy_from_logits_with_chunking=False))
    engine._gather_and_unpad_packed = lambda t, pad: fsdp_engine.FSDPEngineWithLMHead._gather_and_unpad_packed(
        engine, t, pad)
    output_args = {"input_ids_rmpad_rolled": labels, "temperature_rmpad": torch.ones(nnz, dtype=torch.float64),
                   "pad_size": 0, "temperature_is_one": True}
    out = fsdp_engine.FSDPEngineWithLMHead.prepare_model_outputs(
        engine, SimpleNamespace(logits=logits), output_args, micro_batch, None)
    return {key: value.values() for key, value in out.items()}


def test_fsdp_engine_turns_logits_into_log_probs_entropy_and_sum_pi_squared_with_ours(ran):
    verl_out = _engine_outputs()
    assert not ran
    pf_verl.install()
    try:
        ours = _engine_outputs()
    finally:
        pf_verl.uninstall()
    assert ran.count("token_logprobs") >= 3, ran
    assert ours.keys() == verl_out.keys() == {"log_probs", "entropy", "sum_pi_squared"}
    for key in verl_out:
        torch.testing.assert_close(ours[key], verl_out[key], rtol=0, atol=1e-12, msg=key)


# --------------------------------------------------------------------------------------------
# The plugin: PPO_FAST_VERL=1 installs in any process that imports verl
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plugin_installs_on_import_of_verl_only_when_asked():
    probe = ("import warnings; warnings.simplefilter('ignore'); "
             "import verl.trainer.ppo.core_algos as c; "
             "print(c.POLICY_LOSS_REGISTRY['gspo'].__module__)")
    for flag, expected in (("1", "ppo_fast.integrations.verl.losses"), ("", "verl.trainer.ppo.core_algos")):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                                env=subprocess_env(PPO_FAST_VERL=flag))
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == expected, (flag, result.stdout)
