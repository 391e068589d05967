"""The Triton fast path registered as ``torch.library`` ops, with fake kernels and autograd.

One schema per op, so autograd, device dispatch and ``torch.compile`` see them as ordinary ops:

* ``ppo_fast::token_logprobs``      logits → (logp, entropy, lse); backward one pass.
* ``ppo_fast::token_logprobs_bwd``  writes dlogits (optionally into the logits buffer itself).
* ``ppo_fast::ppo_loss_tokens``     fused actor loss per token; backward reuses the above.
* ``ppo_fast::gae``                 packed GAE, one launch for the whole batch.

Triton is imported only when an op runs, so ``import ppo_fast`` never needs it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference


def _acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalars(values, dtype: torch.dtype, device) -> Tensor:
    """Kernel coefficients as a device tensor: Triton passes Python floats as float32."""
    return torch.tensor(values, dtype=_out_dtype(dtype), device=device)


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ppo_fast::token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: Tensor, labels: Tensor, inv_temp: float, ignore_index: int, with_entropy: bool,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from .kernels import logprobs as k

    lead = logits.shape[:-1]
    out_dtype = _out_dtype(logits.dtype)
    logp = torch.empty(lead, dtype=out_dtype, device=logits.device)
    entropy = torch.zeros(lead, dtype=out_dtype, device=logits.device)
    lse = torch.empty(lead, dtype=out_dtype, device=logits.device)
    logits, layout = k.row_layout(logits)
    k.logprobs_fwd(logits, layout, labels.reshape(-1).contiguous(), logp.view(-1),
                   entropy.view(-1), lse.view(-1), _scalars([inv_temp], logits.dtype, logits.device),
                   ignore_index, with_entropy,
                   _acc(logits.dtype))
    return logp, entropy, lse


@token_logprobs_op.register_fake
def _(logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward):
    lead = logits.shape[:-1]
    out_dtype = _out_dtype(logits.dtype)
    return tuple(logits.new_empty(lead, dtype=out_dtype) for _ in range(3))


@torch.library.custom_op("ppo_fast::token_logprobs_bwd", mutates_args=("dlogits",))
def token_logprobs_bwd_op(
    dlogits: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor,
    grad_logp: Tensor, grad_entropy: Optional[Tensor], inv_temp: float, ignore_index: int,
) -> None:
    """Write ∂loss/∂logits into ``dlogits``, of the logits' shape with unit column stride. It may
    be ``logits`` itself: each element is read before it is overwritten, by the same program."""
    from .kernels import logprobs as k

    logits, layout = k.row_layout(logits)
    dlogits_rows, dlayout = k.row_layout(dlogits)
    if dlogits_rows is not dlogits:
        raise ValueError("dlogits must have unit column stride and rows addressable as "
                         f"[outer, inner, V]; got strides {tuple(dlogits.stride())}")
    k.logprobs_bwd(
        logits, layout, dlogits, dlayout, labels.reshape(-1).contiguous(),
        lse.reshape(-1), entropy.reshape(-1), grad_logp.reshape(-1).contiguous(),
        None if grad_entropy is None else grad_entropy.reshape(-1).contiguous(),
        _scalars([inv_temp], logits.dtype, logits.device), ignore_index, _acc(logits.dtype),
    )


@token_logprobs_bwd_op.register_fake
def _(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index):
    return None


def _dlogits(ctx, logits, labels, lse, entropy, grad_logp, grad_entropy):
    from .kernels.logprobs import row_layout

    # In place only where the kernels address the logits directly (no copy was needed).
    if ctx.inplace_backward and row_layout(logits)[0] is logits:
        dlogits = logits
    else:
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    token_logprobs_bwd_op(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                          ctx.inv_temp, ctx.ignore_index)
    return dlogits


def _logprobs_setup(ctx, inputs, output):
    logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.inv_temp, ctx.ignore_index = inv_temp, ignore_index
    ctx.with_entropy, ctx.inplace_backward = with_entropy, inplace_backward


def _logprobs_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    if not ctx.with_entropy:
        grad_entropy = None
    dlogits = _dlogits(ctx, logits, labels, lse, entropy, grad_logp, grad_entropy)
    return dlogits, None, None, None, None, None


token_logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


def token_logprobs(logits, labels, *, temperature, ignore_index, return_entropy, inplace_backward):
    logp, entropy, _ = token_logprobs_op(logits, labels, 1.0 / float(temperature),
                                         int(ignore_index), bool(return_entropy),
                                         bool(inplace_backward))
    return (logp, entropy) if return_entropy else logp


# --------------------------------------------------------------------------------------------
# Fused PPO actor loss
# --------------------------------------------------------------------------------------------

_PPO_OUTPUTS = ("token_loss", "dloss_dlogp", "logp", "entropy", "lse", "pg", "kl", "log_ratio",
                "flags")


@torch.library.custom_op("ppo_fast::ppo_loss_tokens", mutates_args=())
def ppo_loss_tokens_op(
    logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor,
    ref_logp: Optional[Tensor], rollout_logp: Optional[Tensor], inv_temp: float,
    ignore_index: int, clip_low: float, clip_high: float, dual_clip: Optional[float],
    tis_cap: float, kl_coef: float, entropy_coef: float, kl_estimator: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token outputs in the order of ``_PPO_OUTPUTS``; only ``token_loss`` is differentiable."""
    from .kernels import ppo_loss as k
    from .kernels.logprobs import row_layout

    lead = logits.shape[:-1]
    out_dtype = _out_dtype(logits.dtype)
    outputs = {name: torch.empty(lead, dtype=out_dtype, device=logits.device)
               for name in _PPO_OUTPUTS[:-1]}
    outputs["flags"] = torch.empty(lead, dtype=torch.int8, device=logits.device)

    def flat(t):
        return None if t is None else t.reshape(-1).contiguous()

    logits, layout = row_layout(logits)
    k.ppo_fwd(
        logits, layout, flat(labels), flat(old_logp), flat(advantages), flat(ref_logp),
        flat(rollout_logp), {name: t.view(-1) for name, t in outputs.items()},
        _scalars([inv_temp, clip_low, clip_high, dual_clip or 0.0, tis_cap, kl_coef, entropy_coef],
                 logits.dtype, logits.device),
        ignore_index=ignore_index, has_dual_clip=dual_clip is not None, kl_mode=kl_estimator,
        acc=_acc(logits.dtype),
    )
    return tuple(outputs[name] for name in _PPO_OUTPUTS)


@ppo_loss_tokens_op.register_fake
def _(logits, labels, old_logp, advantages, ref_logp, rollout_logp, *args):
    lead = logits.shape[:-1]
    out_dtype = _out_dtype(logits.dtype)
    floats = [logits.new_empty(lead, dtype=out_dtype) for _ in _PPO_OUTPUTS[:-1]]
    return (*floats, logits.new_empty(lead, dtype=torch.int8))


def _ppo_setup(ctx, inputs, output):
    logits, labels = inputs[:2]
    ctx.inv_temp, ctx.ignore_index = inputs[6], inputs[7]
    ctx.entropy_coef, ctx.inplace_backward = inputs[13], inputs[15]
    _, dloss_dlogp, _, entropy, lse = output[:5]
    ctx.save_for_backward(logits, labels, lse, entropy, dloss_dlogp)


def _ppo_backward(ctx, grad_token_loss, *_metric_grads):
    logits, labels, lse, entropy, dloss_dlogp = ctx.saved_tensors
    if grad_token_loss is None:
        grad_token_loss = torch.zeros_like(lse)
    grad_logp = grad_token_loss * dloss_dlogp
    grad_entropy = grad_token_loss * -ctx.entropy_coef if ctx.entropy_coef != 0 else None
    dlogits = _dlogits(ctx, logits, labels, lse, entropy, grad_logp, grad_entropy)
    return (dlogits,) + (None,) * 15


ppo_loss_tokens_op.register_autograd(_ppo_backward, setup_context=_ppo_setup)


def ppo_loss_tokens(logits, labels, old_logp, advantages, *, ref_logp, rollout_logp, temperature,
                    ignore_index, clip_low, clip_high, dual_clip, tis_cap, kl_coef, entropy_coef,
                    kl_estimator, inplace_backward):
    """Dict of per-token tensors (see ``_PPO_OUTPUTS``)."""
    dtype = _out_dtype(logits.dtype)

    def cast(t):
        return None if t is None else t.detach().to(dtype)

    outputs = ppo_loss_tokens_op(
        logits, labels, cast(old_logp), cast(advantages), cast(ref_logp), cast(rollout_logp),
        1.0 / float(temperature), int(ignore_index), float(clip_low), float(clip_high),
        None if dual_clip is None else float(dual_clip), float(tis_cap),
        float(kl_coef if ref_logp is not None else 0.0), float(entropy_coef),
        kl_estimator if ref_logp is not None else "k1", bool(inplace_backward),
    )
    return dict(zip(_PPO_OUTPUTS, outputs))


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ppo_fast::gae", mutates_args=())
def gae_op(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Tensor, gamma: float,
           lam: float, max_len: int) -> tuple[Tensor, Tensor]:
    from .kernels import gae as k

    dtype = reference.compute_dtype(rewards, values)
    advantages = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    returns = torch.empty_like(advantages)
    k.gae(rewards.contiguous(), values.contiguous(), mask.to(dtype).contiguous(),
          cu_seqlens.contiguous(), advantages, returns,
          _scalars([gamma, gamma * lam], dtype, rewards.device), max_len, _acc(dtype))
    return advantages, returns


@gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam, max_len):
    dtype = reference.compute_dtype(rewards, values)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def gae_packed(rewards, values, mask, cu_seqlens, *, gamma, lam, max_len):
    return gae_op(rewards, values, mask, cu_seqlens, float(gamma), float(lam), int(max_len))


def gae_padded(rewards, values, mask, *, gamma, lam):
    B, T = rewards.shape
    if T == 0:
        dtype = reference.compute_dtype(rewards, values)
        empty = torch.empty(B, 0, dtype=dtype, device=rewards.device)
        return empty, empty.clone()
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int64, device=rewards.device)
    adv, ret = gae_packed(rewards.reshape(-1), values.reshape(-1), mask.reshape(-1), cu,
                          gamma=gamma, lam=lam, max_len=T)
    return adv.view(B, T), ret.view(B, T)
