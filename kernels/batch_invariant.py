"""Batch-invariant matmul, row reduction and attention for CUDA: a row's bits do not depend on
the other rows of its call.

What makes a GPU kernel batch-dependent is a schedule chosen from the batch: cuBLAS picks tiles
and split-K by M, torch's reductions split a row over more blocks when rows are few, and
attention kernels chunk the keys from position 0 whatever the padding. Here every schedule is a
function of what a row cannot tell apart from its batch only through its own data:

    matmul      C[b] = alpha · A[b] @ B[b] + beta · bias. Tiles of BLOCK_M × BLOCK_N, the K
                loop in BLOCK_K steps from 0, no split-K; the block sizes depend on the dtype
                alone. A row of C is one row of a tile, and a tile row's dot products do not
                read the other rows (tensor-core MMA reduces each output element on its own).
    row reduce  one program per row, the row read in BLOCK steps from its start, a vector
                accumulator summed once at the end: the order depends on the row length only.
    attention   one program per (sequence, KV head, query): the query heads that share the KV
                head are the rows of its dot products. Keys are visited in BLOCK_N chunks
                starting at the row's first valid key and ending after its last, with the
                online softmax (running max, rescaled sum and accumulator). Left padding only
                moves where the first valid key is, and a query decoded against the KV cache
                sees the same valid keys as in the prefill: the same chunks, the same bits.

Integers that depend on the batch (M, the row count, row strides, pointers' alignment) are left
unspecialised, so a single row and a batch run the same machine code (the compile check holds
that). Accumulation is float32 (float64 for float64); float32 products are IEEE, not TF32, as
torch's own default for float32 matmul.
"""

import os

import triton
import triton.language as tl

from .launch import Launch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's CPU interpreter (read once, as triton does at import) runs ``tl.dot`` as numpy's
matmul: a float32 row's result then depends on its place in the tile (the BLAS micro-kernels
treat rows differently), and bf16 tiles are multiplied as their raw 16-bit patterns (triton 3.6
and 3.9). There the tile product is written as a sum over K of each output element on its own,
which is the property the GPU's MMA gives ``tl.dot``: the tests check invariance, not GPU bits."""

MATMUL_ADDRESSING = ["M", "stride_ab", "stride_am", "stride_cb", "stride_cm", "stride_bias_b", "stride_bias_m"]

# dtype size → (BLOCK_M, BLOCK_N, BLOCK_K, num_warps): from the element size only.
MATMUL_TILES = {2: (64, 128, 64, 8), 4: (64, 64, 32, 4), 8: (16, 16, 16, 4)}


@triton.jit
def _tile_dot(a, b, acc, PRECISION: tl.constexpr, ACC: tl.constexpr, BY_SUM: tl.constexpr):
    """``acc + a @ b`` for tiles ``a`` [M, K] and ``b`` [K, N], accumulated in ``ACC``. float64 sums
    its products on the FMA units: Triton 3.6 has no float64 ``tl.dot``."""
    if BY_SUM or a.dtype == tl.float64:
        return acc + tl.sum(a.to(ACC)[:, :, None] * b.to(ACC)[None, :, :], axis=1)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit(do_not_specialize=MATMUL_ADDRESSING + ["a_ptr", "c_ptr", "bias_ptr"],
            do_not_specialize_on_alignment=["a_ptr", "c_ptr", "bias_ptr"])
def _matmul_kernel(
    a_ptr,  # [batch, M, K]
    b_ptr,  # [batch, K, N]
    c_ptr,  # [batch, M, N], out
    bias_ptr,  # broadcast to [batch, M, N] by its strides (0 where broadcast); unread without HAS_BIAS
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_bias_b, stride_bias_m, stride_bias_n,
    alpha, beta,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, BY_SUM: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    a_base = a_ptr + batch * stride_ab + rows[:, None] * stride_am
    b_base = b_ptr + batch * stride_bb + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + inner
        a = tl.load(a_base + k[None, :] * stride_ak, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_base + k[:, None] * stride_bk, mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = _tile_dot(a, b, acc, PRECISION, ACC, BY_SUM)
    acc = acc * alpha
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + batch * stride_bias_b + rows[:, None] * stride_bias_m
                       + cols[None, :] * stride_bias_n, mask=inside, other=0.0)
        acc = acc + beta * bias.to(ACC)
    tl.store(c_ptr + batch * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["n_rows", "x_ptr", "out_ptr"],
            do_not_specialize_on_alignment=["x_ptr", "out_ptr"])
def _row_reduce_kernel(
    x_ptr,  # [n_rows, length], contiguous
    out_ptr,  # [n_rows]
    n_rows, length,
    MEAN: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * length
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, length, BLOCK):
        acc += tl.load(x_row + start + cols, mask=start + cols < length, other=0).to(ACC)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / length
    tl.store(out_ptr + row, total.to(out_ptr.dtype.element_ty))


ATTENTION_ADDRESSING = ["T", "S", "stride_qb", "stride_qt", "stride_kb", "stride_ks", "stride_vb", "stride_vs",
                        "stride_ob", "stride_ot", "stride_biasb", "stride_biash", "stride_biast", "stride_bounds_b",
                        "stride_bounds_t"]


@triton.jit(do_not_specialize=ATTENTION_ADDRESSING + ["q_ptr", "k_ptr", "v_ptr", "o_ptr", "bias_ptr", "bounds_ptr"],
            do_not_specialize_on_alignment=["q_ptr", "k_ptr", "v_ptr", "o_ptr", "bias_ptr", "bounds_ptr"])
def _attention_kernel(
    q_ptr,  # [B, H, T, D]
    k_ptr,  # [B, Hkv, S, D]
    v_ptr,  # [B, Hkv, S, D]
    o_ptr,  # [B, T, H, D], out
    bias_ptr,  # float32 additive mask broadcast to [B, H, T, S] by its strides; unread without HAS_BIAS
    bounds_ptr,  # int64 [B, Hkv, T, 2]: the first valid key and one past the last (HAS_BIAS only)
    T, S, D, group, scale, masked_below,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_ot, stride_oh,
    stride_biasb, stride_biash, stride_biast, stride_biass,
    stride_bounds_b, stride_bounds_h, stride_bounds_t,
    HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, BY_SUM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    heads = kv_head * group + tl.arange(0, BLOCK_G)
    in_group = tl.arange(0, BLOCK_G) < group
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + t * stride_qt + dims[None, :],
                mask=in_group[:, None] & (dims[None, :] < D), other=0.0)
    if HAS_BIAS:
        bounds = bounds_ptr + b * stride_bounds_b + kv_head * stride_bounds_h + t * stride_bounds_t
        first = tl.load(bounds)
        end = tl.load(bounds + 1)
    else:
        first = 0
        end = S - T + t + 1
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    offsets = tl.arange(0, BLOCK_N)
    running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(first, end, BLOCK_N):
        keys = start + offsets
        in_range = keys < end
        k = tl.load(k_base + keys[:, None] * stride_ks + dims[None, :],
                    mask=in_range[:, None] & (dims[None, :] < D), other=0.0)
        scores = _tile_dot(q, tl.trans(k), tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32), PRECISION, tl.float32,
                           BY_SUM) * scale
        valid = in_group[:, None] & in_range[None, :]
        if HAS_BIAS:
            extra = tl.load(bias_ptr + b * stride_biasb + heads[:, None] * stride_biash + t * stride_biast
                            + keys[None, :] * stride_biass, mask=valid, other=float("-inf"))
            # NaN compares false: a NaN mask entry masks its key, as on the CPU.
            valid = valid & (extra > masked_below)
            scores = scores + tl.where(valid, extra, 0.0)
        scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A row with no valid key yet keeps max −inf; shifting by 0 then keeps its terms at 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(scores - shift[:, None])
        rescale = tl.exp(running_max - shift)
        total = total * rescale + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vs + dims[None, :],
                    mask=in_range[:, None] & (dims[None, :] < D), other=0.0)
        acc = _tile_dot(p.to(v.dtype), v, acc * rescale[:, None], PRECISION, tl.float32, BY_SUM)
        running_max = new_max
    # A query without a valid key gets zeros.
    out = tl.where(total[:, None] > 0, acc / tl.where(total > 0, total, 1.0)[:, None], 0.0)
    tl.store(o_ptr + b * stride_ob + t * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=in_group[:, None] & (dims[None, :] < D))


def _precision(dtype_size: int):
    """IEEE float32 products for float32 (and float64) inputs; 16-bit inputs have one precision."""
    return "ieee" if dtype_size >= 4 else None


def plan_matmul(a, b, c, bias, alpha: float, beta: float, acc) -> Launch:
    """``c[i] = alpha · a[i] @ b[i] + beta · bias[i]`` for 3-D ``a`` [batch, M, K], ``b`` [batch, K, N],
    ``c`` [batch, M, N] and ``bias`` (None, or broadcast to ``c``'s shape: an expanded view)."""
    batch, M, K = a.shape
    N = b.shape[2]
    block_m, block_n, block_k, warps = MATMUL_TILES[a.element_size()]
    has_bias = bias is not None
    bias_strides = bias.stride() if has_bias else (0, 0, 0)
    return Launch(
        _matmul_kernel, (triton.cdiv(M, block_m), triton.cdiv(N, block_n), batch),
        (a, b, c, bias if has_bias else c, M, N, K, *a.stride(), *b.stride(), *c.stride(), *bias_strides,
         float(alpha), float(beta)),
        dict(HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
             PRECISION=_precision(a.element_size()), ACC=acc, BY_SUM=INTERPRETED),
        warps)


def plan_row_reduce(x, out, mean: bool, acc) -> Launch:
    """Each row of the contiguous [n_rows, length] ``x`` summed (or averaged) into ``out`` [n_rows]."""
    n_rows, length = x.shape
    block = 1024 if x.element_size() <= 4 else 512
    return Launch(_row_reduce_kernel, (n_rows,), (x, out, n_rows, length),
                  dict(MEAN=mean, BLOCK=block, ACC=acc), 4)


def plan_attention(q, k, v, out, bias, bounds, scale: float, masked_below: float) -> Launch:
    """``out`` [B, T, H, D] from ``q`` [B, H, T, D] and ``k``, ``v`` [B, Hkv, S, D] (unit stride along
    D). ``bias``: None (causal, the T queries are the last T positions of the S keys) or a float32
    additive mask broadcast to [B, H, T, S], with ``bounds`` int64 [B, Hkv, T, 2] its first valid
    key and one past its last for each query (over the heads of the KV head)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    has_bias = bias is not None
    bias_strides = bias.stride() if has_bias else (0, 0, 0, 0)
    bounds_strides = bounds.stride()[:3] if has_bias else (0, 0, 0)
    block_d = max(16, triton.next_power_of_2(D))
    return Launch(
        _attention_kernel, (T, Hkv, B),
        (q, k, v, out, bias if has_bias else out, bounds if has_bias else out, T, S, D, group, float(scale),
         float(masked_below), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
         v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), *bias_strides,
         *bounds_strides),
        dict(HAS_BIAS=has_bias, BLOCK_G=max(16, triton.next_power_of_2(group)),
             BLOCK_N=16 if q.element_size() >= 4 else 32,
             BLOCK_D=block_d, PRECISION=_precision(q.element_size()), BY_SUM=INTERPRETED),
        4)
