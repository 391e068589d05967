"""Rollout correction: importance-sampling weights and rejection filters for the mismatch between
the engine that sampled the tokens (vLLM, SGLang: π_rollout) and the trainer that scores them
(π_old, the training policy before the update).

Per token, ``log r = old_logp − rollout_logp`` and ``r = π_old / π_rollout``. Two tools, usable
together:

* **Importance sampling (IS)**: a per-token weight that multiplies the policy loss.
  ``is_level="token"``: ``w = r``. ``is_level="sequence"``: one weight per sequence, broadcast
  over its tokens: ``is_seq_stat="sum"`` gives ``exp(Σ_t log r)``, the product of the token
  ratios (verl's and TRL's sequence IS), ``"mean"`` gives ``exp(mean_t log r)``, their geometric
  mean (OpenRLHF's sequence statistic). The raw weight is then bounded: ``is_mode="truncate"``
  clamps it into ``[is_lower, is_upper]`` (TIS; verl's single threshold, OpenRLHF's ``clip``,
  TRL's ``*_truncate``), ``is_mode="mask"`` sets it to 0 outside that band (IcePop; verl's
  ``"lower_upper"`` threshold, OpenRLHF's ``mask`` with ratio gating, TRL's ``*_mask``). Either
  bound may be None (no bound on that side). A zeroed weight keeps its token in the mask.
* **Rejection**: filters that drop tokens, or whole sequences, from the mask. Each filter is a
  statistic, an aggregation and a band ``[lower, upper]`` (inclusive): a unit is kept when its
  statistic lies in the band. Statistics per token: ``k1 = −log r``, ``k2 = ½ (log r)²``,
  ``k3 = r − 1 − log r`` (the KL estimators of KL(π_rollout ‖ π_old)), and OpenRLHF's divergences
  of the sampled token's probability, ``binary_kl = p log(p/q) + (1−p) log((1−p)/(1−q))`` and
  ``tv = |p − q|`` with ``p = π_rollout``, ``q = π_old``, both clamped into ``[1e-6, 1 − 1e-6]``
  (OpenRLHF's clamp, which keeps the logs finite). Aggregations: ``token`` (each token on its
  own), ``seq_sum``, ``seq_mean`` (over the sequence's valid tokens), ``seq_max`` (not for k1).
  A sequence filter keeps or drops all tokens of a sequence. **The k1 filters take bounds on the
  ratio**: ``token_k1`` keeps ``lower ≤ r ≤ upper``, ``seq_sum_k1`` bounds the product of the
  ratios ``exp(−Σ k1)``, ``seq_mean_k1`` their geometric mean ``exp(−mean k1)``; the other
  filters bound the statistic itself.

The peers' options, here:

* verl (``rollout_is`` / ``rollout_rs``): IS as above with ``is_seq_stat="sum"``; a single
  threshold is ``is_upper`` in truncate mode, ``"lo_up"`` is mask mode; its RS options are the
  filters of the same name, except that verl compares its k1 statistic with ``[log lower,
  log upper]``, which keeps ``1/upper ≤ r ≤ 1/lower`` (the band above only when the bounds are
  reciprocal). :mod:`ppo_fast.integrations.verl.rollout_correction` reproduces verl exactly.
* OpenRLHF (``is_correction_*``): level ``token`` with gating ``ratio`` is IS itself (``clip``:
  truncate, ``mask``: mask mode); otherwise survivors keep their per-token weight
  (``is_level="token", is_upper=None``) and the gate is a filter: ``seq_mean_k1`` for ``ratio``
  at level ``seq``, ``token_binary_kl`` / ``seq_mean_binary_kl``, ``token_tv`` / ``seq_mean_tv``;
  all with ``log_ratio_bound=None``. OpenRLHF keeps filtered tokens in the loss's denominator
  with weight 0: use the weights with the input mask. :func:`ppo_fast.integrations.openrlhf.openrlhf_coefficients` reproduces it
  exactly.
* TRL (``vllm_importance_sampling_mode`` ``{token,sequence}_{truncate,mask}``, ``clip_min``,
  ``clip_max``): ``is_level``, ``is_mode``, ``is_lower=clip_min``, ``is_upper=clip_max``,
  ``log_ratio_bound=None``. TRL also turns a NaN rollout log-prob into a ratio of 1; here a NaN
  stays NaN: replace it first.

The weights are 0 wherever the returned mask is 0 (masked or rejected). ``log_ratio_bound``
(default 20, verl's safety bound; None: no clamp, as OpenRLHF and TRL) clamps every log-ratio
before it is exponentiated or turned into a rejection statistic: each token's ``log r`` (token
weights, k1/k2/k3 and everything aggregated from them) and, at ``is_level="sequence"``, the
sequence's log-weight (the clamp applies to the sum or mean of the unclamped token log-ratios).
Without a bound a ratio can overflow to inf.

All of it is detached (no gradient flows through IS weights or rejection) and computed in float32,
or float64 when an input is float64. Masks select (``torch.where``): whatever masked positions of
the log-probs hold changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from . import arguments as check
from .arguments import choice, is_number
from .spec import compute_dtype

IS_LEVELS = ("token", "sequence")
IS_SEQ_STATS = ("sum", "mean")
IS_MODES = ("truncate", "mask")
STATISTICS = ("k1", "k2", "k3", "binary_kl", "tv")
AGGREGATIONS = ("token", "seq_sum", "seq_mean", "seq_max")
REJECTION_FILTERS = tuple(f"{agg}_{stat}" for stat in STATISTICS for agg in AGGREGATIONS
                          if (agg, stat) != ("seq_max", "k1"))
"""The rejection filters: ``<aggregation>_<statistic>`` (verl's eleven and the binary_kl / tv ones)."""
DEFAULT_LOG_RATIO_BOUND = 20.0
PROB_CLAMP = 1e-6
"""binary_kl and tv clamp the token probabilities into [PROB_CLAMP, 1 − PROB_CLAMP] (OpenRLHF's)."""

_IS_DEFAULTS = {"is_seq_stat": "sum", "is_mode": "truncate", "is_upper": 2.0, "is_lower": None,
                "is_batch_normalize": False, "group": None}


# --------------------------------------------------------------------------------------------
# Masked reductions. Counts are cast to the values' dtype; ``eps`` (verl adds 1e-8 to the count
# of a float64 mask) is added to every count, otherwise an empty selection gives 0.
# --------------------------------------------------------------------------------------------

def _masked_mean(x: torch.Tensor, sel: torch.Tensor, dim: int | None = None, eps: float = 0.0):
    total = torch.where(sel, x, 0.0)
    total = total.sum() if dim is None else total.sum(dim)
    count = (sel.sum() if dim is None else sel.sum(dim)).to(x.dtype)
    return total / (count + eps) if eps else total / count.clamp(min=1)


def _row_sum(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, 0.0).sum(-1)


def _row_max(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Max over each row's valid tokens; 0 for a row without any."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    largest = torch.where(valid, x, -math.inf).amax(-1)
    return torch.where(valid.any(-1), largest, 0.0)


def _extreme(x: torch.Tensor, sel: torch.Tensor, largest: bool) -> torch.Tensor:
    """max (or min) of x where sel; 0 when nothing is selected."""
    if x.numel() == 0:
        return x.new_zeros(())
    fill = -math.inf if largest else math.inf
    picked = torch.where(sel, x, fill)
    value = picked.amax() if largest else picked.amin()
    return torch.where(sel.any(), value, 0.0)


def _bounded(log_ratio: torch.Tensor, bound: float | None) -> torch.Tensor:
    return log_ratio if bound is None else log_ratio.clamp(-bound, bound)


def _in_band(x: torch.Tensor, lower, upper) -> torch.Tensor:
    """lower ≤ x ≤ upper (a None bound is open; NaN is never in the band)."""
    keep = x == x
    if lower is not None:
        keep = keep & (x >= lower)
    if upper is not None:
        keep = keep & (x <= upper)
    return keep


def _all_reduce_mean(total: torch.Tensor, count: torch.Tensor, group) -> torch.Tensor:
    """total / count, both summed over ``group``'s ranks when it is given (float64, one all-reduce)."""
    both = torch.stack([total.to(torch.float64), count.to(torch.float64)])
    if group is not None:
        torch.distributed.all_reduce(both, group=group)
    return both[0] / both[1]


# --------------------------------------------------------------------------------------------
# Building blocks (the verl and OpenRLHF adapters assemble them too)
# --------------------------------------------------------------------------------------------

def _log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor | None, valid: torch.Tensor):
    """``old − rollout`` at valid tokens, 0 elsewhere, in the compute dtype (``rollout_logp=None``:
    ``old_logp`` already is the log-ratio)."""
    dtype = compute_dtype(old_logp, rollout_logp)
    diff = old_logp.to(dtype) if rollout_logp is None else old_logp.to(dtype) - rollout_logp.to(dtype)
    return torch.where(valid, diff, 0.0)


class _Importance(NamedTuple):
    log_weight: torch.Tensor
    """Unclamped log-weight per unit: ``[B, T]`` (token level) or ``[B, 1]`` (the sequence's)."""
    unit_raw: torch.Tensor
    """exp(clamped log-weight) per unit, same shape as ``log_weight``."""
    unit_weight: torch.Tensor
    """unit_raw after the bounds."""
    raw: torch.Tensor
    """unit_raw broadcast to ``[B, T]``, 0 at masked tokens."""
    weights: torch.Tensor
    """unit_weight broadcast to ``[B, T]``, 0 at masked tokens."""
    inside: torch.Tensor
    """``[B, T]`` bool: a valid token whose raw weight lies within the bounds."""


def _importance(log_ratio, valid, *, level, seq_stat, mode, lower, upper, bound) -> _Importance:
    """IS weights from the unclamped log-ratio (0 at masked tokens), before any rejection."""
    if level == "token":
        log_weight = log_ratio
    elif seq_stat == "sum":
        log_weight = _row_sum(log_ratio, valid).unsqueeze(-1)
    else:
        log_weight = _masked_mean(log_ratio, valid, -1).unsqueeze(-1)
    unit_raw = torch.exp(_bounded(log_weight, bound))
    unit_inside = _in_band(unit_raw, lower, upper)
    if mode == "mask":
        unit_weight = torch.where(unit_inside, unit_raw, 0.0)
    elif lower is None and upper is None:
        unit_weight = unit_raw
    else:
        unit_weight = unit_raw.clamp(min=lower, max=upper)
    return _Importance(log_weight, unit_raw, unit_weight, torch.where(valid, unit_raw, 0.0),
                       torch.where(valid, unit_weight, 0.0), valid & unit_inside)


class _Rejection(NamedTuple):
    token_stat: torch.Tensor
    """``[B, T]`` per-token statistic (k1 = −log r, ...), 0 at masked tokens."""
    row_stat: torch.Tensor | None
    """``[B]`` the sequence aggregate for sequence filters (0 for empty rows), else None."""
    keep: torch.Tensor
    """``[B, T]`` bool: the unit passes (rows broadcast over T); its value at masked tokens is
    meaningless, combine it with the mask."""


def _token_statistic(stat, log_ratio, old_logp, rollout_logp, valid):
    """The per-token statistic ``stat`` from the clamped log-ratio (k1/k2/k3) or the log-probs
    (binary_kl, tv); 0 at masked tokens."""
    if stat == "k1":
        return -log_ratio
    if stat == "k2":
        return 0.5 * log_ratio.square()
    if stat == "k3":
        return torch.exp(log_ratio) - 1.0 - log_ratio
    dtype = log_ratio.dtype
    p = rollout_logp.to(dtype).exp().clamp(PROB_CLAMP, 1 - PROB_CLAMP)
    q = old_logp.to(dtype).exp().clamp(PROB_CLAMP, 1 - PROB_CLAMP)
    if stat == "binary_kl":
        value = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    else:
        value = (p - q).abs()
    return torch.where(valid, value, 0.0)


def _rejection(name, bounded_log_ratio, old_logp, rollout_logp, valid, lower, upper, *,
               ratio_bounds: bool, eps: float = 0.0) -> _Rejection:
    """One filter. ``ratio_bounds`` (k1 only): the band bounds ``exp(−statistic)`` (the ratio, its
    product or geometric mean); otherwise the statistic itself."""
    agg, stat = _filter_parts(name)
    token_stat = _token_statistic(stat, bounded_log_ratio, old_logp, rollout_logp, valid)
    if agg == "token":
        row_stat, unit_stat = None, token_stat
    else:
        if agg == "seq_sum":
            row_stat = _row_sum(token_stat, valid)
        elif agg == "seq_mean":
            row_stat = _masked_mean(token_stat, valid, -1, eps)
        else:
            row_stat = _row_max(token_stat, valid)
        unit_stat = row_stat
    compared = torch.exp(-unit_stat) if ratio_bounds else unit_stat
    keep = _in_band(compared, lower, upper)
    if row_stat is not None:
        keep = keep.unsqueeze(-1).expand(valid.shape)
    return _Rejection(token_stat, row_stat, keep)


def _filter_parts(name: str) -> tuple[str, str]:
    """(aggregation, statistic) of a filter name from :data:`REJECTION_FILTERS`."""
    stat = next(stat for stat in STATISTICS if name.endswith("_" + stat))
    return name[: -len(stat) - 1], stat


# --------------------------------------------------------------------------------------------
# Option checks
# --------------------------------------------------------------------------------------------

def _optional_bound(name: str, value, positive_only: bool) -> None:
    if value is None:
        return
    if not is_number(value) or (positive_only and value <= 0):
        what = "a finite number > 0" if positive_only else "a finite number"
        raise ValueError(f"{name} must be {what} or None, got {value!r}")


def _check_importance_options(is_level, is_seq_stat, is_mode, is_upper, is_lower, is_batch_normalize,
                              group) -> None:
    if is_level is None:
        given = {"is_seq_stat": is_seq_stat, "is_mode": is_mode, "is_upper": is_upper, "is_lower": is_lower,
                 "is_batch_normalize": is_batch_normalize, "group": group}
        changed = [name for name, value in given.items() if value is not _IS_DEFAULTS[name]
                   and value != _IS_DEFAULTS[name]]
        if changed:
            raise ValueError(f"{', '.join(changed)} only apply to importance sampling, which is_level=None "
                             "turns off; set is_level='token' or 'sequence', or leave them at their defaults")
        return
    choice("is_level", is_level, IS_LEVELS)
    choice("is_seq_stat", is_seq_stat, IS_SEQ_STATS)
    choice("is_mode", is_mode, IS_MODES)
    if is_level == "token" and is_seq_stat != "sum":
        raise ValueError(f"is_seq_stat={is_seq_stat!r} applies to is_level='sequence' only; got is_level='token'")
    _optional_bound("is_upper", is_upper, positive_only=True)
    _optional_bound("is_lower", is_lower, positive_only=True)
    if is_upper is not None and is_lower is not None and is_lower > is_upper:
        raise ValueError(f"is_lower must be <= is_upper, got is_lower={is_lower!r}, is_upper={is_upper!r}")
    if is_mode == "mask" and is_upper is None and is_lower is None:
        raise ValueError("is_mode='mask' zeroes weights outside [is_lower, is_upper]: give at least one of them")
    if not isinstance(is_batch_normalize, bool):
        raise ValueError(f"is_batch_normalize must be a bool, got {is_batch_normalize!r}")
    if group is not None:
        if not is_batch_normalize:
            raise ValueError("group only serves the batch normalisation: set is_batch_normalize=True or drop group")
        if not (torch.distributed.is_available() and isinstance(group, torch.distributed.ProcessGroup)):
            raise ValueError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
        if not torch.distributed.is_initialized():
            raise ValueError("group was given but torch.distributed is not initialised")


def _rejection_bounds(rejection) -> list[tuple[str, float | None, float | None]]:
    """[(filter, lower, upper)] from the ``rejection`` mapping, checked."""
    if rejection is None:
        return []
    if not isinstance(rejection, Mapping):
        raise ValueError(f"rejection must be a mapping {{filter: bounds}} or None, got {type(rejection).__name__}")
    checked = []
    for name, spec in rejection.items():
        choice("rejection filter", name, REJECTION_FILTERS)
        ratio = _filter_parts(name)[1] == "k1"
        where = f"rejection[{name!r}]"
        if is_number(spec):
            if ratio and not spec >= 1:
                raise ValueError(f"{where}: a single k1 bound u is the ratio band [1/u, u], so u must be >= 1; "
                                 f"got {spec!r}")
            lower, upper = (1.0 / spec, spec) if ratio else (None, spec)
        elif isinstance(spec, (tuple, list)) and len(spec) == 2:
            lower, upper = spec
        else:
            raise ValueError(f"{where} must be a number (the upper bound) or a (lower, upper) pair, got {spec!r}")
        _optional_bound(f"{where} lower bound", lower, positive_only=ratio)
        _optional_bound(f"{where} upper bound", upper, positive_only=ratio)
        if lower is None and upper is None:
            raise ValueError(f"{where} must bound at least one side, got {spec!r}")
        if lower is not None and upper is not None and lower > upper:
            raise ValueError(f"{where}: lower bound {lower!r} > upper bound {upper!r}")
        if not ratio and upper is not None and upper < 0:
            raise ValueError(f"{where}: {_filter_parts(name)[1]} is never negative, so an upper bound "
                             f"{upper!r} < 0 would reject every token")
        checked.append((name, None if lower is None else float(lower), None if upper is None else float(upper)))
    return checked


def _check_log_probs(old_logp, rollout_logp, mask, names=("old_logp", "rollout_logp", "mask")) -> None:
    """[B, T] float log-probs and a 0/1 mask of that shape; ``names`` as the caller calls them."""
    old_name, rollout_name, mask_name = names
    check.floating(old_name, check.tensor(old_name, old_logp))
    if old_logp.dim() != 2:
        raise ValueError(f"{old_name} must have shape [B, T], got shape {tuple(old_logp.shape)}")
    check.token_tensor(rollout_name, check.tensor(rollout_name, rollout_logp), old_logp.shape, f"{old_name}.shape")
    check.mask_like(mask_name, mask, old_logp.shape, f"{old_name}.shape")
    check.same_device(old_name, old_logp, **{rollout_name: rollout_logp, mask_name: mask})


def _check_sampleable(old_logp, rollout_logp, mask) -> None:
    """A valid token that both policies give probability 0 has no ratio (−inf − −inf is NaN,
    which would spread over its sequence's weight): an error naming the first one."""
    if not check.values_checked(old_logp, rollout_logp, mask):
        return
    impossible = mask.bool() & torch.isneginf(old_logp) & torch.isneginf(rollout_logp)
    if bool(impossible.any()):
        where = tuple(impossible.nonzero()[0].tolist())
        raise ValueError(f"old_logp and rollout_logp are both -inf at position {where}, a token of the mask: a "
                         "token neither policy can sample has no importance ratio (-inf - -inf is NaN); mask it "
                         f"out. {int(impossible.sum())} such positions")


# --------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------

def rollout_correction(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    is_level: str | None = "token",
    is_seq_stat: str = "sum",
    is_mode: str = "truncate",
    is_upper: float | None = 2.0,
    is_lower: float | None = None,
    is_batch_normalize: bool = False,
    group=None,
    rejection: Mapping | None = None,
    log_ratio_bound: float | None = DEFAULT_LOG_RATIO_BOUND,
    compute_metrics: bool = True,
):
    """Importance-sampling weights and rejection for rollout/training mismatch (see the module
    docstring for the definitions).

    Args:
        old_logp, rollout_logp: ``[B, T]`` float, log π_old and log π_rollout of the sampled
            tokens (any float dtype; their values at masked positions are ignored).
        mask: ``[B, T]`` bool or 0/1, the response tokens.
        is_level: ``"token"``, ``"sequence"``, or None (no weights; the ``is_*`` options and
            ``group`` must then stay at their defaults).
        is_seq_stat: the sequence's log-weight at ``is_level="sequence"``: ``"sum"`` (product of
            the token ratios) or ``"mean"`` (their geometric mean).
        is_mode: ``"truncate"`` (clamp into the bounds) or ``"mask"`` (0 outside them).
        is_upper, is_lower: bounds on the raw weight, each > 0 or None (open).
        is_batch_normalize: divide the weights by their mean over the batch so that they average
            1: over the kept tokens (token level) or over the sequences with a kept token (one
            weight per sequence). **The normalised weights depend on the whole batch** (they are
            not batch-invariant: the same sequence gets a different weight in another batch or
            micro-batch). When that mean is 0 (every kept weight is 0, or nothing is kept), the
            weights are left as they are and the factor is 1.
        group: a ``torch.distributed`` process group: the normalising mean is taken over all its
            ranks' batches (one all-reduce of [sum, count] in float64), as verl does in bypass
            mode. None: this batch only.
        rejection: ``{filter: bounds}`` with filters from :data:`REJECTION_FILTERS`, applied in
            order (all must pass). ``bounds`` is ``(lower, upper)`` (inclusive, either may be
            None) or one number: the upper bound, or for a k1 filter the ratio band
            ``[1/u, u]`` (u ≥ 1). k1 bounds are on the ratio and must be > 0.
        log_ratio_bound: clamp ``|log r|`` at this bound before exponentiating or building a
            statistic (default 20, verl's); None: no clamp.
        compute_metrics: also compute the metrics (otherwise ``{}``).

    Returns:
        ``(weights, mask, metrics)``: ``weights`` ``[B, T]`` (compute dtype, detached, 0 wherever
        the returned mask is 0) or None when ``is_level`` is None; ``mask`` the input mask with
        rejected tokens set to 0, in the input's dtype; ``metrics`` a dict of detached 0-d
        tensors (below; the off-policy ones always). With no valid token the weights are 0 and
        every metric is 0 (``is_batch_norm_factor`` 1).

    Metrics (token statistics over the input mask's valid tokens, sequence statistics over the
    sequences with at least one; std is the population std; fractions are of those units):

    * IS (before rejection and normalisation): ``is_mean``, ``is_std``, ``is_min``, ``is_max``
      of the weights; ``is_ess``, the effective sample size as a fraction,
      ``(Σw)² / (n Σw²)`` (0 when every weight is 0); ``is_fraction_high`` / ``_low``: units
      (tokens, or sequences at sequence level) whose raw weight is above ``is_upper`` / below
      ``is_lower`` (0 for an open bound); ``is_oob_fraction``: tokens whose raw weight is out of
      the bounds (truncated, or zeroed in mask mode); ``is_seq_mean``, ``_std``, ``_min``,
      ``_max`` of each sequence's mean weight and ``is_seq_max_deviation`` = max |mean − 1|;
      ``is_seq_fraction_high`` / ``_low``: sequences whose mean raw weight is out of bounds;
      ``is_batch_norm_factor`` (with ``is_batch_normalize``): what the weights were divided by.
    * per filter f: ``rs_f_mean``, ``_std``, ``_min``, ``_max`` of its statistic over its units
      (tokens, or sequences for sequence filters); ``rs_f_fraction_high`` / ``_low``: units
      rejected by the upper / lower bound as given (for k1: the ratio above ``upper`` / below
      ``lower``); ``rs_f_masked_fraction``: tokens it rejects; ``rs_f_seq_masked_fraction``:
      sequences in which it rejects a token; token filters also ``rs_f_seq_mean``, ``_std``,
      ``_min``, ``_max`` of each sequence's mean statistic. Then ``rs_masked_fraction`` and
      ``rs_seq_masked_fraction`` for all filters together.
    * off-policy: ``kl`` = mean(rollout_logp − old_logp) (k1 estimate of KL(π_rollout ‖ π_old)),
      ``k3_kl`` = mean(r − 1 − log r), ``chi2_token`` = mean(r² − 1), ``chi2_seq`` = mean over
      sequences of (Π r)² − 1 (its log clamped at ``±log_ratio_bound``, as the sequence weight);
      per sequence ``ℓ_old``, ``ℓ_rollout`` = mean log-prob: ``training_ppl`` = mean exp(−ℓ_old),
      ``training_log_ppl`` = mean(−ℓ_old), ``rollout_ppl``, ``rollout_log_ppl`` alike, with
      ``d = ℓ_rollout − ℓ_old``: ``log_ppl_diff`` = mean d, ``log_ppl_abs_diff`` = mean |d|,
      ``log_ppl_diff_max``, ``log_ppl_diff_min``, ``ppl_ratio`` = mean exp(d).

    Both log-probs −inf at a valid token (a token neither policy samples) is a ValueError naming
    its position. A NaN log-ratio at a valid token gives a NaN weight in truncate mode and counts as out of
    bounds (weight 0) in mask mode; it fails every rejection filter.
    """
    check.tensor("old_logp", old_logp)
    _check_log_probs(old_logp, rollout_logp, mask)
    _check_sampleable(old_logp, rollout_logp, mask)
    _check_importance_options(is_level, is_seq_stat, is_mode, is_upper, is_lower, is_batch_normalize, group)
    filters = _rejection_bounds(rejection)
    _optional_bound("log_ratio_bound", log_ratio_bound, positive_only=True)
    if not isinstance(compute_metrics, bool):
        raise ValueError(f"compute_metrics must be a bool, got {compute_metrics!r}")

    valid = mask.bool()
    old, rollout = old_logp.detach(), rollout_logp.detach()
    log_ratio = _log_ratio(old, rollout, valid)
    bounded = _bounded(log_ratio, log_ratio_bound)

    importance = None
    if is_level is not None:
        importance = _importance(log_ratio, valid, level=is_level, seq_stat=is_seq_stat, mode=is_mode,
                                 lower=is_lower, upper=is_upper, bound=log_ratio_bound)
    kept = valid
    rejections = []
    for name, lower, upper in filters:
        result = _rejection(name, bounded, old, rollout, valid, lower, upper,
                            ratio_bounds=_filter_parts(name)[1] == "k1")
        rejections.append(result)
        kept = kept & result.keep

    weights = factor = None
    if importance is not None:
        weights = torch.where(kept, importance.weights, 0.0)
        if is_batch_normalize:
            units = kept if is_level == "token" else kept.any(-1, keepdim=True)
            mean = _all_reduce_mean(torch.where(units, importance.unit_weight, 0.0).sum(), units.sum(), group)
            factor = torch.where(mean > 0, mean, 1.0).to(weights.dtype)
            weights = weights / factor

    metrics: dict[str, torch.Tensor] = {}
    if compute_metrics:
        if importance is not None:
            metrics.update(_importance_metrics(importance, valid, is_level, is_lower, is_upper))
            if factor is not None:
                metrics["is_batch_norm_factor"] = factor
        for (name, lower, upper), result in zip(filters, rejections):
            metrics.update(_rejection_metrics(name, result, valid, lower, upper))
        if filters:
            rows = valid.any(-1)
            rejected = valid & ~kept
            metrics["rs_masked_fraction"] = _share(rejected, valid, log_ratio.dtype)
            metrics["rs_seq_masked_fraction"] = _share(rejected.any(-1), rows, log_ratio.dtype)
        metrics.update(_offpolicy_metrics(old, rollout, log_ratio, valid, log_ratio_bound))
    return weights, kept.to(mask.dtype, copy=True), metrics


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def _share(cond: torch.Tensor, sel: torch.Tensor, dtype) -> torch.Tensor:
    """Fraction of the selected units where cond holds (0 when none is selected)."""
    return _masked_mean(cond.to(dtype), sel)


def _summary(metrics: dict, prefix: str, x: torch.Tensor, sel: torch.Tensor) -> None:
    mean = _masked_mean(x, sel)
    metrics[f"{prefix}_mean"] = mean
    metrics[f"{prefix}_std"] = _masked_mean((x - mean).square(), sel).sqrt()
    metrics[f"{prefix}_min"] = _extreme(x, sel, largest=False)
    metrics[f"{prefix}_max"] = _extreme(x, sel, largest=True)


def _out_of_band(metrics: dict, prefix: str, x: torch.Tensor, sel: torch.Tensor, lower, upper) -> None:
    zero = x.new_zeros(())
    metrics[f"{prefix}_high"] = zero if upper is None else _share(x > upper, sel, x.dtype)
    metrics[f"{prefix}_low"] = zero if lower is None else _share(x < lower, sel, x.dtype)


def _importance_metrics(imp: _Importance, valid, level, lower, upper) -> dict:
    metrics: dict[str, torch.Tensor] = {}
    w = imp.weights
    _summary(metrics, "is", w, valid)
    scale = _extreme(w, valid, largest=True)
    scaled = torch.where(valid, w / torch.where(scale > 0, scale, 1.0), 0.0)
    square_sum = scaled.square().sum()
    count = valid.sum().to(w.dtype)
    metrics["is_ess"] = torch.where(square_sum > 0, scaled.sum().square() / (count * square_sum), 0.0)
    rows = valid.any(-1)
    if level == "token":
        row_raw, row_weight = _masked_mean(imp.raw, valid, -1), _masked_mean(w, valid, -1)
        _out_of_band(metrics, "is_fraction", imp.raw, valid, lower, upper)
    else:
        row_raw, row_weight = imp.unit_raw.squeeze(-1), imp.unit_weight.squeeze(-1)
        _out_of_band(metrics, "is_fraction", row_raw, rows, lower, upper)
    metrics["is_oob_fraction"] = _share(~imp.inside, valid, w.dtype)
    _summary(metrics, "is_seq", row_weight, rows)
    metrics["is_seq_max_deviation"] = _extreme((row_weight - 1).abs(), rows, largest=True)
    _out_of_band(metrics, "is_seq_fraction", row_raw, rows, lower, upper)
    return metrics


def _rejection_metrics(name: str, rej: _Rejection, valid, lower, upper) -> dict:
    metrics: dict[str, torch.Tensor] = {}
    prefix = f"rs_{name}"
    rows = valid.any(-1)
    unit_stat, units = (rej.token_stat, valid) if rej.row_stat is None else (rej.row_stat, rows)
    _summary(metrics, prefix, unit_stat, units)
    if _filter_parts(name)[1] == "k1":
        _out_of_band(metrics, f"{prefix}_fraction", torch.exp(-unit_stat), units, lower, upper)
    else:
        _out_of_band(metrics, f"{prefix}_fraction", unit_stat, units, lower, upper)
    rejected = valid & ~rej.keep
    metrics[f"{prefix}_masked_fraction"] = _share(rejected, valid, unit_stat.dtype)
    metrics[f"{prefix}_seq_masked_fraction"] = _share(rejected.any(-1), rows, unit_stat.dtype)
    if rej.row_stat is None:
        _summary(metrics, f"{prefix}_seq", _masked_mean(rej.token_stat, valid, -1), rows)
    return metrics


def _offpolicy_metrics(old, rollout, log_ratio, valid, bound) -> dict:
    dtype = log_ratio.dtype
    old = torch.where(valid, old.to(dtype), 0.0)
    rollout = torch.where(valid, rollout.to(dtype), 0.0)
    rows = valid.any(-1)
    bounded = _bounded(log_ratio, bound)
    ratio = torch.exp(bounded)
    mean_old, mean_rollout = _masked_mean(old, valid, -1), _masked_mean(rollout, valid, -1)
    diff = mean_rollout - mean_old
    sequence_log_ratio = _bounded(_row_sum(log_ratio, valid), bound)
    return {
        "training_ppl": _masked_mean(torch.exp(-mean_old), rows),
        "training_log_ppl": _masked_mean(-mean_old, rows),
        "kl": _masked_mean(rollout - old, valid),
        "k3_kl": _masked_mean(ratio - 1.0 - bounded, valid),
        "rollout_ppl": _masked_mean(torch.exp(-mean_rollout), rows),
        "rollout_log_ppl": _masked_mean(-mean_rollout, rows),
        "log_ppl_diff": _masked_mean(diff, rows),
        "log_ppl_abs_diff": _masked_mean(diff.abs(), rows),
        "log_ppl_diff_max": _extreme(diff, rows, largest=True),
        "log_ppl_diff_min": _extreme(diff, rows, largest=False),
        "ppl_ratio": _masked_mean(torch.exp(diff), rows),
        "chi2_token": _masked_mean(ratio.square() - 1.0, valid),
        "chi2_seq": _masked_mean(torch.exp(2.0 * sequence_log_ratio) - 1.0, rows),
    }
