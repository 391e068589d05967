"""The specification of every ppo_fast op, in plain PyTorch.

These functions are the CPU fallback and the oracle every fast path (Triton, native) is tested
against, in float64. They favour reading like the math over speed. Inputs are assumed valid: the
public functions in :mod:`ppo_fast.functional` check shapes, dtypes and options before calling here.

Conventions
-----------
* ``N`` is the number of tokens (any leading shape flattened), ``V`` the vocabulary size,
  ``B`` the number of sequences and ``T`` their padded length.
* Computation happens in float32, or float64 when an input is float64; outputs follow.
* ``mask`` (bool, or 0/1) marks the tokens that count (response tokens). Whatever a masked-out
  position holds (NaN, inf, garbage) reaches no output and no gradient: masks select
  (``torch.where``), they never multiply (NaN·0 is NaN). Per-token outputs at masked positions
  are 0. The same holds for positions whose label is ``ignore_index``.
* Where a choice exists, the semantics follow verl's ``core_algos.py``, which users already know.
* The loss options are one :class:`~ppo_fast.arguments.LossOptions`; the loss functions take its
  fields as keyword arguments.
* The actor losses are per-token terms (:class:`TokenTerms`, :func:`ppo_token_terms`) turned into
  ``(loss, metrics)`` by :func:`reduce`. The public API reduces the terms that a backend's kernel
  computes with the same :func:`reduce`: there is one reduction.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import arguments, objectives
from .objectives import LOG_RATIO_CLAMP
from .arguments import AGG_MODES, KL_ALIASES, KL_ESTIMATORS, LossOptions

__all__ = ["AGG_MODES", "KL_ALIASES", "KL_ESTIMATORS", "LossOptions", "TokenTerms", "agg_weights",
           "aggregate", "compute_dtype", "full_kl", "gae", "gae_packed", "group_advantages", "kl_penalty",
           "masked_mean", "masked_whiten", "policy_loss", "policy_metrics", "ppo_loss",
           "ppo_token_terms", "reduce", "token_logprobs", "value_loss"]

K3_VALUE_CLAMP = 10.0
"""|k3| clamp, as verl's ``low_var_kl``."""

WHITEN_EPS = 1e-8


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


# --------------------------------------------------------------------------------------------
# Token log-probabilities and entropy
# --------------------------------------------------------------------------------------------


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_sum_pi_squared: bool = False,
):
    """Log-probability of each label under ``softmax(logits / temperature)``.

    logits: ``[..., V]`` float32/bfloat16/float16/float64; labels: ``[...]`` integer.
    Returns logp ``[...]``, or the tuple ``(logp, entropy, sum_pi_squared)`` less the outputs
    not asked for (``return_entropy``, ``return_sum_pi_squared``), all float32 (float64 for
    float64 logits). With ``s = logits / τ`` and ``p = softmax(s)``:

        logp           = s_y − logsumexp(s)
        entropy        = logsumexp(s) − Σ_j p_j · s_j
        sum_pi_squared = Σ_j p_j²    ∈ [1/V, 1]

    ``sum_pi_squared`` (verl's ``calculate_sum_pi_squared_from_logits`` of the tempered logits,
    which its optimal-token-baseline advantages read) is computed from the max-shifted row, so
    no logit magnitude overflows it; it carries no gradient (returned detached).

    Positions whose label is ``ignore_index`` give 0 for every output, with zero gradient,
    whatever their logits hold. Elsewhere an ``s`` holding +inf (a +inf logit, or a finite one
    over a tiny temperature) is an error: every output would be NaN there.
    """
    ignored = labels == ignore_index
    s = logits.to(compute_dtype(logits)).masked_fill(ignored.unsqueeze(-1), 0.0)
    if temperature != 1.0:
        s = s / temperature
    arguments.no_infinite_maximum(logits, torch.isposinf(s).any(-1), temperature)
    safe_labels = labels.masked_fill(ignored, 0).long()
    # log_softmax(s) = s − logsumexp(s); one fused kernel on the CPU, where this is the fast path.
    log_probs = torch.log_softmax(s, dim=-1)
    logp = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(ignored, 0.0)
    if not (return_entropy or return_sum_pi_squared):
        return logp
    p = log_probs.exp()
    out = (logp,)
    if return_entropy:
        # p·log p with p = 0 is 0 even where s = −inf (a banned token), never NaN.
        entropy = -(p * log_probs.masked_fill(p == 0, 0.0)).sum(-1)
        out += (entropy.masked_fill(ignored, 0.0),)
    if return_sum_pi_squared:
        # p comes from the max-shifted row (log_softmax): each p_j ≤ 1, nothing overflows.
        out += ((p * p).sum(-1).masked_fill(ignored, 0.0).detach(),)
    return out


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """Generalised advantage estimation over ``[B, T]`` (padded), as the plain loop over time.

    Walking backwards with ``A_next = V_next = 0`` after the last token:

        δ_t = r_t + γ·V_next − V_t
        A_t = δ_t + γλ·A_next
        where mask_t = 1:  V_next ← V_t,  A_next ← A_t
        where mask_t = 0:  V_next and A_next carry over the token unchanged

    so masked tokens (padding, tool or observation tokens inside a multi-turn response) add no TD
    error and do not break the chain. ``returns = advantages + values``; both are 0 at masked
    positions. No whitening.
    """
    dtype = compute_dtype(rewards, values)
    r, v, m = rewards.to(dtype), values.to(dtype), mask.bool()
    T = r.shape[-1]
    next_value = r.new_zeros(r.shape[:-1])
    next_adv = r.new_zeros(r.shape[:-1])
    advantages = torch.zeros_like(r)
    for t in reversed(range(T)):
        keep = m[..., t]
        adv_t = r[..., t] + gamma * next_value - v[..., t] + gamma * lam * next_adv
        next_value = torch.where(keep, v[..., t], next_value)
        next_adv = torch.where(keep, adv_t, next_adv)
        advantages[..., t] = torch.where(keep, adv_t, 0.0)
    return advantages, torch.where(m, advantages + v, 0.0)


def gae_packed(rewards, values, mask, cu_seqlens, *, gamma=1.0, lam=0.95):
    """:func:`gae` over packed 1-D tokens; sequence ``i`` is ``[cu_seqlens[i], cu_seqlens[i+1])``."""
    dtype = compute_dtype(rewards, values)
    advantages = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    returns = torch.empty_like(advantages)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        a, r = gae(rewards[start:end], values[start:end], mask[start:end], gamma=gamma, lam=lam)
        advantages[start:end], returns[start:end] = a, r
    return advantages, returns


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where mask is 1 (in float32, or float64); 0 when the mask is empty."""
    m = mask.bool()
    x = values.to(compute_dtype(values))
    return torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1)


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """max |x| (1 when that is 0 or x is empty): statistics of x / max|x| cannot overflow, whatever
    the size of x in its dtype."""
    if x.numel() == 0:
        return x.new_ones(())
    largest = x.abs().amax()
    return torch.where(largest > 0, largest, 1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True):
    """``(x − mean) / sqrt(var + 1e-8)`` with the masked mean and Bessel-corrected masked variance.

    Statistics come from the masked tokens only, in float32 (float64 for float64 input), computed
    on x / max|x| so that no square overflows; positions outside the mask give 0. With
    ``shift_mean=False`` the mean is added back (only the scale changes). Needs ≥ 2 masked tokens.
    """
    m = mask.bool()
    x = torch.where(m, values.to(compute_dtype(values)), 0.0)
    scale = _magnitude(x)
    y = x / scale
    count = m.sum()
    mean = y.sum() / count
    var = torch.where(m, y - mean, 0.0).square().sum() / (count - 1)
    # (x − mean) / sqrt(var + eps), with x, mean and var in units of scale.
    whitened = (y - mean) * torch.rsqrt(var + WHITEN_EPS / scale / scale)
    if not shift_mean:
        whitened = whitened + mean * scale
    return torch.where(m, whitened, 0.0)


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
):
    """GRPO outcome advantages: each sequence's score against its group.

    scores ``[B]``, group_ids ``[B]`` (any integer labels). ``A_i = (s_i − mean_g) / (std_g + eps)``
    with the unbiased std of the group; ``normalize_std=False`` gives Dr. GRPO's ``s_i − mean_g``.
    A group of one sample has mean 0 and std 1 (its advantage is its score), as in verl.
    Computed in float32 (float64 for float64 scores) on scores / max|score|, so that no square
    overflows.
    """
    dtype = compute_dtype(scores)
    scale = _magnitude(scores.to(dtype))
    s = scores.to(dtype) / scale
    # Groups numbered 0..G-1 by sorting the ids and counting where they change: torch.unique would
    # give a result whose size depends on the data, which torch.compile cannot trace in one graph.
    order = torch.argsort(group_ids, stable=True)
    sorted_ids = group_ids[order]
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group = torch.empty_like(order).scatter_(0, order, starts.long().cumsum(0) - 1)
    count = torch.zeros_like(s).index_add_(0, group, torch.ones_like(s))
    mean = torch.zeros_like(s).index_add_(0, group, s) / count.clamp(min=1)
    sq = torch.zeros_like(s).index_add_(0, group, (s - mean[group]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    singleton = count == 1
    mean = mean.masked_fill(singleton, 0.0)
    std = std.masked_fill(singleton, 1.0 / scale)
    if normalize_std:
        return (s - mean[group]) / (std[group] + eps / scale)
    return (s - mean[group]) * scale


# --------------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------------


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from sampled-token log-probs (Schulman's k1/k2/k3).

    With ``Δ = logp − ref_logp``:
      k1 = Δ;  abs = |Δ|;  k2 = ½Δ²;
      k3 = e^(−Δ) + Δ − 1, with −Δ clamped to ±20 before exp and the result clamped to ±10;
      k1+ / k3+ = the value of k1 / k3 with the gradient of k2 (unbiased value, low-variance grad).
    """
    estimator = arguments.kl_estimator_name(estimator, name="estimator")
    if estimator.endswith("+"):
        value = kl_penalty(logp, ref_logp, estimator[:-1])
        k2 = kl_penalty(logp, ref_logp, "k2")
        return k2 - k2.detach() + value.detach()
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "abs":
        return diff.abs()
    if estimator == "k2":
        return 0.5 * diff.square()
    log_ratio = (-diff).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (log_ratio.exp() - log_ratio - 1).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def agg_weights(
    mask: torch.Tensor,
    agg: str,
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    dp_size: int = 1,
    horizon: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights ``w`` such that the aggregated loss is ``Σ w ⊙ loss``.

    Every aggregation is linear in the per-token losses, so one weight tensor describes it. The
    last dimension of ``mask`` is time; leading dimensions are sequences.

    * ``token-mean``:  Σ m·ℓ / num_tokens · dp_size
    * ``token-sum``:   Σ m·ℓ · dp_size
    * ``seq-mean-token-sum``:   Σ_seq (Σ_t m·ℓ) / num_seqs · dp_size
    * ``seq-mean-token-mean``:  Σ_seq (Σ_t m·ℓ / Σ_t m) / num_seqs · dp_size
    * ``seq-mean-token-sum-norm`` (Dr. GRPO):  Σ_seq Σ_t m·ℓ / horizon / num_seqs · dp_size

    ``num_tokens`` / ``num_seqs`` default to this batch's masked tokens / sequences with at least
    one masked token (at least 1, so an empty batch gives loss 0). Passing the global counts
    across data-parallel ranks with their ``dp_size`` makes the loss, after the usual gradient
    averaging over ranks, independent of how the batch was sharded (``dp_size > 1`` therefore
    needs the count its aggregation divides by: :class:`LossOptions` checks). A count the
    aggregation does not divide by is not read, so one set of global counts (as verl's
    ``global_batch_info``) can go to every call. ``horizon`` defaults to ``T``. Sequences
    without a masked token are not counted; pass ``num_seqs`` to count them (TRL's GRPO divides
    by every row).
    """
    m = mask.to(dtype)
    if agg == "token-sum":
        return m * dp_size
    if agg == "token-mean":
        denom = m.sum().clamp(min=1) if num_tokens is None else num_tokens
        return m * (dp_size / denom)
    seq_tokens = m.sum(-1, keepdim=True)
    if num_seqs is None:
        num_seqs = (seq_tokens > 0).sum().clamp(min=1).to(dtype)
    if agg == "seq-mean-token-sum":
        per_seq = m
    elif agg == "seq-mean-token-mean":
        per_seq = m / seq_tokens.clamp(min=1)
    else:
        per_seq = m / (mask.shape[-1] if horizon is None else horizon)
    return per_seq * (dp_size / num_seqs)


def aggregate(values: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ w ⊙ values`` over the masked tokens, selected rather than multiplied by a zero weight,
    so a non-finite value at a masked position cannot reach the sum."""
    return torch.where(mask, values * weights, 0.0).sum()


# --------------------------------------------------------------------------------------------
# Policy and value losses
# --------------------------------------------------------------------------------------------


class TokenTerms(NamedTuple):
    """The actor loss per token, the one shape every backend produces (each ``[...]``, the tokens'
    shape). Only ``loss`` carries a gradient."""

    loss: torch.Tensor
    """pg + kl_coef·kl − entropy_coef·entropy."""
    pg: torch.Tensor
    """The clipped surrogate (dual clip and importance weight applied)."""
    kl: torch.Tensor | None
    """KL estimate to the reference policy (0 without one); None for the policy loss alone."""
    entropy: torch.Tensor | None
    """Entropy of the token's distribution; None for the policy loss alone."""
    log_ratio: torch.Tensor
    """logp − old_logp, clamped to ±20."""
    clipped: torch.Tensor
    """bool: the clipped surrogate was the larger loss."""
    clipped_lower: torch.Tensor
    """bool: the dual-clip cap was applied."""


def ppo_token_terms(
    logp,
    old_logp,
    advantages,
    opts: LossOptions,
    *,
    mask=None,
    entropy=None,
    ref_logp=None,
    rollout_logp=None,
    rollout_is_weights=None,
) -> TokenTerms:
    """Per-token actor loss, in the dtype of ``logp``; with ``mask``, every input is first set to
    0 where the mask is false (so what masked positions hold reaches no term and no gradient).

        pg = the objective of opts.loss_type (ppo_fast.objectives), for vanilla
             max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high)), r = exp(clamp(logp − old_logp, ±20)),
             and with dual clip (c > 1), where A < 0, min(pg, −A·c)
        importance weights (no gradient): rollout_is_weights, times with rollout_logp the
             truncated min(exp(clamp(old_logp − rollout_logp, ±20)), tis_cap); they multiply pg
             (geo_mean and vespo fold them in per sequence)
        loss = pg + kl_coef·kl(logp, ref_logp) − entropy_coef·entropy

    Without ``entropy`` (the policy loss from log-probs alone) the loss is ``pg``. With it and
    without ``ref_logp`` the KL term is 0.
    """
    dtype = logp.dtype
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    mask = mask.bool()
    logp, old_logp, advantages, entropy, ref_logp, rollout_logp, rollout_is_weights = (
        None if t is None else torch.where(mask, t.to(dtype), 0.0)
        for t in (logp, old_logp, advantages, entropy, ref_logp, rollout_logp, rollout_is_weights))
    weights = None if rollout_is_weights is None else rollout_is_weights.detach()
    if rollout_logp is not None:
        is_log_ratio = (old_logp - rollout_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        truncated = is_log_ratio.exp().clamp(max=opts.tis_cap).detach()
        weights = truncated if weights is None else weights * truncated
    pg, log_ratio, clipped, clipped_lower = objectives.policy_terms(
        logp, old_logp, advantages, mask, opts, weights=weights)
    if entropy is None:
        return TokenTerms(pg, pg, None, None, log_ratio, clipped, clipped_lower)
    if ref_logp is None:
        kl = torch.zeros_like(logp)
        loss = pg
    else:
        kl = kl_penalty(logp, ref_logp, opts.kl_estimator)
        loss = pg + opts.kl_coef * kl
    loss = loss - opts.entropy_coef * entropy
    return TokenTerms(loss, pg, kl, entropy, log_ratio, clipped, clipped_lower)


def policy_metrics(log_ratio, clipped, clipped_lower, mask) -> dict[str, torch.Tensor]:
    """clipfrac, clipfrac_lower, approx_kl (mean of old − new, as verl), ratio_mean, ratio_max."""
    log_ratio = log_ratio.detach()
    ratio = log_ratio.exp()
    valid = mask.bool()
    ratio_max = ratio.masked_fill(~valid, 0.0).max() if ratio.numel() else ratio.new_zeros(())
    return {
        "clipfrac": masked_mean(clipped.to(ratio.dtype), mask),
        "clipfrac_lower": masked_mean(clipped_lower.to(ratio.dtype), mask),
        "approx_kl": masked_mean(-log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": ratio_max,
    }


def reduce(terms: TokenTerms, mask: torch.Tensor, opts: LossOptions):
    """``(loss, metrics)`` from per-token terms: the loss aggregated with ``opts.agg`` over the
    tokens where ``mask`` is true; metrics are detached 0-d tensors.

    Metrics: ``pg_loss``, ``clipfrac``, ``clipfrac_lower``, ``approx_kl``, ``ratio_mean``,
    ``ratio_max``; with entropy (the PPO loss) also ``kl_loss`` and ``entropy_loss`` (the
    aggregated terms before their coefficients) and ``entropy``, ``kl`` (masked means).
    """
    mask = mask.bool()
    weights = agg_weights(mask, opts.agg, num_tokens=opts.num_tokens, num_seqs=opts.num_seqs,
                          dp_size=opts.dp_size, horizon=opts.horizon, dtype=terms.loss.dtype)
    loss = aggregate(terms.loss, weights, mask)
    metrics = policy_metrics(terms.log_ratio, terms.clipped, terms.clipped_lower, mask)
    metrics["pg_loss"] = aggregate(terms.pg.detach(), weights, mask)
    if terms.entropy is not None:
        kl, entropy = terms.kl.detach(), terms.entropy.detach()
        metrics.update(
            kl_loss=aggregate(kl, weights, mask),
            entropy_loss=aggregate(entropy, weights, mask),
            entropy=masked_mean(entropy, mask),
            kl=masked_mean(kl, mask),
        )
    return loss, metrics


def policy_loss(logp, old_logp, advantages, mask, *, rollout_logp=None, rollout_is_weights=None,
                **options):
    """The policy loss from per-token log-probs, aggregated with ``agg``; options are
    :class:`LossOptions` fields. Returns ``(loss, metrics)`` (see :func:`reduce`)."""
    opts = LossOptions(**options)
    dtype = compute_dtype(logp, old_logp, advantages)
    terms = ppo_token_terms(logp.to(dtype), old_logp, advantages, opts, mask=mask,
                            rollout_logp=rollout_logp, rollout_is_weights=rollout_is_weights)
    return reduce(terms, mask, opts)


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(π ‖ π_ref) = Σ_v π_v (log π_v − log π_ref,v)`` over the last dimension, with
    ``π = softmax(logits / T)`` and ``π_ref = softmax(ref_logits / T)``; a term with ``π_v = 0`` is
    0 (``kl_estimator="full"``). In the logits' compute dtype; differentiable in ``logits``."""
    dtype = compute_dtype(logits)
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    log_ref = torch.log_softmax(ref_logits.to(dtype) / temperature, dim=-1)
    p = logp.exp()
    # Selected before the subtraction: where π_v = 0 (a token the policy bans), log π_v − log ρ_v
    # may be −inf − −inf, and a NaN computed there would reach the gradient through the select.
    present = p > 0
    return (p * (torch.where(present, logp, 0.0) - torch.where(present, log_ref, 0.0))).sum(-1)


def ppo_loss(logits, labels, old_logp, advantages, mask, *, ref_logp=None, ref_logits=None, rollout_logp=None,
             rollout_is_weights=None, **options):
    """The actor loss from logits: policy loss + kl_coef·agg(KL) − entropy_coef·agg(entropy).

    Options are :class:`LossOptions` fields. Labels equal to ``ignore_index`` are treated as
    masked out. The KL: ``kl_penalty(logp, ref_logp)``, or with ``kl_estimator="full"``
    :func:`full_kl` of logits and ``ref_logits``. Returns ``(loss, metrics)`` (see :func:`reduce`).
    """
    opts = LossOptions(**options)
    mask = mask.bool() & (labels != opts.ignore_index)
    logp, entropy = token_logprobs(logits, labels.masked_fill(~mask, opts.ignore_index),
                                   temperature=opts.temperature, ignore_index=opts.ignore_index,
                                   return_entropy=True)
    terms = ppo_token_terms(logp, old_logp, advantages, opts, mask=mask, entropy=entropy,
                            ref_logp=ref_logp, rollout_logp=rollout_logp,
                            rollout_is_weights=rollout_is_weights)
    if ref_logits is not None:
        rows = mask.unsqueeze(-1)
        kl = torch.where(mask, full_kl(torch.where(rows, logits, 0.0), torch.where(rows, ref_logits, 0.0),
                                       opts.temperature), 0.0)
        terms = terms._replace(loss=terms.loss + opts.kl_coef * kl, kl=kl)
    return reduce(terms, mask, opts)


def fused_linear_token_logprobs(hidden, weight, labels, *, bias=None, **options):
    """:func:`token_logprobs` of the logits ``hidden @ weight.T + bias`` (the fused linear head's
    spec: the same numbers, with the logits in memory)."""
    return token_logprobs(torch.nn.functional.linear(hidden, weight, bias), labels, **options)


def fused_linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, *, bias=None, ref_hidden=None,
                          ref_weight=None, ref_bias=None, **options):
    """:func:`ppo_loss` of the logits ``hidden @ weight.T + bias`` (the fused linear head's spec),
    the reference's for the full KL ``ref_hidden @ ref_weight.T + ref_bias``."""
    ref_logits = None if ref_weight is None else torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias)
    return ppo_loss(torch.nn.functional.linear(hidden, weight, bias), labels, old_logp, advantages, mask,
                    ref_logits=ref_logits, **options)


def value_loss(values, old_values, returns, mask, *, clip: float | None = None, **options):
    """½·agg(max((v − R)², (clip(v, v_old − clip, v_old + clip) − R)²)); no clipping if clip is None.

    Aggregation options are :class:`LossOptions` fields. Returns ``(loss, {"vf_loss",
    "vf_clipfrac"})``.
    """
    opts = LossOptions(**options)
    dtype = compute_dtype(values, old_values, returns)
    mask = mask.bool()
    v, v_old, R = (torch.where(mask, t.to(dtype), 0.0) for t in (values, old_values, returns))
    unclipped = (v - R).square()
    if clip is None:
        token_loss, clipped = unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped_sq = (torch.clamp(v, v_old - clip, v_old + clip) - R).square()
        token_loss = torch.maximum(unclipped, clipped_sq)
        clipped = clipped_sq > unclipped
    weights = agg_weights(mask, opts.agg, num_tokens=opts.num_tokens, num_seqs=opts.num_seqs,
                          dp_size=opts.dp_size, horizon=opts.horizon, dtype=dtype)
    loss = 0.5 * aggregate(token_loss, weights, mask)
    return loss, {"vf_loss": loss.detach(), "vf_clipfrac": masked_mean(clipped.to(dtype), mask)}
