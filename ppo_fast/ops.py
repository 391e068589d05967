"""The ops with a ``torch.library`` schema, so autograd, device dispatch and ``torch.compile`` see
each as one ordinary op:

* ``ppo_fast::token_logprobs``           logits → (logp, entropy, lse, sum_pi_squared)
* ``ppo_fast::token_logprobs_backward``  writes ∂loss/∂logits (into the logits buffer if asked)
* ``ppo_fast::ppo_loss_tokens``          the actor loss per token (``backends.PPO_OUTPUTS``)
* ``ppo_fast::gae``                      GAE over packed sequences

Each has one implementation per device key (CPU, CUDA). It asks :func:`ppo_fast.dispatch.resolve`
which backend serves the call and runs that backend's function of the same role; a fake kernel
gives shapes to tracers; the autograd formula is registered once, for every backend.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import dispatch
from . import reference as spec
from .backends import PPO_OUTPUTS
from .backends.reference import linear_chunk_tokens, linear_chunks
from .options import LossOptions

DEVICE_TYPES = ("cpu", "cuda")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_kernel(name: str, tensor: Tensor):
    return NotImplementedError(f"ppo_fast::{name} runs on {' and '.join(DEVICE_TYPES)} tensors, "
                               f"not {tensor.device.type}")


def _implement(schema_op, op: str, entry, drop_last: bool = False) -> None:
    """Register, for each device type, the function that resolves ``op``'s backend and calls its
    ``entry`` (a function name, or a callable given the backend module and the op's arguments).
    ``drop_last``: the schema's last argument is for the autograd formula only."""
    for device_type in DEVICE_TYPES:
        def implementation(*args, device_type=device_type):
            impl = dispatch.resolve(op, device_type).impl
            if callable(entry):
                return entry(impl, *args)
            return getattr(impl, entry)(*(args[:-1] if drop_last else args))

        schema_op.register_kernel(device_type)(implementation)


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ppo_fast::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, labels: Tensor, inv_temp: float, ignore_index: int,
                      with_entropy: bool, inplace_backward: bool,
                      with_sum_pi_squared: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse, sum_pi_squared)``, each ``[...]`` float32 (float64 for float64
    logits); ``entropy`` is zeros without ``with_entropy``, ``sum_pi_squared`` is empty (shape
    ``[0]``) without ``with_sum_pi_squared``. Only ``logp`` and ``entropy`` are differentiable:
    ``lse`` and ``sum_pi_squared`` come back with ``requires_grad=False``."""
    raise _no_kernel("token_logprobs", logits)


@token_logprobs_op.register_fake
def _(logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward,
      with_sum_pi_squared=False):
    lead, dtype = logits.shape[:-1], _out_dtype(logits.dtype)
    return (*(logits.new_empty(lead, dtype=dtype) for _ in range(3)),
            logits.new_empty(lead if with_sum_pi_squared else (0,), dtype=dtype))


def _token_logprobs(impl, logits, labels, inv_temp, ignore_index, with_entropy,
                    inplace_backward, with_sum_pi_squared=False):
    """The op's four outputs from a backend, whose forward gives Σ p² only when asked for
    (``inplace_backward`` is for the autograd formula)."""
    out = impl.token_logprobs_forward(logits, labels, inv_temp, ignore_index, with_entropy,
                                      with_sum_pi_squared)
    if with_sum_pi_squared:
        return out
    return (*out, out[0].new_empty(0))


@torch.library.custom_op("ppo_fast::token_logprobs_backward", mutates_args=("dlogits",))
def token_logprobs_backward_op(dlogits: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                               entropy: Tensor, grad_logp: Tensor, grad_entropy: Optional[Tensor],
                               inv_temp: float, ignore_index: int) -> None:
    raise _no_kernel("token_logprobs_backward", logits)


@token_logprobs_backward_op.register_fake
def _(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index):
    return None


_implement(token_logprobs_op, "token_logprobs", _token_logprobs)
_implement(token_logprobs_backward_op, "token_logprobs", "token_logprobs_backward")


def _dlogits(ctx, logits, labels, lse, entropy, grad_logp, grad_entropy) -> Tensor:
    impl = dispatch.resolve("token_logprobs", logits.device).impl
    if ctx.inplace_backward and impl.writes_in_place(logits):
        dlogits = logits
    else:
        dlogits = impl.empty_dlogits(logits)
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    token_logprobs_backward_op(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                               ctx.inv_temp, ctx.ignore_index)
    return dlogits


def _logprobs_setup(ctx, inputs, output):
    logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward = inputs[:6]
    _, entropy, lse, sum_pi_squared = output
    # Σ p² is a statistic of the old policy, read under no_grad: no backward formula for it. Marked
    # non-differentiable, a gradient cannot reach it silently (it is a constant to autograd).
    ctx.mark_non_differentiable(lse, sum_pi_squared)
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.inv_temp, ctx.ignore_index = inv_temp, ignore_index
    ctx.with_entropy, ctx.inplace_backward = with_entropy, inplace_backward


def _logprobs_backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_sum_pi_squared):
    logits, labels, lse, entropy = ctx.saved_tensors
    dlogits = _dlogits(ctx, logits, labels, lse, entropy, grad_logp,
                       grad_entropy if ctx.with_entropy else None)
    return dlogits, None, None, None, None, None, None


token_logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


# --------------------------------------------------------------------------------------------
# The actor loss per token
# --------------------------------------------------------------------------------------------


class _PPOInputs(NamedTuple):
    logits: Tensor
    labels: Tensor
    old_logp: Tensor
    advantages: Tensor
    ref_logp: Optional[Tensor]
    rollout_logp: Optional[Tensor]
    inv_temp: float
    ignore_index: int
    clip_low: float
    clip_high: float
    dual_clip: Optional[float]
    tis_cap: float
    kl_coef: float
    entropy_coef: float
    kl_estimator: str
    inplace_backward: bool


@torch.library.custom_op("ppo_fast::ppo_loss_tokens", mutates_args=())
def ppo_loss_tokens_op(
    logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor,
    ref_logp: Optional[Tensor], rollout_logp: Optional[Tensor], inv_temp: float,
    ignore_index: int, clip_low: float, clip_high: float, dual_clip: Optional[float],
    tis_cap: float, kl_coef: float, entropy_coef: float, kl_estimator: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token outputs in the order of ``PPO_OUTPUTS``; only ``token_loss`` is differentiable."""
    raise _no_kernel("ppo_loss_tokens", logits)


@ppo_loss_tokens_op.register_fake
def _(logits, *args):
    lead, dtype = logits.shape[:-1], _out_dtype(logits.dtype)
    floats = [logits.new_empty(lead, dtype=dtype) for _ in PPO_OUTPUTS[:-1]]
    return (*floats, logits.new_empty(lead, dtype=torch.int8))


_implement(ppo_loss_tokens_op, "ppo_loss", "ppo_loss_forward", drop_last=True)


def _ppo_setup(ctx, inputs, output):
    args = _PPOInputs(*inputs)
    out = dict(zip(PPO_OUTPUTS, output))
    ctx.save_for_backward(args.logits, args.labels, out["lse"], out["entropy"],
                          out["dloss_dlogp"])
    ctx.inv_temp, ctx.ignore_index = args.inv_temp, args.ignore_index
    ctx.entropy_coef, ctx.inplace_backward = args.entropy_coef, args.inplace_backward


def _ppo_backward(ctx, grad_token_loss, *_grads_of_metrics):
    logits, labels, lse, entropy, dloss_dlogp = ctx.saved_tensors
    if grad_token_loss is None:
        grad_token_loss = torch.zeros_like(lse)
    grad_entropy = grad_token_loss * -ctx.entropy_coef if ctx.entropy_coef != 0 else None
    dlogits = _dlogits(ctx, logits, labels, lse, entropy, grad_token_loss * dloss_dlogp,
                       grad_entropy)
    return (dlogits,) + (None,) * (len(_PPOInputs._fields) - 1)


ppo_loss_tokens_op.register_autograd(_ppo_backward, setup_context=_ppo_setup)


def ppo_token_terms(logits, labels, old_logp, advantages, ref_logp, rollout_logp,
                    opts: LossOptions, inplace_backward: bool) -> spec.TokenTerms:
    """The actor loss per token from logits, by whichever backend serves the device. Labels equal
    to ``ignore_index`` are skipped (their rows are never read on CUDA)."""
    dtype = _out_dtype(logits.dtype)

    def data(t):
        return None if t is None else t.detach().to(dtype)

    out = dict(zip(PPO_OUTPUTS, ppo_loss_tokens_op(
        logits, labels, data(old_logp), data(advantages), data(ref_logp), data(rollout_logp),
        1.0 / float(opts.temperature), int(opts.ignore_index), float(opts.clip_low),
        float(opts.clip_high), None if opts.dual_clip is None else float(opts.dual_clip),
        float(opts.tis_cap), float(opts.kl_coef if ref_logp is not None else 0.0),
        float(opts.entropy_coef), opts.kl_estimator, bool(inplace_backward))))
    flags = out["flags"]
    return spec.TokenTerms(loss=out["token_loss"], pg=out["pg"], kl=out["kl"],
                           entropy=out["entropy"], log_ratio=out["log_ratio"],
                           clipped=(flags & 1) != 0, clipped_lower=(flags & 2) != 0)


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ppo_fast::gae", mutates_args=())
def gae_op(rewards: Tensor, values: Tensor, mask: Tensor, cu_seqlens: Tensor, gamma: float,
           lam: float) -> tuple[Tensor, Tensor]:
    raise _no_kernel("gae", rewards)


@gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam):
    dtype = spec.compute_dtype(rewards, values)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


_implement(gae_op, "gae", "gae_forward")


# --------------------------------------------------------------------------------------------
# The fused linear head: log-probs and entropy from hidden states and the lm_head weight
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ppo_fast::linear_logprobs", mutates_args=())
def linear_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                       inv_temp: float, ignore_index: int, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` ``[N]`` of ``logits = hidden @ weight.T + bias`` (never stored):
    hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]``, labels ``[N]``. float32 out (float64 for
    float64 inputs); ``lse`` is for the backward and not differentiable."""
    raise _no_kernel("linear_logprobs", hidden)


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy):
    dtype = _out_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=dtype) for _ in range(3))


_implement(linear_logprobs_op, "linear_logprobs", "linear_logprobs_forward")


@torch.library.custom_op("ppo_fast::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                                grad_entropy: Optional[Tensor], inv_temp: float,
                                ignore_index: int, need_hidden: bool, need_weight: bool,
                                need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dhidden, dweight, dbias)``, each empty where not needed (a frozen head: no dweight, no
    float32 accumulator, no GEMM for it), the logits recomputed chunk by chunk: per chunk one GEMM
    for the logits, the row kernel for dlogits (written over the chunk's logits where the backend
    can), one GEMM each for dhidden and dweight. dweight (and dbias) accumulate over the chunks in
    float32 (float64 for float64), rounded once at the end."""
    raise _no_kernel("linear_logprobs_backward", hidden)


@linear_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, need_hidden,
      need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            weight.new_empty(weight.shape[:1] if need_bias else (0,)))


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with the products summed in ``acc``'s dtype: in place where the operands
    have it, by the GEMM's own output dtype on CUDA, else on operands cast up (a chunk's worth)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _linear_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, inv_temp,
                     ignore_index, need_hidden, need_weight, need_bias):
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dhidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    dweight = torch.zeros(weight.shape if need_weight else (0,), dtype=acc_dtype, device=weight.device)
    dbias = torch.zeros(weight.shape[:1] if need_bias else (0,), dtype=acc_dtype, device=weight.device)
    chunk = linear_chunk_tokens(weight.shape[0], hidden.dtype)
    impl = dispatch.resolve("token_logprobs", hidden.device).impl

    for start, stop, h, lab, lse_c, entropy_c, grad_logp_c, grad_entropy_c in linear_chunks(
            hidden, labels, ignore_index, chunk, lse, entropy, grad_logp, grad_entropy):
        logits = torch.nn.functional.linear(h, weight, bias)
        dlogits = logits if impl.writes_in_place(logits) else impl.empty_dlogits(logits)
        token_logprobs_backward_op(dlogits, logits, lab, lse_c, entropy_c, grad_logp_c, grad_entropy_c, inv_temp,
                                   ignore_index)
        if need_hidden:
            dhidden[start:stop] = (dlogits @ weight)[: stop - start]
        if need_weight:
            _accumulate_mm(dweight, dlogits.t(), h)
        if need_bias:
            dbias += dlogits.sum(0, dtype=acc_dtype)
    return dhidden, dweight.to(weight.dtype), dbias.to(weight.dtype)


for _device_type in DEVICE_TYPES:
    linear_logprobs_backward_op.register_kernel(_device_type)(_linear_backward)


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.inv_temp, ctx.ignore_index, ctx.with_entropy = inv_temp, ignore_index, with_entropy


def _linear_backward_formula(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    dhidden, dweight, dbias = linear_logprobs_backward_op(
        hidden, weight, bias, labels, lse, entropy, grad_logp,
        grad_entropy if ctx.with_entropy else None, ctx.inv_temp, ctx.ignore_index, need_hidden, need_weight,
        need_bias)
    return (dhidden if need_hidden else None, dweight if need_weight else None, dbias if need_bias else None,
            None, None, None, None)


linear_logprobs_op.register_autograd(_linear_backward_formula, setup_context=_linear_setup)
