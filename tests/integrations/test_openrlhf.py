"""ppo_fast.integrations.openrlhf against OpenRLHF 0.11.2's own ``PolicyLoss``, ``ValueLoss``,
``compute_approx_kl`` and log-prob/entropy functions: every option, float64, 1e-9, gradients
included (``compute_approx_kl``: OpenRLHF computes in float32, compared at float32 rounding)."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402

from ppo_fast.integrations import openrlhf as ours  # noqa: E402

theirs_loss = peers.openrlhf("loss")
theirs_utils = peers.openrlhf("utils")

MASK_DTYPES = [torch.bool, torch.int64, torch.float64]
COUNTS = [{}, {"dp_size": 2, "batch_num_tokens": 41.0, "global_batch_size": 9.0}]
CORRECTIONS = [
    dict(),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.8, 1.2)),
    dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.8, 1.2)),
    dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=(0.95, 1.05)),
    dict(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.01)),
    dict(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.01)),
    dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.0, 0.05)),
    dict(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=(0.0, 0.05)),
]


def batch(seed, mask_dtype, B=6, T=8):
    g = torch.Generator().manual_seed(seed)
    old = -(torch.randn(B, T, generator=g, dtype=torch.float64) + 1).abs()
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(B, T, generator=g,
                                                                                 dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate([8, 1, 5, 3, 8, 6][:B]):
        mask[b, :n] = True
    return logp, old, rollout, adv, mask.to(mask_dtype)


def run(module, logp, *args, **kwargs):
    x = logp.clone().requires_grad_(True)
    out = module(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(out[0], x)
    return out, grad


def same(a, b, tol=1e-9):
    if a is None or b is None:
        assert a is None and b is None
        return
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b).to(torch.as_tensor(a).dtype),
                               rtol=0, atol=tol, equal_nan=True)


@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("correction", CORRECTIONS, ids=lambda c: "-".join(map(str, c.values())) or "off")
def test_policy_loss_equals_openrlhf(policy_loss_type, correction):
    for seed, mask_dtype, counts, dual_clip, token_level in itertools.product(
            range(2), MASK_DTYPES, COUNTS, [None, 3.0], [True, False]):
        logp, old, rollout, adv, mask = batch(seed, mask_dtype)
        kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level,
                  policy_loss_type=policy_loss_type, **correction)
        args = (old, adv, mask, rollout)
        (t_out, t_grad) = run(theirs_loss.PolicyLoss(**kw), logp, *args, **counts)
        (m_out, m_grad) = run(ours.PolicyLoss(**kw), logp, *args, **counts)
        for t, m in zip(t_out, m_out):
            same(m, t)
        torch.testing.assert_close(m_grad, t_grad, rtol=0, atol=1e-9)


@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
def test_dual_clip_binds_as_in_openrlhf(policy_loss_type):
    """Far off-policy with negative advantages, where the dual clip decides the loss."""
    logp, old, rollout, adv, mask = batch(4, torch.bool)
    logp = old + 1.5
    adv = -adv.abs() - 0.1
    for dual_clip in (None, 3.0):
        kw = dict(dual_clip=dual_clip, policy_loss_type=policy_loss_type)
        (t_out, t_grad) = run(theirs_loss.PolicyLoss(**kw), logp, old, adv, mask, rollout)
        (m_out, m_grad) = run(ours.PolicyLoss(**kw), logp, old, adv, mask, rollout)
        for t, m in zip(t_out, m_out):
            same(m, t)
        torch.testing.assert_close(m_grad, t_grad, rtol=0, atol=1e-9)
        if dual_clip is not None:
            assert (m_grad == 0).all(), "the cap binds everywhere here"


def test_the_correction_fires():
    logp, old, rollout, adv, mask = batch(0, torch.bool)
    for correction in CORRECTIONS[1:]:
        _, _, _, vllm_kl, filtered = ours.PolicyLoss(**correction)(logp, old, adv, mask, rollout)
        assert 0 < float(filtered) < 1, correction
        assert vllm_kl is not None


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_value_loss_equals_openrlhf(mask_dtype):
    for seed, counts, clip, token_level in itertools.product(range(2), COUNTS, [None, 0.2], [True, False]):
        values, old, returns, _, mask = batch(seed, mask_dtype)
        (t_loss, t_grad) = run(lambda v, *a, **k: (theirs_loss.ValueLoss(clip, token_level)(v, *a, **k),),
                               values, old, returns, mask, **counts)
        (m_loss, m_grad) = run(lambda v, *a, **k: (ours.ValueLoss(clip, token_level)(v, *a, **k),),
                               values, old, returns, mask, **counts)
        same(m_loss[0], t_loss[0])
        torch.testing.assert_close(m_grad, t_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
def test_compute_approx_kl_equals_openrlhf(estimator, unbiased, with_old):
    logp, old, ref, _, _ = batch(3, torch.bool)
    ref = ref.clone()
    ref[0, 0] = logp[0, 0] + 15  # past the k3 bound and the ±10 value clamp
    for dtype, tol in ((torch.float32, 0.0), (torch.float64, 2e-6)):
        results = []
        for fn in (theirs_utils.compute_approx_kl, ours.compute_approx_kl):
            x = logp.to(dtype).requires_grad_(True)
            value = fn(x, ref.to(dtype), log_probs_old=old.to(dtype) if with_old else None,
                       kl_estimator=estimator, unbiased_gradient=unbiased)
            g = torch.linspace(-1, 1, value.numel(), dtype=value.dtype).view_as(value)
            results.append((value, torch.autograd.grad(value, x, g)[0]))
        (t_value, t_grad), (m_value, m_grad) = results
        torch.testing.assert_close(m_value, t_value.to(m_value.dtype), rtol=tol, atol=tol)
        torch.testing.assert_close(m_grad, t_grad.to(m_grad.dtype), rtol=tol, atol=tol)


def test_log_probs_and_entropy_equal_openrlhf():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 5, 37, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 37, (2, 5), generator=g)
    for temperature in (1.0, 0.7):
        want = theirs_utils.log_probs_from_logits(logits.clone(), labels, temperature=temperature)
        original = logits.clone()
        got = ours.log_probs_from_logits(logits, labels, temperature=temperature)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert torch.equal(logits, original), "the caller's logits are left alone"
    entropy = theirs_utils.compute_entropy._torchdynamo_orig_callable(logits)
    torch.testing.assert_close(ours.compute_entropy(logits), entropy, rtol=0, atol=1e-12)


def test_masked_positions_cannot_reach_our_loss():
    logp, old, rollout, adv, mask = batch(1, torch.bool)
    for correction in CORRECTIONS:
        for loss_type in ("ppo", "gspo"):
            module = ours.PolicyLoss(policy_loss_type=loss_type, **correction)
            clean = module(logp, old, adv, mask, rollout)[0]
            dirty = module(logp.masked_fill(~mask, float("nan")), old.masked_fill(~mask, float("inf")), adv,
                           mask, rollout.masked_fill(~mask, float("-inf")))[0]
            assert torch.equal(clean, dirty), (loss_type, correction)


def test_constructor_errors_are_named():
    with pytest.raises(ValueError, match="policy_loss_type"):
        ours.PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match="dual_clip must be > 1.0"):
        ours.PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_eps_low must be a finite number >= 0"):
        ours.PolicyLoss(clip_eps_low=-0.1)
    with pytest.raises(ValueError, match="is_correction_mode='clip' needs"):
        ours.PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError, match="bounds a divergence from above"):
        ours.PolicyLoss(is_correction_level="token", is_correction_gating="tv")
    with pytest.raises(ValueError, match="needs rollout_log_probs"):
        logp, old, _, adv, mask = batch(0, torch.bool)
        ours.PolicyLoss(is_correction_level="token")(logp, old, adv, mask)
