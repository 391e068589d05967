"""``ppo_fast::gae``: generalised advantage estimation over packed sequences.

Read top to bottom: the schema and fake kernel, the autograd formula, then the implementations
(reference PyTorch, Triton, native C++) and their table. Each implementation is

    forward(rewards, values, mask, cu_seqlens, gamma, lam) -> (advantages, returns)

on 1-D ``[total]`` tensors, ``cu_seqlens`` ``[S + 1]`` delimiting the sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import arguments as check
from .. import dispatch, native, spec
from .token_logprobs import DEVICE_TYPES, no_kernel


@torch.library.custom_op("ppo_fast::gae", mutates_args=())
def gae_op(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Tensor, gamma: float,
           lam: float) -> tuple[Tensor, Tensor]:
    raise no_kernel("gae", rewards)


@gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam):
    dtype = spec.compute_dtype(rewards, values)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def _forward(rewards, values, mask, cu_seqlens, gamma, lam):
    return dispatch.implementation("gae", rewards.device)(rewards, values, mask, cu_seqlens, gamma, lam)


for _device_type in DEVICE_TYPES:
    gae_op.register_kernel(_device_type)(_forward)


def _adjoint(grad_adv, grad_ret, mask, gamma, lam):
    """The gradients of ``[..., T]`` rewards and values. Over a sequence's kept tokens
    (masked ones feed nothing), δ_i = r_i + γ·v_{i+1} − v_i, A_i = Σ_{j≥i} (γλ)^{j−i}·δ_j and
    R_i = A_i + v_i, so with g_i = ∂/∂A_i + ∂/∂R_i:

        ∂/∂δ_j = Σ_{i≤j} (γλ)^{j−i}·g_i         (a scan forward in time)
        ∂/∂r_j = ∂/∂δ_j,   ∂/∂v_j = −∂/∂δ_j + γ·∂/∂δ_{j−1} + ∂/∂R_j   (j−1: the previous kept token)
    """
    d_delta_prev = grad_adv.new_zeros(grad_adv.shape[:-1])
    d_rewards, d_values = torch.zeros_like(grad_adv), torch.zeros_like(grad_adv)
    for t in range(grad_adv.shape[-1]):
        keep = mask[..., t]
        d_delta = grad_adv[..., t] + grad_ret[..., t] + gamma * lam * d_delta_prev
        d_rewards[..., t] = torch.where(keep, d_delta, 0.0)
        d_values[..., t] = torch.where(keep, -d_delta + gamma * d_delta_prev + grad_ret[..., t], 0.0)
        d_delta_prev = torch.where(keep, d_delta, d_delta_prev)
    return d_rewards, d_values


def _setup(ctx, inputs, output):
    rewards, values, mask, cu_seqlens, gamma, lam = inputs
    ctx.save_for_backward(mask, cu_seqlens)
    ctx.gamma, ctx.lam, ctx.dtypes = gamma, lam, (rewards.dtype, values.dtype)


def _autograd_backward(ctx, grad_adv, grad_ret):
    mask, cu_seqlens = ctx.saved_tensors
    grad_adv = torch.zeros(mask.shape, dtype=grad_ret.dtype, device=mask.device) if grad_adv is None else grad_adv
    grad_ret = torch.zeros_like(grad_adv) if grad_ret is None else grad_ret
    d_rewards, d_values = torch.zeros_like(grad_adv), torch.zeros_like(grad_adv)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        d_rewards[start:end], d_values[start:end] = _adjoint(
            grad_adv[start:end], grad_ret[start:end], mask[start:end].bool(), ctx.gamma, ctx.lam)
    reward_dtype, value_dtype = ctx.dtypes
    return d_rewards.to(reward_dtype), d_values.to(value_dtype), None, None, None, None


gae_op.register_autograd(_autograd_backward, setup_context=_setup)


def reference_forward(rewards, values, mask, cu_seqlens, gamma, lam):
    lengths = cu_seqlens.diff()
    if lengths.numel() and bool((lengths == lengths[0]).all()):
        # Equal lengths: one loop over time for the whole batch instead of one per sequence.
        B, T = lengths.numel(), int(lengths[0])
        adv, ret = spec.gae(rewards.reshape(B, T), values.reshape(B, T), mask.reshape(B, T),
                            gamma=gamma, lam=lam)
        return adv.reshape(-1), ret.reshape(-1)
    return spec.gae_packed(rewards, values, mask, cu_seqlens, gamma=gamma, lam=lam)


def triton_forward(rewards, values, mask, cu_seqlens, gamma, lam):
    """One launch for the whole batch (kernels/gae.py)."""
    from ..kernels import gae as kernels
    from ..kernels.launch import accumulator, coefficients

    dtype = spec.compute_dtype(rewards, values)
    advantages = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    returns = torch.empty_like(advantages)
    lengths = cu_seqlens.diff()
    max_len = int(lengths.max()) if lengths.numel() else 0
    kernels.gae(rewards.contiguous(), values.contiguous(), mask.to(torch.int8).contiguous(),
                cu_seqlens.contiguous(), advantages, returns,
                coefficients([gamma, gamma * lam], dtype, rewards.device), max_len, accumulator(dtype))
    return advantages, returns


def native_forward(rewards, values, mask, cu_seqlens, gamma, lam):
    dtype = spec.compute_dtype(rewards, values)
    return tuple(native.load().gae_forward(
        rewards.to(dtype).contiguous(), values.to(dtype).contiguous(), mask.bool().contiguous(),
        cu_seqlens.long().contiguous(), float(gamma), float(lam)))


IMPLEMENTATIONS = dispatch.register("gae", {"reference": reference_forward, "triton": triton_forward,
                                            "native": native_forward})


# --------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    cu_seqlens: torch.Tensor | None = None,
    whiten: bool = True,
):
    """Generalised advantage estimation; returns ``(advantages, returns)``, the advantages
    whitened over the batch by default, as ``pf.advantages("gae", ...)`` (and verl) give them.

    Padded form: ``rewards``, ``values``, ``mask`` are ``[B, T]``. Packed form: they are 1-D
    ``[total]`` and ``cu_seqlens`` ``[S + 1]`` (int, as flash-attn's varlen API) delimits the
    sequences (its values are not checked under ``torch.compile``). ``mask`` (default all ones)
    marks the tokens that count; masked tokens add no TD error and do not break the chain, and
    both outputs are 0 there. ``whiten`` (default True): ``advantages = masked_whiten(A, mask)``
    (:func:`masked_whiten`; needs at least 2 masked tokens); returns are never whitened.
    Differentiable in ``rewards`` and ``values`` (GAE is linear in both). On CUDA, one kernel
    launch for the whole batch.
    """
    if not isinstance(whiten, bool):
        raise ValueError(f"whiten must be a bool, got {whiten!r}")
    for name, t in (("rewards", rewards), ("values", values)):
        check.floating(name, check.tensor(name, t))
    packed = cu_seqlens is not None
    if packed:
        if rewards.dim() != 1:
            raise ValueError(f"rewards must be 1-D [total] with cu_seqlens, got shape {tuple(rewards.shape)}")
        check.integer("cu_seqlens", check.tensor("cu_seqlens", cu_seqlens))
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
    elif rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T] (or 1-D with cu_seqlens), got shape {tuple(rewards.shape)}")
    check.shape("values", values, rewards.shape, "rewards.shape")
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    check.mask_like("mask", mask, rewards.shape, "rewards.shape")
    check.same_device("rewards", rewards, values=values, mask=mask, cu_seqlens=cu_seqlens)
    check.in_unit_interval("gamma", gamma)
    check.in_unit_interval("lam", lam)
    if not packed:
        B, T = rewards.shape
        cu_seqlens = torch.arange(B + 1, dtype=torch.int64, device=rewards.device) * T
    elif check.values_checked(cu_seqlens):
        lengths = cu_seqlens.diff()
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != rewards.numel() or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to rewards.numel()={rewards.numel()}, "
                             f"got {cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}")
    advantages, returns = gae_op(rewards.reshape(-1), values.reshape(-1), mask.reshape(-1), cu_seqlens,
                                 float(gamma), float(lam))
    advantages, returns = advantages.view(rewards.shape), returns.view(rewards.shape)
    if whiten:
        check.whitening(advantages, mask)
        advantages = spec.masked_whiten(advantages, mask)
    return advantages, returns
