"""The exact KL to the reference over the whole vocabulary, ``kl_estimator="full"``:

    KL_t = Σ_v π_v (log π_v − log ρ_v),   π = softmax(z / T),  ρ = softmax(r / T)
    ∂KL_t/∂z_u = π_u (log π_u − log ρ_u − KL_t) / T

with z the policy's logits and r the reference's at token t (a term with π_v = 0 is 0). The
estimators k1…k3+ see only the sampled token's two log-probs; this one sees both distributions,
so it is exact and has no variance. The reference is data: no gradient reaches r.

Two forms, both chunk by chunk over the tokens, so the float32 work is one chunk's logits at a
time: from the two models' logits (here, :func:`full_kl_from_logits`), and from the two models'
last hidden states and heads (:func:`ppo_fast.ops.linear_logprobs.full_kl_from_heads`, with the
head's chunks), where neither model's logits are stored: each chunk's are computed, used and
freed, forward and backward (which recomputes them). Both run in PyTorch on every device, so the
op is not in :mod:`ppo_fast.dispatch`'s table; where the head runs on Triton, the heads' form runs
two Triton kernels instead, which compute both heads' logits tile by tile and never store them
(``kernels/linear_logprobs.py``). Every row's numbers are row-wise reductions, so they do not
depend on the chunk or the batch around the row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import spec

CHUNK_BYTES = 64 * 2**20
"""Bytes of one chunk's logits in the compute dtype (policy and reference each)."""


def chunk_kl(z: Tensor, r: Tensor, active: Tensor, inv_temp: float, dtype: torch.dtype, with_gradient: bool):
    """``(kl [C], ∂kl/∂z [C, V] or None)`` of one chunk's policy and reference logits, in
    ``dtype``; 0 on the rows where ``active`` ``[C]`` is false, whatever they hold."""
    rows = active.unsqueeze(-1)
    logp = torch.log_softmax(torch.where(rows, z.to(dtype), 0.0) * inv_temp, dim=-1)
    log_ref = torch.log_softmax(torch.where(rows, r.to(dtype), 0.0) * inv_temp, dim=-1)
    p = logp.exp()
    # π_v = 0 (a banned token, or an underflow) contributes 0, whatever ρ_v is: 0·log 0 = 0.
    gap = torch.where(p > 0, logp - log_ref, 0.0)
    kl = torch.where(active, (p * gap).sum(-1), 0.0)
    if not with_gradient:
        return kl, None
    return kl, torch.where(rows, p * (gap - kl.unsqueeze(-1)) * inv_temp, 0.0)


def check_kl_finite(kl: Tensor, start: int, what: str, policy_lse: Tensor | None = None) -> None:
    """A KL that is not finite at a token is an error naming it, not a NaN or inf step (not while
    tracing): +inf where the reference gives probability 0 to a token the policy does not, NaN
    where the reference's logits hold NaN or +inf, are all −inf, or overflow once divided by the
    temperature. ``policy_lse`` (the policy's log-sum-exps of the same tokens, where known) names
    the policy's logits instead when theirs is what is not finite."""
    if torch.compiler.is_compiling() or kl.device.type == "meta" or bool(torch.isfinite(kl).all()):
        return
    token = start + int((~torch.isfinite(kl)).nonzero()[0, 0])
    if policy_lse is not None and not bool(torch.isfinite(policy_lse[token - start])):
        raise ValueError(f"the policy's logits at token {token} (of the flattened tokens, from 0) give no "
                         "distribution: they hold NaN or +inf, are all -inf, or overflow float32 once divided by "
                         "the temperature, and the full KL would be NaN")
    if bool(torch.isinf(kl[token - start])):
        raise ValueError(f"{what} at token {token} (of the flattened tokens, from 0) give probability 0 to a token "
                         "the policy gives a positive probability: the full KL is +inf there. Ban a token in both "
                         "models or in neither")
    raise ValueError(f"{what} at token {token} (of the flattened tokens, from 0) give no distribution: they hold NaN "
                     "or +inf, are all -inf, or overflow float32 once divided by the temperature, and the full KL "
                     "would be NaN")


def _rows_per_chunk(vocab: int, dtype: torch.dtype) -> int:
    itemsize = 8 if dtype == torch.float64 else 4
    return max(CHUNK_BYTES // max(vocab * itemsize, 1), 1)


class _FullKLFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, labels, inv_temp, ignore_index):
        dtype = spec.compute_dtype(logits)
        kl = torch.zeros(labels.shape, dtype=dtype, device=logits.device)
        chunk = _rows_per_chunk(logits.shape[-1], logits.dtype)
        for start in range(0, labels.shape[0], chunk):
            part = slice(start, start + chunk)
            kl[part], _ = chunk_kl(logits[part], ref_logits[part], labels[part] != ignore_index, inv_temp, dtype,
                                   False)
            check_kl_finite(kl[part], start, "ref_logits")
        ctx.save_for_backward(logits, ref_logits, labels)
        ctx.inv_temp, ctx.ignore_index = inv_temp, ignore_index
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, labels = ctx.saved_tensors
        dtype = spec.compute_dtype(logits)
        dlogits = torch.empty_like(logits)
        chunk = _rows_per_chunk(logits.shape[-1], logits.dtype)
        for start in range(0, labels.shape[0], chunk):
            part = slice(start, start + chunk)
            active = labels[part] != ctx.ignore_index
            _, dz = chunk_kl(logits[part], ref_logits[part], active, ctx.inv_temp, dtype, True)
            dlogits[part] = torch.where(active.unsqueeze(-1), dz * grad_kl[part].to(dtype).unsqueeze(-1), 0.0)
        return dlogits, None, None, None, None


def full_kl_from_logits(logits: Tensor, ref_logits: Tensor, labels: Tensor, temperature: float,
                        ignore_index: int) -> Tensor:
    """``KL_t`` ``[N]`` for logits and ref_logits ``[N, V]`` (checked by the caller); 0 where the
    label is ``ignore_index``, whatever those rows hold. float32 (float64 for float64 logits);
    differentiable in ``logits``."""
    return _FullKLFromLogits.apply(logits, ref_logits.detach(), labels, 1.0 / float(temperature), int(ignore_index))
