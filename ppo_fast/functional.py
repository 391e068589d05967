"""The public functional API. Every function reads the same way: check the inputs, dispatch to the
op (:mod:`ppo_fast.ops`, whose implementation per backend :mod:`ppo_fast.dispatch` picks) or the
spec, and for the losses reduce the per-token terms with :func:`ppo_fast.spec.reduce`.

Shapes use ``N`` (tokens, any leading shape), ``V`` (vocabulary), ``B``/``T`` (sequences, time).
Semantics are those of :mod:`ppo_fast.spec`, the spec; the docstrings there give formulas.
Every function works under ``torch.compile(fullgraph=True)``; while it traces, the checks that
read values on the device (label ranges, ``cu_seqlens``, mask counts) are skipped.
"""

from __future__ import annotations

import torch

from . import _checks as check
from . import objectives, spec
from .ops.gae import gae_op
from .ops.linear_logprobs import LossWithGradients, linear_logprobs_op, linear_logprobs_with_gradients
from .ops.ppo_loss import ppo_token_terms
from .ops.token_logprobs import out_dtype, token_logprobs_op
from ._checks import check_temperature, in_unit_interval, int_option, positive
from .options import LossOptions


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_sum_pi_squared: bool = False,
    inplace_backward: bool = False,
):
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``, differentiable.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 / float64.
        labels: ``[...]`` integer, in ``[0, V)`` or ``ignore_index`` (gives 0 for every output,
            zero gradient). Under ``torch.compile`` the range is not checked; on the Triton
            path an out-of-range label then gives NaN.
        return_entropy: also return the entropy of each position's distribution.
        return_sum_pi_squared: also return ``Σ_v softmax(logits / temperature)_v²`` per position
            (in ``[1/V, 1]``; verl's ``sum_pi_squared`` for its optimal-token-baseline
            advantages), computed in the same pass over the logits. Forward only: it comes back
            with ``requires_grad=False`` and no gradient flows through it.
        inplace_backward: on the Triton and native paths, write the gradient into the logits
            buffer itself during backward (saves one ``[N, V]`` buffer; the logits are
            overwritten). Logits whose rows share memory (an expanded view) get a fresh buffer.

    Returns:
        ``logp`` ``[...]`` float32 (float64 for float64 logits) when neither extra is asked for,
        else the tuple ``(logp, entropy, sum_pi_squared)`` without the ones not asked for:
        ``(logp, entropy)`` or ``(logp, sum_pi_squared)``. On CUDA one read of the logits
        forward and one read + one write backward; no float32 copy of the logits is made.
    """
    int_option("ignore_index", ignore_index)
    check_temperature(temperature)
    for flag, value in (("return_entropy", return_entropy), ("return_sum_pi_squared", return_sum_pi_squared),
                        ("inplace_backward", inplace_backward)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be a bool, got {value!r}")
    labels = check.logits_and_labels(logits, labels, ignore_index)
    logp, entropy, sum_pi_squared = _token_rows(logits, labels, temperature, ignore_index, return_entropy,
                                                inplace_backward, return_sum_pi_squared)
    out = (logp,)
    if return_entropy:
        out += (entropy,)
    if return_sum_pi_squared:
        out += (sum_pi_squared,)
    return out if len(out) > 1 else logp


def _token_rows(logits, labels, temperature, ignore_index, with_entropy, inplace_backward, with_sum_pi_squared=False):
    """``(logp, entropy, sum_pi_squared)`` of the log-prob op; a row whose scaled logits reach +inf
    (its log-sum-exp is +inf on every backend) is an error naming it."""
    logp, entropy, lse, sum_pi_squared = token_logprobs_op(
        logits, labels, 1.0 / float(temperature), int(ignore_index), bool(with_entropy), bool(inplace_backward),
        bool(with_sum_pi_squared))
    check.no_infinite_maximum(logits, torch.isposinf(lse), temperature)
    return logp, entropy, sum_pi_squared


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    cu_seqlens: torch.Tensor | None = None,
    whiten: bool = True,
):
    """Generalised advantage estimation; returns ``(advantages, returns)``, the advantages
    whitened over the batch by default, as ``pf.advantages("gae", ...)`` (and verl) give them.

    Padded form: ``rewards``, ``values``, ``mask`` are ``[B, T]``. Packed form: they are 1-D
    ``[total]`` and ``cu_seqlens`` ``[S + 1]`` (int, as flash-attn's varlen API) delimits the
    sequences (its values are not checked under ``torch.compile``). ``mask`` (default all ones)
    marks the tokens that count; masked tokens add no TD error and do not break the chain, and
    both outputs are 0 there. ``whiten`` (default True): ``advantages = masked_whiten(A, mask)``
    (:func:`masked_whiten`; needs at least 2 masked tokens); returns are never whitened.
    Differentiable in ``rewards`` and ``values`` (GAE is linear in both). On CUDA, one kernel
    launch for the whole batch.
    """
    if not isinstance(whiten, bool):
        raise ValueError(f"whiten must be a bool, got {whiten!r}")
    for name, t in (("rewards", rewards), ("values", values)):
        check.floating(name, check.tensor(name, t))
    packed = cu_seqlens is not None
    if packed:
        if rewards.dim() != 1:
            raise ValueError(f"rewards must be 1-D [total] with cu_seqlens, got shape {tuple(rewards.shape)}")
        check.integer("cu_seqlens", check.tensor("cu_seqlens", cu_seqlens))
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
    elif rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T] (or 1-D with cu_seqlens), got shape {tuple(rewards.shape)}")
    check.shape("values", values, rewards.shape, "rewards.shape")
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    check.mask_like("mask", mask, rewards.shape, "rewards.shape")
    check.same_device("rewards", rewards, values=values, mask=mask, cu_seqlens=cu_seqlens)
    in_unit_interval("gamma", gamma)
    in_unit_interval("lam", lam)
    if not packed:
        B, T = rewards.shape
        cu_seqlens = torch.arange(B + 1, dtype=torch.int64, device=rewards.device) * T
    elif check.values_checked(cu_seqlens):
        lengths = cu_seqlens.diff()
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != rewards.numel() or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to rewards.numel()={rewards.numel()}, "
                             f"got {cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}")
    advantages, returns = gae_op(rewards.reshape(-1), values.reshape(-1), mask.reshape(-1), cu_seqlens,
                                 float(gamma), float(lam))
    advantages, returns = advantages.view(rewards.shape), returns.view(rewards.shape)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True):
    """Whiten with the masked mean and Bessel-corrected masked variance (eps 1e-8).

    ``values`` and ``mask`` share a shape; needs at least 2 masked tokens (not checked under
    ``torch.compile``; an empty ``values`` gives an empty result). Statistics in float32 or
    wider, free of overflow whatever the magnitudes; 0 outside the mask. ``shift_mean=False``
    keeps the mean (scales only).
    """
    check.floating("values", check.tensor("values", values))
    check.mask_like("mask", mask, values.shape, "values.shape")
    check.same_device("values", values, mask=mask)
    if values.numel() and check.values_checked(values, mask):
        count = int(mask.to(torch.bool).sum())
        if count < 2:
            raise ValueError(f"mask must select at least 2 tokens to estimate a variance, selects {count}")
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
    estimator = LossOptions(kl_estimator=estimator).kl_estimator
    return spec.kl_penalty(logp, ref_logp, estimator)


def _check_per_token(shape, what, mask, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            check.token_tensor(name, t, shape, what)
    check.mask_like("mask", mask, shape, what)


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
    _check_per_token(logp.shape, "the log-probs' shape", mask, old_logp=old_logp,
                     advantages=advantages, rollout_logp=rollout_logp,
                     rollout_is_weights=rollout_is_weights)
    check.seq_mask(opts.agg, mask)
    check.sequence_objective(opts.loss_type, opts.loss_params, mask)
    check.same_device("logp", logp, old_logp=old_logp, advantages=advantages, mask=mask,
                      rollout_logp=rollout_logp, rollout_is_weights=rollout_is_weights)
    check.weights("rollout_is_weights", rollout_is_weights, mask)
    dtype = spec.compute_dtype(logp, old_logp, advantages)
    terms = spec.ppo_token_terms(logp.to(dtype), old_logp.detach(), advantages.detach(), opts,
                                 mask=mask, rollout_logp=_data(rollout_logp),
                                 rollout_is_weights=_data(rollout_is_weights))
    return spec.reduce(terms, mask, opts)


def _data(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


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
    _check_per_token(values.shape, "values.shape", mask, old_values=old_values, returns=returns)
    check.seq_mask(opts.agg, mask)
    check.same_device("values", values, old_values=old_values, returns=returns, mask=mask)
    return spec.value_loss(values, old_values, returns, mask, clip=clip, agg=opts.agg,
                           num_tokens=opts.num_tokens, num_seqs=opts.num_seqs,
                           dp_size=opts.dp_size, horizon=opts.horizon)


def ppo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
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
    inplace_backward: bool = False,
):
    """The whole actor loss from logits, fused on CUDA; returns ``(loss, metrics)``.

    ``loss = policy_loss + kl_coef·agg(KL(logp ‖ ref_logp)) − entropy_coef·agg(entropy)``, with
    the options of :func:`policy_loss`. logits ``[..., V]``, labels and every per-token tensor
    ``[...]``. Differentiable in ``logits`` only (old/ref/rollout log-probs and advantages are
    data). Tokens with mask 0 or label ``ignore_index`` are skipped: on CUDA their logits are
    never read. Metrics: those of :func:`policy_loss` plus ``kl_loss``, ``entropy_loss`` (the
    aggregated terms), ``entropy`` and ``kl`` (masked means).

    On CUDA, token-level ``loss_type="vanilla"`` without ``rollout_is_weights``: one kernel reads each logits
    row once and computes log-prob, entropy, ratio, clipped surrogate, KL and the per-token
    gradient coefficient; the backward reads the row once more and writes dlogits (into the
    logits buffer with ``inplace_backward=True``). Every other objective and weighting: the fused
    log-prob/entropy kernel (the same passes over the logits), then the objective on
    ``[tokens]``-sized tensors; no ``[tokens, vocab]`` tensor beyond dlogits either way.
    """
    opts = _actor_options(ref_logp, loss_type=loss_type, loss_params=loss_params, clip_low=clip_low,
                          clip_high=clip_high, dual_clip=dual_clip, agg=agg, tis_cap=tis_cap,
                          num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size, horizon=horizon,
                          kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                          temperature=temperature, ignore_index=ignore_index)
    check.floating("logits", check.tensor("logits", logits))
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    labels = _check_actor_inputs("logits", logits, logits.shape[:-1], "logits.shape[:-1]", logits.shape[-1],
                                 labels, old_logp, advantages, mask, ref_logp, rollout_logp,
                                 rollout_is_weights, opts)
    valid = labels != ignore_index
    if opts.loss_type == "vanilla" and opts.loss_params["importance_level"] == "token" \
            and rollout_is_weights is None:
        terms = ppo_token_terms(logits, labels, old_logp, advantages, ref_logp, rollout_logp, opts,
                                inplace_backward)
        return spec.reduce(terms, valid, opts)
    logp, entropy, _ = _token_rows(logits, labels, opts.temperature, ignore_index, True, inplace_backward)
    return _loss_from_logprobs(logp, entropy, valid, old_logp, advantages, ref_logp, rollout_logp,
                               rollout_is_weights, opts)


def _actor_options(ref_logp, **options) -> LossOptions:
    opts = LossOptions(**options)
    if opts.kl_coef != 0 and ref_logp is None:
        raise ValueError(f"kl_coef={opts.kl_coef!r} needs ref_logp (the reference policy's log-probs); "
                         "pass ref_logp or kl_coef=0")
    return opts


def _check_actor_inputs(source_name, source, lead, what, vocab, labels, old_logp, advantages, mask, ref_logp,
                        rollout_logp, rollout_is_weights, opts) -> torch.Tensor:
    """Check the actor loss's per-token inputs against ``lead`` (the tokens' shape); return the
    labels as int64 with masked positions set to ``ignore_index``."""
    check.integer("labels", check.tensor("labels", labels))
    check.shape("labels", labels, lead, what)
    _check_per_token(lead, what, mask, old_logp=old_logp, advantages=advantages, ref_logp=ref_logp,
                     rollout_logp=rollout_logp, rollout_is_weights=rollout_is_weights)
    check.same_device(source_name, source, labels=labels, mask=mask, old_logp=old_logp,
                      advantages=advantages, ref_logp=ref_logp, rollout_logp=rollout_logp,
                      rollout_is_weights=rollout_is_weights)
    # Masked positions count as ignored labels before anything reads them, so a masked label out
    # of range (garbage after EOS) is no error and its row is never computed.
    labels = labels.long().masked_fill(~mask.bool(), opts.ignore_index)
    labels = check.labels_in_vocab(labels, vocab, opts.ignore_index, source)
    check.seq_mask(opts.agg, mask)
    check.sequence_objective(opts.loss_type, opts.loss_params, mask)
    check.weights("rollout_is_weights", rollout_is_weights, mask)
    return labels


def _loss_from_logprobs(logp, entropy, valid, old_logp, advantages, ref_logp, rollout_logp, rollout_is_weights,
                        opts):
    terms = spec.ppo_token_terms(logp, _data(old_logp), _data(advantages), opts, mask=valid,
                                      entropy=entropy, ref_logp=_data(ref_logp),
                                      rollout_logp=_data(rollout_logp),
                                      rollout_is_weights=_data(rollout_is_weights))
    return spec.reduce(terms, valid, opts)


# --------------------------------------------------------------------------------------------
# The fused linear head: from hidden states, never the logits
# --------------------------------------------------------------------------------------------


def _check_head(hidden, weight, bias) -> None:
    check.floating("hidden", check.tensor("hidden", hidden))
    check.floating("weight", check.tensor("weight", weight))
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= 1 "
                         f"(an lm_head's weight), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype} (cast one, as "
                         "the model's lm_head would)")
    if bias is not None:
        check.floating("bias", check.tensor("bias", bias))
        check.shape("bias", bias, weight.shape[:1], "[V]")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    check.same_device("hidden", hidden, weight=weight, bias=bias)


def _linear_logprobs(hidden, weight, bias, labels, temperature, ignore_index, with_entropy):
    lead = hidden.shape[:-1]
    logp, entropy, _ = linear_logprobs_op(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
                                          1.0 / float(temperature), int(ignore_index), bool(with_entropy))
    return logp.view(lead), entropy.view(lead)


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """:func:`token_logprobs` of ``hidden @ weight.T + bias``, without the logits in memory.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 / float64 (the last hidden states).
        weight: ``[V, H]``, hidden's dtype (an ``lm_head.weight``); bias ``[V]`` or None.
        labels: ``[...]`` integer, in ``[0, V)`` or ``ignore_index`` (logp 0, entropy 0, no
            gradient, and the row is not computed).

    Returns ``logp`` ``[...]`` float32 (float64 for float64), or ``(logp, entropy)``.
    Differentiable in hidden, weight and bias. Under ``torch.no_grad`` it is the scoring pass for
    old and reference log-probs. On CUDA one Triton kernel tiles tokens × vocab with the matmul on
    tensor cores and an online log-sum-exp; elsewhere, and in every backward, the logits are
    recomputed chunk by chunk (:func:`ppo_fast.ops.linear_logprobs.linear_chunk_tokens`): the peak extra memory is
    one chunk's logits, plus a float32 accumulator for the weight's gradient when the weight is
    bf16/fp16. A token's result does not depend on the rest of the batch.
    """
    int_option("ignore_index", ignore_index)
    check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {return_entropy!r}")
    _check_head(hidden, weight, bias)
    labels = check.token_labels("hidden", hidden, weight.shape[0], labels, ignore_index)
    logp, entropy = _linear_logprobs(hidden, weight, bias, labels, temperature, ignore_index, return_entropy)
    return (logp, entropy) if return_entropy else logp


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
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
    """:func:`ppo_loss` of the logits ``hidden @ weight.T + bias``, which are never stored; every
    option and ``loss_type`` of :func:`ppo_loss`. hidden ``[..., H]``, weight ``[V, H]``, bias
    ``[V]`` or None, every per-token tensor ``[...]``. Returns ``(loss, metrics)``, the metrics of
    :func:`ppo_loss`; differentiable in hidden, weight and bias. The log-probs and entropy come
    from :func:`fused_linear_token_logprobs` (see there for memory); the objective then runs on
    ``[tokens]``-sized tensors. Where a gradient is wanted and each token's term depends on that
    token alone (every token-level objective but ``clip_cov`` and ``kl_cov``), the gradients of
    hidden, weight and bias are computed in the forward while each chunk's logits are live (three
    GEMMs per chunk, where recomputing the logits in the backward takes four) and kept until the
    backward, which scales them by the incoming gradient; not differentiable twice.
    """
    opts = _actor_options(ref_logp, loss_type=loss_type, loss_params=loss_params, clip_low=clip_low,
                          clip_high=clip_high, dual_clip=dual_clip, agg=agg, tis_cap=tis_cap,
                          num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size, horizon=horizon,
                          kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                          temperature=temperature, ignore_index=ignore_index)
    _check_head(hidden, weight, bias)
    labels = _check_actor_inputs("hidden", hidden, hidden.shape[:-1], "hidden.shape[:-1]", weight.shape[0],
                                 labels, old_logp, advantages, mask, ref_logp, rollout_logp,
                                 rollout_is_weights, opts)
    valid = labels != ignore_index
    per_token = (old_logp, advantages, ref_logp, rollout_logp, rollout_is_weights)
    if _gradients_in_forward(hidden, weight, bias, opts):
        return _fused_loss_with_gradients(hidden, weight, bias, labels, valid, per_token, opts)
    logp, entropy = _linear_logprobs(hidden, weight, bias, labels, opts.temperature, ignore_index, True)
    return _loss_from_logprobs(logp, entropy, valid, *per_token, opts)


def _gradients_in_forward(hidden, weight, bias, opts) -> bool:
    """Whether the fused loss computes its gradients in its forward: a gradient is wanted (grad
    mode on, an input that requires one), each token's term depends on its own token alone
    (:func:`ppo_fast.objectives.token_local`), and the call runs eagerly (``torch.compile``
    traces the op and its recomputing backward)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
            and objectives.token_local(opts.loss_type, opts.loss_params))


def _fused_loss_with_gradients(hidden, weight, bias, labels, valid, per_token, opts):
    """``(loss, metrics)`` of :func:`fused_linear_ppo_loss` with the gradients of hidden, weight and
    bias computed in the forward, chunk by chunk (three GEMMs per chunk where the op's forward and
    backward take four): the loss is ``Σ_i w_i·term_i(logp_i, entropy_i)`` with the aggregation's
    weights ``w`` fixed by the mask, so a chunk's tokens' share is known when its log-probs are."""
    lead, valid_flat = valid.shape, valid.reshape(-1)
    old_logp, advantages, ref_logp, rollout_logp, rollout_is_weights = (
        None if t is None else t.detach().reshape(-1) for t in per_token)
    dtype = out_dtype(hidden.dtype)
    weights = spec.agg_weights(valid, opts.agg, num_tokens=opts.num_tokens, num_seqs=opts.num_seqs,
                               dp_size=opts.dp_size, horizon=opts.horizon, dtype=dtype).reshape(-1)

    def chunk_loss(start, stop, logp, entropy):
        part = slice(start, stop)
        at = lambda t: None if t is None else t[part]  # noqa: E731
        terms = spec.ppo_token_terms(logp, old_logp[part], advantages[part], opts, mask=valid_flat[part],
                                     entropy=entropy, ref_logp=at(ref_logp), rollout_logp=at(rollout_logp),
                                     rollout_is_weights=at(rollout_is_weights))
        return spec.aggregate(terms.loss, weights[part], valid_flat[part])

    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    logp, entropy, (dhidden, dweight, dbias) = linear_logprobs_with_gradients(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), 1.0 / float(opts.temperature),
        int(opts.ignore_index), chunk_loss, *need)
    with torch.no_grad():
        loss, metrics = _loss_from_logprobs(logp.view(lead), entropy.view(lead), valid, *per_token, opts)
    dhidden = dhidden.view(hidden.shape) if need[0] else dhidden
    return LossWithGradients.apply(loss, hidden, weight, bias, dhidden, dweight, dbias), metrics
