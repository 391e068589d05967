"""``nn.Module`` twins of the functional losses, for trainers that hold their loss as a module."""

from __future__ import annotations

from torch import nn

from . import functional as F


class PPOLoss(nn.Module):
    """Actor loss from logits (:func:`ppo_fast.ppo_loss`), options fixed at construction.

    ``forward(logits, labels, old_logp, advantages, mask, ref_logp=None, rollout_logp=None,
    **overrides)`` returns ``(loss, metrics)``. ``kl_coef`` is an attribute so an adaptive KL
    controller can change it between steps (it is a runtime kernel argument: no recompilation).
    """

    def __init__(self, *, clip_low: float = 0.2, clip_high: float | None = None,
                 dual_clip: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, temperature: float = 1.0, agg: str = "token-mean",
                 tis_cap: float = 2.0, ignore_index: int = -100, inplace_backward: bool = False):
        super().__init__()
        self.options = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                            kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                            temperature=temperature, agg=agg, tis_cap=tis_cap,
                            ignore_index=ignore_index, inplace_backward=inplace_backward)
        self.kl_coef = kl_coef

    def forward(self, logits, labels, old_logp, advantages, mask, ref_logp=None,
                rollout_logp=None, **overrides):
        options = {**self.options, "kl_coef": self.kl_coef, **overrides}
        return F.ppo_loss(logits, labels, old_logp, advantages, mask, ref_logp=ref_logp,
                          rollout_logp=rollout_logp, **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self.options, "kl_coef": self.kl_coef}.items())


class ValueLoss(nn.Module):
    """Clipped critic loss (:func:`ppo_fast.value_loss`); ``forward(values, old_values, returns,
    mask, **overrides)`` returns ``(loss, metrics)``."""

    def __init__(self, *, clip: float | None = 0.2, agg: str = "token-mean"):
        super().__init__()
        self.options = dict(clip=clip, agg=agg)

    def forward(self, values, old_values, returns, mask, **overrides):
        return F.value_loss(values, old_values, returns, mask, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
