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


def empty_dlogits(logits: torch.Tensor) -> torch.Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


# On the CPU, where this backend is the fast path, each fresh [N, V] buffer costs about as much as
# a pass over it (the pages are faulted in anew), so both directions allocate as few as they can:
# the forward one (two with entropy), the backward none beyond dlogits (one more with entropy).


def _scaled(logits, inv_temp, dtype):
    """s = logits / τ in the compute dtype; the logits themselves when τ = 1 (ops that read them
    upcast on the fly)."""
    return logits if inv_temp == 1.0 else logits.to(dtype) * inv_temp


def token_logprobs_forward(logits, labels, inv_temp, ignore_index, with_entropy,
                           with_sum_pi_squared=False):
    """``(logp, entropy, lse)``, and ``sum_pi_squared`` as a fourth output when asked for; entropy
    is zeros without ``with_entropy``. Every output is 0 where the label is ``ignore_index``."""
    dtype = spec.compute_dtype(logits)
    s = _scaled(logits, inv_temp, dtype)
    log_probs = torch.log_softmax(s, dim=-1, dtype=dtype)
    ignored = labels == ignore_index
    index = labels.masked_fill(ignored, 0).long().unsqueeze(-1)
    logp = log_probs.gather(-1, index).squeeze(-1)
    # lse = s_j − log p_j at any j: at the label it costs nothing. Where the label is banned (−inf)
    # that is NaN; there, at the row's maximum (log_softmax keeps the order of s), log p is finite.
    # A row whose maximum is +inf has lse = +inf, as on the other backends (log_softmax gives NaN).
    lse = s.gather(-1, index).squeeze(-1).to(dtype) - logp
    banned = ~torch.isfinite(lse)
    if bool(banned.any()):
        top = s[banned].amax(-1).to(dtype)
        lse[banned] = torch.where(torch.isposinf(top), top, top - log_probs[banned].amax(-1))
    entropy = torch.zeros_like(logp)
    sum_pi_squared = None
    if with_entropy or with_sum_pi_squared:
        p = log_probs.exp()
        if with_sum_pi_squared:
            # Σ p² as a batched dot product: no [N, V] buffer for p², and p stays for the entropy.
            sum_pi_squared = torch.einsum("...v,...v->...", p, p).masked_fill_(ignored, 0.0)
        if with_entropy:
            # p·log p is 0 where p = 0: a finite floor instead of −inf keeps 0·(−inf) from
            # giving NaN.
            entropy = -p.mul_(log_probs.clamp_(min=torch.finfo(dtype).min)).sum(-1)
    out = (logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0),
           lse.masked_fill(ignored, 0.0))
    return out if sum_pi_squared is None else (*out, sum_pi_squared)


def token_logprobs_backward(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                            inv_temp, ignore_index) -> None:
    """∂/∂z_j = ( g·(1[j = y] − p_j) − h·p_j·(s_j − E[s]) ) / τ, zero on ignored rows."""
    dtype = lse.dtype
    s = _scaled(logits, inv_temp, dtype)
    active = labels != ignore_index
    work = dlogits if dlogits.dtype == dtype else torch.empty(logits.shape, dtype=dtype,
                                                                device=logits.device)
    p = torch.sub(s, lse.unsqueeze(-1), out=work).exp_()
    g = grad_logp.to(dtype).unsqueeze(-1)
    if grad_entropy is None:
        d = p.mul_(-g)
    else:
        centred = torch.sub(s, (lse - entropy).unsqueeze(-1)).clamp_(min=torch.finfo(dtype).min)
        entropy_term = centred.mul_(p).mul_(grad_entropy.to(dtype).unsqueeze(-1))
        d = p.mul_(-g).sub_(entropy_term)
    d.scatter_add_(-1, labels.masked_fill(~active, 0).long().unsqueeze(-1), g)
    if inv_temp != 1.0:
        d.mul_(inv_temp)
    d.masked_fill_(~active.unsqueeze(-1), 0.0)
    if d is not dlogits:
        dlogits.copy_(d)


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


# --------------------------------------------------------------------------------------------
# The linear head, chunked over tokens (also the chunking every backend's backward uses)
# --------------------------------------------------------------------------------------------

CHUNK_BYTES = 64 * 2**20
"""Bytes of one chunk's logits in the compute dtype, on the chunked path."""


def linear_chunk_tokens(vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk of the chunked path: a power of two in [16, 1024] whose ``[chunk, V]``
    logits in the compute dtype fit :data:`CHUNK_BYTES`. It depends on V and the dtype only, and
    the last chunk is padded to it, so every token's GEMMs have the same shape whatever the batch:
    BLAS picks its kernel by shape (a GEMV for one row), and the same kernel gives the same bits."""
    itemsize = 8 if dtype == torch.float64 else 4
    fit = max(CHUNK_BYTES // max(vocab * itemsize, 1), 1)
    return min(1024, max(16, 1 << (fit.bit_length() - 1)))


def linear_chunks(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk: int, *per_token):
    """``(start, stop, hidden_chunk, labels_chunk, *per_token_chunks)`` over the tokens, each chunk
    ``chunk`` rows: the last one padded (hidden and ``per_token`` tensors, ``[N]`` or None, with
    zeros, labels with ``ignore_index``), the rows of ignored labels zeroed; chunks where every
    label is ignored are skipped (their outputs and gradients are 0)."""
    n = hidden.shape[0]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        labels_chunk = labels[start:stop]
        active = labels_chunk != ignore_index
        if not bool(active.any()):
            continue
        # Ignored rows are zeroed, not just skipped by the row op: the weight's gradient sums over
        # every row of the chunk, and 0·NaN would carry a NaN from an ignored hidden state into it.
        pieces = [torch.where(active.unsqueeze(-1), hidden[start:stop], 0.0), labels_chunk,
                  *(None if t is None else t[start:stop] for t in per_token)]
        fills = [0.0, ignore_index] + [0.0] * len(per_token)
        if stop - start < chunk:
            pad = chunk - (stop - start)
            pieces = [None if t is None else torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])
                      for t, fill in zip(pieces, fills)]
        yield (start, stop, *pieces)


def linear_logprobs_forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy,
                            row_forward=token_logprobs_forward):
    """``(logp, entropy, lse)`` chunk by chunk: each chunk's logits (one GEMM, in the inputs'
    dtype, as ``hidden @ weight.T + bias`` would give them) go through the row op
    (``row_forward``: this backend's, or the native one) and are freed; the peak extra memory is
    one chunk's."""
    out_dtype = spec.compute_dtype(hidden)
    n = hidden.shape[0]
    logp, entropy, lse = (torch.zeros(n, dtype=out_dtype, device=hidden.device) for _ in range(3))
    chunk = linear_chunk_tokens(weight.shape[0], hidden.dtype)
    for start, stop, h, lab in linear_chunks(hidden, labels, ignore_index, chunk):
        logits = torch.nn.functional.linear(h, weight, bias)
        outs = row_forward(logits, lab, inv_temp, ignore_index, with_entropy)
        for out, value in zip((logp, entropy, lse), outs):
            out[start:stop] = value[: stop - start]
    return logp, entropy, lse
