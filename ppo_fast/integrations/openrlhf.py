"""OpenRLHF 0.11's losses with OpenRLHF's constructors, call signatures and return tuples, computed by
ppo_fast: ``from ppo_fast.integrations.openrlhf import PolicyLoss, ValueLoss, compute_approx_kl``.

``PolicyLoss`` takes the per-token objective from :mod:`ppo_fast.objectives` (``ppo`` → vanilla
with dual clip, ``gspo`` → the same on the sequence ratio, with the gradient of its mean) and the rollout
correction (``is_correction_*``) from :func:`openrlhf_coefficients`;
the aggregation and the metrics are OpenRLHF's. ``log_probs_from_logits`` and
``compute_entropy`` (what OpenRLHF's ``Actor.forward`` calls on the logits) run the fused
log-prob kernel. OpenRLHF itself is never imported.

Where we differ from OpenRLHF 0.11.2, on purpose:

* Masked positions never reach a result (OpenRLHF multiplies by the mask: a NaN in padding makes
  its loss NaN).
* ``compute_approx_kl`` keeps the inputs' precision; OpenRLHF casts to float32 first
  (``models/utils.py``, ``log_probs.float()``), so float64 inputs agree to float32 rounding.
* ``log_probs_from_logits`` does not divide the caller's logits in place by the temperature.
* The gspo ratio's log is clamped to ±20 before ``exp``, as the ppo ratio's (OpenRLHF leaves it
  unclamped).
* ``clip_eps_low`` / ``clip_eps_high`` must be finite and ≥ 0 (OpenRLHF takes any number; a
  negative one would clip the ratio on the wrong side of 1).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import arguments as check
from .. import correction as core
from .. import objectives
from ..arguments import LossOptions, choice, is_number
from ..functional import token_logprobs

__all__ = ["PolicyLoss", "ValueLoss", "aggregate_loss", "compute_approx_kl", "compute_entropy",
           "log_probs_from_logits", "masked_mean"]

KL_IS_WEIGHT_CLIP = 10.0
"""Cap of the detached importance weight in the unbiased KL gradient, as OpenRLHF."""

KL_VALUE_CLAMP = 10.0


def masked_mean(tensor, mask, dim=None):
    """``Σ tensor·mask / Σ mask`` over ``dim`` (no epsilon: an empty mask gives NaN, as
    OpenRLHF); what the mask excludes cannot reach the sum."""
    if mask is None:
        return tensor.mean(dim=dim)
    return torch.where(mask.bool(), tensor, 0.0).mul(mask).sum(dim=dim) / mask.sum(dim=dim)


def aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None,
                   global_batch_size=None):
    """OpenRLHF's reduction: token mean (over ``batch_num_tokens`` when given), or the mean of the
    sequences' token means (over ``global_batch_size`` when given)."""
    selected = torch.where(loss_mask.bool(), loss, 0.0) * loss_mask
    if token_level_loss:
        if batch_num_tokens is None:
            return masked_mean(loss, loss_mask)
        return selected.sum() / batch_num_tokens * dp_size
    counts = loss_mask.sum(dim=-1)
    seq_loss = selected.sum(dim=-1) / (counts + 1e-8)
    nonempty = (counts > 0).float()
    if global_batch_size is None:
        return masked_mean(seq_loss, nonempty)
    return (seq_loss * nonempty).sum() / global_batch_size * dp_size


class PolicyLoss(nn.Module):
    """PPO / GSPO policy loss with dual clip and rollout (train/inference mismatch) correction.

    ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
    dp_size=1, batch_num_tokens=None, global_batch_size=None)`` returns ``(loss, clip_ratio,
    ppo_kl, vllm_kl, is_filter_ratio)``; the last two are None without correction.
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo",
                 is_correction_level: str = "off", is_correction_mode: str = "mask",
                 is_correction_gating: str = "ratio", is_correction_threshold: list = (0.5, 5.0)) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip!r}")
        for name, value, allowed in (("is_correction_level", is_correction_level, ("off", "token", "seq")),
                                     ("is_correction_mode", is_correction_mode, ("mask", "clip")),
                                     ("is_correction_gating", is_correction_gating, ("ratio", "binary_kl", "tv"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode='clip' needs is_correction_level='token' and "
                             "is_correction_gating='ratio' (only a token's ratio can be truncated)")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating!r} bounds a divergence from above "
                             f"only: is_correction_threshold must be (0, delta), got {tuple(is_correction_threshold)}")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        # GSPO's loss is a mean over sequences, whatever was asked (as OpenRLHF).
        self.token_level_loss = False if policy_loss_type == "gspo" else token_level_loss
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        # Checked here, not at the first step.
        self._options(validate=True)

    def _options(self, validate=False) -> LossOptions:
        # OpenRLHF's gspo is its ppo on the sequence ratio (dual clip included), with the gradient
        # of the mean log-ratio: our vanilla at importance_level="sequence".
        params = ({"importance_level": "sequence", "token_gradient": False}
                  if self.policy_loss_type == "gspo" else None)
        try:
            return LossOptions(loss_type="vanilla", loss_params=params, clip_low=self.clip_eps_low,
                               clip_high=self.clip_eps_high, dual_clip=self.dual_clip)
        except ValueError as error:
            message = str(error).replace("clip_low", "clip_eps_low").replace("clip_high", "clip_eps_high")
            raise ValueError(f"PolicyLoss: {message}") from None

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                dp_size=1, batch_num_tokens=None, global_batch_size=None):

        if action_mask is None:
            action_mask = torch.ones_like(log_probs, dtype=torch.bool)
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
        mask = action_mask.bool()
        # gspo with correction measures the ratio against the rollout policy, not the old one.
        baseline = rollout_log_probs if (correcting and self.policy_loss_type == "gspo") else old_log_probs
        weights = vllm_kl = is_filter_ratio = None
        if correcting and self.policy_loss_type == "ppo":
            weights, is_filter_ratio, vllm_kl = openrlhf_coefficients(
                old_log_probs, rollout_log_probs, action_mask, level=self.is_correction_level,
                mode=self.is_correction_mode, gating=self.is_correction_gating,
                threshold=tuple(self.is_correction_threshold))
            weights = weights.expand_as(log_probs)
        terms = objectives.policy_terms(log_probs, baseline.detach(), advantages.detach(), mask,
                                        self._options(), weights=weights)
        loss = aggregate_loss(terms.pg, action_mask, token_level_loss=self.token_level_loss,
                              dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                              global_batch_size=global_batch_size)
        clip_ratio = masked_mean(terms.clipped.float(), action_mask)
        ppo_kl = masked_mean(-(log_probs - old_log_probs).detach(), action_mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


class ValueLoss(nn.Module):
    """Clipped value loss: ``forward(values, old_values, returns, action_mask=None, dp_size=1,
    batch_num_tokens=None, global_batch_size=None)`` → 0.5·aggregate(max((v_clip − R)², (v − R)²))."""

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True) -> None:
        super().__init__()
        if clip_eps is not None and not clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps!r}")
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                global_batch_size=None):
        if action_mask is None:
            action_mask = torch.ones_like(values, dtype=torch.bool)
        mask = action_mask.bool()
        v, v_old, R = (torch.where(mask, t, 0.0) for t in (values, old_values, returns))
        per_token = (v - R) ** 2
        if self.clip_eps is not None:
            clipped = v_old + (v - v_old).clamp(-self.clip_eps, self.clip_eps)
            per_token = torch.max((clipped - R) ** 2, per_token)
        return 0.5 * aggregate_loss(per_token, action_mask, self.token_level_loss, dp_size, batch_num_tokens,
                                    global_batch_size)


def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
                      unbiased_gradient=False):
    """KL(π ‖ π_base) per token (Schulman's k1, k2, k3), clamped to ±10. ``unbiased_gradient``:
    the estimate's value with the gradient of ``w·k2``, ``w = min(π/π_old, 10)`` detached (1
    without ``log_probs_old``): the importance-weighted reverse-KL gradient off-policy."""
    names = {"k1": "k1", "k2": "k2", "k3": "k3"}
    if kl_estimator not in names:
        raise ValueError(f"kl_estimator must be one of k1, k2, k3; got {kl_estimator!r}")
    log_ratio = log_probs - log_probs_base
    if kl_estimator == "k1":
        value = log_ratio
    elif kl_estimator == "k2":
        value = log_ratio ** 2 / 2.0
    else:
        # Bounded before exp: past −10 the estimate already exceeds the final clamp.
        bounded = log_ratio.clamp(min=-KL_VALUE_CLAMP)
        value = (-bounded).exp() - 1 + bounded
    value = value.clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)
    if not unbiased_gradient:
        return value
    if log_probs_old is None:
        weight = 1.0
    else:
        weight = (log_probs - log_probs_old).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = weight * (log_ratio ** 2 / 2.0)
    return value.detach() + surrogate - surrogate.detach()


def log_probs_from_logits(logits, labels, temperature=1.0):
    """Log-probs of ``labels`` under ``softmax(logits / temperature)`` (fused kernel on CUDA)."""
    return token_logprobs(logits, labels, temperature=temperature)


def compute_entropy(logits):
    """Entropy of ``softmax(logits)`` per position, differentiable (fused kernel on CUDA)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs(logits, labels, return_entropy=True)[1]

# --------------------------------------------------------------------------------------------
# OpenRLHF 0.11.2's PolicyLoss correction (is_correction_level / _mode / _gating / _threshold),
# assembled from the building blocks of ppo_fast.correction
# --------------------------------------------------------------------------------------------

OPENRLHF_LEVELS = ("token", "seq")
OPENRLHF_MODES = ("mask", "clip")
OPENRLHF_GATINGS = ("ratio", "binary_kl", "tv")


def openrlhf_coefficients(old_logp, rollout_logp, mask, level, mode, gating, threshold):
    """The per-token coefficient OpenRLHF's ``PolicyLoss`` multiplies into the PPO loss, with its
    ``is_filter_ratio`` and ``vllm_kl`` (``policy_loss_type="ppo"``, correction on).

    Args:
        old_logp, rollout_logp: ``[B, T]`` float (``old_log_probs``, ``rollout_log_probs``).
        mask: ``[B, T]`` bool or 0/1 (``action_mask``).
        level: ``"token"`` or ``"seq"`` (``is_correction_level``; ``"off"`` means no correction:
            do not call this).
        mode: ``"mask"`` or ``"clip"``; gating: ``"ratio"``, ``"binary_kl"`` or ``"tv"``;
        threshold: ``(low, high)`` (``is_correction_threshold``).

    Returns:
        ``(coef, filtered_ratio, vllm_kl)``. ``coef`` ``[B, T]`` (compute dtype, detached; 0 at
        masked tokens), the loss is ``coef · loss`` aggregated with the unchanged mask (filtered
        tokens count in the denominator with coefficient 0). With ``r = exp(old − rollout)``
        (never clamped, as OpenRLHF):

        * clip (token level, ratio gating only): ``clamp(r, low, high)`` (TIS);
        * mask: ``r`` where the token's unit passes the gate, else 0; the gate reads the token's
          ``r`` (token, ratio: IcePop), the geometric mean of its sequence's ratios (seq, ratio),
          the token's binary_kl / tv (token) or their mean over the sequence (seq), inclusive in
          ``[low, high]``. Survivors keep their own per-token ``r`` at both levels.

        ``filtered_ratio``: token level, the fraction of valid tokens filtered (clip: ``r``
        outside ``[low, high]``, NaN not counted; mask: failing the gate, NaN counted), in
        float32 (float64 for a float64 mask), as OpenRLHF computes it; seq level, the fraction of
        **all** B sequences filtered, sequences without a valid token counted as filtered (their
        statistic is OpenRLHF's 0/0 = NaN), float32. ``vllm_kl`` = mean of
        ``rollout − old`` over valid tokens (dtype of the log-probs, float64 with a float64 mask).

    Deliberate differences from OpenRLHF: masks select, so NaN/inf at masked positions changes
    nothing (OpenRLHF multiplies by the mask: NaN·0 = NaN) and ``coef`` is 0 there; with no valid
    token ``vllm_kl`` and the token-level ratio are 0 (OpenRLHF: 0/0 = NaN); bounds that
    OpenRLHF accepts but that make no sense are errors (``low > high``; ``high <= 0`` with ratio
    gating). The seq-level ratio gate compares ``exp(mean log r)`` with the bounds, as OpenRLHF.
    """
    check.tensor("old_logp", old_logp)
    core._check_log_probs(old_logp, rollout_logp, mask)
    choice("level", level, OPENRLHF_LEVELS)
    choice("mode", mode, OPENRLHF_MODES)
    choice("gating", gating, OPENRLHF_GATINGS)
    if mode == "clip" and (level == "seq" or gating != "ratio"):
        raise ValueError(f"mode='clip' needs level='token' and gating='ratio', got level={level!r}, "
                         f"gating={gating!r}")
    if not (isinstance(threshold, (tuple, list)) and len(threshold) == 2
            and all(is_number(v) for v in threshold)):
        raise ValueError(f"threshold must be a (low, high) pair of finite numbers, got {threshold!r}")
    low, high = float(threshold[0]), float(threshold[1])
    if low > high:
        raise ValueError(f"threshold must have low <= high, got {threshold!r}")
    if gating != "ratio" and low > 0:
        raise ValueError(f"gating={gating!r} bounds a divergence from above only: low must be <= 0, "
                         f"got threshold={threshold!r}")
    if gating == "ratio" and high <= 0:
        raise ValueError(f"gating='ratio' needs high > 0 (a ratio is never negative), got threshold={threshold!r}")

    valid = mask.bool()
    old, rollout = old_logp.detach(), rollout_logp.detach()
    log_ratio = core._log_ratio(old, rollout, valid)
    # A ratio is never negative: a lower bound <= 0 only rejects NaN, as the open bound does.
    ratio_low = low if low > 0 else None
    # OpenRLHF's token-level share is float32, widened by a float64 mask.
    share_dtype = torch.float64 if mask.dtype == torch.float64 else torch.float32
    if gating == "ratio" and level == "token":
        imp = core._importance(log_ratio, valid, level="token", seq_stat="sum",
                          mode="truncate" if mode == "clip" else "mask", lower=ratio_low, upper=high, bound=None)
        coef = imp.weights
        if mode == "clip":
            filtered = valid & ((imp.raw < low) | (imp.raw > high))
        else:
            filtered = valid & ~imp.inside
        filtered_ratio = core._share(filtered, valid, share_dtype)
    else:
        imp = core._importance(log_ratio, valid, level="token", seq_stat="sum", mode="truncate", lower=None,
                          upper=None, bound=None)
        statistic = "k1" if gating == "ratio" else gating
        name = f"{'token' if level == 'token' else 'seq_mean'}_{statistic}"
        lower, upper = (ratio_low, high) if gating == "ratio" else (low, high)
        gate = core._rejection(name, log_ratio, old, rollout, valid, lower, upper, ratio_bounds=gating == "ratio")
        coef = torch.where(gate.keep & valid, imp.weights, 0.0)
        if level == "token":
            filtered_ratio = core._share(valid & ~gate.keep, valid, share_dtype)
        else:
            filtered_rows = ~(gate.keep & valid).any(-1)
            filtered_ratio = core._share(filtered_rows, torch.ones_like(filtered_rows), torch.float32)
    kl_dtype = torch.promote_types(log_ratio.dtype, mask.dtype) if mask.is_floating_point() else log_ratio.dtype
    # The difference in the log-probs' precision, then widened by a float64 mask, as OpenRLHF.
    vllm_kl = core._masked_mean((rollout.to(log_ratio.dtype) - old.to(log_ratio.dtype)).to(kl_dtype), valid)
    return coef, filtered_ratio, vllm_kl
