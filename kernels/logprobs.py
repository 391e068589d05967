"""Token log-probabilities and entropy from logits, forward and backward, one pass each.

For a row of logits z (length V), label y and temperature τ, with s = z/τ:

    lse     = log Σ_j exp(s_j)                  (online: running max m, running sum d)
    logp    = s_y − lse
    t       = Σ_j e^(s_j − m) (s_j − m)          (≤ 0)
    entropy = lse − Σ_j p_j s_j = log d − t/d   (two terms ≥ 0)
    Σ_j p_j² = (Σ_j e^(2(s_j − m))) / d²         (optional; forward only)

t is kept relative to the running max (when it rises by δ, every earlier term moves by −δ·e^(s − m),
so t becomes (t − δ·d)·rescale), as the native kernels keep it: lse − Σ p·s would subtract two
numbers of the logits' size, and lose the entropy's digits to them when |s| is large (a low
temperature, or a row with an offset).

The sum of e^(2(s−m)) is rescaled like d (by the square of d's factor) whenever the running max
rises, so each of its terms is at most 1: no logit magnitude overflows it, and Σ p² ∈ [1/V, 1]
since the maximum's own term makes both sums at least 1.

Backward, for upstream gradients g (of logp) and h (of entropy), with p_j = exp(s_j − lse):

    ∂/∂z_j = ( g·(1[j = y] − p_j) − h·p_j·(log p_j + entropy) ) / τ

(log p_j + entropy = s_j − Σ p·s, computed without the logits' size in it). The forward saves only
lse per token (entropy is an output), so the backward recomputes p from one read of the logits
and writes dlogits in the logits' dtype. Σ p²
gets no gradient: it is a statistic of the old policy (verl's optimal-token-baseline advantages
read it), and the op marks it non-differentiable.

Each row is reduced by one program in a fixed order that depends only on V and the dtype. The
compiled code depends on nothing else either: the row-addressing integers and every pointer are
left unspecialised, and alignment reaches the compiler only as ``ALIGNED``, which the launcher
decides from the base address and the row strides. A row alone, sliced from a batch, inside a
permuted or padded batch: the same machine code reads the same bytes in the same order, so a
token's log-prob, entropy and Σ p² are bitwise the same whatever batch they are computed in.
The outputs asked for (``WITH_ENTROPY``, ``WITH_SUM_PI_SQUARED``) choose the code too, but they
are options of the call, never derived from the batch; asking for Σ p² leaves the log-prob and
entropy bitwise unchanged. (Letting Triton specialise ``rows_inner == 1`` gave a single row
different code from a batch; on an H100 its entropy then differed in the last bits.)

A label outside ``[0, V)`` that is not ``ignore_index`` gives NaN outputs and gradient rather than
an out-of-bounds read: the host check that rejects it is skipped under ``torch.compile``.
"""

import triton
import triton.language as tl


from .launch import Launch, rows_aligned

# Integers that locate a row, and every pointer: specialising on their values (== 1, % 16) or on
# a pointer's alignment would give a row different code depending on the batch it sits in.
ROW_ADDRESSING = ["rows_inner", "stride_outer", "stride_inner"]


@triton.jit
def row_pointer(base_ptr, row, rows_inner, stride_outer, stride_inner, ALIGNED: tl.constexpr):
    """Row ``row`` of logits laid out as [outer, rows_inner, V] with unit column stride. Covers a
    shifted slice such as ``logits[:, :-1]`` without a copy; a plain [N, V] matrix has
    rows_inner = N. ``ALIGNED``: the launcher checked that every row starts 16-byte aligned,
    which lets the loads be 128 bits wide."""
    ptr = base_ptr + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def online_softmax_step(s, m, d, t, WITH_ENTROPY: tl.constexpr):
    """One block ``s`` of a row into the running maximum ``m``, ``d = Σ exp(s − m)`` and, with
    ``WITH_ENTROPY``, ``t = Σ exp(s − m)·(s − m)``: ``(m_new, m_safe, rescale, e, d, t)``, where
    the earlier terms are multiplied by ``rescale`` and ``e = exp(s − m_safe)`` are the block's. Every
    kernel that gives a row's log-sum-exp, log-prob or entropy (the log-prob, PPO loss and full-KL
    kernels) takes its sums from here, so each gives the same bits for them."""
    m_new = tl.maximum(m, tl.max(s, axis=0))
    # A row of −inf so far keeps m_new = −inf; exp(−inf − −inf) would be NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    # A +inf in the row makes m_new = +inf, where exp(+inf − +inf) would be NaN: the terms at the
    # maximum are 1 by definition, so d counts the +inf entries and lse is +inf, which the public
    # function reports. Rows without +inf take the exp as before, bit for bit.
    rescale = tl.where(m == float("inf"), 1.0, tl.exp(m - m_safe))
    e = tl.where(s == float("inf"), 1.0, tl.exp(s - m_safe))
    if WITH_ENTROPY:
        # The earlier terms were relative to the old maximum: each moves by the rise. Where d is
        # still 0 the old maximum may be −inf: no terms, no shift, and no inf·0. The floor makes
        # e·(s − m) 0 where e is (s = −inf), not 0·(−inf).
        rise = tl.where(d > 0, m_safe - m, 0.0)
        t = (t - rise * d) * rescale + tl.sum(e * tl.maximum(s - m_safe, -3.0e38), axis=0)
    d = d * rescale + tl.sum(e, axis=0)
    return m_new, m_safe, rescale, e, d, t


@triton.jit
def row_softmax_stats(
    row_ptr,  # pointer to logits[row, 0]; the row is contiguous
    V,
    inv_temp,
    active,  # scalar bool: inactive rows are not read
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_SUM_PI_SQUARED: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: float32, or float64 for float64 logits
):
    """(lse, entropy, Σ p²) of one row of s = logits·inv_temp in one pass; the entropy is 0
    without ``WITH_ENTROPY``, Σ p² is 0 without ``WITH_SUM_PI_SQUARED``. An inactive row gives
    lse = −inf, and NaN (0/0) for the entropy and Σ p² where they are computed: callers select
    them away."""
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((), ACC)
    t = tl.zeros((), ACC)
    q = tl.zeros((), ACC)
    n_read = tl.where(active, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_read
        s = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(ACC) * inv_temp
        m_new, _, rescale, e, d, t = online_softmax_step(s, m, d, t, WITH_ENTROPY)
        if WITH_SUM_PI_SQUARED:
            # rescale² underflows to 0 only where the max jumps by half the exponent range:
            # the old terms are then negligible next to the new maximum's own term, 1.
            q = q * (rescale * rescale) + tl.sum(e * e, axis=0)
        m = m_new
    lse = m + tl.log(d)
    if WITH_ENTROPY:
        entropy = tl.log(d) - t / d
    else:
        entropy = tl.zeros((), ACC)
    if WITH_SUM_PI_SQUARED:
        sum_sq = q / (d * d)
    else:
        sum_sq = tl.zeros((), ACC)
    return lse, entropy, sum_sq


@triton.jit
def row_lse_entropy(
    row_ptr,
    V,
    inv_temp,
    active,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
):
    """(lse, entropy) of one row, as :func:`row_softmax_stats` without Σ p²."""
    lse, entropy, _ = row_softmax_stats(row_ptr, V, inv_temp, active, BLOCK_V, WITH_ENTROPY,
                                        False, ACC)
    return lse, entropy


@triton.jit(do_not_specialize=ROW_ADDRESSING,
            do_not_specialize_on_alignment=["logits_ptr", "labels_ptr", "logp_ptr", "entropy_ptr",
                                            "lse_ptr", "scalars_ptr", "sum_sq_ptr"])
def _logprobs_fwd_kernel(
    logits_ptr,  # [N, V] any float dtype, unit column stride, rows as in row_pointer
    rows_inner,
    stride_outer,
    stride_inner,
    labels_ptr,  # [N] int32/int64, contiguous
    logp_ptr,  # [N] out, ACC dtype
    entropy_ptr,  # [N] out, ACC dtype (unused without entropy)
    lse_ptr,  # [N] out, ACC dtype
    sum_sq_ptr,  # [N] out, ACC dtype: Σ p² (unused without WITH_SUM_PI_SQUARED)
    scalars_ptr,  # [1] ACC dtype: 1/temperature (a tensor, so float64 runs keep full precision)
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_SUM_PI_SQUARED: tl.constexpr,
    ALIGNED: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = tl.load(scalars_ptr)
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    in_range = (label >= 0) & (label < V)
    row_ptr = row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner, ALIGNED)
    lse, entropy, sum_sq = row_softmax_stats(row_ptr, V, inv_temp, active & in_range, BLOCK_V,
                                              WITH_ENTROPY, WITH_SUM_PI_SQUARED, ACC)
    lse = tl.where(in_range, lse, float("nan"))
    s_label = tl.load(row_ptr + tl.where(in_range, label, 0), mask=active & in_range,
                      other=0.0).to(ACC) * inv_temp
    tl.store(logp_ptr + row, tl.where(active, s_label - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(active, entropy, 0.0))
    if WITH_SUM_PI_SQUARED:
        # An out-of-range label left the row unread: Σ p² is 0/0, NaN, as lse is made above.
        tl.store(sum_sq_ptr + row, tl.where(active, sum_sq, 0.0))


@triton.jit(do_not_specialize=ROW_ADDRESSING + ["drows_inner", "dstride_outer", "dstride_inner"],
            do_not_specialize_on_alignment=["logits_ptr", "dlogits_ptr", "labels_ptr", "lse_ptr",
                                            "entropy_ptr", "grad_logp_ptr", "grad_entropy_ptr",
                                            "scalars_ptr"])
def _logprobs_bwd_kernel(
    logits_ptr,  # [N, V] read, rows as in row_pointer
    rows_inner,
    stride_outer,
    stride_inner,
    dlogits_ptr,  # [N, V] out, rows as in row_pointer; may be logits_ptr itself (in place)
    drows_inner,
    dstride_outer,
    dstride_inner,
    labels_ptr,  # [N]
    lse_ptr,  # [N] saved by the forward
    entropy_ptr,  # [N] forward output (needed only with HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # [N]
    grad_entropy_ptr,  # [N]
    scalars_ptr,  # [1] ACC dtype: 1/temperature
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    ALIGNED: tl.constexpr,  # rows of both logits and dlogits start 16-byte aligned
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = tl.load(scalars_ptr)
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    lse = tl.load(lse_ptr + row).to(ACC)
    g = tl.load(grad_logp_ptr + row).to(ACC)
    if HAS_GRAD_ENTROPY:
        h = tl.load(grad_entropy_ptr + row).to(ACC)
        entropy = tl.load(entropy_ptr + row).to(ACC)
    row_ptr = row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner, ALIGNED)
    drow_ptr = row_pointer(dlogits_ptr, row, drows_inner, dstride_outer, dstride_inner, ALIGNED)
    n_read = tl.where(active, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        s = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(ACC) * inv_temp
        p = tl.where(active, tl.exp(s - lse), 0.0)
        ds = tl.where(cols == label, g, 0.0) - g * p
        if HAS_GRAD_ENTROPY:
            ds -= h * tl.where(p > 0, p * ((s - lse) + entropy), 0.0)
        ds = tl.where(active, ds * inv_temp, 0.0)
        tl.store(drow_ptr + cols, ds.to(dlogits_ptr.dtype.element_ty), mask=in_row)


def row_layout(logits):
    """``(logits, (rows_inner, stride_outer, stride_inner))`` for the kernels' row addressing,
    copying only when the rows cannot be addressed as [outer, inner, V] with unit column stride."""
    V = logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    lead = logits.shape[:-1]
    n_rows = 1
    for size in lead:
        n_rows *= size
    try:
        flat = logits.view(-1, V)
        return logits, (max(n_rows, 1), 0, flat.stride(0))
    except RuntimeError:
        pass
    if logits.dim() == 3:
        return logits, (max(lead[1], 1), logits.stride(0), logits.stride(1))
    logits = logits.contiguous()
    return logits, (max(n_rows, 1), 0, V)


def block_config(V: int, element_size: int):
    """(BLOCK_V, num_warps) from the vocabulary size and dtype only: batch invariance needs it."""
    block = min(triton.next_power_of_2(V), 16384 // element_size)
    return block, 8 if block >= 4096 else 4


def plan_logprobs_fwd(logits, layout, labels, logp, entropy, lse, scalars, ignore_index,
                      with_entropy, acc, sum_pi_squared=None) -> Launch:
    """The forward over the N rows of ``logits`` (addressed by ``layout``, from ``row_layout``).
    Outputs are preallocated [N] tensors of dtype ``acc``; ``scalars`` is a device tensor
    ``[1/temperature]`` of that dtype. ``sum_pi_squared``: an [N] output for Σ p², or None not
    to compute it (the kernel is then compiled without the accumulator)."""
    n_rows, V = labels.numel(), logits.shape[-1]
    block, warps = block_config(V, logits.element_size())
    with_sum_sq = sum_pi_squared is not None
    # Without Σ p² the kernel is handed lse in its place, never written: no dummy allocation.
    return Launch(
        _logprobs_fwd_kernel, (n_rows,),
        (logits, *layout, labels, logp, entropy, lse, sum_pi_squared if with_sum_sq else lse,
         scalars, V, ignore_index),
        dict(BLOCK_V=block, WITH_ENTROPY=with_entropy, WITH_SUM_PI_SQUARED=with_sum_sq,
             ALIGNED=rows_aligned(logits, layout[1:]), ACC=acc),
        warps)


def plan_logprobs_bwd(logits, layout, dlogits, dlayout, labels, lse, entropy, grad_logp,
                      grad_entropy, scalars, ignore_index, acc) -> Launch:
    """The backward; ``grad_entropy`` None means the entropy got no gradient. Both tensors are
    addressed by their layouts from ``row_layout``."""
    n_rows, V = labels.numel(), logits.shape[-1]
    block, warps = block_config(V, logits.element_size())
    has_h = grad_entropy is not None
    aligned = rows_aligned(logits, layout[1:]) and rows_aligned(dlogits, dlayout[1:])
    return Launch(
        _logprobs_bwd_kernel, (n_rows,),
        (logits, *layout, dlogits, *dlayout, labels, lse, entropy if has_h else lse, grad_logp,
         grad_entropy if has_h else grad_logp, scalars, V, ignore_index),
        dict(BLOCK_V=block, HAS_GRAD_ENTROPY=has_h, ALIGNED=aligned, ACC=acc),
        warps)


def logprobs_fwd(*args, **kwargs) -> None:
    plan = plan_logprobs_fwd(*args, **kwargs)
    if plan.grid[0]:
        plan()


def logprobs_bwd(*args, **kwargs) -> None:
    plan = plan_logprobs_bwd(*args, **kwargs)
    if plan.grid[0]:
        plan()
