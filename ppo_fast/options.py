"""The loss options in one frozen dataclass.

The public functions keep their keyword arguments; inside, the options travel as one
:class:`LossOptions`, checked once when it is built, so no function below the public API takes or
checks an option on its own. Its defaults are the public defaults (a test holds them together).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Mapping

import numpy as np

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


def _is_number(value) -> bool:
    # value − value is 0 for a finite number and NaN for ±inf and NaN. Unlike math.isfinite it
    # also works on the symbolic floats torch.compile passes once an option changes between calls.
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and value - value == 0)


def integer(name: str, value, low: int = -(2**63), high: int = 2**63 - 1) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def positive(name: str, value) -> None:
    if not (_is_number(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


MIN_TEMPERATURE = 1.0 / float(np.finfo(np.float32).max)
"""The smallest temperature, about 2.9e-39. Every backend scales the logits by 1/temperature, in
float32 for float32, bfloat16 and float16 logits: below this bound 1/temperature overflows to inf
and every logit turns into ±inf or NaN (0·inf). float64 logits have the same bound, so that a
temperature is valid or not whatever the logits' dtype."""


def check_temperature(value) -> None:
    positive("temperature", value)
    if value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:.4g} (1 / the float32 maximum: the logits are "
                         f"scaled by 1/temperature in float32, which overflows below it), got {value!r}")


def non_negative(name: str, value) -> None:
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def in_unit_interval(name: str, value) -> None:
    if not (_is_number(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def kl_estimator_name(value) -> str:
    """The canonical estimator name (verl's aliases accepted)."""
    canonical = KL_ALIASES.get(value, value) if isinstance(value, str) else value
    if canonical not in KL_ESTIMATORS:
        names = KL_ESTIMATORS + tuple(KL_ALIASES)
        raise ValueError(f"kl_estimator must be one of {', '.join(map(repr, names))}; got {value!r}")
    return canonical


@dataclass(frozen=True)
class LossOptions:
    """Every option of the policy and PPO losses (the value loss takes the aggregation ones).
    Each public function sets the ones it takes and leaves the others at their defaults."""

    loss_type: str = "vanilla"
    """The policy objective (:mod:`ppo_fast.objectives`; aliases stored canonical)."""
    loss_params: Mapping[str, object] | None = None
    """The objective's own parameters; stored complete (defaults filled in), read-only."""
    clip_low: float = 0.2
    """The ratio is clipped below at 1 − clip_low (≥ 0; from 1 on nothing is clipped below). For
    dppo the thresholds of the trust region, for geo_mean the log-ratio bound −clip_low."""
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
        from .objectives import OBJECTIVES, resolve

        for name in _NUMERIC_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (np.integer, np.floating)):
                # numpy scalars (a count from numpy, a coefficient from a config) are numbers.
                object.__setattr__(self, name, value.item())

        loss_type, params, default_agg = resolve(self.loss_type, self.loss_params)
        clip_given = self.clip_low != 0.2 or self.clip_high is not None
        object.__setattr__(self, "loss_type", loss_type)
        object.__setattr__(self, "loss_params", MappingProxyType(params))
        if self.agg is None:
            object.__setattr__(self, "agg", default_agg)
        non_negative("clip_low", self.clip_low)
        if self.clip_high is None:
            object.__setattr__(self, "clip_high", self.clip_low)
        non_negative("clip_high", self.clip_high)
        if self.dual_clip is not None and not (_is_number(self.dual_clip) and self.dual_clip > 1):
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
        integer("ignore_index", self.ignore_index)
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
