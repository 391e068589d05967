"""The reference ops against independent formulations of the same math, in float64.

The reference is the oracle for every fast path, so it is itself checked against textbook forms
(log_softmax, −Σ p log p, verl's loops and aggregation formulas) and with gradcheck.
"""

import math

import pytest
import torch
from torch.autograd import gradcheck

import ppo_fast as pf
from ppo_fast import spec as R

F64 = torch.float64


def test_token_logprobs_matches_log_softmax_and_entropy_definition():
    logits = torch.randn(4, 9, 37, dtype=F64) * 3
    labels = torch.randint(0, 37, (4, 9))
    labels[0, :3] = -100
    logp, ent = R.token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    log_probs = torch.log_softmax(logits / 0.7, -1)
    expected = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected[0, :3] = 0
    expected_ent = -(log_probs.exp() * log_probs).sum(-1)
    expected_ent[0, :3] = 0
    torch.testing.assert_close(logp, expected)
    torch.testing.assert_close(ent, expected_ent)


def test_token_logprobs_with_banned_tokens_has_finite_entropy():
    logits = torch.randn(3, 11, dtype=F64)
    logits[:, :4] = float("-inf")
    logp, ent = R.token_logprobs(logits, torch.tensor([5, 6, 10]), return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(ent, R.token_logprobs(logits[:, 4:], torch.tensor([1, 2, 6]),
                                                      return_entropy=True)[1])


def test_token_logprobs_gradcheck():
    logits = torch.randn(5, 13, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 12, -100, 3, 7])

    def f(x):
        logp, ent = R.token_logprobs(x, labels, temperature=1.3, return_entropy=True)
        return torch.stack([logp, ent])

    assert gradcheck(f, (logits,))


def verl_style_gae(rewards, values, mask, gamma, lam):
    """verl's multi-turn loop, written independently: skipped tokens carry value and advantage."""
    B, T = rewards.shape
    next_values = torch.zeros(B, dtype=F64)
    last = torch.zeros(B, dtype=F64)
    out = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        candidate = delta + gamma * lam * last
        keep = mask[:, t].to(F64)
        next_values = values[:, t] * keep + (1 - keep) * next_values
        last = candidate * keep + (1 - keep) * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def test_gae_matches_verl_loop_with_observation_tokens():
    r, v = torch.randn(3, 20, dtype=F64), torch.randn(3, 20, dtype=F64)
    mask = torch.rand(3, 20) > 0.3
    mask[1] = False
    adv, ret = R.gae(r, v, mask, gamma=0.99, lam=0.9)
    exp_adv, exp_ret = verl_style_gae(r, v, mask, 0.99, 0.9)
    # verl multiplies its advantages by the mask at the end; here both outputs are 0 off the mask.
    torch.testing.assert_close(adv, torch.where(mask, exp_adv, 0.0))
    torch.testing.assert_close(ret, torch.where(mask, exp_ret, 0.0))


def test_gae_without_mask_is_textbook_gae():
    r, v = torch.randn(1, 6, dtype=F64), torch.randn(1, 6, dtype=F64)
    gamma, lam = 0.9, 0.8
    adv, _ = R.gae(r, v, torch.ones(1, 6), gamma=gamma, lam=lam)
    v_next = torch.cat([v[0, 1:], torch.zeros(1, dtype=F64)])
    delta = r[0] + gamma * v_next - v[0]
    expected = [sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, 6)) for t in range(6)]
    torch.testing.assert_close(adv[0], torch.stack(expected))


def test_gae_packed_equals_padded_per_sequence():
    lengths = [5, 1, 0, 9]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    total = sum(lengths)
    r, v = torch.randn(total, dtype=F64), torch.randn(total, dtype=F64)
    m = torch.rand(total) > 0.2
    adv, ret = R.gae_packed(r, v, m, cu, gamma=0.95, lam=0.9)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            pa, pr = R.gae(r[None, a:b], v[None, a:b], m[None, a:b], gamma=0.95, lam=0.9)
            torch.testing.assert_close(adv[a:b], pa[0])
            torch.testing.assert_close(ret[a:b], pr[0])


def test_masked_whiten_formula():
    x = torch.randn(4, 7, dtype=F64) * 3 + 2
    m = torch.rand(4, 7) > 0.4
    sel = x[m]
    expected = (x - sel.mean()) / torch.sqrt(sel.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(R.masked_whiten(x, m), torch.where(m, expected, 0.0))
    torch.testing.assert_close(R.masked_whiten(x, m, shift_mean=False),
                               torch.where(m, expected + sel.mean(), 0.0))


@pytest.mark.parametrize("magnitude", [1e-30, 1e20, 3e38])
def test_statistics_do_not_overflow_or_underflow_in_float32(magnitude):
    """Values near float32's limits: squares of them overflow, yet the whitened values and group
    advantages are those of the same values at unit scale."""
    unit = torch.tensor([1.0, -0.5, 0.25, 0.75, -1.0, 0.1])
    x = (unit * magnitude).float()
    mask = torch.ones(6, dtype=torch.bool)
    whitened = R.masked_whiten(x, mask)
    assert torch.isfinite(whitened).all()
    if magnitude > 1:  # at 1e-30 the 1e-8 epsilon dominates the variance, as it should
        torch.testing.assert_close(whitened, R.masked_whiten(unit, mask), rtol=1e-5, atol=1e-5)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = R.group_advantages(x, groups, eps=0.0)
    torch.testing.assert_close(adv, R.group_advantages(unit, groups, eps=0.0), rtol=1e-5, atol=1e-5)


def test_half_precision_statistics_are_computed_in_float32():
    x = torch.randn(70000).half()
    mask = torch.ones(70000, dtype=torch.bool)
    assert R.masked_mean(torch.ones(70000, dtype=torch.half), mask).item() == 1.0
    whitened = R.masked_whiten(x, mask)
    assert whitened.dtype == torch.float32 and torch.isfinite(whitened).all()
    torch.testing.assert_close(whitened, R.masked_whiten(x.float(), mask))


def test_group_advantages_grpo_and_dr_grpo():
    scores = torch.tensor([1.0, 0.0, 0.5, 3.0, 2.0, 7.0], dtype=F64)
    groups = torch.tensor([10, 10, 10, 4, 4, 99])
    adv = R.group_advantages(scores, groups)
    g1, g2 = scores[:3], scores[3:5]
    expected = torch.cat([(g1 - g1.mean()) / (g1.std() + 1e-6), (g2 - g2.mean()) / (g2.std() + 1e-6),
                          torch.tensor([7.0 / (1 + 1e-6)], dtype=F64)])
    torch.testing.assert_close(adv, expected)
    dr = R.group_advantages(scores, groups, normalize_std=False)
    torch.testing.assert_close(dr, torch.cat([g1 - g1.mean(), g2 - g2.mean(), scores[5:]]))


@pytest.mark.parametrize("estimator", R.KL_ESTIMATORS)
def test_kl_estimators_values_and_gradients(estimator):
    logp = (torch.randn(50, dtype=F64) - 2).requires_grad_()
    ref = torch.randn(50, dtype=F64) - 2
    ref[0] = logp[0].item() + 25  # beyond the ±20 clamp
    d = (logp - ref).detach()
    x = (-d).clamp(-20, 20)
    values = {
        "k1": d, "abs": d.abs(), "k2": 0.5 * d * d,
        "k3": (x.exp() - x - 1).clamp(-10, 10),
    }
    base = estimator.rstrip("+")
    kl = R.kl_penalty(logp, ref, estimator)
    torch.testing.assert_close(kl.detach(), values[base])
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    if estimator.endswith("+"):
        torch.testing.assert_close(grad, d)  # the k2 gradient
    elif base in ("k1", "abs", "k2"):
        assert gradcheck(lambda lp: R.kl_penalty(lp, ref, estimator), (logp,))
    else:
        raw = x.exp() - x - 1
        live = (raw.abs() <= 10) & ((-d).abs() <= 20)
        torch.testing.assert_close(grad, torch.where(live, 1 - x.exp(), torch.zeros_like(x)))


def test_kl_aliases_match_verl_names():
    a, b = torch.randn(9, dtype=F64), torch.randn(9, dtype=F64)
    for alias, name in R.KL_ALIASES.items():
        torch.testing.assert_close(pf.kl_penalty(a, b, alias), pf.kl_penalty(a, b, name))


def policy_loss_by_hand(logp, old, adv, clip_low, clip_high, dual_clip):
    """The per-token PPO loss by cases, one token at a time."""
    out = []
    for lp, o, a in zip(logp.tolist(), old.tolist(), adv.tolist()):
        r = math.exp(max(-20, min(20, lp - o)))
        loss = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
        if dual_clip is not None and a < 0:
            loss = min(loss, -a * dual_clip)
        out.append(loss)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_token_loss_by_cases(dual_clip):
    logp = torch.randn(200, dtype=F64) - 1
    old = logp + torch.randn(200, dtype=F64) * 0.7
    adv = torch.randn(200, dtype=F64) * 2
    opts = R.LossOptions(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    terms = R.ppo_token_terms(logp, old, adv, opts)
    torch.testing.assert_close(terms.loss, policy_loss_by_hand(logp, old, adv, 0.2, 0.28, dual_clip))


def test_truncated_importance_sampling_scales_by_capped_ratio():
    logp, old = torch.randn(30, dtype=F64), torch.randn(30, dtype=F64)
    rollout = old + torch.randn(30, dtype=F64)
    adv = torch.randn(30, dtype=F64)
    plain = R.ppo_token_terms(logp, old, adv, R.LossOptions()).loss
    tis = R.ppo_token_terms(logp, old, adv, R.LossOptions(tis_cap=1.5), rollout_logp=rollout).loss
    torch.testing.assert_close(tis, plain * (old - rollout).exp().clamp(max=1.5))


def test_ppo_token_loss_adds_the_kl_and_entropy_terms():
    logp, old, ref = (torch.randn(30, dtype=F64) for _ in range(3))
    adv, entropy = torch.randn(30, dtype=F64), torch.rand(30, dtype=F64)
    opts = R.LossOptions(kl_coef=0.3, kl_estimator="k2", entropy_coef=0.05)
    terms = R.ppo_token_terms(logp, old, adv, opts, entropy=entropy, ref_logp=ref)
    pg = R.ppo_token_terms(logp, old, adv, opts).loss
    torch.testing.assert_close(terms.loss, pg + 0.3 * 0.5 * (logp - ref) ** 2 - 0.05 * entropy)
    no_ref = R.ppo_token_terms(logp, old, adv, opts, entropy=entropy)
    torch.testing.assert_close(no_ref.loss, pg - 0.05 * entropy)
    assert (no_ref.kl == 0).all()


def agg_by_formula(loss, mask, mode):
    m = mask.to(F64)
    if mode == "token-mean":
        return (loss * m).sum() / m.sum()
    if mode == "token-sum":
        return (loss * m).sum()
    seq_sum = (loss * m).sum(-1)
    has = m.sum(-1) > 0
    if mode == "seq-mean-token-sum":
        return seq_sum[has].mean()
    if mode == "seq-mean-token-mean":
        return (seq_sum[has] / m.sum(-1)[has]).mean()
    return seq_sum[has].sum() / mask.shape[-1] / has.sum()


@pytest.mark.parametrize("agg", R.AGG_MODES)
def test_aggregations_match_their_formulas(agg):
    loss = torch.randn(5, 8, dtype=F64)
    mask = torch.rand(5, 8) > 0.3
    mask[2] = False
    w = R.agg_weights(mask, agg, dtype=F64)
    torch.testing.assert_close(R.aggregate(loss, w, mask), agg_by_formula(loss, mask, agg))


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
def test_global_normalisers_make_the_loss_invariant_to_sharding(agg):
    """Two data-parallel shards with global counts and dp_size=2, averaged as DDP averages
    gradients, give the full batch's loss and gradient."""
    logp = torch.randn(6, 10, dtype=F64, requires_grad=True)
    old, adv = torch.randn(6, 10, dtype=F64), torch.randn(6, 10, dtype=F64)
    mask = torch.rand(6, 10) > 0.3
    full, _ = R.policy_loss(logp, old, adv, mask, agg=agg)
    (g_full,) = torch.autograd.grad(full, logp)
    kw = dict(agg=agg, dp_size=2, num_tokens=mask.sum().item(),
              num_seqs=(mask.sum(-1) > 0).sum().item())
    shards = [R.policy_loss(logp[i:i + 3], old[i:i + 3], adv[i:i + 3], mask[i:i + 3], **kw)[0]
              for i in (0, 3)]
    averaged = (shards[0] + shards[1]) / 2
    (g_sharded,) = torch.autograd.grad(averaged, logp)
    torch.testing.assert_close(averaged, full)
    torch.testing.assert_close(g_sharded, g_full)


def test_value_loss_formula():
    v, old, ret = (torch.randn(4, 6, dtype=F64) for _ in range(3))
    mask = torch.rand(4, 6) > 0.2
    loss, metrics = R.value_loss(v, old, ret, mask, clip=0.2)
    a = (v - ret) ** 2
    b = (old + (v - old).clamp(-0.2, 0.2) - ret) ** 2
    torch.testing.assert_close(loss, 0.5 * torch.maximum(a, b)[mask].mean())
    torch.testing.assert_close(metrics["vf_clipfrac"], (b > a)[mask].to(F64).mean())
    unclipped, _ = R.value_loss(v, old, ret, mask)
    torch.testing.assert_close(unclipped, 0.5 * a[mask].mean())


def test_losses_gradcheck():
    B, T, V = 2, 4, 7
    logits = torch.randn(B, T, V, dtype=F64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    old = torch.randn(B, T, dtype=F64) - 2
    adv = torch.randn(B, T, dtype=F64)
    ref = old + 0.3 * torch.randn(B, T, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])

    def f(x):
        return R.ppo_loss(x, labels, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy_coef=0.05,
                          clip_low=0.2, clip_high=0.3, dual_clip=2.0, agg="seq-mean-token-mean")[0]

    assert gradcheck(f, (logits,))
    values = torch.randn(B, T, dtype=F64, requires_grad=True)
    assert gradcheck(lambda v: R.value_loss(v, old, adv, mask, clip=0.5)[0], (values,))


@pytest.mark.parametrize("agg", R.AGG_MODES)
def test_all_masked_batch_gives_zero_loss_and_gradient(agg):
    logits = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3))
    zeros = torch.zeros(2, 3, dtype=torch.bool)
    lp = torch.randn(2, 3, dtype=F64)
    loss, metrics = R.ppo_loss(logits, labels, lp, torch.randn(2, 3, dtype=F64), zeros,
                               ref_logp=lp, kl_coef=0.1, entropy_coef=0.1, agg=agg)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0 and (grad == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
