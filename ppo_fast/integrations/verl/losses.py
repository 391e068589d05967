"""verl 0.9.1's loss functions, with verl's signatures and results, computed by ppo_fast.

Each ``compute_policy_loss_<name>`` takes what verl's function of that name takes and returns
what it returns, ``(pg_loss, metrics)`` with Python-float metrics under verl's keys: the
per-token objective is :func:`ppo_fast.objectives.policy_terms`, the aggregation is verl's
``agg_loss`` (below). Values and gradients equal verl's in float64 to 1e-9 (tests/integrations);
where verl's numbers depend on the mask's dtype (``mask.sum() + 1e-8`` is float32 for bool and
integer masks, so the ``1e-8`` vanishes, and survives for float64 masks) we follow verl.

Where we differ from verl 0.9.1, on purpose:

* Masked positions never reach a result: verl's ``seq-mean-*`` aggregations, gspo's sequence
  ratio and geo_mean's sums multiply by the mask, so a NaN or inf in padding turns verl's loss
  into NaN (``core_algos.py`` ``agg_loss``, ``torch.sum(loss_mat * loss_mask)``); here it does not.
* Ratios are ``exp`` of log-ratios clamped to ±20 everywhere (verl leaves clip_cov's, kl_cov's
  and geo_mean's unclamped, where a log-ratio beyond ±20 overflows to inf).
* geo_mean's ratio uses each sequence's exact token count; with a float64 mask verl divides by
  ``count + 1e-8`` (a relative difference of about 1e-9 / count).
* Masks must hold 0 and 1 only; verl would read other values as token weights in some places and
  as booleans in others.
"""

from __future__ import annotations

import torch

from ... import objectives
from ...arguments import LossOptions
from ...spec import kl_penalty as _kl_estimate

__all__ = [
    "agg_loss",
    "compute_policy_loss_bypass_mode",
    "compute_policy_loss_cispo",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_dppo_kl",
    "compute_policy_loss_dppo_tv",
    "compute_policy_loss_dro",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg",
    "compute_policy_loss_gspo",
    "compute_policy_loss_kl_cov",
    "compute_policy_loss_reinforce",
    "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla",
    "compute_value_loss",
    "kl_penalty",
    "kl_penalty_forward",
    "masked_mean",
    "masked_sum",
]


# --------------------------------------------------------------------------------------------
# verl's masked statistics and aggregation (their arithmetic, dtype rules included)
# --------------------------------------------------------------------------------------------


def masked_sum(values, mask, axis=None):
    """Σ values where mask ≠ 0 (what the mask excludes cannot reach the sum)."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis)


def masked_mean(values, mask, axis=None):
    """``masked_sum / (mask.sum() + 1e-8)``; the epsilon is added in the mask's sum's dtype
    promoted with a Python float (float32 for bool and integer masks), as verl."""
    return masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None,
             global_batch_size=None, loss_scale_factor=None):
    """verl's ``agg_loss``: token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean,
    seq-mean-token-sum-norm, with the global counts verl passes across data-parallel ranks."""
    _check_mask("loss_mask", loss_mask, loss_mat.shape)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("agg_loss: batch_num_tokens (the global token count) is required "
                                 f"when dp_size={dp_size} > 1")
            batch_num_tokens = loss_mask.sum()
        return masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return masked_sum(loss_mat, loss_mask) * dp_size
    if loss_agg_mode not in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        raise ValueError(f"agg_loss: loss_agg_mode must be one of token-mean, token-sum, "
                         f"seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm; "
                         f"got {loss_agg_mode!r}")
    counts = loss_mask.sum(dim=-1)
    seq_losses = masked_sum(loss_mat, loss_mask, axis=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = seq_losses / (counts + 1e-8)
    nonempty = (counts > 0).float()
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("agg_loss: global_batch_size (the global sequence count) is required "
                             f"when dp_size={dp_size} > 1")
        global_batch_size = nonempty.sum()
    loss = masked_sum(seq_losses, nonempty) / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _check_mask(name, mask, shape):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool), got dtype {mask.dtype} with "
                         "other values")


# --------------------------------------------------------------------------------------------
# Config access: verl's ActorConfig, an OmegaConf DictConfig or any object with the fields
# --------------------------------------------------------------------------------------------


def _field(config, key, default=None):
    """``config.<key>``, or ``default`` only where the field does not exist (a field set to None
    stays None), as verl's ``BaseConfig.get``."""
    if isinstance(config, dict):
        return config.get(key, default)
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(key, default)
    return getattr(config, key, default)


def _need_config(config, name):
    if config is None:
        raise ValueError(f"compute_policy_loss_{name}: config (verl's ActorConfig) is required, "
                         "got None")


def _clip_bounds(config):
    clip_ratio = _field(config, "clip_ratio")
    low = _field(config, "clip_ratio_low")
    high = _field(config, "clip_ratio_high")
    return (clip_ratio if low is None else low), (clip_ratio if high is None else high)


def _policy_loss_config(config):
    section = _field(config, "policy_loss")
    if section is None:
        raise ValueError("config.policy_loss is required for this loss mode (verl's "
                         "PolicyLossConfig)")
    return section


def _global_batch_info(config):
    return dict(_field(config, "global_batch_info", None) or {})


# --------------------------------------------------------------------------------------------
# The per-token objective from ppo_fast, verl's aggregation and metrics
# --------------------------------------------------------------------------------------------


def _terms(loss_type, old_log_prob, log_prob, advantages, response_mask, weights=None, **options):
    _check_mask("response_mask", response_mask, log_prob.shape)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages),
                    ("rollout_is_weights", weights)):
        if t is not None and tuple(t.shape) != tuple(log_prob.shape):
            raise ValueError(f"{name} must have the shape of log_prob {tuple(log_prob.shape)}, "
                             f"got {tuple(t.shape)}")
    try:
        opts = LossOptions(loss_type=loss_type, **options)
    except ValueError as error:
        message = str(error)
        for ours_name, verl_name in _CONFIG_NAMES:
            message = message.replace(ours_name, verl_name)
        raise ValueError(f"verl config: {message}") from None
    return objectives.policy_terms(log_prob, old_log_prob.detach(), advantages.detach(),
                                   response_mask.bool(), opts,
                                   weights=None if weights is None else weights.detach())


_CONFIG_NAMES = (
    ("loss_params['ratio_cap']", "config.clip_ratio_c"),
    ("loss_params['tau_pos']", "config.tau_pos"),
    ("loss_params['tau_neg']", "config.tau_neg"),
    ("loss_params['beta']", "config.policy_loss.dro_beta"),
    ("loss_params['clip_cov_", "config.policy_loss['clip_cov_"),
    ("loss_params['kl_cov_ratio']", "config.policy_loss.kl_cov_ratio"),
    ("loss_params['kl_cov_coef']", "config.policy_loss.ppo_kl_coef"),
    ("clip_low", "config.clip_ratio_low (or clip_ratio)"),
    ("clip_high", "config.clip_ratio_high (or clip_ratio)"),
    ("dual_clip", "config.clip_ratio_c"),
)
"""Our option names → the verl config fields they come from, for error messages."""


def _number(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"verl config: {name} must be a number, got {value!r}")
    return value


def _rate(flags, response_mask):
    """verl's clip fractions: a float32 indicator's masked mean."""
    return masked_mean(flags.float(), response_mask).detach().item()


def _kl_metric(log_prob, old_log_prob, response_mask, clamp):
    log_ratio = (log_prob - old_log_prob).detach()
    if clamp:
        log_ratio = log_ratio.clamp(-objectives.LOG_RATIO_CLAMP, objectives.LOG_RATIO_CLAMP)
    return masked_mean(-log_ratio, response_mask).detach().item()


def _clip_metrics(terms, log_prob, old_log_prob, response_mask, *, lower=True, clamp=True):
    metrics = {"actor/pg_clipfrac": _rate(terms.clipped, response_mask),
               "actor/ppo_kl": _kl_metric(log_prob, old_log_prob, response_mask, clamp)}
    metrics["actor/pg_clipfrac_lower"] = _rate(terms.clipped_lower, response_mask) if lower else 0.0
    return metrics


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask,
                                loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Clipped PPO with dual clip (``clip_ratio_c``, default 3.0)."""
    _need_config(config, "vanilla")
    low, high = _clip_bounds(config)
    dual_clip = _number(_field(config, "clip_ratio_c", 3.0), "config.clip_ratio_c")
    if not dual_clip > 1.0:
        raise ValueError(f"config.clip_ratio_c (dual-clip PPO's bound) must be > 1.0, got {dual_clip!r}")
    terms = _terms("vanilla", old_log_prob, log_prob, advantages, response_mask, rollout_is_weights,
                   clip_low=low, clip_high=high, dual_clip=dual_clip)
    loss = agg_loss(terms.pg, response_mask, loss_agg_mode, **_global_batch_info(config))
    return loss, _clip_metrics(terms, log_prob, old_log_prob, response_mask)


def _dppo(loss_type):
    def compute(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                config=None, rollout_is_weights=None):
        _need_config(config, loss_type)
        low, high = _clip_bounds(config)
        terms = _terms(loss_type, old_log_prob, log_prob, advantages, response_mask,
                       rollout_is_weights, clip_low=low, clip_high=high,
                       loss_params={"ratio_cap": _field(config, "clip_ratio_c", 20.0)})
        loss = agg_loss(terms.pg, response_mask, loss_agg_mode, **_global_batch_info(config))
        return loss, _clip_metrics(terms, log_prob, old_log_prob, response_mask)

    compute.__name__ = compute.__qualname__ = f"compute_policy_loss_{loss_type}"
    compute.__doc__ = (f"DPPO ({'total variation' if loss_type == 'dppo_tv' else 'binary KL'} trust "
                       "region): thresholds clip_ratio_low / clip_ratio_high, truncation "
                       "clip_ratio_c.")
    return compute


compute_policy_loss_dppo_tv = _dppo("dppo_tv")
compute_policy_loss_dppo_kl = _dppo("dppo_kl")


def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask,
                             loss_agg_mode="seq-mean-token-mean", config=None, rollout_is_weights=None):
    """GSPO: vanilla clipping of the sequence ratio exp(mean log-ratio), capped at e^10,
    GSPO-token gradient."""
    _need_config(config, "gspo")
    low, high = _clip_bounds(config)
    terms = _terms("gspo", old_log_prob, log_prob, advantages, response_mask, rollout_is_weights,
                   clip_low=low, clip_high=high)
    loss = agg_loss(terms.pg, response_mask, loss_agg_mode, **_global_batch_info(config))
    return loss, _clip_metrics(terms, log_prob, old_log_prob, response_mask, lower=False, clamp=False)


def compute_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask,
                             loss_agg_mode="seq-mean-token-mean", config=None, rollout_is_weights=None):
    """SAPO's soft gate (config.tau_pos, config.tau_neg); verl aggregates it with
    seq-mean-token-mean whatever ``loss_agg_mode`` says, and so do we."""
    _need_config(config, "sapo")
    params = {"tau_pos": _number(_field(config, "tau_pos"), "config.tau_pos"),
              "tau_neg": _number(_field(config, "tau_neg"), "config.tau_neg")}
    terms = _terms("sapo", old_log_prob, log_prob, advantages, response_mask, rollout_is_weights,
                   loss_params=params)
    loss = agg_loss(terms.pg, response_mask, "seq-mean-token-mean", **_global_batch_info(config))
    return loss, {"actor/pg_clipfrac": 0.0,
                  "actor/ppo_kl": _kl_metric(log_prob, old_log_prob, response_mask, True),
                  "actor/pg_clipfrac_lower": 0.0}


def compute_policy_loss_gpg(old_log_prob, log_prob, advantages, response_mask,
                            loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """GPG: −A·logp. Metrics: none (as verl)."""
    _need_config(config, "gpg")
    terms = _terms("gpg", old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    return agg_loss(terms.pg, response_mask, loss_agg_mode, **_global_batch_info(config)), {}


def compute_policy_loss_clip_cov(old_log_prob, log_prob, advantages, response_mask,
                                 loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """Clip-Cov: config.policy_loss.clip_cov_ratio / clip_cov_lb / clip_cov_ub (defaults 2e-4,
    1.0, 5.0); draws from the global CPU generator as verl does."""
    _need_config(config, "clip_cov")
    section = _policy_loss_config(config)
    low, high = _clip_bounds(config)
    ratio, lb, ub = (_field(section, key) for key in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"))
    params = {"clip_cov_ratio": 0.0002 if ratio is None else ratio,
              "clip_cov_lb": 1.0 if lb is None else lb,
              "clip_cov_ub": 5.0 if ub is None else ub}
    terms = _terms("clip_cov", old_log_prob, log_prob, advantages, response_mask, rollout_is_weights,
                   clip_low=low, clip_high=high, loss_params=params)
    loss = agg_loss(terms.pg, response_mask, loss_agg_mode, **_global_batch_info(config))
    return loss, {"actor/pg_clipfrac": _rate(terms.clipped_lower, response_mask),
                  "actor/ppo_kl": _kl_metric(log_prob, old_log_prob, response_mask, False)}


def compute_policy_loss_kl_cov(old_log_prob, log_prob, advantages, response_mask,
                               loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """KL-Cov: config.policy_loss.kl_cov_ratio (default 2e-4) and ppo_kl_coef (1.0 when None,
    as verl's code; verl's config default is 0.1). Metric ``actor/ppo_kl`` is the mean
    |log-ratio|, as verl."""
    _need_config(config, "kl_cov")
    section = _policy_loss_config(config)
    ratio, coef = _field(section, "kl_cov_ratio"), _field(section, "ppo_kl_coef")
    params = {"kl_cov_ratio": 0.0002 if ratio is None else ratio,
              "kl_cov_coef": 1.0 if coef is None else coef}
    terms = _terms("kl_cov", old_log_prob, log_prob, advantages, response_mask, rollout_is_weights,
                   loss_params=params)
    loss = agg_loss(terms.pg, response_mask, loss_agg_mode, **_global_batch_info(config))
    abs_kl = masked_mean((log_prob - old_log_prob).detach().abs(), response_mask)
    return loss, {"actor/ppo_kl": abs_kl.item()}


def compute_policy_loss_geo_mean(old_log_prob, log_prob, advantages, response_mask,
                                 loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """GMPO. Like verl, ignores ``loss_agg_mode`` and the global batch info: the mean of the
    sequences' losses over every row of this micro-batch, empty rows included. IS weights enter as
    their geometric mean over the sequence, with verl's ``log(w + 1e-10)``."""
    _need_config(config, "geo_mean")
    low, high = _clip_bounds(config)
    weights = None if rollout_is_weights is None else rollout_is_weights.detach() + 1e-10
    terms = _terms("geo_mean", old_log_prob, log_prob, advantages, response_mask, weights,
                   clip_low=low, clip_high=high)
    mask = response_mask.bool()
    counts = mask.sum(-1, keepdim=True).clamp(min=1)
    rows = max(mask.shape[0], 1) if mask.dim() > 1 else 1
    loss = torch.where(mask, terms.pg / counts, 0.0).sum() / rows
    return loss, _clip_metrics(terms, log_prob, old_log_prob, response_mask, clamp=False)


def compute_policy_loss_dro(old_log_prob, log_prob, advantages, response_mask,
                            loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """DRO: −(A·logp − β/2·(logp − old)²), β = config.policy_loss.dro_beta (> 0, required)."""
    _need_config(config, "dro")
    beta = _field(_policy_loss_config(config), "dro_beta")
    if beta is not None:
        _number(beta, "config.policy_loss.dro_beta")
    if beta is None or not beta > 0:
        raise ValueError(f"config.policy_loss.dro_beta must be a number > 0 for loss mode 'dro', "
                         f"got {beta!r}")
    terms = _terms("dro", old_log_prob, log_prob, advantages, response_mask, rollout_is_weights,
                   loss_params={"beta": beta})
    loss = agg_loss(terms.pg, response_mask, loss_agg_mode, **_global_batch_info(config))
    return loss, {"actor/ppo_kl": _kl_metric(log_prob, old_log_prob, response_mask, False)}


def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask,
                              loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """CISPO: −sg(clip(r, 1 − low, 1 + high))·A·logp."""
    _need_config(config, "cispo")
    low, high = _clip_bounds(config)
    terms = _terms("cispo", old_log_prob, log_prob, advantages, response_mask, rollout_is_weights,
                   clip_low=low, clip_high=high)
    loss = agg_loss(terms.pg, response_mask, loss_agg_mode, **_global_batch_info(config))
    return loss, _clip_metrics(terms, log_prob, old_log_prob, response_mask, lower=False)


def compute_policy_loss_reinforce(rollout_log_prob, log_prob, advantages, response_mask,
                                  loss_agg_mode="seq-mean-token-sum", config=None,
                                  rollout_is_weights=None):
    """REINFORCE: −A·logp·w (verl's bypass mode's ``loss_type='reinforce'``)."""
    if config is None:
        raise ValueError("compute_policy_loss_reinforce: config (verl's ActorConfig) is required")
    terms = _terms("reinforce", rollout_log_prob, log_prob, advantages, response_mask,
                   rollout_is_weights)
    loss = agg_loss(terms.pg, response_mask, loss_agg_mode, **_global_batch_info(config))
    return loss, {"actor/ppo_kl": _kl_metric(log_prob, rollout_log_prob, response_mask, False)}


# --------------------------------------------------------------------------------------------
# Value and KL
# --------------------------------------------------------------------------------------------


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                       dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """½·agg(max((v − R)², (clip(v, v_old ± c) − R)²)); returns ``(vf_loss, vf_clipfrac)``."""
    _check_mask("response_mask", response_mask, vpreds.shape)
    mask = response_mask.bool()
    v, R, v_old = (torch.where(mask, t, 0.0) for t in (vpreds, returns, values))
    clipped_v = torch.maximum(torch.minimum(v, v_old + cliprange_value), v_old - cliprange_value)
    unclipped_sq, clipped_sq = (v - R) ** 2, (clipped_v - R) ** 2
    per_token = torch.maximum(unclipped_sq, clipped_sq)
    vf_loss = 0.5 * agg_loss(per_token, response_mask, loss_agg_mode, dp_size=dp_size,
                             batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                             loss_scale_factor=loss_scale_factor)
    return vf_loss, masked_mean((clipped_sq > unclipped_sq).float(), response_mask)


_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3",
             "k3": "k3"}


def kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    """The KL estimate's value: kl/k1, abs, mse/k2, low_var_kl/k3 (``full`` is not implemented,
    as in verl)."""
    if kl_penalty == "full":
        raise NotImplementedError("kl_penalty='full' needs both models' whole distributions, which this "
                                  "signature does not receive (verl raises too): ppo_fast computes it in "
                                  "pf.ppo_loss(..., kl_estimator='full', ref_logits=...) and "
                                  "pf.fused_linear_ppo_loss(..., kl_estimator='full', ref_hidden=..., ref_weight=...)")
    if kl_penalty not in _KL_NAMES:
        raise NotImplementedError(f"kl_penalty must be one of {', '.join(_KL_NAMES)} (or one of "
                                  f"them followed by '+'); got {kl_penalty!r}")
    return _kl_estimate(logprob, ref_logprob, _KL_NAMES[kl_penalty])


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's ``kl_penalty``: a trailing ``+`` keeps the estimate's value with k2's gradient."""
    if kl_penalty.endswith("+"):
        base = kl_penalty[:-1]
        value = kl_penalty_forward(logprob, ref_logprob, base).detach()
        k2 = kl_penalty_forward(logprob, ref_logprob, "k2")
        return k2 - k2.detach() + value
    return kl_penalty_forward(logprob, ref_logprob, kl_penalty)


def compute_policy_loss_bypass_mode(old_log_prob, log_prob, advantages, response_mask,
                                    loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """verl's bypass mode: ``old_log_prob`` holds the rollout policy's log-probs. Rollout
    correction (config.policy_loss.rollout_correction: IS weights of the current policy against
    the rollout's, rejection) then REINFORCE with those weights (``loss_type='reinforce'``) or
    PPO clipping on the rejection mask (``'ppo_clip'``). The ``rollout_is_weights`` argument is
    ignored, as in verl (the weights are computed here)."""
    from .rollout_correction import compute_rollout_correction_and_rejection_mask

    if config is None:
        raise ValueError("compute_policy_loss_bypass_mode: config (verl's ActorConfig) is required")
    section = _field(config, "policy_loss")
    settings = None if section is None else _field(section, "rollout_correction")
    if settings is None:
        raise ValueError("loss_mode='bypass_mode' needs config.policy_loss.rollout_correction "
                         "(verl's RolloutCorrectionConfig)")
    loss_type = _field(settings, "loss_type", "ppo_clip")
    if loss_type not in ("reinforce", "ppo_clip"):
        raise ValueError(f"rollout_correction.loss_type must be 'reinforce' or 'ppo_clip', got {loss_type!r}")
    with torch.no_grad():
        weights, mask, correction_metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob, rollout_log_prob=old_log_prob, response_mask=response_mask,
            rollout_is=_field(settings, "rollout_is", None),
            rollout_is_threshold=_field(settings, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=_field(settings, "rollout_is_batch_normalize", False),
            rollout_rs=_field(settings, "rollout_rs", None),
            rollout_rs_threshold=_field(settings, "rollout_rs_threshold", None))
    weights = weights.batch["rollout_is_weights"] if weights is not None else None
    if loss_type == "reinforce":
        loss, metrics = compute_policy_loss_reinforce(old_log_prob, log_prob, advantages, mask, loss_agg_mode,
                                                      config, weights)
    else:
        loss, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode,
                                                    config)
    metrics.update(correction_metrics)
    return loss, metrics
