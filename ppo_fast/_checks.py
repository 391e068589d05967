"""Tensor checks shared by every public function: each error names the argument, what was
expected and what was given, so a wrong call fails at the call and not as a NaN three steps later.
Scalar options are checked here too (the numbers of :class:`ppo_fast.options.LossOptions` and
every other function's).

Checks of values that live on the device (label ranges, ``cu_seqlens``, mask counts) need a host
sync; they are skipped while ``torch.compile`` traces (:func:`values_checked`), which is
documented on each public function that has one.
"""

from __future__ import annotations

import numpy as np
import torch


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
