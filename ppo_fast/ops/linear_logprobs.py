"""``ppo_fast::linear_logprobs``: log-probs and entropy from hidden states and the lm_head weight,
``logits = hidden @ weight.T + bias`` never stored, and its backward
``ppo_fast::linear_logprobs_backward``.

Read top to bottom: the token chunking, the schema and fake kernels, the backward (chunked GEMMs
around each backend's dlogits), the autograd formula, the implementations (reference PyTorch,
Triton, native C++) and their table, then the gradients computed in the forward for a loss that
sums over tokens (:func:`linear_logprobs_with_gradients`, three GEMMs per chunk where the op and
its backward take four). Each backend has the three functions of :class:`HeadOps`:

    forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared)
        -> (logp, entropy, lse, sum_pi_squared)
    chunk_dlogits(h, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index)
        -> ∂loss/∂logits [T, V] of a chunk of T tokens, in hidden's dtype
    tile_dlogits(h, weight_part, bias_part, first, vocab, labels, lse, entropy, grad_logp, grad_entropy,
                 inv_temp, ignore_index, dtype)
        -> the same over the vocabulary entries first .. first + E − 1 only, [T, E] in dtype

The reference and native backends compute the logits with a GEMM and run their row backward over
them; Triton's one kernel recomputes the logits tile by tile as its forward did and writes only
dlogits (:func:`ppo_fast.kernels.linear_logprobs.plan_linear_logprobs_dlogits`).
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import arguments as check
from .. import dispatch, objectives, spec
from .full_kl import check_kl_finite, full_kl_backward_op, full_kl_op
from .ppo_loss import token_terms_from_logprobs, with_full_kl
from .token_logprobs import DEVICE_TYPES, native_forward, no_kernel, out_dtype, reference_forward, row_ops_for
from .token_logprobs import refuse_second_backward, token_logprobs_backward_op

FUSED_LOSS = "pf.fused_linear_ppo_loss"

# --------------------------------------------------------------------------------------------
# Chunks of tokens: the forward off CUDA and every backward compute the logits chunk by chunk
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
    label is ignored are skipped (their outputs and gradients are 0), except while
    ``torch.compile`` traces, which cannot branch on the labels' values."""
    n = hidden.shape[0]
    tracing = torch.compiler.is_compiling()
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        labels_chunk = labels[start:stop]
        active = labels_chunk != ignore_index
        if not tracing and not bool(active.any()):
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
                       inv_temp: float, ignore_index: int, with_entropy: bool,
                       with_sum_pi_squared: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse, sum_pi_squared)`` ``[N]`` of ``logits = hidden @ weight.T + bias``
    (never stored): hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]``, labels ``[N]``. float32 out
    (float64 for float64 inputs); entropy and Σ p² are 0 where not asked for; ``lse`` (for the
    backward) and Σ p² are not differentiable."""
    raise no_kernel("linear_logprobs", hidden)


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared):
    dtype = out_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=dtype) for _ in range(4))


def _forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared):
    forward = dispatch.implementation("linear_logprobs", hidden.device).forward
    return forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared)


for _device_type in DEVICE_TYPES:
    linear_logprobs_op.register_kernel(_device_type)(_forward)


@torch.library.custom_op("ppo_fast::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                                grad_entropy: Optional[Tensor], inv_temp: float,
                                ignore_index: int, need_hidden: bool, need_weight: bool,
                                need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dhidden, dweight, dbias)``, each empty where not needed (a frozen head: no dweight, no
    float32 accumulator, no GEMM for it), the logits recomputed chunk by chunk: per chunk the
    backend's ``chunk_dlogits`` (a GEMM for the logits and the row backward over them, or Triton's
    one kernel), then one GEMM each for dhidden and dweight. dweight (and dbias) accumulate over the chunks in
    float32 (float64 for float64), rounded once at the end; for 16-bit weights and fewer tokens
    than vocabulary entries the vocabulary is the outer loop instead (:func:`vocabulary_outer`)."""
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
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Gradients:
    """dhidden, dweight and dbias summed chunk by chunk, each allocated only where needed: dweight
    and dbias accumulate in float32 (float64 for float64), rounded to the weight's dtype once, by
    :meth:`result`."""

    def __init__(self, hidden, weight, need_hidden, need_weight, need_bias):
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.need = need_hidden, need_weight, need_bias
        self.weight = weight
        self.dhidden = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
        self.dweight = torch.zeros(weight.shape if need_weight else (0,), dtype=acc_dtype, device=weight.device)
        self.dbias = torch.zeros(weight.shape[:1] if need_bias else (0,), dtype=acc_dtype, device=weight.device)

    def add_chunk(self, start: int, stop: int, dlogits: Tensor, h: Tensor) -> None:
        """One chunk's share from its ``dlogits [chunk, V]`` and hidden states ``h [chunk, H]``:
        one GEMM for dhidden, one for dweight."""
        need_hidden, need_weight, need_bias = self.need
        if need_hidden:
            self.dhidden[start:stop] = (dlogits @ self.weight)[: stop - start]
        if need_weight:
            _accumulate_mm(self.dweight, dlogits.t(), h)
        if need_bias:
            self.dbias += dlogits.sum(0, dtype=self.dbias.dtype)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        dtype = self.weight.dtype
        return self.dhidden, self.dweight.to(dtype), self.dbias.to(dtype)


def vocabulary_outer(n_tokens: int, weight: Tensor, need_weight: bool) -> bool:
    """Whether the backward goes through the vocabulary in the outer loop
    (:func:`_backward_vocabulary_outer`): for 16-bit weights whose gradient is wanted, when the
    float32 accumulator it needs for dhidden (``N × H``) is smaller than the one the token-outer
    order needs for dweight (``V × H``), i.e. fewer tokens than vocabulary entries."""
    return need_weight and weight.dtype in (torch.bfloat16, torch.float16) and n_tokens < weight.shape[0]


TILE_BYTES = 16 * 2**20
"""Bytes of the largest float32 buffer of one tile in the vocabulary-outer backward: a
``[tokens, entries]`` tile, a ``[tokens, H]`` product, a vocabulary chunk's ``[entries, H]``
dweight accumulator."""


def vocabulary_tile(vocab: int, hidden_size: int) -> tuple[int, int]:
    """``(tokens, entries)`` of a tile in the vocabulary-outer backward, from V and H only (the last
    token tile padded to it, so every GEMM has one shape whatever the batch): entries a power of
    two in [16, 4096] (at most V) whose ``[entries, H]`` float32 accumulator fits
    :data:`TILE_BYTES`, then tokens a power of two in [16, 1024] (the forward's chunks' bound: a
    small batch pays for the padding of one tile) whose float32 ``[tokens, entries]`` and
    ``[tokens, H]`` buffers fit it."""
    def power_of_two_within(budget: int, most: int) -> int:
        return min(most, max(16, 1 << (max(budget, 1).bit_length() - 1)))

    entries = min(power_of_two_within(TILE_BYTES // (4 * hidden_size), 4096), max(vocab, 1))
    return power_of_two_within(TILE_BYTES // (4 * max(entries, hidden_size)), 1024), entries


def _tile_dlogits(z, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, first: int, dtype):
    """∂loss/∂z of a ``[tokens, entries]`` tile of the logits, the entries ``first`` to ``first +
    entries``, in ``dtype``: the row backward of :mod:`ppo_fast.ops.token_logprobs` restricted to
    the tile, from each row's log-sum-exp and entropy (the reference backend's formula; 0 on
    ignored rows). Two float32 tiles live at once."""
    s = z.to(dtype).mul_(inv_temp) if z.dtype != dtype or inv_temp != 1.0 else z.clone()
    p = torch.sub(s, lse.unsqueeze(-1)).exp_()
    g = grad_logp.to(dtype).unsqueeze(-1)
    if grad_entropy is None:
        d = p.mul_(-g)
    else:
        # s − (lse − H) = log p + H, in place of s; the floor keeps 0·(−inf) from giving NaN.
        centred = s.sub_(lse.unsqueeze(-1)).add_(entropy.to(dtype).unsqueeze(-1)).clamp_(min=torch.finfo(dtype).min)
        entropy_term = centred.mul_(p).mul_(grad_entropy.to(dtype).unsqueeze(-1))
        d = p.mul_(-g).sub_(entropy_term)
    del s
    active = labels != ignore_index
    column = labels - first
    here = active & (column >= 0) & (column < z.shape[1])
    d.scatter_add_(-1, torch.where(here, column, 0).unsqueeze(-1), torch.where(here.unsqueeze(-1), g, 0.0))
    if inv_temp != 1.0:
        d.mul_(inv_temp)
    return d.masked_fill_(~active.unsqueeze(-1), 0.0)


def _backward_vocabulary_outer(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, inv_temp,
                               ignore_index, need_hidden, need_bias):
    """The log-probs' backward with the vocabulary in the outer loop (:func:`vocabulary_outer_grads`),
    each tile's dlogits from each row's log-sum-exp and entropy (the backend's ``tile_dlogits``), in
    the dtype the GEMMs after it take."""
    head = dispatch.implementation("linear_logprobs", hidden.device)

    def tile_dlogits(h, part, dtype, lab, lse_c, entropy_c, grad_logp_c, grad_entropy_c):
        return head.tile_dlogits(h, weight[part], None if bias is None else bias[part], part.start, weight.shape[0],
                                 lab, lse_c, entropy_c, grad_logp_c, grad_entropy_c, inv_temp, ignore_index, dtype)

    return vocabulary_outer_grads(hidden, weight, bias, labels, ignore_index, need_hidden, need_bias,
                                  (lse, entropy, grad_logp, grad_entropy), tile_dlogits)


def vocabulary_outer_grads(hidden, weight, bias, labels, ignore_index, need_hidden, need_bias, per_token,
                           tile_dlogits):
    """``(dhidden, dweight, dbias)`` of a loss over the logits ``hidden @ weight.T + bias`` with the
    vocabulary in the outer loop, for 16-bit weights: each chunk of the vocabulary gets its float32
    dweight (and dbias) accumulator, summed over every tile of tokens and rounded into the weight's
    gradient once; dhidden sums over the vocabulary chunks in one float32 ``N × H`` accumulator,
    rounded once at the end into its own storage. No ``V × H`` float32 buffer: the extra memory is
    ``N × H × 2`` bytes (the accumulator beyond the gradient it becomes) plus one chunk's
    accumulator and tiles (:func:`vocabulary_tile`). Per tile:
    ``tile_dlogits(h, part, dtype, labels_tile, *per_token_tiles)`` (``h``: the tile's hidden
    states; ``part``: the tile's slice of the vocabulary; ``per_token``: ``[N, ...]`` tensors or
    None, tiled as the tokens) gives its ∂loss/∂z in ``dtype``, 0 on ignored rows, computing the
    tile's logits itself; then one GEMM each for dhidden and dweight."""
    dtype, vocab = spec.compute_dtype(hidden), weight.shape[0]
    tokens, entries = vocabulary_tile(vocab, hidden.shape[1])
    dhidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
    dweight = torch.empty_like(weight)
    dbias = torch.empty(vocab if need_bias else 0, dtype=weight.dtype, device=weight.device)
    for first in range(0, vocab, entries):
        part = slice(first, min(first + entries, vocab))
        w = weight[part]
        # On CUDA the GEMMs take dlogits in the weight's dtype and sum in float32 (as the
        # token-outer path does); the CPU's GEMM sums in float32 on float32 operands only, so there
        # dlogits stay float32 and the chunk of the weight is cast once, not per tile.
        w_for_dhidden, dz_dtype = (w, weight.dtype) if w.is_cuda else (w.to(dtype), dtype)
        dweight_acc = torch.zeros(w.shape, dtype=dtype, device=w.device)
        dbias_acc = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if need_bias else None
        for start, stop, h, lab, *tiles in linear_chunks(hidden, labels, ignore_index, tokens, *per_token):
            dz = tile_dlogits(h, part, dz_dtype, lab, *tiles)
            if need_hidden:
                # The whole padded tile, as the token-outer order does: the GEMM's shape, so a
                # token's bits, do not depend on how many tokens the last tile holds.
                product = (torch.mm(dz, w_for_dhidden, out_dtype=dtype) if dz.dtype != dtype
                           else dz @ w_for_dhidden)
                dhidden[start:stop] += product[: stop - start]
                del product
            _accumulate_mm(dweight_acc, dz.t(), h)
            if need_bias:
                dbias_acc += dz.sum(0, dtype=dtype)
            del dz
        dweight[part] = dweight_acc
        if need_bias:
            dbias[part] = dbias_acc
    return (_rounded_in_place(dhidden, hidden.dtype) if need_hidden else hidden.new_empty(0)), dweight, dbias


def _rounded_in_place(acc: Tensor, dtype: torch.dtype, block_bytes: int = TILE_BYTES) -> Tensor:
    """A float32 ``[N, H]`` accumulator rounded to the 16-bit ``dtype`` into the first half of its
    own storage, so the result needs no second ``N × H`` buffer (its storage keeps the accumulator's
    size while it lives). Block by block in row order: each block is read whole before its rounded
    bytes are written, below the rows not read yet."""
    n, h = acc.shape
    halves = acc.view(-1).view(dtype)
    rows = max(block_bytes // (4 * h), 1)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        halves[start * h: stop * h] = acc[start:stop].to(dtype).view(-1)
    return halves[: n * h].view(n, h)


def _backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, inv_temp,
              ignore_index, need_hidden, need_weight, need_bias):
    if vocabulary_outer(hidden.shape[0], weight, need_weight):
        return _backward_vocabulary_outer(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy,
                                          inv_temp, ignore_index, need_hidden, need_bias)
    grads = _Gradients(hidden, weight, need_hidden, need_weight, need_bias)
    chunk = linear_chunk_tokens(weight.shape[0], hidden.dtype)
    head = dispatch.implementation("linear_logprobs", hidden.device)
    for start, stop, h, *per_token in linear_chunks(hidden, labels, ignore_index, chunk, lse, entropy, grad_logp,
                                                    grad_entropy):
        dlogits = head.chunk_dlogits(h, weight, bias, *per_token, inv_temp, ignore_index)
        grads.add_chunk(start, stop, dlogits, h)
        del dlogits  # freed before the next chunk's: one chunk's logits live, not two
    return grads.result()


for _device_type in DEVICE_TYPES:
    linear_logprobs_backward_op.register_kernel(_device_type)(_backward)


def _setup(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy, _with_sum_pi_squared = inputs
    _, entropy, lse, sum_pi_squared = output
    ctx.mark_non_differentiable(lse, sum_pi_squared)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.inv_temp, ctx.ignore_index, ctx.with_entropy = inv_temp, ignore_index, with_entropy


def _autograd_backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_sum_pi_squared):
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
            None, None, None, None, None)


linear_logprobs_op.register_autograd(_autograd_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


class HeadOps(NamedTuple):
    forward: Callable
    chunk_dlogits: Callable
    tile_dlogits: Callable


def chunked_forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared, *,
                    row_forward):
    """``(logp, entropy, lse, sum_pi_squared)`` chunk by chunk: each chunk's logits (one GEMM, in
    the inputs' dtype, as ``hidden @ weight.T + bias`` would give them) go through ``row_forward``
    (a backend's row op) and are freed; the peak extra memory is one chunk's."""
    n = hidden.shape[0]
    outputs = [torch.zeros(n, dtype=spec.compute_dtype(hidden), device=hidden.device) for _ in range(4)]
    chunk = linear_chunk_tokens(weight.shape[0], hidden.dtype)
    for start, stop, h, lab in linear_chunks(hidden, labels, ignore_index, chunk):
        logits = torch.nn.functional.linear(h, weight, bias)
        outs = row_forward(logits, lab, inv_temp, ignore_index, with_entropy, with_sum_pi_squared)
        for out, value in zip(outputs, outs):
            out[start:stop] = value[: stop - start]
        del logits  # freed before the next chunk's GEMM: one chunk's logits live, not two
    return tuple(outputs)


def _unit_columns(matrix: Tensor) -> Tensor:
    """The kernels read rows with unit column stride; any row stride serves."""
    return matrix if matrix.stride(-1) == 1 else matrix.contiguous()


def _contiguous(vector: Optional[Tensor]) -> Optional[Tensor]:
    return None if vector is None else vector.contiguous()


def triton_forward(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared):
    """``(logp, entropy, lse, sum_pi_squared)`` of ``hidden @ weight.T + bias`` tile by tile: no
    logits in memory (kernels/linear_logprobs.py)."""
    from ..kernels import linear_logprobs as kernels
    from ..kernels.launch import accumulator

    dtype, n = out_dtype(hidden.dtype), hidden.shape[0]
    logp, entropy, lse = (torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(3))
    sum_pi_squared = (torch.empty if with_sum_pi_squared else torch.zeros)(n, dtype=dtype, device=hidden.device)
    kernels.linear_logprobs_fwd(
        _unit_columns(hidden), _unit_columns(weight), _contiguous(bias), labels.contiguous(), logp, entropy, lse,
        _scalars(inv_temp, hidden.dtype, hidden.device), ignore_index, with_entropy,
        accumulator(hidden.dtype), sum_pi_squared if with_sum_pi_squared else None)
    return logp, entropy, lse, sum_pi_squared


def gemm_chunk_dlogits(h, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index):
    """A chunk's logits by one GEMM, then the row backward of the backend serving them, written
    over the logits where it can."""
    logits = torch.nn.functional.linear(h, weight, bias)
    row_ops = row_ops_for(h.device)
    dlogits = logits if row_ops.writes_in_place(logits) else row_ops.empty_dlogits(logits)
    token_logprobs_backward_op(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index)
    return dlogits


def gemm_tile_dlogits(h, weight, bias, first, vocab, labels, lse, entropy, grad_logp, grad_entropy, inv_temp,
                      ignore_index, dtype):
    """A tile's logits by one GEMM, then :func:`_tile_dlogits` in the compute dtype."""
    z = torch.nn.functional.linear(h, weight, bias)
    return _tile_dlogits(z, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, first,
                         spec.compute_dtype(h)).to(dtype)


def triton_tile_dlogits(h, weight, bias, first, vocab, labels, lse, entropy, grad_logp, grad_entropy, inv_temp,
                        ignore_index, dtype):
    """One kernel: each tile's logits computed as :func:`triton_forward` computed them, and dlogits
    from them, never the logits in memory."""
    from ..kernels import linear_logprobs as kernels
    from ..kernels.launch import accumulator

    dlogits = torch.empty(h.shape[0], weight.shape[0], dtype=dtype, device=h.device)
    kernels.linear_logprobs_dlogits(
        _unit_columns(h), _unit_columns(weight), _contiguous(bias), first, vocab, labels.contiguous(),
        lse.contiguous(), entropy.contiguous(), grad_logp.contiguous(), _contiguous(grad_entropy),
        _scalars(inv_temp, h.dtype, h.device), ignore_index, dlogits, accumulator(h.dtype))
    return dlogits


@lru_cache(maxsize=8)
def _scalars(inv_temp: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[1/temperature]`` on the device, made once per value rather than per launch: each copy from
    the host waits for the device (about 1,200 tiles in one backward at a 152k vocabulary)."""
    from ..kernels.launch import coefficients

    return coefficients([inv_temp], dtype, device)


def triton_chunk_dlogits(h, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index):
    return triton_tile_dlogits(h, weight, bias, 0, weight.shape[0], labels, lse, entropy, grad_logp, grad_entropy,
                               inv_temp, ignore_index, h.dtype)


IMPLEMENTATIONS = dispatch.register("linear_logprobs", {
    "reference": HeadOps(partial(chunked_forward, row_forward=reference_forward), gemm_chunk_dlogits,
                         gemm_tile_dlogits),
    "triton": HeadOps(triton_forward, triton_chunk_dlogits, triton_tile_dlogits),
    "native": HeadOps(partial(chunked_forward, row_forward=native_forward), gemm_chunk_dlogits,
                      gemm_tile_dlogits),
})


# --------------------------------------------------------------------------------------------
# Gradients in the forward: a scalar loss that sums over tokens (three GEMMs per chunk, not four)
# --------------------------------------------------------------------------------------------
#
# The op above leaves the logits nowhere, so its backward computes them again: per chunk one GEMM
# forward, then three backward (logits again, dhidden, dweight). A loss Σ_i ℓ_i(logp_i, entropy_i)
# whose token terms each depend on their own token alone (given the data) knows each token's
# ∂loss/∂logp and ∂loss/∂entropy as soon as its chunk's log-probs are out, so the forward can carry
# on while the chunk's logits are live: dlogits over them, then the dhidden and dweight GEMMs. The
# backward is left only to scale by the incoming gradient, a scalar (the chain rule through a
# scalar). The price: dhidden and dweight (the weight's size, in its dtype) live from the forward to
# the backward instead of being made in the backward.


class ReferenceHead(NamedTuple):
    """The reference model's head for the full KL in :func:`linear_logprobs_with_gradients`."""

    hidden: Tensor  # [N, H_ref]
    weight: Tensor  # [V, H_ref], hidden's dtype
    bias: Optional[Tensor]  # [V] or None
    kl_weights: Optional[Tensor]  # [N]: ∂loss/∂KL_t, in the policy's compute dtype; None: no gradient


def _into(out: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``h @ weight.T + bias`` written into ``out`` (a chunk's reused buffer)."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def linear_logprobs_with_gradients(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                   inv_temp: float, ignore_index: int, chunk_loss,
                                   need_hidden: bool, need_weight: bool, need_bias: bool,
                                   reference: Optional[ReferenceHead] = None):
    """``(logp, entropy, kl, (dhidden, dweight, dbias))`` of the logits ``hidden @ weight.T + bias``
    (hidden ``[N, H]``, labels ``[N]``), where the gradients are those of the loss
    ``Σ_chunks chunk_loss(start, stop, logp[start:stop], entropy[start:stop])`` (each call a
    0-d tensor differentiable in the two ``[stop - start]`` tensors it is given, which must not
    depend on any other token), each ``[0]``-shaped where not needed. Per chunk: one GEMM for the
    logits, the row forward, ``chunk_loss``'s gradient by autograd on the chunk's tokens, the row
    backward (over the logits where the backend can), one GEMM each for dhidden and dweight. The
    values (logp, entropy) are bitwise those of :func:`chunked_forward` with the same backend's
    row op; nothing here is recorded by autograd.

    With a ``reference`` head the loss also has ``Σ_t kl_weights_t · KL_t``, the full KL to it
    (``kl`` ``[N]``; None without one): per chunk one more GEMM for the reference's logits, and
    the full-KL op over the two in place of the row op (:func:`ppo_fast.ops.full_kl.full_kl_op`:
    the same log-prob and entropy from one pass over both, and one backward for the gradients of
    all three while both are live): four GEMMs per chunk for the whole loss, where computing the
    KL apart takes six more."""
    n = hidden.shape[0]
    logp, entropy = (torch.zeros(n, dtype=out_dtype(hidden.dtype), device=hidden.device) for _ in range(2))
    kl = None if reference is None else torch.zeros_like(logp)
    hidden, weight, bias = (None if t is None else t.detach() for t in (hidden, weight, bias))
    grads = _Gradients(hidden, weight, need_hidden, need_weight, need_bias)
    chunk = linear_chunk_tokens(weight.shape[0], hidden.dtype)
    # The head's backend, from its own table, serves its rows with that backend's row op.
    row_ops = dispatch.TABLE["token_logprobs"][dispatch.choose("linear_logprobs", hidden.device)]
    per_token = () if reference is None else (reference.hidden.detach(), reference.kl_weights)
    # One logits buffer (and one dlogits buffer where the backend cannot write over the logits)
    # serves every chunk: a fresh one per chunk costs its page faults each time on the CPU (0.4 s
    # of 4 at 8192 × 32 000 fp32), and the GEMM writing into it gives the bits F.linear gives. With
    # a reference, its logits get one too.
    logits = dlogits = ref_logits = None
    with torch.no_grad():
        for start, stop, h, lab, *ref_tiles in linear_chunks(hidden, labels, ignore_index, chunk, *per_token):
            if logits is None:
                logits = hidden.new_empty(chunk, weight.shape[0])
                dlogits = logits if row_ops.writes_in_place(logits) else row_ops.empty_dlogits(logits)
                if reference is not None:
                    ref_logits = reference.hidden.new_empty(chunk, weight.shape[0])
            _into(logits, h, weight, bias)
            # The row ops see the chunk's tokens only (a row's numbers do not depend on its
            # neighbours), the GEMMs the padded chunk, whose padding rows of dlogits are zeroed.
            rows = stop - start
            live, lab = logits[:rows], lab[:rows]
            if reference is None:
                logp_c, entropy_c, lse_c = row_ops.forward(live, lab, inv_temp, ignore_index, True)
                grad_logp, grad_entropy = _token_gradients(chunk_loss, start, stop, logp_c, entropy_c)
                token_logprobs_backward_op(dlogits[:rows], live, lab, lse_c, entropy_c, grad_logp, grad_entropy,
                                           inv_temp, ignore_index)
            else:
                logp_c, entropy_c, kl[start:stop] = _chunk_with_full_kl(live, ref_logits, dlogits[:rows], reference,
                                                                        lab, start, stop, ref_tiles, chunk_loss,
                                                                        inv_temp, ignore_index)
            logp[start:stop], entropy[start:stop] = logp_c, entropy_c
            dlogits[rows:].zero_()
            grads.add_chunk(start, stop, dlogits, h)
    return logp, entropy, kl, grads.result()


def _chunk_with_full_kl(live, ref_logits, dlogits, reference, labels, start, stop, ref_tiles, chunk_loss, inv_temp,
                        ignore_index):
    """One chunk's ``(logp, entropy, kl)`` ``[rows]``, the full KL to the reference head, from the
    policy's ``live`` logits and the reference's, computed into ``ref_logits``: one pass of the
    full-KL op over both; then the gradient of ``chunk_loss`` and of ``kl_weights · KL`` into
    ``dlogits`` (which may be ``live``) by its one backward. A KL that is not finite is an error
    naming the token."""
    h_ref, kl_weights = ref_tiles
    rows = live.shape[0]
    _into(ref_logits, h_ref, reference.weight, reference.bias)
    kl, lse, ref_lse, logp, entropy = full_kl_op(live, ref_logits[:rows], labels, inv_temp, ignore_index)
    check_kl_finite(kl, start, "the reference head's logits", lse)
    grad_logp, grad_entropy = _token_gradients(chunk_loss, start, stop, logp, entropy)
    grad_kl = torch.zeros_like(kl) if kl_weights is None else kl_weights[:rows].to(kl.dtype)
    full_kl_backward_op(dlogits, live, ref_logits[:rows], labels, kl, lse, ref_lse, grad_kl, inv_temp, ignore_index,
                        entropy, grad_logp, grad_entropy)
    return logp, entropy, kl


def _token_gradients(chunk_loss, start, stop, logp, entropy):
    """``(∂loss/∂logp, ∂loss/∂entropy)`` of one chunk's tokens; the second None where the loss does
    not read the entropy."""
    with torch.enable_grad():
        logp, entropy = logp.detach().requires_grad_(), entropy.detach().requires_grad_()
        loss = chunk_loss(start, stop, logp, entropy)
        grad_logp, grad_entropy = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return torch.zeros_like(logp) if grad_logp is None else grad_logp, grad_entropy


def _graph_kept() -> bool:
    """Whether the backward running now keeps the graph (``retain_graph`` or ``create_graph``), so
    what a node saved must survive its call. A private torch function (AOTAutograd asks it the same
    question); where it is missing, the answer is yes, which costs a copy and is always right."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if kept is None else bool(kept())


class LossWithGradients(torch.autograd.Function):
    """``apply(value, hidden, weight, bias, dhidden, dweight, dbias)``: a 0-d loss whose gradients
    with respect to ``hidden``, ``weight`` and ``bias`` were computed with it; the backward scales
    them by the incoming gradient. They are scaled in place and handed to autograd when the graph
    is not kept (no copy: a leaf's ``.grad`` becomes the buffer itself), copied when it is, so a
    second backward with ``retain_graph=True`` gets the same gradients. Not twice differentiable:
    under ``create_graph=True`` the gradients come back differentiable, and differentiating them
    is an error (:func:`refuse_second_backward`), never a silent zero."""

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, dhidden, dweight, dbias):
        ctx.save_for_backward(hidden, weight, bias, dhidden, dweight, dbias)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, *saved = ctx.saved_tensors
        with torch.no_grad():
            scaled = [t * grad for t in saved] if _graph_kept() else [t.mul_(grad) for t in saved]
        scaled = [refuse_second_backward(t, FUSED_LOSS, hidden, weight, bias) for t in scaled]
        return (None, *(g if need else None for g, need in zip(scaled, ctx.needs_input_grad[1:4])),
                None, None, None)


# --------------------------------------------------------------------------------------------
# The full KL between two heads (kl_estimator="full", ppo_fast.ops.full_kl), chunk by chunk
# --------------------------------------------------------------------------------------------


class _FullKLFromHeads(torch.autograd.Function):
    """Forward: the KL and each row's two log-sum-exps; per chunk the two heads' logits (two GEMMs)
    and the full-KL op over them (:func:`ppo_fast.ops.full_kl.full_kl_op`: native C++ on the CPU),
    or where the heads run on Triton one kernel over all tokens
    (:func:`triton_full_kl_forward`). Backward: ∂KL/∂z, from each row's KL and log-sum-exps, then
    one GEMM each for dhidden and dweight, in chunks of tokens (:class:`_Gradients`), or for 16-bit
    weights and fewer tokens than vocabulary entries per tile of the vocabulary-outer order
    (:func:`vocabulary_outer_grads`); ∂KL/∂z comes from the two GEMMs again and the op's backward
    over their logits, or on Triton from one kernel that recomputes both tiles
    (:func:`triton_full_kl_dlogits`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, inv_temp, ignore_index):
        ctx.triton = _heads_on_triton(hidden, ref_hidden)
        if ctx.triton:
            kl, lse, ref_lse = triton_full_kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels,
                                                      inv_temp, ignore_index)
            check_kl_finite(kl, 0, "the reference head's logits", lse)
        else:
            kl, lse, ref_lse = _chunked_full_kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                                        labels, inv_temp, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, kl, lse, ref_lse)
        ctx.inv_temp, ctx.ignore_index = inv_temp, ignore_index
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, kl, lse, ref_lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        dtype, inv_temp, ignore_index = spec.compute_dtype(hidden), ctx.inv_temp, ctx.ignore_index
        vocab = weight.shape[0]
        part_of = lambda t, part: None if t is None else t[part]  # noqa: E731

        def triton_dlogits(h, part, dz_dtype, lab, h_ref, g, kl_c, lse_c, ref_lse_c):
            return triton_full_kl_dlogits(h, weight[part], part_of(bias, part), h_ref, ref_weight[part],
                                          part_of(ref_bias, part), vocab, lab, kl_c, lse_c, ref_lse_c, g, inv_temp,
                                          ignore_index, dz_dtype)

        def gemm_dlogits(h, part, dz_dtype, lab, h_ref, g, kl_c, lse_c, ref_lse_c):
            z = torch.nn.functional.linear(h, weight[part], part_of(bias, part))
            r = torch.nn.functional.linear(h_ref, ref_weight[part], part_of(ref_bias, part))
            dz = torch.empty(z.shape, dtype=dz_dtype, device=z.device)
            full_kl_backward_op(dz, z, r, lab, kl_c, lse_c, ref_lse_c, g.to(dtype), inv_temp, ignore_index)
            return dz

        tile_dlogits = triton_dlogits if ctx.triton else gemm_dlogits
        per_token = (ref_hidden, grad_kl, kl, lse, ref_lse)
        if vocabulary_outer(hidden.shape[0], weight, need_weight):
            dhidden, dweight, dbias = vocabulary_outer_grads(hidden, weight, bias, labels, ignore_index, need_hidden,
                                                             need_bias, per_token, tile_dlogits)
        else:
            grads = _Gradients(hidden, weight, need_hidden, need_weight, need_bias)
            # Two float32 chunks of logits live at once on the GEMM path, none on Triton's.
            chunk = linear_chunk_tokens(vocab, hidden.dtype) // (1 if ctx.triton else 2)
            whole = slice(0, vocab)
            for start, stop, h, lab, *tiles in linear_chunks(hidden, labels, ignore_index, chunk, *per_token):
                grads.add_chunk(start, stop, tile_dlogits(h, whole, hidden.dtype, lab, *tiles), h)
            dhidden, dweight, dbias = grads.result()
        grads = (dhidden if need_hidden else None, dweight if need_weight else None, dbias if need_bias else None)
        # create_graph=True: the kernels' gradients are constants to autograd, so a second backward
        # through them is an error, not a silent zero.
        grads = tuple(None if g is None else refuse_second_backward(g, FUSED_LOSS, hidden, weight, bias)
                      for g in grads)
        return (*grads, None, None, None, None, None, None)


def _chunked_full_kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, inv_temp,
                             ignore_index):
    """``(kl, lse, ref_lse)`` ``[N]``: per chunk of tokens the two heads' logits by two GEMMs and
    the full-KL op over them (:func:`ppo_fast.ops.full_kl.full_kl_op`, on its backend)."""
    dtype = spec.compute_dtype(hidden)
    kl, lse, ref_lse = (torch.zeros(labels.shape, dtype=dtype, device=hidden.device) for _ in range(3))
    # Half the head's chunk: two chunks of logits live at once, the policy's and the reference's.
    chunk = max(linear_chunk_tokens(weight.shape[0], hidden.dtype) // 2, 1)
    for start, stop, h, lab, h_ref in linear_chunks(hidden, labels, ignore_index, chunk, ref_hidden):
        z = torch.nn.functional.linear(h, weight, bias)
        r = torch.nn.functional.linear(h_ref, ref_weight, ref_bias)
        rows = stop - start
        kl_chunk, lse_chunk, ref_lse_chunk = (t[:rows] for t in full_kl_op(z, r, lab, inv_temp, ignore_index)[:3])
        del z, r
        check_kl_finite(kl_chunk, start, "the reference head's logits", lse_chunk)
        kl[start:stop], lse[start:stop], ref_lse[start:stop] = kl_chunk, lse_chunk, ref_lse_chunk
    return kl, lse, ref_lse


def _heads_on_triton(hidden: Tensor, ref_hidden: Tensor) -> bool:
    """Whether the full KL between two heads runs the Triton kernels: where the policy's head runs
    on Triton, for two bfloat16 or two float16 heads (the kernels' plans,
    :func:`ppo_fast.kernels.linear_logprobs.full_kl_tile_plan`), in eager mode (``torch.compile``
    traces the GEMM path)."""
    return (not torch.compiler.is_compiling() and hidden.dtype == ref_hidden.dtype
            and hidden.dtype in (torch.bfloat16, torch.float16)
            and dispatch.choose("linear_logprobs", hidden.device) == "triton")


def triton_full_kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, inv_temp, ignore_index):
    """``(kl, lse, ref_lse)`` ``[N]`` of two heads of one dtype in one kernel, tile by tile: no
    logits of either model in memory (:func:`ppo_fast.kernels.linear_logprobs.plan_linear_full_kl_fwd`)."""
    from ..kernels import linear_logprobs as kernels
    from ..kernels.launch import accumulator

    n = hidden.shape[0]
    kl, lse, ref_lse = (torch.empty(n, dtype=out_dtype(hidden.dtype), device=hidden.device) for _ in range(3))
    kernels.linear_full_kl_fwd(
        _unit_columns(hidden), _unit_columns(weight), _contiguous(bias), _unit_columns(ref_hidden),
        _unit_columns(ref_weight), _contiguous(ref_bias), labels.contiguous(), kl, lse, ref_lse,
        _scalars(inv_temp, hidden.dtype, hidden.device), ignore_index, accumulator(hidden.dtype))
    return kl, lse, ref_lse


def triton_full_kl_dlogits(h, weight, bias, h_ref, ref_weight, ref_bias, vocab, labels, kl, lse, ref_lse, grad_kl,
                           inv_temp, ignore_index, dtype):
    """``grad_kl · ∂KL/∂z`` ``[T, E]`` in ``dtype`` over the E vocabulary entries whose rows of the
    two weights (and entries of the biases) are given, in one kernel from the forward's KL and
    log-sum-exps; 0 on ignored rows."""
    from ..kernels import linear_logprobs as kernels
    from ..kernels.launch import accumulator

    dlogits = torch.empty(h.shape[0], weight.shape[0], dtype=dtype, device=h.device)
    kernels.linear_full_kl_dlogits(
        _unit_columns(h), _unit_columns(weight), _contiguous(bias), _unit_columns(h_ref), _unit_columns(ref_weight),
        _contiguous(ref_bias), vocab, labels.contiguous(), kl.contiguous(), lse.contiguous(), ref_lse.contiguous(),
        grad_kl.contiguous(), _scalars(inv_temp, h.dtype, h.device), ignore_index, dlogits, accumulator(h.dtype))
    return dlogits


def full_kl_from_heads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor,
                       ref_weight: Tensor, ref_bias: Optional[Tensor], labels: Tensor, temperature: float,
                       ignore_index: int) -> Tensor:
    """``KL_t`` ``[N]`` between the heads ``hidden @ weight.T + bias`` and ``ref_hidden @
    ref_weight.T + ref_bias`` (hidden ``[N, H]``, ref_hidden ``[N, H_ref]``, weights ``[V, H]`` and
    ``[V, H_ref]``; checked by the caller), neither model's logits stored; 0 where the label is
    ``ignore_index``, whatever those rows hold. Differentiable in hidden, weight and bias (the
    reference is data)."""
    ref = [None if t is None else t.detach() for t in (ref_hidden, ref_weight, ref_bias)]
    return _FullKLFromHeads.apply(hidden, weight, bias, *ref, labels, 1.0 / float(temperature), int(ignore_index))


# --------------------------------------------------------------------------------------------
# The public functions: from hidden states, never the logits
# --------------------------------------------------------------------------------------------


def _linear_logprobs(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, with_sum_pi_squared=False):
    lead = hidden.shape[:-1]
    logp, entropy, _, sum_pi_squared = linear_logprobs_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), 1.0 / float(temperature),
        int(ignore_index), bool(with_entropy), bool(with_sum_pi_squared))
    return logp.view(lead), entropy.view(lead), sum_pi_squared.view(lead)


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_sum_pi_squared: bool = False,
):
    """:func:`token_logprobs` of ``hidden @ weight.T + bias``, without the logits in memory.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 / float64 (the last hidden states).
        weight: ``[V, H]``, hidden's dtype (an ``lm_head.weight``); bias ``[V]`` or None.
        labels: ``[...]`` integer, in ``[0, V)`` or ``ignore_index`` (logp 0, entropy 0, no
            gradient, and the row is not computed).

    Returns ``logp`` ``[...]`` float32 (float64 for float64) when neither extra is asked for,
    else ``(logp, entropy, sum_pi_squared)`` without the ones not asked for, as
    :func:`token_logprobs`: ``return_sum_pi_squared`` gives ``Σ_v π_v²`` per token (forward only,
    in the same pass). Differentiable in hidden, weight and bias. Under ``torch.no_grad`` it is the scoring pass for
    old and reference log-probs. On CUDA one Triton kernel tiles tokens × vocab with the matmul on
    tensor cores and an online log-sum-exp; elsewhere, and in every backward, the logits are
    recomputed chunk by chunk (:func:`ppo_fast.ops.linear_logprobs.linear_chunk_tokens`): the peak extra memory is
    one chunk's logits, plus for bf16/fp16 weights a float32 accumulator, the smaller of ``N × H``
    (the backward goes through the vocabulary in the outer loop, :func:`vocabulary_outer`) and
    ``V × H``. A token's result does not depend on the rest of the batch.
    """
    check.int_option("ignore_index", ignore_index)
    check.check_temperature(temperature)
    for flag, value in (("return_entropy", return_entropy), ("return_sum_pi_squared", return_sum_pi_squared)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be a bool, got {value!r}")
    check.linear_head(hidden, weight, bias)
    labels = check.token_labels("hidden", hidden, weight.shape[0], labels, ignore_index)
    logp, entropy, sum_pi_squared = _linear_logprobs(hidden, weight, bias, labels, temperature, ignore_index,
                                                     return_entropy, return_sum_pi_squared)
    out = (logp,) + ((entropy,) if return_entropy else ()) + ((sum_pi_squared,) if return_sum_pi_squared else ())
    return out if len(out) > 1 else logp


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    loss_type: str = "vanilla",
    loss_params: dict | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str | None = None,
    rollout_logp: torch.Tensor | None = None,
    tis_cap: float = 2.0,
    rollout_is_weights: torch.Tensor | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    dp_size: int = 1,
    horizon: float | None = None,
):
    """:func:`ppo_loss` of the logits ``hidden @ weight.T + bias``, which are never stored; every
    option and ``loss_type`` of :func:`ppo_loss`. hidden ``[..., H]``, weight ``[V, H]``, bias
    ``[V]`` or None, every per-token tensor ``[...]``. Returns ``(loss, metrics)``, the metrics of
    :func:`ppo_loss`; differentiable in hidden, weight and bias. The log-probs and entropy come
    from :func:`fused_linear_token_logprobs` (see there for memory); the objective then runs on
    ``[tokens]``-sized tensors. Where a gradient is wanted and each token's term depends on that
    token alone (every token-level objective but ``clip_cov`` and ``kl_cov``), the gradients of
    hidden, weight and bias are computed in the forward while each chunk's logits are live (three
    GEMMs per chunk, where recomputing the logits in the backward takes four) and kept until the
    backward, which scales them by the incoming gradient; not differentiable twice.

    ``kl_estimator="full"``: the exact KL over the vocabulary to the reference model's head,
    ``ref_hidden @ ref_weight.T + ref_bias`` (ref_hidden ``[..., H_ref]``, ref_weight ``[V, H_ref]``,
    its own dtype), neither model's logits stored. Where the gradients are computed in the forward
    (above), each chunk's reference logits join the policy's (one GEMM more per chunk: four for the
    whole loss) and the full-KL op runs over the two; otherwise both heads' logits are computed,
    used and freed per chunk, forward and backward (:func:`full_kl_from_heads`), and there, on
    CUDA, for two bfloat16 or two float16 heads, Triton kernels compute them tile by tile instead.
    """
    opts = check.actor_options(ref_logp, {"ref_hidden": ref_hidden, "ref_weight": ref_weight},
                               {"ref_bias": ref_bias}, loss_type=loss_type,
                               loss_params=loss_params, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                               agg=agg, tis_cap=tis_cap, num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size,
                               horizon=horizon, kl_coef=kl_coef, kl_estimator=kl_estimator,
                               entropy_coef=entropy_coef, temperature=temperature, ignore_index=ignore_index)
    check.linear_head(hidden, weight, bias)
    if ref_weight is not None:
        check.reference_head(hidden, weight, ref_hidden, ref_weight, ref_bias)
    labels = check.actor_inputs("hidden", hidden, hidden.shape[:-1], "hidden.shape[:-1]", weight.shape[0],
                                labels, old_logp, advantages, mask, ref_logp, rollout_logp,
                                rollout_is_weights, opts)
    valid = labels != ignore_index
    per_token = (old_logp, advantages, ref_logp, rollout_logp, rollout_is_weights)
    reference = None if ref_weight is None else (ref_hidden, ref_weight, ref_bias)
    if _gradients_in_forward(hidden, weight, bias, opts):
        loss, terms = _fused_loss_with_gradients(hidden, weight, bias, labels, valid, per_token, opts, reference)
        return loss, spec.reduce(terms, valid, opts)[1]
    logp, entropy, _ = _linear_logprobs(hidden, weight, bias, labels, opts.temperature, ignore_index, True)
    terms = token_terms_from_logprobs(logp, entropy, valid, *per_token, opts)
    if reference is not None:
        kl = full_kl_from_heads(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias,
                                labels.reshape(-1), opts.temperature, ignore_index).view(labels.shape)
        terms = with_full_kl(terms, kl, opts)
    return spec.reduce(terms, valid, opts)


def _gradients_in_forward(hidden, weight, bias, opts) -> bool:
    """Whether the fused loss computes its gradients in its forward: a gradient is wanted (grad
    mode on, an input that requires one), each token's term depends on its own token alone
    (:func:`ppo_fast.objectives.token_local`), and the call runs eagerly (``torch.compile``
    traces the op and its recomputing backward), unless 16-bit weights take the vocabulary-outer
    backward (:func:`vocabulary_outer`), whose float32 accumulator is the smaller one."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
            and objectives.token_local(opts.loss_type, opts.loss_params)
            and not vocabulary_outer(hidden.numel() // max(hidden.shape[-1], 1), weight, weight.requires_grad))


def _fused_loss_with_gradients(hidden, weight, bias, labels, valid, per_token, opts, reference=None):
    """``(loss, its per-token terms)`` of :func:`fused_linear_ppo_loss` with the gradients of hidden, weight and
    bias computed in the forward, chunk by chunk (three GEMMs per chunk where the op's forward and
    backward take four): the loss is ``Σ_i w_i·term_i(logp_i, entropy_i)`` with the aggregation's
    weights ``w`` fixed by the mask, so a chunk's tokens' share is known when its log-probs are.
    ``reference``: ``(ref_hidden, ref_weight, ref_bias)`` for the full KL, whose term
    ``kl_coef·w_i·KL_i`` joins the loss in the same chunks (one GEMM more per chunk)."""
    lead, valid_flat = valid.shape, valid.reshape(-1)
    old_logp, advantages, ref_logp, rollout_logp, rollout_is_weights = (
        None if t is None else t.detach().reshape(-1) for t in per_token)
    dtype = out_dtype(hidden.dtype)
    weights = spec.agg_weights(valid, opts.agg, num_tokens=opts.num_tokens, num_seqs=opts.num_seqs,
                               dp_size=opts.dp_size, horizon=opts.horizon, dtype=dtype).reshape(-1)

    def chunk_loss(start, stop, logp, entropy):
        part = slice(start, stop)
        at = lambda t: None if t is None else t[part]  # noqa: E731
        terms = spec.ppo_token_terms(logp, old_logp[part], advantages[part], opts, mask=valid_flat[part],
                                     entropy=entropy, ref_logp=at(ref_logp), rollout_logp=at(rollout_logp),
                                     rollout_is_weights=at(rollout_is_weights))
        return spec.aggregate(terms.loss, weights[part], valid_flat[part])

    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if reference is not None:
        ref_hidden, ref_weight, ref_bias = reference
        kl_weights = None if opts.kl_coef == 0 else torch.where(valid_flat, opts.kl_coef * weights, 0.0)
        reference = ReferenceHead(ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias, kl_weights)
    logp, entropy, kl, (dhidden, dweight, dbias) = linear_logprobs_with_gradients(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), 1.0 / float(opts.temperature),
        int(opts.ignore_index), chunk_loss, *need, reference=reference)
    with torch.no_grad():
        terms = token_terms_from_logprobs(logp.view(lead), entropy.view(lead), valid, *per_token, opts)
        if kl is not None:
            terms = with_full_kl(terms, kl.view(lead), opts)
        loss, _ = spec.reduce(terms, valid, opts)
    dhidden = dhidden.view(hidden.shape) if need[0] else dhidden
    return LossWithGradients.apply(loss, hidden, weight, bias, dhidden, dweight, dbias), terms
