"""The ``native`` backend: the C++ CPU kernels of ``csrc/`` (built by :mod:`ppo_fast.native`),
for the ops whose dispatch-table row names this module. Same functions and signatures as the
reference backend (see :mod:`ppo_fast.backends`)."""

from __future__ import annotations

import torch

from .. import native
from ..reference import compute_dtype
from . import reference


def writes_in_place(logits: torch.Tensor) -> bool:
    # Each row is read whole before any of it is written; a row that is not unit-stride on the
    # vocabulary is read from a copy, and then the gradient cannot go back into it.
    return logits.stride(-1) == 1


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
