"""The public functional API. Every function reads the same way: check the inputs, run the op or
the spec, and for the losses reduce the per-token terms with :func:`ppo_fast.spec.reduce`.

The functions served by a fused op (:func:`token_logprobs`, :func:`ppo_loss`, :func:`gae`, the
fused linear head's two) are written at the end of that op's module in :mod:`ppo_fast.ops`, which
reads top to bottom from the schema to the public function, and are re-exported here; the
functions below run their spec on any device.

Shapes use ``N`` (tokens, any leading shape), ``V`` (vocabulary), ``B``/``T`` (sequences, time).
Semantics are those of :mod:`ppo_fast.spec`, the spec; the docstrings there give formulas.
Every function works under ``torch.compile(fullgraph=True)``; while it traces, the checks that
read values on the device (label ranges, ``cu_seqlens``, mask counts) are skipped.
"""

from __future__ import annotations

import torch

from . import arguments as check
from . import spec
from .arguments import LossOptions, positive
from .ops.gae import gae
from .ops.linear_logprobs import fused_linear_ppo_loss, fused_linear_token_logprobs
from .ops.ppo_loss import detached, ppo_loss
from .ops.token_logprobs import token_logprobs

__all__ = [
    "fused_linear_ppo_loss",
    "fused_linear_token_logprobs",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "ppo_loss",
    "token_logprobs",
    "value_loss",
]


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True):
    """Whiten with the masked mean and Bessel-corrected masked variance (eps 1e-8).

    ``values`` and ``mask`` share a shape; needs at least 2 masked tokens (not checked under
    ``torch.compile``; an empty ``values`` gives an empty result). Statistics in float32 or
    wider, free of overflow whatever the magnitudes; 0 outside the mask. ``shift_mean=False``
    keeps the mean (scales only).
    """
    check.whitening(values, mask)
    return spec.masked_whiten(values, mask, shift_mean=shift_mean)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 for an empty mask)."""
    check.floating("values", check.tensor("values", values))
    check.mask_like("mask", mask, values.shape, "values.shape")
    check.same_device("values", values, mask=mask)
    return spec.masked_mean(values, mask)


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
):
    """GRPO (``normalize_std=True``) or Dr. GRPO (``False``) outcome advantages.

    ``scores`` ``[B]`` (one score per sequence), ``group_ids`` ``[B]`` integer (samples of the
    same prompt share an id). Returns ``[B]``, or ``[B, T]`` broadcast over the tokens, 0 outside
    ``mask``, when a ``[B, T]`` mask is given. Float32 or wider, free of overflow.
    """
    check.floating("scores", check.tensor("scores", scores))
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    check.integer("group_ids", check.tensor("group_ids", group_ids))
    check.shape("group_ids", group_ids, scores.shape, "scores.shape")
    positive("eps", eps)
    if mask is not None:
        check.tensor("mask", mask)
        if mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
            raise ValueError(f"mask must be [B, T] with B={scores.shape[0]}, got shape {tuple(mask.shape)}")
        check.mask_like("mask", mask, mask.shape, "[B, T]")
    check.same_device("scores", scores, group_ids=group_ids, mask=mask)
    adv = spec.group_advantages(scores, group_ids, normalize_std=normalize_std, eps=eps)
    if mask is None:
        return adv
    return torch.where(mask.bool(), adv.unsqueeze(-1), 0.0)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate (``k1``, ``abs``, ``k2``, ``k3``, ``k1+``, ``k3+``; verl's ``kl``,
    ``mse``, ``low_var_kl`` too). Same shape as ``logp``; differentiable in ``logp``."""
    check.floating("logp", check.tensor("logp", logp))
    check.token_tensor("ref_logp", ref_logp, logp.shape, "logp.shape")
    check.same_device("logp", logp, ref_logp=ref_logp)
    # The spec names the estimator (verl's aliases included) and refuses an unknown one.
    return spec.kl_penalty(logp, ref_logp, estimator)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "vanilla",
    loss_params: dict | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str | None = None,
    rollout_logp: torch.Tensor | None = None,
    tis_cap: float = 2.0,
    rollout_is_weights: torch.Tensor | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    dp_size: int = 1,
    horizon: float | None = None,
):
    """Policy-gradient loss from per-token log-probs; returns ``(loss, metrics)``.

    All tensors share the shape of ``logp`` (``[B, T]`` for the ``seq-*`` aggregations and the
    sequence-level objectives). ``loss_type`` picks the objective, ``loss_params`` its own
    parameters (:mod:`ppo_fast.objectives` lists both; default PPO's clipped surrogate).
    ``clip_low`` defaults to 0.2 for the objectives that clip (those that do not refuse it),
    ``clip_high`` to ``clip_low`` (set it higher for DAPO's clip-higher). ``dual_clip``
    (> 1, vanilla only) caps the loss of negative-advantage tokens at ``−A·dual_clip``.
    Importance weights multiply each token's policy term (no gradient): ``rollout_is_weights``
    as given (e.g. from :func:`ppo_fast.rollout_correction`), and with ``rollout_logp`` the
    truncated ``min(π_old / π_rollout, tis_cap)``. ``agg`` defaults to the loss type's
    aggregation (token-mean for most). Differentiable in ``logp`` only (the rest is data).
    ``num_tokens`` / ``num_seqs`` / ``dp_size``: global normalisers (see
    :func:`ppo_fast.spec.agg_weights`). Metrics: ``pg_loss``, ``clipfrac``,
    ``clipfrac_lower`` (per objective, see ``objectives.FLAGS``), ``approx_kl``, ``ratio_mean``,
    ``ratio_max`` (detached 0-d tensors).
    """
    opts = LossOptions(loss_type=loss_type, loss_params=loss_params, clip_low=clip_low,
                       clip_high=clip_high, dual_clip=dual_clip, agg=agg, tis_cap=tis_cap,
                       num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size, horizon=horizon)
    check.floating("logp", check.tensor("logp", logp))
    check.per_token(logp.shape, "the log-probs' shape", mask, old_logp=old_logp,
                     advantages=advantages, rollout_logp=rollout_logp,
                     rollout_is_weights=rollout_is_weights)
    check.seq_mask(opts.agg, mask)
    check.sequence_objective(opts.loss_type, opts.loss_params, mask)
    check.same_device("logp", logp, old_logp=old_logp, advantages=advantages, mask=mask,
                      rollout_logp=rollout_logp, rollout_is_weights=rollout_is_weights)
    check.weights("rollout_is_weights", rollout_is_weights, mask)
    dtype = spec.compute_dtype(logp, old_logp, advantages)
    terms = spec.ppo_token_terms(logp.to(dtype), old_logp.detach(), advantages.detach(), opts,
                                 mask=mask, rollout_logp=detached(rollout_logp),
                                 rollout_is_weights=detached(rollout_is_weights))
    return spec.reduce(terms, mask, opts)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = None,
    agg: str | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    dp_size: int = 1,
    horizon: float | None = None,
):
    """Clipped value loss ``½·agg(max((v − R)², (clip(v, v_old ± clip) − R)²))``.

    Returns ``(loss, {"vf_loss", "vf_clipfrac"})``. ``clip=None`` disables clipping; ``agg``
    None is token-mean.
    """
    opts = LossOptions(agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size,
                       horizon=horizon)
    if clip is not None:
        positive("clip", clip)
    check.floating("values", check.tensor("values", values))
    check.per_token(values.shape, "values.shape", mask, old_values=old_values, returns=returns)
    check.seq_mask(opts.agg, mask)
    check.same_device("values", values, old_values=old_values, returns=returns, mask=mask)
    return spec.value_loss(values, old_values, returns, mask, clip=clip, agg=opts.agg,
                           num_tokens=opts.num_tokens, num_seqs=opts.num_seqs,
                           dp_size=opts.dp_size, horizon=opts.horizon)
