"""Input checks shared by every public function: each error names the argument, what was expected
and what was given, so a wrong call fails at the call and not as a NaN three steps later."""

from __future__ import annotations

import math

import torch

from . import reference


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
    tensor(name, mask)
    if mask.is_complex():
        raise ValueError(f"{name} must be bool, integer or float 0/1, got {_describe(mask)}")
    shape(name, mask, expected, what)


def token_tensor(name: str, t, expected: tuple, what: str) -> None:
    """A per-token float tensor (log-probs, advantages, values...) of a given shape."""
    floating(name, tensor(name, t))
    shape(name, t, expected, what)


def positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def in_unit_interval(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def non_negative(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def kl_estimator(value: str) -> str:
    """The canonical estimator name (verl's aliases accepted)."""
    canonical = reference.KL_ALIASES.get(value, value)
    if canonical not in reference.KL_ESTIMATORS:
        names = reference.KL_ESTIMATORS + tuple(reference.KL_ALIASES)
        raise ValueError(f"kl_estimator must be one of {', '.join(map(repr, names))}; got {value!r}")
    return canonical


def logits_and_labels(logits, labels, ignore_index: int) -> None:
    floating("logits", tensor("logits", logits))
    integer("labels", tensor("labels", labels))
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {_describe(logits)}")
    shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    same_device("logits", logits, labels=labels)
    vocab = logits.shape[-1]
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.numel() and bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {bad} ({int(out_of_range.sum())} such labels)")


def clip_options(clip_low, clip_high, dual_clip) -> None:
    positive("clip_low", clip_low)
    if clip_high is not None:
        positive("clip_high", clip_high)
    if clip_low >= 1:
        raise ValueError(f"clip_low must be < 1 (the ratio is clipped at 1 - clip_low), got {clip_low!r}")
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1):
        raise ValueError(f"dual_clip must be a number > 1 or None, got {dual_clip!r}")


def agg_options(agg, mask, num_tokens, num_seqs, dp_size, horizon) -> None:
    choice("agg", agg, reference.AGG_MODES)
    for name, value in (("num_tokens", num_tokens), ("num_seqs", num_seqs), ("horizon", horizon)):
        if value is not None:
            positive(name, value)
    if not (isinstance(dp_size, int) and dp_size >= 1):
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")
    if agg.startswith("seq-") and mask.dim() < 1:
        raise ValueError(f"agg={agg!r} needs a mask of shape [..., T], got {_describe(mask)}")
