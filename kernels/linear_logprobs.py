"""Token log-probabilities, entropy and log-sum-exp straight from hidden states and the lm_head
weight, forward: the [N, V] logits are never written to memory.

For token n with hidden state x (length H), weight W [V, H], optional bias b [V], label y and
temperature τ, a program computes s = (x·Wᵀ + b)/τ one [BLOCK_N, BLOCK_V] tile at a time and
keeps, per token, the online statistics of :mod:`kernels.logprobs`:

    m       = max_v s_v                      (running; the sums are rescaled when it rises)
    d       = Σ_v exp(s_v − m)
    t       = Σ_v exp(s_v − m)·(s_v − m)     (entropy only; moved by the rise of m, as d is rescaled)
    lse     = m + log d
    logp    = s_y − lse                      (s_y picked from the tile that holds y)
    entropy = log d − t/d

A tile's logits are ``tl.dot`` products over H in BLOCK_H chunks, accumulated in float32 (tensor
cores for bf16/fp16, IEEE products for float32 inputs, never TF32) or in float64 for float64
inputs; then the bias is added, the sum rounded once to the inputs' dtype (the logits a GEMM in
that dtype would store) and scaled by 1/τ. H and V need not divide any block: the
H tail loads as 0, the vocabulary tail becomes logit −inf.

Batch invariance. The grid is one program per BLOCK_N consecutive tokens, and the plan (blocks,
warps, stages) is a function of (H, V, dtype) only: a token's logits are the same dot products
in the same order, its statistics the same reductions over the same tiles, whatever batch it is
in and whichever row of its tile it lands in (the rows of a tile never mix). The compiled code
depends on nothing batch-dependent either: the token count and the row strides are not
specialised, no pointer is specialised on its alignment, and 16-byte alignment reaches the
compiler only as ``ALIGNED``, which the launcher decides from base addresses and row strides.

Backward (:func:`plan_linear_logprobs_dlogits`): for upstream gradients g (of logp) and h (of
entropy), one program per [BLOCK_N, BLOCK_V] tile of a range of the vocabulary computes the tile's
logits again with the forward's code and blocks over H (:func:`dlogits_tile_plan`: each logit the
same products summed in the same order) and writes

    ∂/∂z_v = ( g·(1[v = y] − p_v) − h·p_v·(log p_v + entropy) ) / τ,   p_v = exp(s_v − lse)

from the forward's lse and entropy, the row backward of
:mod:`kernels.logprobs` applied in the GEMM's epilogue: the logits never reach memory, only
dlogits do, for the two gradient GEMMs (dhidden = dlogits·W, dW = dlogitsᵀ·x) that follow.

Full KL between two heads (:func:`plan_linear_full_kl_fwd`, ``kl_estimator="full"``): the same
tiles of the policy's logits s and, beside them, of the reference's s_ref (its own hidden states
and weight over the same vocabulary), with one more online sum per row,

    a   = Σ_v exp(s_v − m)·((s_v − m) − (s_ref,v − m_ref))   (each term relative to both maxima)
    d_a = Σ_v exp(s_v − m)                                   (over the same tokens)
    KL  = (a + d_a·(log d_ref − log d))/d                    (= Σ_v π_v (log π_v − log ρ_v))

with the reference's own m_ref and d_ref, so the KL takes one pass over the two heads, and an
offset between the heads' logits cancels term by term (``a/d − (lse − lse_ref)`` would subtract
two numbers of the offset's size). The sums skip the tokens the reference bans (ρ_v = 0); the KL
is +inf where one of them has π_v > 0 at the end, as in the spec. Its
backward (:func:`plan_linear_full_kl_dlogits`) recomputes both tiles and writes

    ∂KL/∂z_v · g = π_v (log π_v − log ρ_v − KL) · g / τ

for the same two gradient GEMMs. Both kernels take :func:`full_kl_tile_plan` (two float32 tiles
live at once) and serve two heads of one 16-bit dtype.

Rows whose label is ``ignore_index``, and rows past the end of the batch, are never loaded:
whatever their hidden state holds changes nothing, and a tile holding only such rows skips the
vocabulary loop. A label outside ``[0, V)`` that is not ``ignore_index`` gives NaN outputs rather
than a wrong number, as in :mod:`kernels.logprobs`.
"""

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .launch import ALIGNMENT_BYTES, ENABLE_FP_FUSION, Launch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's CPU interpreter (read once, as triton does at import) runs ``tl.dot`` as numpy's
matmul: on bf16 tiles it multiplies their raw 16-bit patterns (triton 3.6 and 3.9), and a float32
row's result depends on its place in the tile (the BLAS micro-kernels treat rows differently:
measured on an AMD EPYC with AVX2, not on a Xeon with AVX-512). There the tile product is a sum
over H of each logit on its own, the property the GPU's MMA gives ``tl.dot``."""

# The batch-dependent integers, and every pointer: specialising on their values (== 1, % 16) or
# on a pointer's alignment would give a token different code depending on the batch around it.
BATCH_ADDRESSING = ["n_rows", "stride_hn", "stride_wv"]
POINTERS = ["hidden_ptr", "weight_ptr", "bias_ptr", "labels_ptr", "logp_ptr", "entropy_ptr",
            "lse_ptr", "sum_sq_ptr", "scalars_ptr"]
DLOGITS_POINTERS = ["hidden_ptr", "weight_ptr", "bias_ptr", "labels_ptr", "lse_ptr", "entropy_ptr",
                    "grad_logp_ptr", "grad_entropy_ptr", "scalars_ptr", "dlogits_ptr"]
FULL_KL_POINTERS = ["hidden_ptr", "weight_ptr", "bias_ptr", "ref_hidden_ptr", "ref_weight_ptr", "ref_bias_ptr",
                    "labels_ptr", "kl_ptr", "lse_ptr", "ref_lse_ptr", "grad_kl_ptr", "scalars_ptr", "dlogits_ptr"]
FULL_KL_ADDRESSING = BATCH_ADDRESSING + ["stride_rn", "stride_rv"]


@triton.jit
def tile_logits(
    h_rows,  # [BLOCK_N, 1] pointers to hidden[row, 0], unit column stride
    read,  # [BLOCK_N] bool: rows to load; the others are 0
    w_rows,  # [BLOCK_V, 1] pointers to weight[col, 0], unit column stride
    in_vocab,  # [BLOCK_V] bool: columns < V; the others are 0
    H,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC: tl.constexpr,
    BY_SUM: tl.constexpr,  # the interpreter: products summed per logit in ACC (see INTERPRETED)
):
    """x·Wᵀ over the tile, summed over H in BLOCK_H chunks in increasing order: float32 for
    16-bit and float32 inputs (IEEE products for float32), float64 for float64."""
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    for start in range(0, H, BLOCK_H):
        cols_h = start + offs_h
        in_h = cols_h < H
        x = tl.load(h_rows + cols_h[None, :], mask=read[:, None] & in_h[None, :], other=0.0)
        w = tl.load(w_rows + cols_h[None, :], mask=in_vocab[:, None] & in_h[None, :], other=0.0)
        if BY_SUM or x.dtype == tl.float64:
            # float64: products and sums on the FMA units (Triton 3.6 has no float64 tl.dot). A
            # product of two 16-bit floats is exact in float32, as in the MMA.
            acc += tl.sum(x.to(ACC)[:, None, :] * w.to(ACC)[None, :, :], axis=2)
        elif x.dtype == tl.float32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def full_kl_of_sums(m, d, m_ref, d_ref, a, d_a, banned_top):
    """``(kl, lse, ref_lse)`` from a row's (or rows') online sums of the full KL: both maxima and
    sums, ``a``, ``d_a`` and the largest policy logit the reference bans (the module's docstring;
    :mod:`kernels.full_kl` keeps the same sums)."""
    lse = m + tl.log(d)
    ref_lse = m_ref + tl.log(d_ref)
    # KL = Σ π (log π − log ρ) = (a + d_a·(log d_ref − log d))/d, +inf where a token the reference
    # bans has π > 0 (as the spec: a term with π = 0 is 0, whatever ρ is).
    kl = (a + d_a * (tl.log(d_ref) - tl.log(d))) / d
    kl = tl.where(tl.exp(banned_top - lse) > 0, float("inf"), kl)
    # A model with no distribution (NaN or +inf in its row, or all of it −inf: a log-sum-exp that
    # is not finite) gives NaN, not the +inf of a banned token, as the other backends do.
    kl = tl.where((tl.abs(lse) < float("inf")) & (tl.abs(ref_lse) < float("inf")), kl, float("nan"))
    return kl, lse, ref_lse


@triton.jit
def to_element(
    x,  # float32 or float64
    ELEMENT: tl.constexpr,
    BY_SUM: tl.constexpr,  # the interpreter (see INTERPRETED)
):
    """x cast to ELEMENT, normal numbers and infinities rounded to nearest even on every backend.
    The interpreter casts float32 to bfloat16 by truncation (triton 3.6 and 3.9: 0.02 off in a
    log-sum-exp of logits of a few units); there the rounding is done on the bits first, which the
    cast then keeps. NaN is left to the cast (the bits' carry could turn it into a number), and
    the interpreter's cast flushes subnormals whatever is done here."""
    if BY_SUM and ELEMENT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x != x, x, rounded)
    return x.to(ELEMENT)


@triton.jit
def scaled_tile(
    h_rows,  # [BLOCK_N, 1] pointers to hidden[row, 0], unit column stride
    read,  # [BLOCK_N] bool: rows to load
    w_rows,  # [BLOCK_V, 1] pointers to weight[col, 0], unit column stride
    in_vocab,  # [BLOCK_V] bool: columns to load
    bias_ptr,  # [V] or the entries' part of it (not read without HAS_BIAS)
    cols,  # [BLOCK_V] the columns' offsets into bias_ptr
    H,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BY_SUM: tl.constexpr,
):
    """A tile of the head's logits as the forward computes them (:func:`tile_logits`, plus the
    bias, rounded once to the inputs' dtype), divided by the temperature, in ACC."""
    z = tile_logits(h_rows, read, w_rows, in_vocab, H, BLOCK_N, BLOCK_V, BLOCK_H, ACC, BY_SUM)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=in_vocab, other=0.0).to(ACC)[None, :]
    return to_element(z, h_rows.dtype.element_ty, BY_SUM).to(ACC) * inv_temp


@triton.jit
def dlogits_tile(
    labels_ptr,  # [N] int64, contiguous
    n_rows,
    E,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The backward kernels' tile of the 2-D grid (token blocks × blocks of E vocabulary entries):
    ``(rows, cols, in_batch, in_entries, labels, active)``, int64 offsets, ``active`` the rows in
    the batch whose label is not ``ignore_index``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_batch = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=in_batch, other=ignore_index).to(tl.int64)
    return rows, cols, in_batch, cols < E, labels, (labels != ignore_index) & in_batch


@triton.jit(do_not_specialize=BATCH_ADDRESSING, do_not_specialize_on_alignment=POINTERS)
def _linear_logprobs_fwd_kernel(
    hidden_ptr,  # [N, H] bf16/fp16/fp32/fp64, unit column stride, rows stride_hn apart
    stride_hn,
    weight_ptr,  # [V, H] hidden's dtype, unit column stride, rows stride_wv apart
    stride_wv,
    bias_ptr,  # [V] hidden's dtype, contiguous (not read without HAS_BIAS)
    labels_ptr,  # [N] int64, contiguous
    logp_ptr,  # [N] out, ACC dtype
    entropy_ptr,  # [N] out, ACC dtype: 0 without WITH_ENTROPY
    lse_ptr,  # [N] out, ACC dtype
    sum_sq_ptr,  # [N] out, ACC dtype: Σ p² (not written without WITH_SUM_PI_SQUARED)
    scalars_ptr,  # [1] ACC dtype: 1/temperature (a tensor, so float64 runs keep full precision)
    n_rows,
    H,
    V,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_SUM_PI_SQUARED: tl.constexpr,
    ALIGNED: tl.constexpr,  # both matrices' base and row stride are 16-byte multiples
    ACC: tl.constexpr,  # float32, or float64 for float64 inputs
    BY_SUM: tl.constexpr,  # see tile_logits; only ever set under the interpreter
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_batch = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=in_batch, other=ignore_index).to(tl.int64)
    active = (labels != ignore_index) & in_batch
    in_range = (labels >= 0) & (labels < V)
    read = active & in_range
    inv_temp = tl.load(scalars_ptr)
    h_rows = hidden_ptr + rows[:, None] * stride_hn
    if ALIGNED:
        # Every row starts 16-byte aligned: its loads may be 128 bits wide. (The hint must sit on
        # a computed value; on a kernel argument Triton drops it.)
        h_rows = tl.multiple_of(h_rows, [16, 16])

    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    d = tl.zeros((BLOCK_N,), ACC)
    t = tl.zeros((BLOCK_N,), ACC)
    q = tl.zeros((BLOCK_N,), ACC)
    s_label = tl.zeros((BLOCK_N,), ACC)
    n_vocab = tl.where(tl.max(read.to(tl.int32), axis=0) > 0, V, 0)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < V
        w_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_wv
        if ALIGNED:
            w_rows = tl.multiple_of(w_rows, [16, 16])
        # Rounded once to the inputs' dtype, as ``hidden @ weight.T + bias`` stores its logits: the
        # statistics are those of the model's own logits, and the backward, which recomputes them
        # with a GEMM in that dtype, differentiates the same numbers.
        s = scaled_tile(h_rows, read, w_rows, in_vocab, bias_ptr, cols, H, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, ACC, BY_SUM)
        s = tl.where(in_vocab[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row of −inf so far keeps m_new = −inf; exp(−inf − −inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_safe)
        e = tl.exp(s - m_safe[:, None])
        if WITH_ENTROPY:
            # As in the row kernel (kernels/logprobs.py, online_softmax_step): t is relative to
            # the running max, and its earlier terms move by the rise. Where e = 0 its term is
            # selected away (the row kernel floors s − m instead: each form is the one that
            # compiles without a spill under both Triton versions in its kernel).
            rise = tl.where(d > 0, m_safe - m, 0.0)
            t = (t - rise * d) * rescale + tl.sum(tl.where(e > 0, e * (s - m_safe[:, None]), 0.0), axis=1)
        d = d * rescale + tl.sum(e, axis=1)
        if WITH_SUM_PI_SQUARED:
            # As in the row kernel (kernels/logprobs.py): rescale² underflows only where the old
            # terms are negligible beside the new maximum's own, 1.
            q = q * (rescale * rescale) + tl.sum(e * e, axis=1)
        # Exactly one tile holds the label; every other adds 0, exactly.
        s_label += tl.sum(tl.where(cols[None, :] == labels[:, None], s, 0.0), axis=1)
        m = m_new

    lse = tl.where(in_range, m + tl.log(d), float("nan"))
    tl.store(logp_ptr + rows, tl.where(active, s_label - lse, 0.0), mask=in_batch)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=in_batch)
    if WITH_ENTROPY:
        entropy = tl.where(active, tl.log(d) - t / d, 0.0)
    else:
        entropy = tl.zeros((BLOCK_N,), ACC)
    tl.store(entropy_ptr + rows, entropy, mask=in_batch)
    if WITH_SUM_PI_SQUARED:
        tl.store(sum_sq_ptr + rows, tl.where(active, q / (d * d), 0.0), mask=in_batch)


@triton.jit(do_not_specialize=BATCH_ADDRESSING + ["stride_dn", "E", "first"],
            do_not_specialize_on_alignment=DLOGITS_POINTERS)
def _linear_logprobs_dlogits_kernel(
    hidden_ptr,  # [N, H], unit column stride, rows stride_hn apart
    stride_hn,
    weight_ptr,  # [E, H] entries first .. first + E − 1 of the head's weight, rows stride_wv apart
    stride_wv,
    bias_ptr,  # [E] the same entries of the bias (not read without HAS_BIAS)
    labels_ptr,  # [N] int64, contiguous
    lse_ptr,  # [N] ACC dtype, contiguous: the forward's
    entropy_ptr,  # [N] ACC dtype, contiguous: the forward's (read only with HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # [N] contiguous
    grad_entropy_ptr,  # [N] contiguous (read only with HAS_GRAD_ENTROPY)
    scalars_ptr,  # [1] ACC dtype: 1/temperature
    dlogits_ptr,  # [N, E] out, any float dtype, unit column stride, rows stride_dn apart
    stride_dn,
    n_rows,
    H,
    E,
    first,  # the vocabulary index of the range's first entry: labels are matched against first + column
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ALIGNED: tl.constexpr,  # hidden's and weight's base and row stride are 16-byte multiples
    ACC: tl.constexpr,
    BY_SUM: tl.constexpr,
):
    rows, cols, in_batch, in_entries, labels, active = dlogits_tile(labels_ptr, n_rows, E, ignore_index,
                                                                    BLOCK_N, BLOCK_V)
    inv_temp = tl.load(scalars_ptr)
    h_rows = hidden_ptr + rows[:, None] * stride_hn
    w_rows = weight_ptr + cols[:, None] * stride_wv
    if ALIGNED:
        h_rows = tl.multiple_of(h_rows, [16, 16])
        w_rows = tl.multiple_of(w_rows, [16, 16])
    # A tile of ignored rows skips the H loop; its gradient is 0.
    n_hidden = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, H, 0)
    s = scaled_tile(h_rows, active, w_rows, in_entries, bias_ptr, cols, n_hidden, inv_temp,
                    BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, ACC, BY_SUM)
    # An active row with a label outside [0, V) has lse NaN from the forward: NaN here too.
    lse = tl.load(lse_ptr + rows, mask=in_batch, other=0.0).to(ACC)
    g = tl.load(grad_logp_ptr + rows, mask=in_batch, other=0.0).to(ACC)
    p = tl.exp(s - lse[:, None])
    ds = tl.where((first + cols)[None, :] == labels[:, None], g[:, None], 0.0) - g[:, None] * p
    if HAS_GRAD_ENTROPY:
        h = tl.load(grad_entropy_ptr + rows, mask=in_batch, other=0.0).to(ACC)
        entropy = tl.load(entropy_ptr + rows, mask=in_batch, other=0.0).to(ACC)
        ds -= h[:, None] * tl.where(p > 0, p * ((s - lse[:, None]) + entropy[:, None]), 0.0)
    ds = tl.where(active[:, None], ds * inv_temp, 0.0)
    tl.store(dlogits_ptr + rows[:, None] * stride_dn + cols[None, :],
             to_element(ds, dlogits_ptr.dtype.element_ty, BY_SUM), mask=in_batch[:, None] & in_entries[None, :])


@triton.jit(do_not_specialize=FULL_KL_ADDRESSING, do_not_specialize_on_alignment=FULL_KL_POINTERS)
def _linear_full_kl_fwd_kernel(
    hidden_ptr,  # [N, H], unit column stride, rows stride_hn apart
    stride_hn,
    weight_ptr,  # [V, H] hidden's dtype, unit column stride, rows stride_wv apart
    stride_wv,
    bias_ptr,  # [V] contiguous (not read without HAS_BIAS)
    ref_hidden_ptr,  # [N, H_ref] hidden's dtype, unit column stride, rows stride_rn apart
    stride_rn,
    ref_weight_ptr,  # [V, H_ref] hidden's dtype, unit column stride, rows stride_rv apart
    stride_rv,
    ref_bias_ptr,  # [V] contiguous (not read without HAS_REF_BIAS)
    labels_ptr,  # [N] int64, contiguous: only ignore_index is looked at
    kl_ptr,  # [N] out, ACC dtype
    lse_ptr,  # [N] out, ACC dtype: the policy's log-sum-exp of s
    ref_lse_ptr,  # [N] out, ACC dtype: the reference's
    scalars_ptr,  # [1] ACC dtype: 1/temperature
    n_rows,
    H,
    H_ref,
    V,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    REF_BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    ALIGNED: tl.constexpr,  # all four matrices' base and row stride are 16-byte multiples
    ACC: tl.constexpr,
    BY_SUM: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_batch = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=in_batch, other=ignore_index).to(tl.int64)
    active = (labels != ignore_index) & in_batch
    inv_temp = tl.load(scalars_ptr)
    h_rows = hidden_ptr + rows[:, None] * stride_hn
    r_rows = ref_hidden_ptr + rows[:, None] * stride_rn
    if ALIGNED:
        h_rows = tl.multiple_of(h_rows, [16, 16])
        r_rows = tl.multiple_of(r_rows, [16, 16])

    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    d = tl.zeros((BLOCK_N,), ACC)
    m_ref = tl.full((BLOCK_N,), float("-inf"), ACC)
    d_ref = tl.zeros((BLOCK_N,), ACC)
    a = tl.zeros((BLOCK_N,), ACC)
    d_a = tl.zeros((BLOCK_N,), ACC)
    banned_top = tl.full((BLOCK_N,), float("-inf"), ACC)
    n_vocab = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, V, 0)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < V
        w_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_wv
        rw_rows = ref_weight_ptr + cols.to(tl.int64)[:, None] * stride_rv
        if ALIGNED:
            w_rows = tl.multiple_of(w_rows, [16, 16])
            rw_rows = tl.multiple_of(rw_rows, [16, 16])
        s = scaled_tile(h_rows, active, w_rows, in_vocab, bias_ptr, cols, H, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, ACC, BY_SUM)
        s = tl.where(in_vocab[None, :], s, float("-inf"))
        # Past the vocabulary s_ref is 0 (loads of 0): finite, and s there is −inf, so e is 0.
        s_ref = scaled_tile(r_rows, active, rw_rows, in_vocab, ref_bias_ptr, cols, H_ref, inv_temp,
                            BLOCK_N, BLOCK_V, REF_BLOCK_H, HAS_REF_BIAS, ACC, BY_SUM)
        # The reference's statistics first, so its exponentials are dead before the policy's live.
        # A row of −inf so far keeps its maximum −inf; exp(−inf − −inf) would be NaN.
        s_ref_in_vocab = tl.where(in_vocab[None, :], s_ref, float("-inf"))
        m_ref_new = tl.maximum(m_ref, tl.max(s_ref_in_vocab, axis=1))
        m_ref_safe = tl.where(m_ref_new == float("-inf"), 0.0, m_ref_new)
        d_ref = d_ref * tl.exp(m_ref - m_ref_safe) + tl.sum(tl.exp(s_ref_in_vocab - m_ref_safe[:, None]), axis=1)
        # A token the reference bans (ρ_v = 0) stays out of a: the KL is +inf if its π_v > 0, which
        # only the final log-sum-exp tells, so its policy logit is kept (the largest of them).
        ref_banned = s_ref == float("-inf")
        banned_top = tl.maximum(banned_top, tl.max(tl.where(ref_banned, s, float("-inf")), axis=1))

        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_safe)
        e = tl.exp(s - m_safe[:, None])
        d = d * rescale + tl.sum(e, axis=1)
        # a = Σ e^{s−m}·((s − m) − (s_ref − m_ref)) over the tokens the reference does not ban, and
        # d_a their Σ e^{s−m}: an offset between the two heads' logits cancels inside each term.
        # When the maxima rise, every earlier term moves by (m_ref_new − m_ref) − (m_new − m).
        # (Where d_a is 0 a maximum may still be −inf: no shift, and no inf·0.)
        seen = d_a > 0
        shift = tl.where(seen, m_ref_safe - m_ref, 0.0) - tl.where(seen, m_safe - m, 0.0)
        # The floor keeps a token the policy bans (e = 0) from giving 0·(−inf).
        gap = tl.where(ref_banned, 0.0,
                       tl.maximum(s - m_safe[:, None], -3.0e38) - (s_ref - m_ref_safe[:, None]))
        a = (a + shift * d_a) * rescale + tl.sum(e * gap, axis=1)
        d_a = d_a * rescale + tl.sum(tl.where(ref_banned, 0.0, e), axis=1)
        m = m_new
        m_ref = m_ref_new

    kl, lse, ref_lse = full_kl_of_sums(m, d, m_ref, d_ref, a, d_a, banned_top)
    tl.store(kl_ptr + rows, tl.where(active, kl, 0.0), mask=in_batch)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=in_batch)
    tl.store(ref_lse_ptr + rows, tl.where(active, ref_lse, 0.0), mask=in_batch)


@triton.jit(do_not_specialize=FULL_KL_ADDRESSING + ["stride_dn", "E"],
            do_not_specialize_on_alignment=FULL_KL_POINTERS)
def _linear_full_kl_dlogits_kernel(
    hidden_ptr,  # [N, H], unit column stride, rows stride_hn apart
    stride_hn,
    weight_ptr,  # [E, H] entries first .. first + E − 1 of the policy's weight, rows stride_wv apart
    stride_wv,
    bias_ptr,  # [E] the same entries of the bias (not read without HAS_BIAS)
    ref_hidden_ptr,  # [N, H_ref], unit column stride, rows stride_rn apart
    stride_rn,
    ref_weight_ptr,  # [E, H_ref] the same entries of the reference's weight, rows stride_rv apart
    stride_rv,
    ref_bias_ptr,  # [E] (not read without HAS_REF_BIAS)
    labels_ptr,  # [N] int64, contiguous
    kl_ptr,  # [N] ACC dtype, contiguous: the forward's
    lse_ptr,  # [N] ACC dtype, contiguous: the forward's
    ref_lse_ptr,  # [N] ACC dtype, contiguous: the forward's
    grad_kl_ptr,  # [N] contiguous
    scalars_ptr,  # [1] ACC dtype: 1/temperature
    dlogits_ptr,  # [N, E] out, any float dtype, unit column stride, rows stride_dn apart
    stride_dn,
    n_rows,
    H,
    H_ref,
    E,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    REF_BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    ALIGNED: tl.constexpr,
    ACC: tl.constexpr,
    BY_SUM: tl.constexpr,
):
    rows, cols, in_batch, in_entries, labels, active = dlogits_tile(labels_ptr, n_rows, E, ignore_index,
                                                                    BLOCK_N, BLOCK_V)
    inv_temp = tl.load(scalars_ptr)
    h_rows = hidden_ptr + rows[:, None] * stride_hn
    w_rows = weight_ptr + cols[:, None] * stride_wv
    r_rows = ref_hidden_ptr + rows[:, None] * stride_rn
    rw_rows = ref_weight_ptr + cols[:, None] * stride_rv
    if ALIGNED:
        h_rows = tl.multiple_of(h_rows, [16, 16])
        w_rows = tl.multiple_of(w_rows, [16, 16])
        r_rows = tl.multiple_of(r_rows, [16, 16])
        rw_rows = tl.multiple_of(rw_rows, [16, 16])
    # A tile of ignored rows skips both H loops; its gradient is 0.
    any_active = tl.max(active.to(tl.int32), axis=0) > 0
    s = scaled_tile(h_rows, active, w_rows, in_entries, bias_ptr, cols, tl.where(any_active, H, 0), inv_temp,
                    BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, ACC, BY_SUM)
    s_ref = scaled_tile(r_rows, active, rw_rows, in_entries, ref_bias_ptr, cols, tl.where(any_active, H_ref, 0),
                        inv_temp, BLOCK_N, BLOCK_V, REF_BLOCK_H, HAS_REF_BIAS, ACC, BY_SUM)
    lse = tl.load(lse_ptr + rows, mask=in_batch, other=0.0).to(ACC)
    ref_lse = tl.load(ref_lse_ptr + rows, mask=in_batch, other=0.0).to(ACC)
    kl = tl.load(kl_ptr + rows, mask=in_batch, other=0.0).to(ACC)
    g = tl.load(grad_kl_ptr + rows, mask=in_batch, other=0.0).to(ACC)
    log_p = s - lse[:, None]
    p = tl.exp(log_p)
    gap = tl.where(p > 0, log_p - (s_ref - ref_lse[:, None]), 0.0)
    ds = tl.where(active[:, None], p * (gap - kl[:, None]) * (g * inv_temp)[:, None], 0.0)
    tl.store(dlogits_ptr + rows[:, None] * stride_dn + cols[None, :],
             to_element(ds, dlogits_ptr.dtype.element_ty, BY_SUM), mask=in_batch[:, None] & in_entries[None, :])


@dataclass(frozen=True)
class TilePlan:
    """Blocks and launch options of the fused forward, from (H, V, dtype) only."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


# (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages) by element type, before clamping to small H and V.
# The largest tiles that compile without a spill for sm_80 and sm_90 at H = 4096 and 4097 (the
# compile check's table): the [BLOCK_N, BLOCK_V] float32 accumulator and the softmax statistics
# over it share the registers (Triton 3.6 allocates more of them than 3.9). 16-bit: eight warps of
# m16 MMAs (two Hopper warpgroups); float32 runs IEEE FMA products and float64 plain FMAs, so their
# tiles are smaller.
_TILES = {
    torch.bfloat16: (64, 128, 32, 8, 3),
    torch.float16: (64, 128, 32, 8, 3),
    torch.float32: (16, 64, 32, 4, 2),
    torch.float64: (16, 32, 16, 8, 2),
}

MIN_DOT = 16
"""``tl.dot`` needs every tile dimension to be at least 16."""


def tile_plan(H: int, V: int, dtype: torch.dtype) -> TilePlan:
    """The plan for hidden size H, vocabulary V and input dtype: never the token count, so a
    token's result does not depend on its batch. BLOCK_V and BLOCK_H shrink (to powers of two,
    at least 16) when V or H is smaller than the tile."""
    block_n, block_v, block_h, warps, stages = _TILES[dtype]
    block_v = min(block_v, max(MIN_DOT, triton.next_power_of_2(V)))
    block_h = min(block_h, max(MIN_DOT, triton.next_power_of_2(H)))
    return TilePlan(block_n, block_v, block_h, warps, stages)


def full_kl_tile_plan(H: int, V: int, dtype: torch.dtype) -> TilePlan:
    """The full KL's plan, forward and backward, for 16-bit inputs: the backward's
    (:func:`dlogits_tile_plan`) with tiles 16 vocabulary entries wide, since two heads' tiles and
    their statistics live at once; wider ones spill on sm_80 (the compile check's table). float32
    and float64 heads are not served: with their FMA dot products the forward spilled under Triton
    3.6 or 3.9 at every tile tried (16 to 64 tokens, 16 to 32 entries, H blocks of 16 and 32, 2 to 8
    warps, 1 to 3 stages)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the full-KL kernels serve bfloat16 and float16 heads, got {dtype}")
    return replace(dlogits_tile_plan(H, V, dtype), block_v=MIN_DOT)


def dlogits_tile_plan(H: int, V: int, dtype: torch.dtype) -> TilePlan:
    """The backward's plan: the forward's, but at most 64 vocabulary entries wide for 16-bit inputs,
    whose 128-wide tile with the gradient's epilogue spills under Triton 3.6 (the compile check's
    table). BLOCK_N, BLOCK_H and the warps stay, so each logit is the same sequence of MMA k-steps
    over H as in the forward."""
    plan = tile_plan(H, V, dtype)
    if dtype in (torch.bfloat16, torch.float16):
        return replace(plan, block_v=min(plan.block_v, 64))
    return plan


@dataclass(frozen=True)
class StagedLaunch(Launch):
    """A :class:`Launch` that also fixes the software-pipelining depth of the H loop."""

    num_stages: int = 3

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages, enable_fp_fusion=ENABLE_FP_FUSION)


def _rows_unit(matrix, name):
    if matrix.dim() != 2 or matrix.stride(1) != 1:
        raise ValueError(f"{name} must be 2-D with unit column stride; got shape "
                         f"{tuple(matrix.shape)}, strides {tuple(matrix.stride())}")


def _aligned(*matrices) -> bool:
    return all(m.data_ptr() % ALIGNMENT_BYTES == 0
               and (m.stride(0) * m.element_size()) % ALIGNMENT_BYTES == 0 for m in matrices)


def plan_linear_logprobs_fwd(hidden, weight, bias, labels, logp, entropy, lse, scalars,
                             ignore_index, with_entropy, acc, sum_pi_squared=None) -> StagedLaunch:
    """The fused forward over the N rows of ``hidden`` [N, H] against ``weight`` [V, H] (both of
    one dtype, unit column stride, any row stride), ``bias`` [V] contiguous or None, ``labels``
    [N] int64 contiguous. ``logp``, ``entropy``, ``lse``: preallocated contiguous [N] outputs of
    dtype ``acc`` (tl.float32, or tl.float64 for float64 inputs), all written, entropy with 0
    unless ``with_entropy``; ``scalars``: a device tensor ``[1/temperature]`` of that dtype.
    ``sum_pi_squared``: an [N] output of that dtype for Σ p², or None not to compute it."""
    _rows_unit(hidden, "hidden")
    _rows_unit(weight, "weight")
    n_rows, H = hidden.shape
    V = weight.shape[0]
    plan = tile_plan(H, V, hidden.dtype)
    has_bias = bias is not None
    # Without a bias the kernel is handed the weight in its place, never read: no dummy tensor.
    return StagedLaunch(
        _linear_logprobs_fwd_kernel, (triton.cdiv(n_rows, plan.block_n),),
        (hidden, hidden.stride(0), weight, weight.stride(0), bias if has_bias else weight,
         labels, logp, entropy, lse, lse if sum_pi_squared is None else sum_pi_squared, scalars, n_rows, H, V,
         ignore_index),
        dict(BLOCK_N=plan.block_n, BLOCK_V=plan.block_v, BLOCK_H=plan.block_h,
             HAS_BIAS=has_bias, WITH_ENTROPY=with_entropy, WITH_SUM_PI_SQUARED=sum_pi_squared is not None,
             ALIGNED=_aligned(hidden, weight),
             ACC=acc, BY_SUM=INTERPRETED),
        plan.num_warps, plan.num_stages)


def linear_logprobs_fwd(*args, **kwargs) -> None:
    """Runs :func:`plan_linear_logprobs_fwd`'s plan (arguments as there); nothing for N = 0."""
    plan = plan_linear_logprobs_fwd(*args, **kwargs)
    if plan.grid[0]:
        plan()


def plan_linear_logprobs_dlogits(hidden, weight, bias, first, vocab, labels, lse, entropy, grad_logp,
                                 grad_entropy, scalars, ignore_index, dlogits, acc) -> StagedLaunch:
    """∂loss/∂logits of the N rows of ``hidden`` [N, H] over the vocabulary entries ``first`` to
    ``first + E − 1``, whose rows of the weight are ``weight`` [E, H] (a slice of the head's
    ``[vocab, H]`` weight, unit column stride) and of the bias ``bias`` [E] (contiguous, or None),
    into ``dlogits`` [N, E] (unit column stride, any float dtype). ``labels``, ``lse``, ``entropy``,
    ``grad_logp``, ``grad_entropy`` (None: the entropy got no gradient): contiguous [N]; ``lse``
    and ``entropy`` as the forward wrote them. The tiles come from the whole head's
    :func:`dlogits_tile_plan`, so a logit is computed alike whatever the range."""
    _rows_unit(hidden, "hidden")
    _rows_unit(weight, "weight")
    _rows_unit(dlogits, "dlogits")
    n_rows, H = hidden.shape
    entries = weight.shape[0]
    plan = dlogits_tile_plan(H, vocab, hidden.dtype)
    has_bias, has_h = bias is not None, grad_entropy is not None
    return StagedLaunch(
        _linear_logprobs_dlogits_kernel, (triton.cdiv(n_rows, plan.block_n), triton.cdiv(entries, plan.block_v)),
        (hidden, hidden.stride(0), weight, weight.stride(0), bias if has_bias else weight, labels, lse,
         entropy if has_h else lse, grad_logp, grad_entropy if has_h else grad_logp, scalars, dlogits,
         dlogits.stride(0), n_rows, H, entries, first, ignore_index),
        dict(BLOCK_N=plan.block_n, BLOCK_V=plan.block_v, BLOCK_H=plan.block_h, HAS_BIAS=has_bias,
             HAS_GRAD_ENTROPY=has_h, ALIGNED=_aligned(hidden, weight), ACC=acc, BY_SUM=INTERPRETED),
        plan.num_warps, plan.num_stages)


def linear_logprobs_dlogits(*args, **kwargs) -> None:
    """Runs :func:`plan_linear_logprobs_dlogits`'s plan (arguments as there); nothing for no rows or entries."""
    plan = plan_linear_logprobs_dlogits(*args, **kwargs)
    if plan.grid[0] and plan.grid[1]:
        plan()


def _full_kl_launch(kernel, grid, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, vocab, head_args,
                    acc) -> StagedLaunch:
    for matrix, name in ((hidden, "hidden"), (weight, "weight"), (ref_hidden, "ref_hidden"),
                         (ref_weight, "ref_weight")):
        _rows_unit(matrix, name)
    if len({hidden.dtype, weight.dtype, ref_hidden.dtype, ref_weight.dtype}) != 1:
        raise ValueError(f"the two heads must share one dtype, got hidden {hidden.dtype}, ref_hidden "
                         f"{ref_hidden.dtype}, weights {weight.dtype} and {ref_weight.dtype}")
    H, H_ref = hidden.shape[1], ref_hidden.shape[1]
    plan = full_kl_tile_plan(H, vocab, hidden.dtype)
    has_bias, has_ref_bias = bias is not None, ref_bias is not None
    # Without a bias the kernel is handed the weight in its place, never read.
    return StagedLaunch(
        kernel, grid(plan),
        (hidden, hidden.stride(0), weight, weight.stride(0), bias if has_bias else weight,
         ref_hidden, ref_hidden.stride(0), ref_weight, ref_weight.stride(0),
         ref_bias if has_ref_bias else ref_weight, *head_args),
        dict(BLOCK_N=plan.block_n, BLOCK_V=plan.block_v, BLOCK_H=plan.block_h,
             REF_BLOCK_H=full_kl_tile_plan(H_ref, vocab, hidden.dtype).block_h, HAS_BIAS=has_bias,
             HAS_REF_BIAS=has_ref_bias, ALIGNED=_aligned(hidden, weight, ref_hidden, ref_weight), ACC=acc,
             BY_SUM=INTERPRETED),
        plan.num_warps, plan.num_stages)


def plan_linear_full_kl_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, kl, lse, ref_lse,
                            scalars, ignore_index, acc) -> StagedLaunch:
    """The full KL of the N rows of the policy's head (``hidden`` [N, H], ``weight`` [V, H],
    ``bias`` [V] or None) to the reference's (``ref_hidden`` [N, H_ref], ``ref_weight`` [V, H_ref],
    ``ref_bias`` [V] or None), all of one dtype, matrices with unit column stride, biases and
    ``labels`` [N] int64 contiguous. ``kl``, ``lse``, ``ref_lse``: preallocated contiguous [N]
    outputs of dtype ``acc``, all written (0 on ignored rows); ``scalars``: ``[1/temperature]``."""
    n_rows, V = hidden.shape[0], weight.shape[0]
    return _full_kl_launch(
        _linear_full_kl_fwd_kernel, lambda plan: (triton.cdiv(n_rows, plan.block_n),),
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, V,
        (labels, kl, lse, ref_lse, scalars, n_rows, hidden.shape[1], ref_hidden.shape[1], V, ignore_index), acc)


def linear_full_kl_fwd(*args, **kwargs) -> None:
    """Runs :func:`plan_linear_full_kl_fwd`'s plan (arguments as there); nothing for N = 0."""
    plan = plan_linear_full_kl_fwd(*args, **kwargs)
    if plan.grid[0]:
        plan()


def plan_linear_full_kl_dlogits(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, vocab, labels, kl, lse,
                                ref_lse, grad_kl, scalars, ignore_index, dlogits, acc) -> StagedLaunch:
    """``grad_kl · ∂KL/∂z`` of the N rows over a range of E vocabulary entries, whose rows of the
    two weights are ``weight`` [E, H] and ``ref_weight`` [E, H_ref] and of the biases ``bias`` and
    ``ref_bias`` [E] (or None), into ``dlogits`` [N, E] (unit column stride, any float dtype);
    ``kl``, ``lse``, ``ref_lse`` as :func:`plan_linear_full_kl_fwd` wrote them, ``grad_kl`` [N].
    The tiles come from the whole head's plan (``vocab`` entries), so a logit is computed alike
    whatever the range."""
    _rows_unit(dlogits, "dlogits")
    n_rows, entries = hidden.shape[0], weight.shape[0]
    return _full_kl_launch(
        _linear_full_kl_dlogits_kernel,
        lambda plan: (triton.cdiv(n_rows, plan.block_n), triton.cdiv(entries, plan.block_v)),
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, vocab,
        (labels, kl, lse, ref_lse, grad_kl, scalars, dlogits, dlogits.stride(0), n_rows, hidden.shape[1],
         ref_hidden.shape[1], entries, ignore_index), acc)


def linear_full_kl_dlogits(*args, **kwargs) -> None:
    """Runs :func:`plan_linear_full_kl_dlogits`'s plan (arguments as there); nothing for no rows or entries."""
    plan = plan_linear_full_kl_dlogits(*args, **kwargs)
    if plan.grid[0] and plan.grid[1]:
        plan()
