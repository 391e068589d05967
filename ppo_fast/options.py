"""The loss options in one frozen dataclass, and ``loss_type`` / ``loss_params`` resolved against
the objectives' table (:data:`ppo_fast.objectives.OBJECTIVES`).

The public functions keep their keyword arguments; inside, the options travel as one
:class:`LossOptions`, checked once when it is built, so no function below the public API takes or
checks an option on its own. Its defaults are the public defaults (a test holds them together).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Mapping

import numpy as np

from ._checks import check_temperature, choice, int_option, is_number, non_negative, positive
from .objectives import ALIASES, LOSS_TYPES, OBJECTIVES, REQUIRED

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k1+", "k3+")
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
"""verl's names for the same estimators."""


def kl_estimator_name(value) -> str:
    """The canonical estimator name (verl's aliases accepted)."""
    canonical = KL_ALIASES.get(value, value) if isinstance(value, str) else value
    if canonical not in KL_ESTIMATORS:
        names = KL_ESTIMATORS + tuple(KL_ALIASES)
        raise ValueError(f"kl_estimator must be one of {', '.join(map(repr, names))}; got {value!r}")
    return canonical


def _check_param(loss_type: str, name: str, value) -> None:

    if name == "importance_level":
        choice("loss_params['importance_level']", value, ("token", "sequence"))
    elif name == "token_gradient":
        if not isinstance(value, bool):
            raise ValueError(f"loss_params['token_gradient'] must be a bool, got {value!r}")
    elif name in ("max_log_ratio", "ratio_min", "ratio_max"):
        if value is not None and not is_number(value):
            raise ValueError(f"loss_params[{name!r}] must be a finite number or None, got {value!r}")
        if name == "ratio_min" and value is not None and value < 0:
            raise ValueError(f"loss_params['ratio_min'] must be >= 0, got {value!r}")
        if name in ("ratio_max", "max_log_ratio") and value is not None:
            positive(f"loss_params[{name!r}]", value)
    elif name == "clip_cov_ratio" or name == "kl_cov_ratio":
        positive(f"loss_params[{name!r}]", value)
        if value > 1:
            raise ValueError(f"loss_params[{name!r}] is a share of the tokens, in (0, 1]; got {value!r}")
    elif name in ("clip_cov_lb", "clip_cov_ub", "kl_cov_coef", "k_pos", "k_neg"):
        if not is_number(value):
            raise ValueError(f"loss_params[{name!r}] must be a finite number, got {value!r}")
    else:  # ratio_cap, tau_pos, tau_neg, beta, lambda_pos, lambda_neg
        positive(f"loss_params[{name!r}]", value)


def resolve(loss_type, loss_params) -> tuple[str, dict, str]:
    """``(objective name, its full params, its default aggregation)`` for a loss_type (alias
    allowed) and the user's ``loss_params``; raises ValueError naming what is wrong."""
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}; got {loss_type!r}")
    name, agg = ALIASES.get(loss_type, (loss_type, None))
    objective = OBJECTIVES[name]
    given = {} if loss_params is None else loss_params
    if not isinstance(given, Mapping):
        raise ValueError(f"loss_params must be a dict of {loss_type!r}'s parameters or None, got "
                         f"{type(given).__name__}")
    unknown = sorted(set(given) - set(objective.params))
    if unknown:
        known = ", ".join(objective.params) or "none"
        raise ValueError(f"loss_params has {unknown} which loss_type={loss_type!r} does not take "
                         f"(its parameters: {known})")
    # numpy scalars (from a config or a computation) are numbers like any other.
    params = {**objective.params,
              **{key: value.item() if isinstance(value, np.generic) else value for key, value in given.items()}}
    missing = [key for key, value in params.items() if value is REQUIRED]
    if missing:
        raise ValueError(f"loss_type={loss_type!r} needs loss_params {missing} (no default)")
    for key, value in params.items():
        _check_param(loss_type, key, value)
    if name == "gspo" and params["importance_level"] != "sequence":
        raise ValueError("loss_type='gspo' is the sequence ratio: loss_params['importance_level'] must be "
                         "'sequence' (for the token ratio use loss_type='vanilla')")
    if params.get("importance_level") == "token" and params.get("max_log_ratio") is not None:
        raise ValueError("loss_params['max_log_ratio'] bounds the sequence ratio; it needs "
                         "importance_level='sequence'")
    if name == "clip_cov" and not params["clip_cov_lb"] < params["clip_cov_ub"]:
        raise ValueError(f"loss_params needs clip_cov_lb < clip_cov_ub (the covariance band), got "
                         f"{params['clip_cov_lb']!r} and {params['clip_cov_ub']!r}")
    return name, params, agg or objective.agg



DEFAULT_CLIP = 0.2
"""PPO's ε: the ratio is clipped to [1 − 0.2, 1 + 0.2] unless clip_low / clip_high say otherwise."""


@dataclass(frozen=True)
class LossOptions:
    """Every option of the policy and PPO losses (the value loss takes the aggregation ones).
    Each public function sets the ones it takes and leaves the others at their defaults."""

    loss_type: str = "vanilla"
    """The policy objective (:mod:`ppo_fast.objectives`; aliases stored canonical)."""
    loss_params: Mapping[str, object] | None = None
    """The objective's own parameters; stored complete (defaults filled in), read-only."""
    clip_low: float | None = None
    """The ratio is clipped below at 1 − clip_low (≥ 0; from 1 on nothing is clipped below). For
    dppo the thresholds of the trust region, for geo_mean the log-ratio bound −clip_low. None:
    :data:`DEFAULT_CLIP` (set by ``__post_init__``); objectives that do not clip take none."""
    clip_high: float | None = None
    """The ratio is clipped above at 1 + clip_high; None: clip_low (set by ``__post_init__``).
    Higher than clip_low is DAPO's clip-higher."""
    dual_clip: float | None = None
    """c > 1 caps a negative-advantage token's loss at −A·c (dual-clip PPO); None: off."""
    tis_cap: float = 2.0
    """Truncated importance sampling with ``rollout_logp``: weight min(π_old/π_rollout, tis_cap)."""
    kl_coef: float = 0.0
    """β of the KL term (with ``ref_logp``)."""
    kl_estimator: str = "k3"
    """k1, abs, k2, k3, k1+, k3+, or verl's kl, mse, low_var_kl (stored canonical)."""
    entropy_coef: float = 0.0
    """η of the entropy bonus."""
    temperature: float = 1.0
    """Log-probs are taken under softmax(logits / temperature)."""
    ignore_index: int = -100
    """Label of positions that are skipped like masked ones."""
    agg: str | None = None
    """How per-token losses become one number (``AGG_MODES``; see ``reference.agg_weights``);
    None: the loss type's (token-mean for most; stored resolved)."""
    num_tokens: float | None = None
    """Global token count for ``token-mean`` across data-parallel ranks; None: this batch's."""
    num_seqs: float | None = None
    """Global sequence count for the ``seq-mean-*`` modes; None: this batch's."""
    dp_size: int = 1
    """Data-parallel ranks whose gradients are averaged (with the global counts above)."""
    horizon: float | None = None
    """Divisor of ``seq-mean-token-sum-norm`` (Dr. GRPO); None: T."""

    def __post_init__(self):
        for name in _NUMERIC_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (np.integer, np.floating)):
                # numpy scalars (a count from numpy, a coefficient from a config) are numbers.
                object.__setattr__(self, name, value.item())

        loss_type, params, default_agg = resolve(self.loss_type, self.loss_params)
        clip_given = self.clip_low is not None or self.clip_high is not None
        object.__setattr__(self, "loss_type", loss_type)
        object.__setattr__(self, "loss_params", MappingProxyType(params))
        if self.agg is None:
            object.__setattr__(self, "agg", default_agg)
        if self.clip_low is None:
            object.__setattr__(self, "clip_low", DEFAULT_CLIP)
        non_negative("clip_low", self.clip_low)
        if self.clip_high is None:
            object.__setattr__(self, "clip_high", self.clip_low)
        non_negative("clip_high", self.clip_high)
        if self.dual_clip is not None and not (is_number(self.dual_clip) and self.dual_clip > 1):
            raise ValueError(f"dual_clip must be a number > 1 or None, got {self.dual_clip!r}")
        if self.dual_clip is not None and loss_type != "vanilla":
            raise ValueError(f"dual_clip applies to loss_type='vanilla' only, got loss_type="
                             f"{self.loss_type!r} (dppo's truncation is loss_params['ratio_cap'])")
        if loss_type == "cispo":
            low = 1 - self.clip_low if params["ratio_min"] is None else params["ratio_min"]
            high = 1 + self.clip_high if params["ratio_max"] is None else params["ratio_max"]
            if low > high:
                raise ValueError(f"loss_type='cispo' truncates the ratio to [{low!r}, {high!r}]: the lower "
                                 "bound (ratio_min, or 1 - clip_low) must not exceed the upper (ratio_max, or "
                                 "1 + clip_high)")
        if clip_given and not OBJECTIVES[loss_type].uses_clip:
            raise ValueError(f"loss_type={loss_type!r} does not clip: clip_low / clip_high would "
                             "be ignored; leave them unset")
        positive("tis_cap", self.tis_cap)
        non_negative("kl_coef", self.kl_coef)
        object.__setattr__(self, "kl_estimator", kl_estimator_name(self.kl_estimator))
        non_negative("entropy_coef", self.entropy_coef)
        check_temperature(self.temperature)
        int_option("ignore_index", self.ignore_index)
        choice("agg", self.agg, AGG_MODES)
        for name in ("num_tokens", "num_seqs", "horizon"):
            if getattr(self, name) is not None:
                positive(name, getattr(self, name))
        if not (isinstance(self.dp_size, int) and not isinstance(self.dp_size, bool)
                and self.dp_size >= 1):
            raise ValueError(f"dp_size must be an int >= 1, got {self.dp_size!r}")
        if self.dp_size > 1:
            needed = {"token-mean": "num_tokens"}.get(self.agg, None if self.agg == "token-sum" else "num_seqs")
            if needed is not None and getattr(self, needed) is None:
                raise ValueError(f"dp_size={self.dp_size} with agg={self.agg!r} needs {needed} (the global count "
                                 "over all data-parallel ranks); without it each rank would divide by its own")


_NUMERIC_FIELDS = tuple(f.name for f in fields(LossOptions)
                        if f.name not in ("loss_type", "loss_params", "kl_estimator", "agg"))
