"""``nn.Module`` twins of the functional losses, for trainers that hold their loss as a module."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import functional as F
from .arguments import LossOptions, positive


class PPOLoss(nn.Module):
    """Actor loss from logits (:func:`ppo_fast.ppo_loss`), options fixed at construction.

    Takes any keyword of :func:`ppo_fast.ppo_loss` (checked here, not at the first step).
    ``forward(logits, labels, old_logp, advantages, mask, ref_logp=None, rollout_logp=None,
    rollout_is_weights=None, **overrides)`` returns ``(loss, metrics)``. ``loss_type`` and
    ``loss_params`` pick the objective (:mod:`ppo_fast.objectives`). Given ``hidden=`` and
    ``lm_head=`` (an ``nn.Linear`` or its ``[V, H]`` weight) in place of the logits, the loss runs
    on the fused linear head (:func:`ppo_fast.fused_linear_ppo_loss`) and the logits are never
    made. ``kl_coef`` is an attribute so an adaptive KL
    controller can change it between steps (it is a runtime kernel argument: no recompilation).
    """

    def __init__(self, *, inplace_backward: bool = False, **options):
        super().__init__()
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(LossOptions)})
        if unknown:
            raise TypeError(f"PPOLoss got unexpected keyword arguments {unknown}; it takes the "
                            "keywords of ppo_fast.ppo_loss")
        LossOptions(**options)
        # As given, not as resolved: an override of clip_low must still move an unset clip_high.
        self.options = dict(options)
        self.kl_coef = self.options.pop("kl_coef", 0.0)
        self.inplace_backward = inplace_backward

    def forward(self, logits=None, labels=None, old_logp=None, advantages=None, mask=None, ref_logp=None,
                rollout_logp=None, rollout_is_weights=None, *, hidden=None, lm_head=None, **overrides):
        options = {**self.options, "kl_coef": self.kl_coef, **overrides}
        tensors = dict(ref_logp=ref_logp, rollout_logp=rollout_logp, rollout_is_weights=rollout_is_weights)
        if hidden is None:
            if logits is None:
                raise ValueError("PPOLoss needs either logits or hidden (with lm_head)")
            if lm_head is not None:
                raise ValueError("PPOLoss got lm_head without hidden: pass hidden (the last hidden states) "
                                 "with lm_head, or logits alone")
            return F.ppo_loss(logits, labels, old_logp, advantages, mask, inplace_backward=self.inplace_backward,
                              **tensors, **options)
        if logits is not None:
            raise ValueError("PPOLoss takes either logits or hidden (with lm_head), not both")
        if isinstance(lm_head, nn.Linear):
            if type(lm_head).forward is not nn.Linear.forward:
                raise ValueError(f"lm_head is a {type(lm_head).__name__} with its own forward: the fused head "
                                 "computes nn.Linear's function, so pass its logits instead")
            weight, bias = lm_head.weight, lm_head.bias
        elif isinstance(lm_head, torch.Tensor):
            weight, bias = lm_head, None
        else:
            raise ValueError("with hidden, PPOLoss needs lm_head: the model's output nn.Linear or its [V, H] "
                             f"weight; got {type(lm_head).__name__}")
        return F.fused_linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, bias=bias, **tensors,
                                       **options)

    def extra_repr(self) -> str:
        options = {**self.options, "kl_coef": self.kl_coef, "inplace_backward": self.inplace_backward}
        return ", ".join(f"{k}={v!r}" for k, v in options.items())


class ValueLoss(nn.Module):
    """Clipped critic loss (:func:`ppo_fast.value_loss`); ``forward(values, old_values, returns,
    mask, **overrides)`` returns ``(loss, metrics)``."""

    def __init__(self, *, clip: float | None = 0.2, agg: str = "token-mean"):
        super().__init__()
        LossOptions(agg=agg)
        if clip is not None:
            positive("clip", clip)
        self.options = dict(clip=clip, agg=agg)

    def forward(self, values, old_values, returns, mask, **overrides):
        return F.value_loss(values, old_values, returns, mask, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
