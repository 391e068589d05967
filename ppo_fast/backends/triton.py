"""The Triton backend: output allocation and kernel launches for the dispatch table's ops.

The one module of ``ppo_fast`` that imports ``ppo_fast.kernels`` (and so triton; the compile
check reaches the kernels through it too); the dispatch
imports it only when a call resolves to Triton, so ``import ppo_fast`` never needs triton. Triton
takes Python floats as float32, so every coefficient travels in a small device tensor of the
accumulation dtype: float64 runs keep full precision and changing a coefficient never recompiles.
"""

from __future__ import annotations

import torch
import triton.language as tl

from ..kernels import gae as gae_kernels
from ..kernels import linear_logprobs as linear_kernels
from ..kernels import logprobs as logprobs_kernels
from ..kernels import ppo_loss as ppo_kernels
from ..kernels.launch import ENABLE_FP_FUSION, Launch  # noqa: F401  (for ppo_fast.compile_check)
from . import PPO_OUTPUTS, rows_apart


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _scalars(values, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=_out_dtype(dtype), device=device)


def _flat(t):
    return None if t is None else t.reshape(-1).contiguous()


def writes_in_place(logits: torch.Tensor) -> bool:
    """The gradient can go into the logits buffer where the kernels address it without a copy and
    no two rows share memory (an expanded view would have a written row read again as another)."""
    return logprobs_kernels.row_layout(logits)[0] is logits and rows_apart(logits)


def empty_dlogits(logits: torch.Tensor) -> torch.Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def token_logprobs_forward(logits, labels, inv_temp, ignore_index, with_entropy,
                           with_sum_pi_squared=False):
    """``(logp, entropy, lse)``, and ``sum_pi_squared`` as a fourth output when asked for, all
    from one read of the logits."""
    lead = logits.shape[:-1]
    out_dtype = _out_dtype(logits.dtype)
    logp = torch.empty(lead, dtype=out_dtype, device=logits.device)
    entropy = torch.zeros(lead, dtype=out_dtype, device=logits.device)
    lse = torch.empty(lead, dtype=out_dtype, device=logits.device)
    sum_pi_squared = (torch.empty(lead, dtype=out_dtype, device=logits.device)
                      if with_sum_pi_squared else None)
    rows, layout = logprobs_kernels.row_layout(logits)
    logprobs_kernels.logprobs_fwd(
        rows, layout, _flat(labels), logp.view(-1), entropy.view(-1), lse.view(-1),
        _scalars([inv_temp], logits.dtype, logits.device), ignore_index, with_entropy,
        _acc(logits.dtype), None if sum_pi_squared is None else sum_pi_squared.view(-1))
    out = (logp, entropy, lse)
    return out if sum_pi_squared is None else (*out, sum_pi_squared)


def token_logprobs_backward(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                            inv_temp, ignore_index) -> None:
    """``dlogits`` has the logits' shape and unit column stride; it may be ``logits`` itself: each
    element is read before it is overwritten, by the same program."""
    rows, layout = logprobs_kernels.row_layout(logits)
    drows, dlayout = logprobs_kernels.row_layout(dlogits)
    if drows is not dlogits:
        raise ValueError("dlogits must have unit column stride and rows addressable as "
                         f"[outer, inner, V]; got strides {tuple(dlogits.stride())}")
    logprobs_kernels.logprobs_bwd(
        rows, layout, dlogits, dlayout, _flat(labels), lse.reshape(-1), entropy.reshape(-1),
        _flat(grad_logp), _flat(grad_entropy),
        _scalars([inv_temp], logits.dtype, logits.device), ignore_index, _acc(logits.dtype))


def ppo_loss_forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp, inv_temp,
                     ignore_index, clip_low, clip_high, dual_clip, tis_cap, kl_coef, entropy_coef,
                     kl_estimator):
    lead = logits.shape[:-1]
    out_dtype = _out_dtype(logits.dtype)
    outputs = {name: torch.empty(lead, dtype=out_dtype, device=logits.device)
               for name in PPO_OUTPUTS[:-1]}
    outputs["flags"] = torch.empty(lead, dtype=torch.int8, device=logits.device)
    rows, layout = logprobs_kernels.row_layout(logits)

    def per_token(t):
        return None if t is None else _flat(t.to(out_dtype))

    ppo_kernels.ppo_fwd(
        rows, layout, _flat(labels), per_token(old_logp), per_token(advantages),
        per_token(ref_logp), per_token(rollout_logp),
        {name: t.view(-1) for name, t in outputs.items()},
        _scalars([inv_temp, clip_low, clip_high, dual_clip or 0.0, tis_cap, kl_coef, entropy_coef],
                 logits.dtype, logits.device),
        ignore_index=ignore_index, has_dual_clip=dual_clip is not None,
        kl_mode=kl_estimator, acc=_acc(logits.dtype))
    return tuple(outputs[name] for name in PPO_OUTPUTS)


def gae_forward(rewards, values, mask, cu_seqlens, gamma, lam):
    from .. import reference

    dtype = reference.compute_dtype(rewards, values)
    advantages = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    returns = torch.empty_like(advantages)
    lengths = cu_seqlens.diff()
    max_len = int(lengths.max()) if lengths.numel() else 0
    gae_kernels.gae(rewards.contiguous(), values.contiguous(), mask.to(torch.int8).contiguous(),
                    cu_seqlens.contiguous(), advantages, returns,
                    _scalars([gamma, gamma * lam], dtype, rewards.device), max_len, _acc(dtype))
    return advantages, returns


def linear_logprobs_forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy):
    """``(logp, entropy, lse)`` of ``hidden @ weight.T + bias`` tile by tile: no logits in memory.
    The backward is the chunked one of :mod:`ppo_fast.ops` (GEMMs, this backend's row kernel)."""
    out_dtype = _out_dtype(hidden.dtype)
    n = hidden.shape[0]
    logp, entropy, lse = (torch.empty(n, dtype=out_dtype, device=hidden.device) for _ in range(3))
    linear_kernels.linear_logprobs_fwd(
        hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
        weight if weight.stride(-1) == 1 else weight.contiguous(),
        None if bias is None else bias.contiguous(), labels.contiguous(), logp, entropy, lse,
        _scalars([inv_temp], hidden.dtype, hidden.device), ignore_index, with_entropy, _acc(hidden.dtype))
    return logp, entropy, lse
