"""The full KL to the reference over the whole vocabulary from two rows of logits, forward and
backward, one pass each (``kl_estimator="full"``, :mod:`ppo_fast.ops.full_kl`).

For the policy's row z and the reference's r (length V), with s = z/τ, s_ref = r/τ, one program
per row keeps the online statistics of both softmaxes and one more sum,

    m, d         = max_v s_v,      Σ_v exp(s_v − m)         (rescaled when m rises)
    m_ref, d_ref = max_v s_ref,v,  Σ_v exp(s_ref,v − m_ref)
    a            = Σ_v exp(s_v − m)·((s_v − m) − (s_ref,v − m_ref))
    d_a          = Σ_v exp(s_v − m)
    KL           = (a + d_a·(log d_ref − log d))/d         (= Σ_v π_v (log π_v − log ρ_v))

over the tokens the reference does not ban (ρ_v > 0), each term relative to both maxima, so an
offset between the two rows cancels term by term; the KL is +inf where a banned one has π_v > 0
at the end (a term with π_v = 0 is 0, whatever ρ_v is, as in the spec). The same pass keeps
t = Σ_v exp(s_v − m)·(s_v − m) for the policy's entropy H = log d − t/d, and reads the label's logit
for logp = s_y − lse. The policy's m, d and t come from :func:`kernels.logprobs.online_softmax_step`
over blocks of the log-prob kernel's size, so its logp, H and lse are bitwise those of
``pf.token_logprobs``: a rollout's log-probs and the full-KL loss's agree exactly. The forward
writes the KL, both log-sum-exps, logp and H; the backward reads both rows again and writes

    ∂L/∂z_v = ( g·π_v (log π_v − log ρ_v − KL) + g_y·(1[v = y] − π_v) − h·π_v (log π_v + H) ) / τ

with π_v = exp(s_v − lse), g = ∂L/∂KL, g_y = ∂L/∂logp and h = ∂L/∂H (a loss over all three, as
the PPO loss with the full KL, is one backward pass; a KL alone has g_y = h = 0), in the dtype of
its output (the logits', or float32 for a float32 GEMM after it). The same online update serves
the two heads' kernel, which computes the rows tile by tile (:mod:`kernels.linear_logprobs`).

Batch invariance: one program per row, blocks from V and the dtype alone, no row-addressing
integer or pointer specialised (as in :mod:`kernels.logprobs`): a row's KL is bitwise the same
whatever batch it is in. Rows whose label is ``ignore_index`` are never read: the forward writes
0 there, the backward zeros. A label outside ``[0, V)`` gives a NaN logp, as in logprobs.py.
"""

import triton
import triton.language as tl

from .launch import Launch, rows_aligned
from .linear_logprobs import INTERPRETED, full_kl_of_sums, to_element
from .logprobs import ROW_ADDRESSING, block_config, online_softmax_step, row_pointer

REF_ADDRESSING = ["ref_rows_inner", "ref_stride_outer", "ref_stride_inner"]
OUT_ADDRESSING = ["drows_inner", "dstride_outer", "dstride_inner"]


@triton.jit(do_not_specialize=ROW_ADDRESSING + REF_ADDRESSING,
            do_not_specialize_on_alignment=["logits_ptr", "ref_logits_ptr", "labels_ptr", "kl_ptr", "lse_ptr",
                                            "ref_lse_ptr", "logp_ptr", "entropy_ptr", "scalars_ptr"])
def _full_kl_fwd_kernel(
    logits_ptr,  # [N, V] any float dtype, unit column stride, rows as in row_pointer
    rows_inner,
    stride_outer,
    stride_inner,
    ref_logits_ptr,  # [N, V] any float dtype, its own row addressing
    ref_rows_inner,
    ref_stride_outer,
    ref_stride_inner,
    labels_ptr,  # [N] int32/int64, contiguous
    kl_ptr,  # [N] out, ACC dtype
    lse_ptr,  # [N] out, ACC dtype: the policy's log-sum-exp of s
    ref_lse_ptr,  # [N] out, ACC dtype: the reference's
    logp_ptr,  # [N] out, ACC dtype: the policy's log-prob of the label
    entropy_ptr,  # [N] out, ACC dtype: the policy's entropy
    scalars_ptr,  # [1] ACC dtype: 1/temperature
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ALIGNED: tl.constexpr,  # rows of both logits start 16-byte aligned
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = tl.load(scalars_ptr)
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    row_ptr = row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner, ALIGNED)
    ref_ptr = row_pointer(ref_logits_ptr, row, ref_rows_inner, ref_stride_outer, ref_stride_inner, ALIGNED)
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((), ACC)
    t = tl.zeros((), ACC)
    m_ref = tl.full((), float("-inf"), ACC)
    d_ref = tl.zeros((), ACC)
    a = tl.zeros((), ACC)
    d_a = tl.zeros((), ACC)
    banned_top = tl.full((), float("-inf"), ACC)
    n_read = tl.where(active, V, 0)
    for start in range(0, n_read, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_read
        # Past the row both are −inf: banned by the reference, and π = 0 there, so no term.
        s = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(ACC) * inv_temp
        s_ref = tl.load(ref_ptr + cols, mask=in_row, other=float("-inf")).to(ACC) * inv_temp
        # A row of −inf so far keeps its maximum −inf; exp(−inf − −inf) would be NaN.
        m_ref_new = tl.maximum(m_ref, tl.max(s_ref, axis=0))
        m_ref_safe = tl.where(m_ref_new == float("-inf"), 0.0, m_ref_new)
        d_ref = d_ref * tl.exp(m_ref - m_ref_safe) + tl.sum(tl.exp(s_ref - m_ref_safe), axis=0)
        ref_banned = s_ref == float("-inf")
        banned_top = tl.maximum(banned_top, tl.max(tl.where(ref_banned, s, float("-inf")), axis=0))

        m_new, m_safe, rescale, e, d, t = online_softmax_step(s, m, d, t, True)
        # When the maxima rise every earlier term of a moves by (m_ref_new − m_ref) − (m_new − m);
        # where d_a is still 0 a maximum may be −inf: no shift, and no inf·0.
        seen = d_a > 0
        shift = tl.where(seen, m_ref_safe - m_ref, 0.0) - tl.where(seen, m_safe - m, 0.0)
        # The floor keeps a token the policy bans (e = 0) from giving 0·(−inf).
        gap = tl.where(ref_banned, 0.0, tl.maximum(s - m_safe, -3.0e38) - (s_ref - m_ref_safe))
        a = (a + shift * d_a) * rescale + tl.sum(e * gap, axis=0)
        d_a = d_a * rescale + tl.sum(tl.where(ref_banned, 0.0, e), axis=0)
        m = m_new
        m_ref = m_ref_new

    kl, lse, ref_lse = full_kl_of_sums(m, d, m_ref, d_ref, a, d_a, banned_top)
    in_range = (label >= 0) & (label < V)
    s_label = tl.load(row_ptr + tl.where(in_range, label, 0), mask=active & in_range, other=0.0).to(ACC)
    logp = tl.where(in_range, s_label * inv_temp - lse, float("nan"))
    tl.store(kl_ptr + row, tl.where(active, kl, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    tl.store(ref_lse_ptr + row, tl.where(active, ref_lse, 0.0))
    tl.store(logp_ptr + row, tl.where(active, logp, 0.0))
    tl.store(entropy_ptr + row, tl.where(active, tl.log(d) - t / d, 0.0))


@triton.jit(do_not_specialize=ROW_ADDRESSING + REF_ADDRESSING + OUT_ADDRESSING,
            do_not_specialize_on_alignment=["logits_ptr", "ref_logits_ptr", "dlogits_ptr", "labels_ptr", "kl_ptr",
                                            "lse_ptr", "ref_lse_ptr", "entropy_ptr", "grad_kl_ptr",
                                            "grad_logp_ptr", "grad_entropy_ptr", "scalars_ptr"])
def _full_kl_bwd_kernel(
    logits_ptr,  # [N, V] read, rows as in row_pointer
    rows_inner,
    stride_outer,
    stride_inner,
    ref_logits_ptr,  # [N, V] read, its own row addressing
    ref_rows_inner,
    ref_stride_outer,
    ref_stride_inner,
    dlogits_ptr,  # [N, V] out, any float dtype, its own row addressing
    drows_inner,
    dstride_outer,
    dstride_inner,
    labels_ptr,  # [N]
    kl_ptr,  # [N] ACC dtype, as the forward wrote them
    lse_ptr,  # [N]
    ref_lse_ptr,  # [N]
    entropy_ptr,  # [N] ACC dtype, as the forward wrote it
    grad_kl_ptr,  # [N] ACC dtype
    grad_logp_ptr,  # [N] ACC dtype
    grad_entropy_ptr,  # [N] ACC dtype
    scalars_ptr,  # [1] ACC dtype: 1/temperature
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ALIGNED: tl.constexpr,  # rows of all three start 16-byte aligned
    ACC: tl.constexpr,
    BY_BITS: tl.constexpr,  # the interpreter: bfloat16 rounded on the bits (kernels.linear_logprobs.to_element)
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = tl.load(scalars_ptr)
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    lse = tl.load(lse_ptr + row)
    ref_lse = tl.load(ref_lse_ptr + row)
    kl = tl.load(kl_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    scale = tl.load(grad_kl_ptr + row) * inv_temp
    scale_y = tl.load(grad_logp_ptr + row) * inv_temp
    scale_h = tl.load(grad_entropy_ptr + row) * inv_temp
    row_ptr = row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner, ALIGNED)
    ref_ptr = row_pointer(ref_logits_ptr, row, ref_rows_inner, ref_stride_outer, ref_stride_inner, ALIGNED)
    drow_ptr = row_pointer(dlogits_ptr, row, drows_inner, dstride_outer, dstride_inner, ALIGNED)
    n_read = tl.where(active, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        read = cols < n_read
        log_p = tl.load(row_ptr + cols, mask=read, other=float("-inf")).to(ACC) * inv_temp - lse
        log_ref = tl.load(ref_ptr + cols, mask=read, other=0.0).to(ACC) * inv_temp - ref_lse
        p = tl.exp(log_p)
        # π_v = 0 gives 0 whatever ρ_v is (log π − log ρ may be −inf − −inf there).
        dz = tl.where(p > 0, p * ((log_p - log_ref - kl) * scale - scale_y - (log_p + entropy) * scale_h), 0.0)
        dz = tl.where(active & (cols == label), dz + scale_y, dz)
        tl.store(drow_ptr + cols, to_element(dz, dlogits_ptr.dtype.element_ty, BY_BITS), mask=cols < V)


def _layouts_aligned(*pairs) -> bool:
    return all(rows_aligned(tensor, layout[1:]) for tensor, layout in pairs)


def plan_full_kl_fwd(logits, layout, ref_logits, ref_layout, labels, kl, lse, ref_lse, logp, entropy, scalars,
                     ignore_index, acc) -> Launch:
    """The forward over the N rows of ``logits`` and ``ref_logits`` (each addressed by its layout
    from :func:`kernels.logprobs.row_layout`); ``kl``, ``lse``, ``ref_lse``, ``logp``, ``entropy``
    preallocated ``[N]`` of dtype ``acc``; ``scalars`` a device tensor ``[1/temperature]`` of
    that dtype. The block is the log-prob kernel's for the policy's dtype, so the policy's sums
    go block for block as there (two rows' blocks then live at once: the compile check holds it
    free of spills)."""
    V = logits.shape[-1]
    block, warps = block_config(V, logits.element_size())
    return Launch(
        _full_kl_fwd_kernel, (labels.numel(),),
        (logits, *layout, ref_logits, *ref_layout, labels, kl, lse, ref_lse, logp, entropy, scalars, V,
         ignore_index),
        dict(BLOCK_V=block, ALIGNED=_layouts_aligned((logits, layout), (ref_logits, ref_layout)), ACC=acc),
        warps)


def plan_full_kl_bwd(logits, layout, ref_logits, ref_layout, dlogits, dlayout, labels, kl, lse, ref_lse, entropy,
                     grad_kl, grad_logp, grad_entropy, scalars, ignore_index, acc) -> Launch:
    """The backward into ``dlogits`` (any float dtype, addressed by ``dlayout``), from the
    forward's ``kl``, ``lse``, ``ref_lse``, ``entropy`` and the upstream gradients of the KL, the
    log-prob and the entropy, all ``[N]`` of dtype ``acc``."""
    V = logits.shape[-1]
    block, warps = block_config(V, max(logits.element_size(), ref_logits.element_size(), 4))
    aligned = _layouts_aligned((logits, layout), (ref_logits, ref_layout), (dlogits, dlayout))
    return Launch(
        _full_kl_bwd_kernel, (labels.numel(),),
        (logits, *layout, ref_logits, *ref_layout, dlogits, *dlayout, labels, kl, lse, ref_lse, entropy, grad_kl,
         grad_logp, grad_entropy, scalars, V, ignore_index),
        dict(BLOCK_V=block, ALIGNED=aligned, ACC=acc, BY_BITS=INTERPRETED),
        warps)


def full_kl_fwd(*args, **kwargs) -> None:
    plan = plan_full_kl_fwd(*args, **kwargs)
    if plan.grid[0]:
        plan()


def full_kl_bwd(*args, **kwargs) -> None:
    plan = plan_full_kl_bwd(*args, **kwargs)
    if plan.grid[0]:
        plan()
