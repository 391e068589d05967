"""ppo_fast.integrations.verl's losses against verl 0.9.1's own functions: loss, metrics and the
gradient with respect to the log-probs, float64, 1e-9, for every registered loss mode, every
aggregation, the global batch counts, IS weights, and every mask dtype verl meets."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402

from ppo_fast.integrations.verl import losses as ours  # noqa: E402

core_algos = peers.verl("trainer.ppo.core_algos")
verl_config = peers.verl("workers.config")

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
MASK_DTYPES = [torch.bool, torch.int64, torch.float32, torch.float64]
BATCH_INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 77, "global_batch_size": 16, "loss_scale_factor": 7}]
CONFIGS = [
    {},
    {"clip_ratio": 0.3, "clip_ratio_low": None, "clip_ratio_high": 0.28, "clip_ratio_c": 2.5,
     "tau_pos": 1.3, "tau_neg": 2.0, "policy_loss": {"dro_beta": 0.7, "ppo_kl_coef": None, "kl_cov_ratio": 0.05}},
    {"clip_ratio_low": 0.1, "clip_ratio_high": 0.05, "policy_loss": {"dro_beta": 0.1, "kl_cov_ratio": 0.2}},
]
LOSSES = ["vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "kl_cov", "geo_mean", "dro", "cispo"]


def actor_config(batch_info, kw):
    kw = dict(kw)
    policy = verl_config.PolicyLossConfig(**kw.pop("policy_loss", {}))
    return verl_config.FSDPActorConfig(policy_loss=policy, global_batch_info=dict(batch_info), rollout_n=1,
                                       ppo_micro_batch_size_per_gpu=1, **kw)


def batch(seed, mask_dtype, B=7, T=9):
    g = torch.Generator().manual_seed(seed)
    old = -(torch.randn(B, T, generator=g, dtype=torch.float64) + 1).abs()
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [9, 1, 0, 5, 3, 9, 7][:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(B, T, generator=g,
                                                                                 dtype=torch.float64)
    adv[3] = 0.0
    adv[0, 2] = 0.0
    weights = (0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).exp().clamp(max=2.0) * mask
    return old, logp, adv, mask.to(mask_dtype), weights


def run(fn, old, logp, adv, mask, mode, config, weights):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                       loss_agg_mode=mode, config=config, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, logp, allow_unused=True)
    return loss.detach(), metrics, torch.zeros_like(logp) if grad is None else grad


def assert_same(theirs, mine, tol=1e-9):
    (t_loss, t_metrics, t_grad), (m_loss, m_metrics, m_grad) = theirs, mine
    torch.testing.assert_close(m_loss, t_loss.to(m_loss.dtype), rtol=0, atol=tol, equal_nan=True)
    assert list(m_metrics) == list(t_metrics)
    for key in t_metrics:
        assert m_metrics[key] == pytest.approx(float(t_metrics[key]), abs=tol, nan_ok=True), key
    torch.testing.assert_close(m_grad, t_grad, rtol=0, atol=tol)


@pytest.mark.parametrize("loss_mode", LOSSES)
def test_policy_losses_equal_verl(loss_mode):
    cases = itertools.product(range(2), MASK_DTYPES, MODES, BATCH_INFOS, CONFIGS, [False, True])
    for seed, mask_dtype, mode, info, kw, with_weights in cases:
        if loss_mode == "dro" and "policy_loss" not in kw:
            continue
        old, logp, adv, mask, weights = batch(seed, mask_dtype)
        config = actor_config(info, kw)
        weights = weights if with_weights else None
        theirs = run(core_algos.POLICY_LOSS_REGISTRY[loss_mode], old, logp, adv, mask, mode, config, weights)
        mine = run(getattr(ours, f"compute_policy_loss_{loss_mode}"), old, logp, adv, mask, mode, config,
                   weights)
        # geo_mean divides by count + 1e-8 in float64 when the mask is float64 (ours: the count).
        tol = 1e-7 if (loss_mode == "geo_mean" and mask_dtype == torch.float64) else 1e-9
        assert_same(theirs, mine, tol)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_clip_cov_draws_like_verl(mask_dtype, mode):
    """With the global generator seeded alike, the random cut picks the same tokens."""
    old, logp, adv, mask, weights = batch(0, mask_dtype)
    config = actor_config({}, {"policy_loss": {"clip_cov_ratio": 0.2, "clip_cov_lb": -1.0, "clip_cov_ub": 1.0}})
    torch.manual_seed(7)
    theirs = run(core_algos.compute_policy_loss_clip_cov, old, logp, adv, mask, mode, config, weights)
    torch.manual_seed(7)
    mine = run(ours.compute_policy_loss_clip_cov, old, logp, adv, mask, mode, config, weights)
    assert_same(theirs, mine)
    assert 0 < theirs[1]["actor/pg_clipfrac"] < 1, "the random cut must fire on a subset"


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_reinforce_equals_verl(mask_dtype, mode):
    old, logp, adv, mask, weights = batch(1, mask_dtype)
    config = actor_config({}, {})
    for w in (None, weights):
        theirs = run(lambda **kw: core_algos.compute_policy_loss_reinforce(rollout_log_prob=kw.pop("old_log_prob"),
                                                                           **kw), old, logp, adv, mask, mode,
                     config, w)
        mine = run(lambda **kw: ours.compute_policy_loss_reinforce(rollout_log_prob=kw.pop("old_log_prob"), **kw),
                   old, logp, adv, mask, mode, config, w)
        assert_same(theirs, mine)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_agg_loss_value_loss_and_kl_equal_verl(mask_dtype):
    old, logp, adv, mask, _ = batch(2, mask_dtype)
    for mode, info in itertools.product(MODES, BATCH_INFOS):
        x = logp.clone().requires_grad_(True)
        y = logp.clone().requires_grad_(True)
        theirs, mine = core_algos.agg_loss(x * adv, mask, mode, **info), ours.agg_loss(y * adv, mask, mode, **info)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(mine, y)[0], torch.autograd.grad(theirs, x)[0],
                                   rtol=0, atol=1e-12)

        returns = old + adv
        v_old = old + 0.1 * adv
        vt, vm = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        t_loss, t_frac = core_algos.compute_value_loss(vt, returns, v_old, mask, 0.2, mode, **info)
        m_loss, m_frac = ours.compute_value_loss(vm, returns, v_old, mask, 0.2, mode, **info)
        torch.testing.assert_close(m_loss, t_loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(m_frac, t_frac, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(m_loss, vm)[0], torch.autograd.grad(t_loss, vt)[0],
                                   rtol=0, atol=1e-12)
    for name in ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+", "abs+", "k2+"):
        x, y = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        theirs, mine = core_algos.kl_penalty(x, old, name), ours.kl_penalty(y, old, name)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
        g = torch.randn_like(logp)
        torch.testing.assert_close(torch.autograd.grad(mine, y, g)[0], torch.autograd.grad(theirs, x, g)[0],
                                   rtol=0, atol=1e-12)


def test_masked_positions_cannot_reach_our_loss():
    """verl multiplies padding into its seq-mean sums (NaN·0 = NaN); ours selects."""
    old, logp, adv, mask, _ = batch(0, torch.bool)
    config = actor_config({}, {})
    poisoned = logp.masked_fill(~mask, float("nan"))
    for name in LOSSES[:-2] + ["cispo"]:
        fn = getattr(ours, f"compute_policy_loss_{name}")
        for mode in MODES:
            clean = fn(old, logp, adv, mask, mode, config)[0]
            dirty = fn(old, poisoned, adv.masked_fill(~mask, float("inf")), mask, mode, config)[0]
            assert torch.equal(clean, dirty), (name, mode)


def test_bad_inputs_are_named():
    old, logp, adv, mask, _ = batch(0, torch.bool)
    config = actor_config({}, {})
    with pytest.raises(ValueError, match="config"):
        ours.compute_policy_loss_vanilla(old, logp, adv, mask)
    with pytest.raises(ValueError, match="response_mask must hold only 0 and 1"):
        ours.compute_policy_loss_vanilla(old, logp, adv, mask.double() * 0.5, config=config)
    with pytest.raises(ValueError, match="advantages must have the shape"):
        ours.compute_policy_loss_vanilla(old, logp, adv[:, :3], mask, config=config)
    with pytest.raises(ValueError, match="dro_beta"):
        ours.compute_policy_loss_dro(old, logp, adv, mask, config=config)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ours.agg_loss(logp, mask, "token-median")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        ours.agg_loss(logp, mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match=r"config.clip_ratio_c must be a number, got None"):
        ours.compute_policy_loss_vanilla(old, logp, adv, mask, config={"clip_ratio": 0.2, "clip_ratio_low": None,
                                                                       "clip_ratio_high": None, "clip_ratio_c": None})
    with pytest.raises(ValueError, match=r"verl config: config.clip_ratio_low \(or clip_ratio\) must be"):
        ours.compute_policy_loss_vanilla(old, logp, adv, mask, config={"clip_ratio": "0.2", "clip_ratio_low": None,
                                                                       "clip_ratio_high": None})
    with pytest.raises(ValueError, match="config.tau_pos must be a number"):
        ours.compute_policy_loss_sapo(old, logp, adv, mask, config={"tau_neg": 1.0})
