"""``ppo_fast::linear_logprobs``: log-probs and entropy from hidden states and the lm_head weight,
``logits = hidden @ weight.T + bias`` never stored, and its backward
``ppo_fast::linear_logprobs_backward``.

Read top to bottom: the token chunking, the schema and fake kernels, the backward (chunked GEMMs
around the row backward of :mod:`ppo_fast.ops.token_logprobs`, for every backend), the autograd
formula, then the forward implementations (reference PyTorch, Triton, native C++) and their
table. Each forward implementation is

    forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy) -> (logp, entropy, lse)
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch, spec
from .token_logprobs import DEVICE_TYPES, native_forward, no_kernel, out_dtype, reference_forward, row_ops_for
from .token_logprobs import token_logprobs_backward_op

# --------------------------------------------------------------------------------------------
# Chunks of tokens: the forward off CUDA and every backward recompute the logits chunk by chunk
# --------------------------------------------------------------------------------------------

CHUNK_BYTES = 64 * 2**20
"""Bytes of one chunk's logits in the compute dtype, on the chunked path."""


def linear_chunk_tokens(vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk of the chunked path: a power of two in [16, 1024] whose ``[chunk, V]``
    logits in the compute dtype fit :data:`CHUNK_BYTES`. It depends on V and the dtype only, and
    the last chunk is padded to it, so every token's GEMMs have the same shape whatever the batch:
    BLAS picks its kernel by shape (a GEMV for one row), and the same kernel gives the same bits."""
    itemsize = 8 if dtype == torch.float64 else 4
    fit = max(CHUNK_BYTES // max(vocab * itemsize, 1), 1)
    return min(1024, max(16, 1 << (fit.bit_length() - 1)))


def linear_chunks(hidden: Tensor, labels: Tensor, ignore_index: int, chunk: int, *per_token):
    """``(start, stop, hidden_chunk, labels_chunk, *per_token_chunks)`` over the tokens, each chunk
    ``chunk`` rows: the last one padded (hidden and ``per_token`` tensors, ``[N]`` or None, with
    zeros, labels with ``ignore_index``), the rows of ignored labels zeroed; chunks where every
    label is ignored are skipped (their outputs and gradients are 0)."""
    n = hidden.shape[0]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        labels_chunk = labels[start:stop]
        active = labels_chunk != ignore_index
        if not bool(active.any()):
            continue
        # Ignored rows are zeroed, not just skipped by the row op: the weight's gradient sums over
        # every row of the chunk, and 0·NaN would carry a NaN from an ignored hidden state into it.
        pieces = [torch.where(active.unsqueeze(-1), hidden[start:stop], 0.0), labels_chunk,
                  *(None if t is None else t[start:stop] for t in per_token)]
        fills = [0.0, ignore_index] + [0.0] * len(per_token)
        if stop - start < chunk:
            pad = chunk - (stop - start)
            pieces = [None if t is None else torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])
                      for t, fill in zip(pieces, fills)]
        yield (start, stop, *pieces)


# --------------------------------------------------------------------------------------------
# Schema, fake kernels, backward, autograd formula
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ppo_fast::linear_logprobs", mutates_args=())
def linear_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                       inv_temp: float, ignore_index: int, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` ``[N]`` of ``logits = hidden @ weight.T + bias`` (never stored):
    hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]``, labels ``[N]``. float32 out (float64 for
    float64 inputs); ``lse`` is for the backward and not differentiable."""
    raise no_kernel("linear_logprobs", hidden)


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy):
    dtype = out_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=dtype) for _ in range(3))


def _forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy):
    forward = dispatch.implementation("linear_logprobs", hidden.device)
    return forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy)


for _device_type in DEVICE_TYPES:
    linear_logprobs_op.register_kernel(_device_type)(_forward)


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
    raise no_kernel("linear_logprobs_backward", hidden)


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


def _backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, inv_temp,
              ignore_index, need_hidden, need_weight, need_bias):
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dhidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    dweight = torch.zeros(weight.shape if need_weight else (0,), dtype=acc_dtype, device=weight.device)
    dbias = torch.zeros(weight.shape[:1] if need_bias else (0,), dtype=acc_dtype, device=weight.device)
    chunk = linear_chunk_tokens(weight.shape[0], hidden.dtype)
    row_ops = row_ops_for(hidden.device)

    for start, stop, h, lab, lse_c, entropy_c, grad_logp_c, grad_entropy_c in linear_chunks(
            hidden, labels, ignore_index, chunk, lse, entropy, grad_logp, grad_entropy):
        logits = torch.nn.functional.linear(h, weight, bias)
        dlogits = logits if row_ops.writes_in_place(logits) else row_ops.empty_dlogits(logits)
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
    linear_logprobs_backward_op.register_kernel(_device_type)(_backward)


def _setup(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.inv_temp, ctx.ignore_index, ctx.with_entropy = inv_temp, ignore_index, with_entropy


def _autograd_backward(ctx, grad_logp, grad_entropy, _grad_lse):
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


linear_logprobs_op.register_autograd(_autograd_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# Forward implementations
# --------------------------------------------------------------------------------------------


def chunked_forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy, *, row_forward):
    """``(logp, entropy, lse)`` chunk by chunk: each chunk's logits (one GEMM, in the inputs'
    dtype, as ``hidden @ weight.T + bias`` would give them) go through ``row_forward`` (a
    backend's row op) and are freed; the peak extra memory is one chunk's."""
    n = hidden.shape[0]
    logp, entropy, lse = (torch.zeros(n, dtype=spec.compute_dtype(hidden), device=hidden.device)
                          for _ in range(3))
    chunk = linear_chunk_tokens(weight.shape[0], hidden.dtype)
    for start, stop, h, lab in linear_chunks(hidden, labels, ignore_index, chunk):
        logits = torch.nn.functional.linear(h, weight, bias)
        outs = row_forward(logits, lab, inv_temp, ignore_index, with_entropy)
        for out, value in zip((logp, entropy, lse), outs):
            out[start:stop] = value[: stop - start]
    return logp, entropy, lse


def triton_forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy):
    """``(logp, entropy, lse)`` of ``hidden @ weight.T + bias`` tile by tile: no logits in memory
    (kernels/linear_logprobs.py)."""
    from ..kernels import linear_logprobs as kernels
    from ..kernels.launch import accumulator, coefficients

    dtype, n = out_dtype(hidden.dtype), hidden.shape[0]
    logp, entropy, lse = (torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(3))
    kernels.linear_logprobs_fwd(
        hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
        weight if weight.stride(-1) == 1 else weight.contiguous(),
        None if bias is None else bias.contiguous(), labels.contiguous(), logp, entropy, lse,
        coefficients([inv_temp], hidden.dtype, hidden.device), ignore_index, with_entropy,
        accumulator(hidden.dtype))
    return logp, entropy, lse


IMPLEMENTATIONS = dispatch.register("linear_logprobs", {
    "reference": partial(chunked_forward, row_forward=reference_forward),
    "triton": triton_forward,
    "native": partial(chunked_forward, row_forward=native_forward),
})
