"""The arguments of the public functions: their checks, and the loss options packed once.

Every check names the argument, what was expected and what was given, so a wrong call fails at
the call and not as a NaN three steps later. Scalar options are checked here too (the numbers of
:class:`LossOptions` and every other function's).

Checks of values that live on the device (label ranges, ``cu_seqlens``, mask counts) need a host
sync; they are skipped while ``torch.compile`` traces (:func:`values_checked`), which is
documented on each public function that has one.

The public functions keep their keyword arguments; inside, the options travel as one
:class:`LossOptions`, checked once when it is built, so no function below the public API takes or
checks an option on its own. Its defaults are the public defaults (a test holds them together).
``loss_type`` / ``loss_params`` are resolved against the objectives' table
(:data:`ppo_fast.objectives.OBJECTIVES`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Mapping

import numpy as np
import torch

from .objectives import ALIASES, LOSS_TYPES, OBJECTIVES, REQUIRED


def is_number(value) -> bool:
    # value − value is 0 for a finite number and NaN for ±inf and NaN. Unlike math.isfinite it
    # also works on the symbolic floats torch.compile passes once an option changes between calls.
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and value - value == 0)


def int_option(name: str, value, low: int = -(2**63), high: int = 2**63 - 1) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def positive(name: str, value) -> None:
    if not (is_number(value) and value > 0):
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
    if not (is_number(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def in_unit_interval(name: str, value) -> None:
    if not (is_number(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def values_checked(*tensors: torch.Tensor) -> bool:
    """Whether checks that read device values run: always, except while torch.compile traces and
    on meta tensors (which hold no values)."""
    return not torch.compiler.is_compiling() and not any(
        t is not None and t.device.type == "meta" for t in tensors)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, t: torch.Tensor) -> None:
    tensor(name, t)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {_describe(t)}")


def integer(name: str, t: torch.Tensor) -> None:
    tensor(name, t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {_describe(t)}")


def shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {_describe(t)}")


def same_device(reference_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {ref.device}; "
                             "move all inputs to one device")


def mask_like(name: str, mask: torch.Tensor, expected: tuple, what: str) -> None:
    """A mask: bool, or integer/float holding only 0 and 1 (a 0.5 is not a mask: some functions
    would read it as a weight and others as true)."""
    tensor(name, mask)
    if mask.is_complex():
        raise ValueError(f"{name} must be bool, or integer/float holding only 0 and 1, got "
                         f"{_describe(mask)}")
    shape(name, mask, expected, what)
    if mask.dtype == torch.bool or not values_checked(mask):
        return
    not_binary = (mask != 0) & (mask != 1)
    if bool(not_binary.any()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool); found "
                         f"{mask[not_binary][0].item()} ({int(not_binary.sum())} such values), "
                         f"{_describe(mask)}")


def token_tensor(name: str, t, expected: tuple, what: str) -> None:
    """A per-token float tensor (log-probs, advantages, values...) of a given shape."""
    floating(name, tensor(name, t))
    shape(name, t, expected, what)


def logits_and_labels(logits, labels, ignore_index: int) -> torch.Tensor:
    """Check logits ``[..., V]`` and labels ``[...]``; return the labels as int64, so that
    ``ignore_index`` compares and fills the same whatever integer dtype they came in (-100 in a
    uint8 tensor would be 156)."""
    floating("logits", tensor("logits", logits))
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {_describe(logits)}")
    return token_labels("logits", logits, logits.shape[-1], labels, ignore_index)


def token_labels(source_name: str, source: torch.Tensor, vocab: int, labels, ignore_index: int) -> torch.Tensor:
    """Labels ``[...]`` for ``source`` ``[..., X]`` (the logits, or the hidden states of a fused head)
    over a vocabulary of ``vocab``: checked, returned as int64 (see :func:`logits_and_labels`)."""
    integer("labels", tensor("labels", labels))
    shape("labels", labels, source.shape[:-1], f"{source_name}.shape[:-1]")
    same_device(source_name, source, labels=labels)
    return labels_in_vocab(labels, vocab, ignore_index, source)


def labels_in_vocab(labels, vocab: int, ignore_index: int, source: torch.Tensor) -> torch.Tensor:
    """The labels as int64, checked to lie in ``[0, vocab)`` or equal ``ignore_index`` (not while
    tracing, nor on meta tensors)."""
    labels = labels.long()
    if not values_checked(source, labels):
        return labels
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.numel() and bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {bad} ({int(out_of_range.sum())} such labels)")
    return labels


def no_infinite_maximum(logits: torch.Tensor, overflowed: torch.Tensor, temperature: float) -> None:
    """``overflowed`` ``[...]``: the positions whose scaled logits ``logits / temperature`` hold
    +inf (every backend's log-sum-exp is +inf there, and the spec sees the +inf itself). Their
    softmax is uniform over the +inf entries, which no backend computes: an error naming the first
    such position rather than NaN log-probs (not while tracing, nor on meta tensors)."""
    if not values_checked(logits, overflowed) or not bool(overflowed.any()):
        return
    where = tuple(overflowed.nonzero()[0].tolist())
    row = logits[where]
    infinite = int(torch.isposinf(row).sum())
    cause = (f"{infinite} of its logits are +inf" if infinite else
             f"its largest logit, {row.max().item():.6g}, times 1/temperature = {1 / temperature:.6g} overflows")
    raise ValueError(f"logits at position {where} give +inf once divided by temperature={temperature!r} ({cause}): "
                     "the log-probs would be NaN. Ban tokens with -inf, not +inf, and keep logits / temperature "
                     f"within the float32 range; {int(overflowed.sum())} such positions, {_describe(logits)}")


def seq_mask(agg: str, mask: torch.Tensor) -> None:
    if agg.startswith("seq-") and mask.dim() < 1:
        raise ValueError(f"agg={agg!r} needs a mask of shape [..., T], got {_describe(mask)}")


def sequence_objective(loss_type: str, params, mask: torch.Tensor) -> None:
    """Objectives defined per sequence read the last dimension as time."""
    per_sequence = loss_type in ("geo_mean", "vespo") or params.get("importance_level") == "sequence"
    if per_sequence and mask.dim() < 1:
        raise ValueError(f"loss_type={loss_type!r} works per sequence and needs a mask of shape "
                         f"[..., T], got {_describe(mask)}")


def weights(name: str, w: torch.Tensor | None, mask: torch.Tensor) -> None:
    """Importance weights: >= 0 wherever the mask selects (a negative weight would flip the sign
    of a token's loss). What masked positions hold is not read."""
    if w is None or not values_checked(w, mask):
        return
    negative = mask.bool() & (w < 0)
    if bool(negative.any()):
        raise ValueError(f"{name} must be >= 0 at the masked-in tokens; found {w[negative][0].item()} "
                         f"({int(negative.sum())} such values), {_describe(w)}")


# --------------------------------------------------------------------------------------------
# The arguments of the losses and heads
# --------------------------------------------------------------------------------------------


def per_token(shape, what, mask, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            token_tensor(name, t, shape, what)
    mask_like("mask", mask, shape, what)


def actor_inputs(source_name, source, lead, what, vocab, labels, old_logp, advantages, mask, ref_logp,
                        rollout_logp, rollout_is_weights, opts) -> torch.Tensor:
    """Check the actor loss's per-token inputs against ``lead`` (the tokens' shape); return the
    labels as int64 with masked positions set to ``ignore_index``."""
    integer("labels", tensor("labels", labels))
    shape("labels", labels, lead, what)
    per_token(lead, what, mask, old_logp=old_logp, advantages=advantages, ref_logp=ref_logp,
                     rollout_logp=rollout_logp, rollout_is_weights=rollout_is_weights)
    same_device(source_name, source, labels=labels, mask=mask, old_logp=old_logp,
                      advantages=advantages, ref_logp=ref_logp, rollout_logp=rollout_logp,
                      rollout_is_weights=rollout_is_weights)
    # Masked positions count as ignored labels before anything reads them, so a masked label out
    # of range (garbage after EOS) is no error and its row is never computed.
    labels = labels.long().masked_fill(~mask.bool(), opts.ignore_index)
    labels = labels_in_vocab(labels, vocab, opts.ignore_index, source)
    seq_mask(opts.agg, mask)
    sequence_objective(opts.loss_type, opts.loss_params, mask)
    # A token whose label is ignore_index is skipped like a masked one: its weight is not read.
    weights("rollout_is_weights", rollout_is_weights, labels != opts.ignore_index)
    return labels


def linear_head(hidden, weight, bias, prefix: str = "") -> None:
    """hidden ``[..., H]``, an lm_head's weight ``[V, H]`` and bias ``[V]`` or None; ``prefix``
    names the model's (``ref_`` for the reference's)."""
    h, w, b = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    floating(h, tensor(h, hidden))
    floating(w, tensor(w, weight))
    if hidden.dim() < 1:
        raise ValueError(f"{h} must have shape [..., H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{w} must have shape [V, H] with H = {h}.shape[-1] = {hidden.shape[-1]} and V >= 1 "
                         f"(an lm_head's weight), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{w} must have {h}'s dtype {hidden.dtype}, got {weight.dtype} (cast one, as "
                         "the model's lm_head would)")
    if bias is not None:
        floating(b, tensor(b, bias))
        shape(b, bias, weight.shape[:1], "[V]")
        if bias.dtype != weight.dtype:
            raise ValueError(f"{b} must have {w}'s dtype {weight.dtype}, got {bias.dtype}")
    same_device(h, hidden, **{w: weight, b: bias})


def reference_head(hidden, weight, ref_hidden, ref_weight, ref_bias) -> None:
    """The reference model's head for the full KL: the policy's tokens and vocabulary (its own
    hidden size and dtype), on the policy's device."""
    floating("ref_weight", tensor("ref_weight", ref_weight))
    if ref_weight.dim() == 2 and ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must cover the policy's vocabulary of {weight.shape[0]} tokens (shape [V, H_ref] "
                         f"with V = weight.shape[0]), got shape {tuple(ref_weight.shape)}")
    linear_head(ref_hidden, ref_weight, ref_bias, prefix="ref_")
    shape("ref_hidden", ref_hidden, (*hidden.shape[:-1], ref_hidden.shape[-1]), "hidden's tokens")
    same_device("hidden", hidden, ref_hidden=ref_hidden)


def reference_logits(logits, ref_logits) -> None:
    """The reference model's logits for the full KL: the policy's shape and device, any float dtype."""
    floating("ref_logits", tensor("ref_logits", ref_logits))
    shape("ref_logits", ref_logits, logits.shape, "logits.shape")
    same_device("logits", logits, ref_logits=ref_logits)


def whitening(values: torch.Tensor, mask: torch.Tensor) -> None:
    """Values and mask for a masked whitening: a variance needs at least 2 masked tokens."""
    floating("values", tensor("values", values))
    mask_like("mask", mask, values.shape, "values.shape")
    same_device("values", values, mask=mask)
    if values.numel() and values_checked(values, mask):
        count = int(mask.to(torch.bool).sum())
        if count < 2:
            raise ValueError(f"mask must select at least 2 tokens to estimate a variance, selects {count}")


# --------------------------------------------------------------------------------------------
# The loss options
# --------------------------------------------------------------------------------------------

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k1+", "k3+")
"""The estimators from the sampled token's log-probs (``pf.kl_penalty``)."""
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
"""verl's names for the same estimators."""
FULL_KL = "full"
"""The exact KL over the whole vocabulary (:mod:`ppo_fast.ops.full_kl`): the actor losses take it
from both models' logits or heads; log-probs alone cannot give it."""


def kl_estimator_name(value, *, full: bool = False, name: str = "kl_estimator") -> str:
    """The canonical estimator name (verl's aliases accepted); ``full``: also ``"full"``; ``name``:
    the argument's, for the errors."""
    canonical = KL_ALIASES.get(value, value) if isinstance(value, str) else value
    if canonical == FULL_KL and not full:
        raise ValueError(f"{name}='full' is the KL over the whole vocabulary: it needs both models' logits "
                         "(pf.ppo_loss with ref_logits) or heads (pf.fused_linear_ppo_loss with ref_hidden and "
                         "ref_weight), not their log-probs; here pick one of "
                         f"{', '.join(map(repr, KL_ESTIMATORS + tuple(KL_ALIASES)))}")
    if canonical not in KL_ESTIMATORS + ((FULL_KL,) if full else ()):
        names = KL_ESTIMATORS + tuple(KL_ALIASES) + ((FULL_KL,) if full else ())
        raise ValueError(f"{name} must be one of {', '.join(map(repr, names))}; got {value!r}")
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
    """k1, abs, k2, k3, k1+, k3+, or verl's kl, mse, low_var_kl (stored canonical), from the
    sampled token's log-probs; or ``full``, the exact KL over the vocabulary, from both models'
    logits or heads (the actor losses only)."""
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
        object.__setattr__(self, "kl_estimator", kl_estimator_name(self.kl_estimator, full=True))
        non_negative("entropy_coef", self.entropy_coef)
        check_temperature(self.temperature)
        int_option("ignore_index", self.ignore_index)
        choice("agg", self.agg, AGG_MODES)
        for name in ("num_tokens", "num_seqs", "horizon"):
            if getattr(self, name) is not None:
                positive(name, getattr(self, name))
        if self.horizon is not None and self.agg != "seq-mean-token-sum-norm":
            raise ValueError(f"horizon is the divisor of agg='seq-mean-token-sum-norm' only, got agg={self.agg!r}: "
                             "it would be ignored; leave it unset or pick that aggregation")
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


def actor_options(ref_logp, full_reference: dict, optional_reference: dict | None = None, **options) -> LossOptions:
    """The options of an actor loss (``pf.ppo_loss``, the fused head's) and its reference: the KL
    term reads ``ref_logp`` (a per-token estimator) or every tensor of ``full_reference`` (name →
    tensor or None: the reference model's logits, or its hidden states and head) and those of
    ``optional_reference`` given (the reference head's bias), never both."""
    opts = LossOptions(**options)
    given = [name for name, t in {**full_reference, **(optional_reference or {})}.items() if t is not None]
    if opts.kl_estimator == FULL_KL:
        if ref_logp is not None:
            raise ValueError(f"kl_estimator='full' compares the whole distributions and does not read ref_logp: "
                             f"pass {' and '.join(full_reference)} instead")
        missing = [name for name in full_reference if full_reference[name] is None]
        if missing and (given or opts.kl_coef != 0):
            raise ValueError(f"kl_estimator='full' needs {' and '.join(full_reference)} (the reference model's); "
                             f"{' and '.join(missing)} missing")
    elif given:
        raise ValueError(f"{given[0]} is read by kl_estimator='full' only, got kl_estimator="
                         f"{options.get('kl_estimator', LossOptions.kl_estimator)!r}")
    elif opts.kl_coef != 0 and ref_logp is None:
        raise ValueError(f"kl_coef={opts.kl_coef!r} needs ref_logp (the reference policy's log-probs); "
                         "pass ref_logp or kl_coef=0")
    return opts
