"""The ``native`` backend: the C++ CPU kernels of ``csrc/`` (built by :mod:`ppo_fast.native`),
for the ops whose dispatch-table row names this module. Same functions and signatures as the
reference backend (see :mod:`ppo_fast.backends`)."""

from __future__ import annotations

import torch

from .. import native
from ..reference import compute_dtype
from . import reference, rows_apart


def writes_in_place(logits: torch.Tensor) -> bool:
    """Each row is read whole before any of it is written, so the gradient can go over the row it
    came from, unless the row was read from a copy (not unit-stride on the vocabulary) or rows
    share memory (an expanded view: a row written would be read again as another)."""
    return logits.stride(-1) == 1 and rows_apart(logits)


def empty_dlogits(logits: torch.Tensor) -> torch.Tensor:
    """Large buffers on 2 MiB pages (see ``empty_gradient_like`` in csrc/ppo_fast_cpu.cpp)."""
    return native.load().empty_gradient_like(logits)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def token_logprobs_forward(logits, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared=False):
    out = native.load().token_logprobs_forward(_rows(logits), labels.long().contiguous(), float(inv_temp),
                                               int(ignore_index), bool(with_entropy), bool(with_sum_pi_squared))
    return tuple(out)


def token_logprobs_backward(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temp,
                            ignore_index) -> None:
    dtype = lse.dtype
    native.load().token_logprobs_backward(
        dlogits, _rows(logits), labels.long().contiguous(), lse.contiguous(), entropy.to(dtype).contiguous(),
        grad_logp.to(dtype).contiguous(), None if grad_entropy is None else grad_entropy.to(dtype).contiguous(),
        float(inv_temp), int(ignore_index))


def ppo_loss_forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp, inv_temp,
                     ignore_index, clip_low, clip_high, dual_clip, tis_cap, kl_coef, entropy_coef,
                     kl_estimator):
    """The row pass and the per-token loss in one kernel; outputs as ``PPO_OUTPUTS``."""
    dtype = compute_dtype(logits)
    shape = labels.shape

    def per_token(t):
        return None if t is None else t.to(dtype).reshape(shape).contiguous()

    out = native.load().ppo_loss_forward(
        _rows(logits), labels.long().contiguous(), per_token(old_logp), per_token(advantages),
        per_token(ref_logp), per_token(rollout_logp), float(inv_temp), int(ignore_index),
        float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip),
        float(tis_cap), float(kl_coef), float(entropy_coef), str(kl_estimator))
    return tuple(out)


def linear_logprobs_forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy):
    """The reference's chunked GEMMs with this backend's row kernel."""
    return reference.linear_logprobs_forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy,
                                             row_forward=token_logprobs_forward)


def gae_forward(rewards, values, mask, cu_seqlens, gamma, lam):
    dtype = compute_dtype(rewards, values)
    out = native.load().gae_forward(rewards.to(dtype).contiguous(), values.to(dtype).contiguous(),
                                    mask.bool().contiguous(), cu_seqlens.long().contiguous(), float(gamma),
                                    float(lam))
    return tuple(out)
