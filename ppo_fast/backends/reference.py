"""The reference backend: the dispatch table's ops in plain PyTorch, on any device.

Values come from the spec (:mod:`ppo_fast.reference`). Gradients are written out by hand, as the
Triton kernels write them, because an op's implementation runs below autograd and cannot
differentiate the spec itself; the tests hold both against the spec's autograd in float64.
"""

from __future__ import annotations

import torch

from .. import reference as spec
from ..options import LossOptions
from ..reference import (  # noqa: F401  (the ops that only the reference implements)
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_token_terms,
    value_loss,
)


def writes_in_place(logits: torch.Tensor) -> bool:
    return False


def token_logprobs_forward(logits, labels, inv_temp, ignore_index, with_entropy):
    s = logits.to(spec.compute_dtype(logits)) * inv_temp
    ignored = labels == ignore_index
    # log_softmax is one fused kernel on the CPU, where this backend is the fast path.
    log_probs = torch.log_softmax(s, dim=-1)
    logp = log_probs.gather(-1, labels.masked_fill(ignored, 0).long().unsqueeze(-1)).squeeze(-1)
    # lse = s_j − log p_j for any j; at the row's maximum log p_j is finite even when other
    # tokens are banned (−inf).
    top = s.argmax(-1, keepdim=True)
    lse = (s.gather(-1, top) - log_probs.gather(-1, top)).squeeze(-1)
    if with_entropy:
        p = log_probs.exp()
        entropy = -(p * log_probs.masked_fill(p == 0, 0.0)).sum(-1)
    else:
        entropy = torch.zeros_like(logp)
    return (logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0),
            lse.masked_fill(ignored, 0.0))


def token_logprobs_backward(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                            inv_temp, ignore_index) -> None:
    """∂/∂z_j = ( g·(1[j = y] − p_j) − h·p_j·(s_j − E[s]) ) / τ, zero on ignored rows."""
    s = logits.to(lse.dtype) * inv_temp
    active = (labels != ignore_index).unsqueeze(-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    g = grad_logp.to(lse.dtype).unsqueeze(-1)
    d = -g * p
    d.scatter_add_(-1, labels.masked_fill(~active.squeeze(-1), 0).long().unsqueeze(-1), g)
    if grad_entropy is not None:
        h = grad_entropy.to(lse.dtype).unsqueeze(-1)
        expected = (lse - entropy).unsqueeze(-1)
        d = d - h * torch.where(p > 0, p * (s - expected), 0.0)
    dlogits.copy_(torch.where(active, d * inv_temp, 0.0))


def _dloss_dlogp(logp, old_logp, advantages, ref_logp, rollout_logp, opts: LossOptions, terms):
    """∂ token loss / ∂ logp, the derivative of :func:`ppo_fast.reference.ppo_token_terms`."""
    raw_log_ratio = logp - old_logp
    ratio = terms.log_ratio.exp()
    in_clamp = raw_log_ratio.abs() <= spec.LOG_RATIO_CLAMP
    dpg = torch.where(terms.clipped | terms.clipped_lower | ~in_clamp, 0.0, -advantages * ratio)
    if rollout_logp is not None:
        is_log_ratio = (old_logp - rollout_logp).clamp(-spec.LOG_RATIO_CLAMP, spec.LOG_RATIO_CLAMP)
        dpg = dpg * is_log_ratio.exp().clamp(max=opts.tis_cap)
    if ref_logp is None or opts.kl_coef == 0:
        return dpg
    diff = logp - ref_logp
    estimator = opts.kl_estimator
    if estimator == "k1":
        dkl = torch.ones_like(diff)
    elif estimator == "abs":
        dkl = diff.sign()
    elif estimator in ("k2", "k1+", "k3+"):
        dkl = diff
    else:
        x = -diff
        raw = x.clamp(-spec.LOG_RATIO_CLAMP, spec.LOG_RATIO_CLAMP).exp() - x - 1
        passes = (x.abs() <= spec.LOG_RATIO_CLAMP) & (raw.abs() <= spec.K3_VALUE_CLAMP)
        dkl = torch.where(passes, 1 - x.exp(), 0.0)
    return dpg + opts.kl_coef * dkl


def ppo_loss_forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp, inv_temp,
                     ignore_index, clip_low, clip_high, dual_clip, tis_cap, kl_coef, entropy_coef,
                     kl_estimator):
    logp, entropy, lse = token_logprobs_forward(logits, labels, inv_temp, ignore_index, True)
    opts = LossOptions(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                       tis_cap=tis_cap, kl_coef=kl_coef, kl_estimator=kl_estimator,
                       entropy_coef=entropy_coef)
    dtype = logp.dtype
    old_logp, advantages = old_logp.to(dtype), advantages.to(dtype)
    ref_logp = None if ref_logp is None else ref_logp.to(dtype)
    rollout_logp = None if rollout_logp is None else rollout_logp.to(dtype)
    terms = ppo_token_terms(logp, old_logp, advantages, opts, entropy=entropy, ref_logp=ref_logp,
                            rollout_logp=rollout_logp)
    dloss = _dloss_dlogp(logp, old_logp, advantages, ref_logp, rollout_logp, opts, terms)
    active = labels != ignore_index
    flags = terms.clipped.to(torch.int8) + 2 * terms.clipped_lower.to(torch.int8)

    def kept(t):
        return torch.where(active, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return (kept(terms.loss), kept(dloss), logp, entropy, lse, kept(terms.pg), kept(terms.kl),
            kept(terms.log_ratio), kept(flags))


def gae_forward(rewards, values, mask, cu_seqlens, gamma, lam):
    lengths = cu_seqlens.diff()
    if lengths.numel() and bool((lengths == lengths[0]).all()):
        # Equal lengths: one loop over time for the whole batch instead of one per sequence.
        B, T = lengths.numel(), int(lengths[0])
        adv, ret = spec.gae(rewards.reshape(B, T), values.reshape(B, T), mask.reshape(B, T),
                            gamma=gamma, lam=lam)
        return adv.reshape(-1), ret.reshape(-1)
    return spec.gae_packed(rewards, values, mask, cu_seqlens, gamma=gamma, lam=lam)
