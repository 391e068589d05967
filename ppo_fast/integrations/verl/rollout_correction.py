"""verl 0.9.1's ``verl.trainer.ppo.rollout_corr_helper`` on the ppo_fast core.

Same names, signatures, returns, metric keys (in verl's order) and Python-float metric values
(float64 inputs: within 1e-9 of verl for bool, int64, float32 and float64 masks). The weights and
rejection masks come from :mod:`ppo_fast.correction`; the metrics reproduce verl's
arithmetic, which differs from the core's clean definitions:

* verl's masked mean divides by ``count + 1e-8``; the epsilon only survives a float64 mask (for
  other masks the count is float32, where ``n + 1e-8`` rounds to ``n``). An indicator
  (``(x > t).float()``) averaged over a non-float64 mask is computed in float32. Both are kept.
* verl's k1 filters compare ``k1 = −log r`` with ``[log lower, log upper]``: they keep
  ``1/upper ≤ r ≤ 1/lower`` (``rollout_corr_helper.py:316, 330, 349``), and their
  ``fraction_high`` counts low ratios. Reproduced: with asymmetric bounds this is the inverse of
  the documented ratio band (the core takes bounds on r).
* Sequence-level IS metrics and ``rollout_rs_seq_masked_fraction`` count rows without a valid
  token (``:706-718, 763-781, 410``); the per-option ``*_seq_masked_fraction`` does not. Kept.
* A float32 log-threshold for the sequence-level ``rollout_is_ratio_fraction_*`` (``:700``),
  the ``1e-8`` added to the ESS mean (``:756``), std as ``sqrt(E[x²] − E[x]²)``: kept.
* ``rollout_is_eff_sample_size`` divides by a Python float: when every weight is 0 (IcePop that
  rejects all tokens) verl raises ZeroDivisionError (``:757``); so does this adapter.

Deliberate differences: masks select, so NaN/inf at masked positions never reach the weights
(verl's ``raw * mask``, ``:592``, gives NaN there); masks must be bool or 0/1 and the log-probs
``[B, T]``; a NaN threshold, or a k1 single threshold of 0, is a ValueError (verl accepts NaN,
and divides by zero). The IS batch normalisation all-reduces over the default process group when
``torch.distributed`` is initialised, as verl (``:633-648``); its sums travel in float64.
Float16/bfloat16 masks (whose count verl rounds to that dtype) and float32 log-probs with a
float64 mask (which verl widens to float64) are computed in the core's precision.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ... import arguments as check
from ... import correction as core

__all__ = ["SAFETY_BOUND", "SUPPORTED_ROLLOUT_RS_OPTIONS", "TOKEN_LEVEL_ROLLOUT_RS_OPTIONS",
           "compute_is_metrics", "compute_offpolicy_metrics", "compute_rollout_correction_and_rejection_mask",
           "compute_rollout_correction_weights", "compute_rollout_rejection_mask", "compute_rs_metrics"]

SAFETY_BOUND = core.DEFAULT_LOG_RATIO_BOUND
SUPPORTED_ROLLOUT_RS_OPTIONS: set[str] = {
    "token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3",
}
TOKEN_LEVEL_ROLLOUT_RS_OPTIONS: set[str] = {"token_k1", "token_k2", "token_k3"}
_EMPTY_MASK = "response_mask must contain at least one valid token (1)."
_LOG_RATIO = ("log_ratio", "log_ratio", "response_mask")
_LOG_PROBS = ("old_log_prob", "rollout_log_prob", "response_mask")


# --------------------------------------------------------------------------------------------
# verl's arithmetic
# --------------------------------------------------------------------------------------------

def _mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """verl's ``masked_mean``: a float mask widens the values, a float64 mask keeps the 1e-8."""
    dtype = torch.promote_types(values.dtype, mask.dtype) if mask.is_floating_point() else values.dtype
    eps = 1e-8 if mask.dtype == torch.float64 else 0.0
    return core._masked_mean(values.to(dtype), mask.bool(), dim, eps)


def _std_of_clamped(stat: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> float:
    """``sqrt(max(E[c²] − E[c]², 0))`` of ``c = clamp(stat, low, high)``; 0.0 for ≤ 1 valid token."""
    if not mask.sum() > 1:
        return 0.0
    clamped = stat.clamp(min=low, max=high)
    variance = _mean(clamped.square(), mask) - _mean(clamped, mask).square()
    return variance.clamp(min=0.0).sqrt().item()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------

def _number(text, what: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is not a number") from exc
    if math.isnan(value):
        raise ValueError(f"{what}: {text!r} is NaN")
    return value


def _parse_rollout_is_threshold(spec) -> tuple[float, Optional[float]]:
    """(upper, lower or None): a number or ``"u"`` is TIS, ``"lo_up"`` is IcePop."""
    if isinstance(spec, bool):
        raise TypeError(f"rollout_is_threshold must be a number or a string, not a bool ({spec!r})")
    what = f"rollout_is_threshold {spec!r}"
    if isinstance(spec, (int, float)):
        upper, lower = _number(spec, what), None
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("rollout_is_threshold is an empty string")
        if "_" in text:
            low_text, up_text = text.split("_", 1)
            lower, upper = _number(low_text, what), _number(up_text, what)
        else:
            upper, lower = _number(text, what), None
    else:
        raise TypeError(f"rollout_is_threshold must be a number or a string, got {type(spec).__name__}")
    if upper <= 0:
        raise ValueError(f"{what}: the upper bound must be > 0, got {upper}")
    if lower is not None and lower <= 0:
        raise ValueError(f"{what}: the lower bound must be > 0, got {lower}")
    if lower is not None and lower > upper:
        raise ValueError(f"{what}: the lower bound {lower} exceeds the upper bound {upper}")
    return upper, lower


def _parse_rollout_rs_thresholds(options: list[str], spec) -> dict[str, tuple[Optional[float], float]]:
    """{option: (lower, upper)}: one entry for all options or one per (de-duplicated) option;
    k1 options take ``"lo_up"`` or ``"up"`` (lower = 1/up), the others one upper bound."""
    if spec is None:
        raise ValueError("rollout_rs_threshold is required for rejection sampling")
    if isinstance(spec, (int, float)):
        entries = [str(spec)]
    elif isinstance(spec, str):
        entries = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        raise TypeError(f"rollout_rs_threshold must be a number or a string, got {type(spec).__name__}")
    if not entries:
        raise ValueError(f"rollout_rs_threshold {spec!r} holds no threshold")
    if len(entries) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold {spec!r} has {len(entries)} entries; give one for all "
                         f"options or one per option ({len(options)}: {', '.join(options)})")
    entries = entries * len(options) if len(entries) == 1 else entries
    thresholds = {}
    for option, entry in zip(options, entries):
        what = f"rollout_rs_threshold {entry!r} for {option}"
        if option.endswith("k1"):
            if "_" in entry:
                low_text, up_text = entry.split("_", 1)
                lower, upper = _number(low_text, what), _number(up_text, what)
            else:
                upper = _number(entry, what)
                if upper == 0:
                    raise ValueError(f"{what}: bounds must be > 0")
                lower = float(str(1.0 / upper))
            if lower <= 0 or upper <= 0:
                raise ValueError(f"{what}: bounds must be > 0")
            if lower > upper:
                raise ValueError(f"{what}: lower bound {lower} exceeds upper bound {upper}")
        else:
            if "_" in entry:
                raise ValueError(f"{what}: only k1 options take a 'lower_upper' pair; give one upper bound")
            lower, upper = None, _number(entry, what)
            if upper <= 0:
                raise ValueError(f"{what}: the bound must be > 0")
        thresholds[option] = (lower, upper)
    return thresholds


# --------------------------------------------------------------------------------------------
# IS weights
# --------------------------------------------------------------------------------------------

def compute_rollout_correction_weights(
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: str = "token",
    rollout_is_threshold: str | float = 2.0,
    rollout_is_batch_normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """IS weights ``[B, T]`` (detached, 0 at padding) from ``log_ratio = log π_old − log π_rollout``
    and their metrics (computed before the batch normalisation).

    ``rollout_is``: ``"token"`` (``w = r``) or ``"sequence"`` (``exp(Σ_t log r)`` over valid
    tokens, broadcast). ``rollout_is_threshold``: a number (TIS: ``min(raw, u)``) or ``"lo_up"``
    (IcePop: 0 outside ``[lo, up]``); log-ratios clamped at ±20 before exp.
    ``rollout_is_batch_normalize``: divide by the weights' mean (over valid tokens, or over
    non-empty sequences of their per-sequence mean; all-reduced over the default group when
    ``torch.distributed`` is initialised) when it exceeds 1e-8, reported as
    ``rollout_is_batch_norm_factor`` (1.0 otherwise). The normalised weights depend on the whole
    batch (not batch-invariant).
    """
    check.tensor("log_ratio", log_ratio)
    if rollout_is not in ("token", "sequence"):
        raise ValueError(f"rollout_is must be 'token' or 'sequence', got {rollout_is!r}")
    upper, lower = _parse_rollout_is_threshold(rollout_is_threshold)
    core._check_log_probs(log_ratio, log_ratio, response_mask, _LOG_RATIO)
    valid = response_mask.bool()
    importance = core._importance(core._log_ratio(log_ratio.detach(), None, valid), valid, level=rollout_is,
                                  seq_stat="sum", mode="truncate" if lower is None else "mask", lower=lower,
                                  upper=upper, bound=SAFETY_BOUND)
    raw, weights = importance.raw, importance.weights
    log_ratio_for_metrics = log_ratio.detach() if rollout_is == "token" else importance.log_weight
    metrics = compute_is_metrics(weights, raw, log_ratio_for_metrics, response_mask, rollout_is, upper, lower)
    if lower is not None:
        outside = (raw < lower) | (raw > upper)
        metrics["rollout_is_oob_ratio"] = _mean(outside.float(), response_mask).item()

    if rollout_is_batch_normalize:
        world = torch.distributed.group.WORLD if _distributed() else None
        if rollout_is == "token":
            if world is not None:
                mean = core._all_reduce_mean(torch.where(valid, weights, 0.0).sum(), valid.sum(), world)
            else:
                mean = _mean(weights, response_mask)
        else:
            row_mean = _mean(weights, response_mask, -1)
            rows = (response_mask.sum(-1) > 0).to(weights.dtype)
            total = (row_mean * rows).sum()
            if world is not None:
                mean = core._all_reduce_mean(total, rows.sum(), world)
            else:
                mean = total / rows.sum().clamp_min(1e-8)
        if mean > 1e-8:
            weights = weights / mean
            metrics["rollout_is_batch_norm_factor"] = mean.item()
        else:
            metrics["rollout_is_batch_norm_factor"] = 1.0
    return weights, metrics


def compute_is_metrics(
    rollout_is_weights: torch.Tensor,
    raw_rollout_is_weights: torch.Tensor,
    log_ratio_for_metrics: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: str,
    rollout_is_threshold: float,
    rollout_is_threshold_lower: Optional[float] = None,
) -> dict[str, float]:
    """verl's IS metrics of applied weights ``w`` and raw weights (both ``[B, T]``).

    ``rollout_is="sequence"``: max/min are ``exp`` of the max (clamped at 20) / min over all rows of
    ``log_ratio_for_metrics`` ``[B, 1]``, the high/low fractions compare it with float32 logs of the
    thresholds over all rows; otherwise max/min of ``w`` and fractions of raw weights over valid
    tokens. Both: mean of ``w``; std and ESS (a fraction) of ``clamp(w, 0, threshold)``; per-row
    means of ``w`` over all B rows (mean, unbiased std, max, min, max |· − 1|) and of the raw
    weights against the thresholds. The lower threshold defaults to 1/threshold.
    """
    check.mask_like("response_mask", response_mask, rollout_is_weights.shape, "rollout_is_weights.shape")
    if not response_mask.any():
        raise ValueError(_EMPTY_MASK)
    w, raw, mask = rollout_is_weights, raw_rollout_is_weights, response_mask
    valid = mask.bool()
    lower = 1.0 / rollout_is_threshold if rollout_is_threshold_lower is None else rollout_is_threshold_lower
    metrics: dict[str, float] = {}
    if rollout_is == "sequence":
        device = w.device
        log_upper = torch.log(torch.tensor(rollout_is_threshold, device=device))
        log_lower = torch.log(torch.tensor(lower, device=device))
        metrics["rollout_is_max"] = torch.exp(log_ratio_for_metrics.max().clamp(max=SAFETY_BOUND)).item()
        metrics["rollout_is_min"] = torch.exp(log_ratio_for_metrics.min()).item()
        metrics["rollout_is_mean"] = _mean(w, mask).item()
        metrics["rollout_is_ratio_fraction_high"] = (log_ratio_for_metrics > log_upper).float().mean().item()
        metrics["rollout_is_ratio_fraction_low"] = (log_ratio_for_metrics < log_lower).float().mean().item()
    else:
        metrics["rollout_is_mean"] = _mean(w, mask).item()
        metrics["rollout_is_ratio_fraction_high"] = _mean((raw > rollout_is_threshold).float(), mask).item()
        metrics["rollout_is_ratio_fraction_low"] = _mean((raw < lower).float(), mask).item()
        metrics["rollout_is_max"] = core._extreme(w, valid, largest=True).item()
        metrics["rollout_is_min"] = core._extreme(w, valid, largest=False).item()
    metrics["rollout_is_std"] = _std_of_clamped(w, mask, 0.0, rollout_is_threshold)
    clamped = w.clamp(min=0.0, max=rollout_is_threshold)
    normalised = clamped / (_mean(clamped, mask) + 1e-8)
    metrics["rollout_is_eff_sample_size"] = 1.0 / _mean(normalised.square(), mask).item()
    if w.dim() > 1:
        row_mean = _mean(w, mask, -1)
        metrics["rollout_is_seq_mean"] = row_mean.mean().item()
        metrics["rollout_is_seq_std"] = row_mean.std().item() if row_mean.numel() > 1 else 0.0
        metrics["rollout_is_seq_max"] = row_mean.max().item()
        metrics["rollout_is_seq_min"] = row_mean.min().item()
        metrics["rollout_is_seq_max_deviation"] = (row_mean - 1.0).abs().max().item()
        raw_row_mean = _mean(raw, mask, -1)
        metrics["rollout_is_seq_fraction_high"] = (raw_row_mean > rollout_is_threshold).float().mean().item()
        metrics["rollout_is_seq_fraction_low"] = (raw_row_mean < lower).float().mean().item()
    return metrics


# --------------------------------------------------------------------------------------------
# Rejection sampling
# --------------------------------------------------------------------------------------------

def compute_rollout_rejection_mask(
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_rs: str = "token_k1",
    rollout_rs_threshold: Optional[str | float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(mask, metrics)``: ``response_mask`` (its dtype) with the tokens of failing units set to 0.

    ``rollout_rs``: comma-separated options from :data:`SUPPORTED_ROLLOUT_RS_OPTIONS`
    (duplicates dropped, all must pass); ``rollout_rs_threshold``: one entry for all or one per
    option, comma-separated. Statistics of the log-ratio clamped at ±20: ``k1 = −log r``,
    ``k2 = ½ (log r)²``, ``k3 = r − 1 − log r`` per token, or their sum / mean / max over a
    sequence's valid tokens. k1 keeps ``log lo ≤ statistic ≤ log up``, the others
    ``statistic ≤ up``. An empty batch (B = 0) returns the mask itself and ``{}``.
    """
    check.tensor("log_ratio", log_ratio)
    if rollout_rs is None or not isinstance(rollout_rs, str):
        raise ValueError(f"rollout_rs must be a string of comma-separated options, got {rollout_rs!r}")
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold is required for rejection sampling")
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    options: list[str] = []
    for option in (part.strip() for part in rollout_rs.split(",")):
        if option and option not in SUPPORTED_ROLLOUT_RS_OPTIONS:
            raise ValueError(f"unknown rollout_rs option {option!r}; options: "
                             f"{', '.join(sorted(SUPPORTED_ROLLOUT_RS_OPTIONS))}")
        if option and option not in options:
            options.append(option)
    if not options:
        raise ValueError(f"rollout_rs {rollout_rs!r} names no option")
    thresholds = _parse_rollout_rs_thresholds(options, rollout_rs_threshold)
    core._check_log_probs(log_ratio, log_ratio, response_mask, _LOG_RATIO)

    mask = response_mask
    valid = mask.bool()
    log_ratio = core._log_ratio(log_ratio.detach(), None, valid)
    bounded = core._bounded(log_ratio, SAFETY_BOUND)
    dtype = log_ratio.dtype
    rows = mask.sum(-1) > 0
    eps = 1e-8 if mask.dtype == torch.float64 else 0.0
    kept = torch.ones_like(valid)
    metrics: dict[str, float] = {}
    for option in options:
        lower, upper = thresholds[option]
        k1 = option.endswith("k1")
        low_stat, high_stat = (math.log(lower), math.log(upper)) if k1 else (None, upper)
        result = core._rejection(option, bounded, None, None, valid, low_stat, high_stat, ratio_bounds=False,
                                 eps=eps)
        token_level = option in TOKEN_LEVEL_ROLLOUT_RS_OPTIONS
        statistic = result.token_stat if token_level else result.row_stat.unsqueeze(-1).expand_as(mask)
        metrics.update(compute_rs_metrics(
            option, statistic, mask, rows, level="token" if token_level else "sequence",
            per_sequence_values=result.row_stat, rollout_rs_threshold=high_stat,
            rollout_rs_threshold_lower=low_stat if k1 else 0.0, apply_lower_threshold=k1))
        metrics[f"rollout_rs_{option}_masked_fraction"] = _mean(1 - result.keep.to(dtype), mask).item()
        # Over the rows with a valid token (compute_rs_metrics has refused a mask without any).
        rejected_rows = (valid & ~result.keep).any(-1)
        metrics[f"rollout_rs_{option}_seq_masked_fraction"] = \
            core._masked_mean(rejected_rows.to(dtype), rows).item()
        kept = kept & result.keep
    metrics["rollout_rs_masked_fraction"] = _mean(1 - kept.to(dtype), mask).item()
    metrics["rollout_rs_seq_masked_fraction"] = (valid & ~kept).any(-1).float().mean().item()
    return (valid & kept).to(mask.dtype), metrics


def compute_rs_metrics(
    option_name: str,
    rs_statistic: torch.Tensor,
    response_mask: torch.Tensor,
    seq_valid_mask: torch.Tensor,
    *,
    level: str,
    per_sequence_values: Optional[torch.Tensor],
    rollout_rs_threshold: float,
    rollout_rs_threshold_lower: float,
    apply_lower_threshold: bool,
) -> dict[str, float]:
    """verl's metrics of one rejection option (keys ``rollout_rs_<option>_*``).

    ``rs_statistic`` ``[B, T]`` is the per-token statistic (a sequence statistic broadcast);
    per-sequence values are ``per_sequence_values`` or the per-row mean of the statistic, taken
    over the rows of ``seq_valid_mask``. mean (token-weighted), max/min (of the valid rows at
    sequence level, else of valid tokens), fractions above the threshold / below the lower one
    (0.0 unless ``apply_lower_threshold``), std of the statistic clamped into the thresholds,
    then the per-sequence mean, std (unbiased), max, min, max |·|, fractions.
    """
    check.mask_like("response_mask", response_mask, rs_statistic.shape, "rs_statistic.shape")
    if not response_mask.any():
        raise ValueError(_EMPTY_MASK)
    mask = response_mask
    valid = mask.bool()
    prefix = f"rollout_rs_{option_name}"
    per_row = per_sequence_values if per_sequence_values is not None else _mean(rs_statistic, mask, -1)
    if per_row.dim() > 1:
        per_row = per_row.squeeze(-1)
    per_row = per_row[seq_valid_mask]
    sequence = level == "sequence" and per_row.numel() > 0
    metrics: dict[str, float] = {f"{prefix}_mean": _mean(rs_statistic, mask).item()}
    if sequence:
        metrics[f"{prefix}_max"] = per_row.max().item()
        metrics[f"{prefix}_min"] = per_row.min().item()
        high = (per_row > rollout_rs_threshold).float().mean().item()
        low = (per_row < rollout_rs_threshold_lower).float().mean().item() if apply_lower_threshold else 0.0
    else:
        metrics[f"{prefix}_max"] = core._extreme(rs_statistic, valid, largest=True).item()
        metrics[f"{prefix}_min"] = core._extreme(rs_statistic, valid, largest=False).item()
        high = _mean((rs_statistic > rollout_rs_threshold).float(), mask).item()
        low = (_mean((rs_statistic < rollout_rs_threshold_lower).float(), mask).item()
               if apply_lower_threshold else 0.0)
    metrics[f"{prefix}_fraction_high"] = high
    metrics[f"{prefix}_fraction_low"] = low
    metrics[f"{prefix}_std"] = _std_of_clamped(rs_statistic, mask, rollout_rs_threshold_lower
                                               if apply_lower_threshold else 0.0, rollout_rs_threshold)
    if per_row.numel() > 0:
        metrics[f"{prefix}_seq_mean"] = per_row.mean().item()
        metrics[f"{prefix}_seq_std"] = per_row.std().item() if per_row.numel() > 1 else 0.0
        metrics[f"{prefix}_seq_max"] = per_row.max().item()
        metrics[f"{prefix}_seq_min"] = per_row.min().item()
        metrics[f"{prefix}_seq_max_deviation"] = per_row.abs().max().item()
        metrics[f"{prefix}_seq_fraction_high"] = (per_row > rollout_rs_threshold).float().mean().item()
        if apply_lower_threshold:
            metrics[f"{prefix}_seq_fraction_low"] = (per_row < rollout_rs_threshold_lower).float().mean().item()
    else:
        for key in ("seq_mean", "seq_std", "seq_max", "seq_min", "seq_max_deviation", "seq_fraction_high",
                    "seq_fraction_low"):
            metrics[f"{prefix}_{key}"] = 0.0
    return metrics


# --------------------------------------------------------------------------------------------
# Off-policy metrics and the combined entry point
# --------------------------------------------------------------------------------------------

def compute_offpolicy_metrics(
    old_log_prob: torch.Tensor,
    rollout_log_prob: Optional[torch.Tensor],
    response_mask: torch.Tensor,
) -> dict[str, Any]:
    """verl's mismatch diagnostics (unprefixed keys). Per row (all B rows, an empty row's mean
    log-prob is 0) ``ℓ`` = mean log-prob; ``training_ppl`` = mean exp(−ℓ_old), ``training_log_ppl``;
    with ``rollout_log_prob``: ``kl`` = mean(rollout − old), ``k3_kl`` = mean(r − log r − 1)
    (unclamped), ``rollout_ppl``, ``rollout_log_ppl``, ``log_ppl_diff`` (mean, abs, max, min of
    ℓ_rollout − ℓ_old), ``ppl_ratio``, ``chi2_token`` = mean r² − 1, ``chi2_seq`` = mean
    exp(2 Σ log r) − 1 (log-ratios clamped at ±20). Token means over valid tokens."""
    check.tensor("old_log_prob", old_log_prob)
    core._check_log_probs(old_log_prob, old_log_prob if rollout_log_prob is None else rollout_log_prob,
                          response_mask, _LOG_PROBS)
    if not response_mask.any():
        raise AssertionError("response_mask has no valid token")
    mask = response_mask
    valid = mask.bool()
    row_old = _mean(old_log_prob, mask, -1)
    metrics: dict[str, Any] = {
        "training_ppl": torch.exp(-row_old).mean().item(),
        "training_log_ppl": (-row_old).mean().item(),
    }
    if rollout_log_prob is None:
        return metrics
    log_ratio = old_log_prob - rollout_log_prob
    metrics["kl"] = _mean(rollout_log_prob - old_log_prob, mask).item()
    metrics["k3_kl"] = _mean(torch.exp(log_ratio) - log_ratio - 1, mask).item()
    row_rollout = _mean(rollout_log_prob, mask, -1)
    metrics["rollout_ppl"] = torch.exp(-row_rollout).mean().item()
    metrics["rollout_log_ppl"] = (-row_rollout).mean().item()
    diff = row_rollout - row_old
    metrics["log_ppl_diff"] = diff.mean().item()
    metrics["log_ppl_abs_diff"] = diff.abs().mean().item()
    metrics["log_ppl_diff_max"] = diff.max().item()
    metrics["log_ppl_diff_min"] = diff.min().item()
    metrics["ppl_ratio"] = torch.exp(diff).mean().item()
    bounded = core._bounded(log_ratio, SAFETY_BOUND)
    metrics["chi2_token"] = (_mean(torch.exp(bounded).square(), mask) - 1.0).item()
    sequence = core._bounded(core._row_sum(log_ratio, valid), SAFETY_BOUND)
    metrics["chi2_seq"] = (torch.exp(2.0 * sequence).mean() - 1.0).item()
    return metrics


def compute_rollout_correction_and_rejection_mask(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: Optional[str] = None,
    rollout_is_threshold: Optional[str | float] = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: Optional[str] = None,
    rollout_rs_threshold: Optional[str | float] = None,
):
    """``(weights, mask, metrics)``: a ``verl.protocol.DataProto`` holding ``rollout_is_weights``
    (None unless ``rollout_is`` and ``rollout_is_threshold`` are both set), the mask after
    rejection (a copy when ``rollout_rs`` is None) and every metric as a Python float under
    ``rollout_corr/``: IS, then RS, then off-policy ones, all over the input mask. IS and RS see
    ``log_ratio = old_log_prob − rollout_log_prob`` independently: rejected tokens keep their
    weight (the loss drops them through the mask)."""
    check.tensor("old_log_prob", old_log_prob)
    if not response_mask.any():
        raise ValueError(_EMPTY_MASK)
    if old_log_prob.shape != rollout_log_prob.shape:
        raise ValueError(f"old_log_prob has shape {tuple(old_log_prob.shape)} but rollout_log_prob "
                         f"{tuple(rollout_log_prob.shape)}")
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(f"old_log_prob has shape {tuple(old_log_prob.shape)} but response_mask "
                         f"{tuple(response_mask.shape)}")
    core._check_log_probs(old_log_prob, rollout_log_prob, response_mask, _LOG_PROBS)
    log_ratio = old_log_prob - rollout_log_prob
    metrics: dict[str, float] = {}
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        weights, is_metrics = compute_rollout_correction_weights(
            log_ratio, response_mask, rollout_is, rollout_is_threshold, rollout_is_batch_normalize)
        metrics.update(is_metrics)
    new_mask = response_mask.clone()
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs is set but rollout_rs_threshold is None: give a threshold")
        new_mask, rs_metrics = compute_rollout_rejection_mask(log_ratio, response_mask, rollout_rs,
                                                              rollout_rs_threshold)
        metrics.update(rs_metrics)
    metrics.update(compute_offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask))
    metrics = {f"rollout_corr/{key}": value for key, value in metrics.items()}
    proto = None
    if weights is not None:
        from verl.protocol import DataProto

        proto = DataProto.from_dict(tensors={"rollout_is_weights": weights})
    return proto, new_mask, metrics


FUNCTIONS = {
    "compute_rollout_correction_weights": compute_rollout_correction_weights,
    "compute_rollout_rejection_mask": compute_rollout_rejection_mask,
    "compute_rollout_correction_and_rejection_mask": compute_rollout_correction_and_rejection_mask,
    "compute_offpolicy_metrics": compute_offpolicy_metrics,
    "compute_is_metrics": compute_is_metrics,
    "compute_rs_metrics": compute_rs_metrics,
}
"""verl name → adapter, for ``install()`` to patch ``verl.trainer.ppo.rollout_corr_helper``."""
