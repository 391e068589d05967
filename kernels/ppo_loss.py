"""Fused PPO actor loss forward: one pass over each logits row, then the per-token loss math.

Per token, with logp and entropy H from the row (see logprobs.py), Δ = logp − old_logp:

    ratio = exp(clamp(Δ, ±20))
    pg    = max(−A·ratio, −A·clip(ratio, 1 − ε_low, 1 + ε_high))         clipped := second wins
    dual clip (c > 1), A < 0:  pg = min(pg, −A·c)                          clipped_lower := cap wins
    truncated IS:  pg ·= min(exp(clamp(old − rollout, ±20)), cap)
    kl    = estimator(logp, ref_logp)                                      (see KL modes below)
    token_loss = pg + β·kl − η·H

and the derivative ∂token_loss/∂logp, so the backward is the log-prob backward with
g = upstream·∂loss/∂logp and h = −upstream·η: one read of the logits and one write of dlogits.

Rows whose label is ``ignore_index`` (masked-out tokens: the launcher folds the mask into the
labels) are never read and give zeros everywhere. Rows are addressed, specialised and reduced as
in logprobs.py, so a token's outputs do not depend on the batch it is in.
"""

import triton
import triton.language as tl

from .launch import Launch, rows_aligned
from .logprobs import ROW_ADDRESSING, block_config, row_lse_entropy, row_pointer

KL_MODES = {None: 0, "k1": 1, "abs": 2, "k2": 3, "k3": 4, "k1+": 5, "k3+": 6}
SCALARS = ("inv_temp", "clip_low", "clip_high", "dual_clip", "tis_cap", "kl_coef", "entropy_coef")
"""Per-step coefficients, passed at run time (in a tensor) so changing them never recompiles."""


@triton.jit
def _kl_and_grad(logp, ref, KL_MODE: tl.constexpr):
    """(kl, ∂kl/∂logp) of one token; k1+/k3+ take the k2 gradient."""
    diff = logp - ref
    if KL_MODE == 1:
        kl = diff
        dkl = tl.full(diff.shape, 1.0, diff.dtype)
    elif KL_MODE == 2:
        kl = tl.abs(diff)
        dkl = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(diff.dtype)
    elif KL_MODE == 3:
        kl = 0.5 * diff * diff
        dkl = diff
    elif KL_MODE == 5:
        kl = diff
        dkl = diff
    else:
        # k3 (mode 4) and k3+ (mode 6): e^x − x − 1 with x = clamp(ref − logp, ±20), result ±10.
        x = -diff
        x_in = (x >= -20.0) & (x <= 20.0)
        x = tl.minimum(tl.maximum(x, -20.0), 20.0)
        raw = tl.exp(x) - x - 1.0
        kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
        if KL_MODE == 6:
            dkl = diff
        else:
            dkl = tl.where(x_in & (raw >= -10.0) & (raw <= 10.0), 1.0 - tl.exp(x), 0.0)
    return kl, dkl


@triton.jit(do_not_specialize=ROW_ADDRESSING,
            do_not_specialize_on_alignment=["logits_ptr", "labels_ptr", "old_logp_ptr", "adv_ptr",
                                            "ref_logp_ptr", "rollout_logp_ptr", "token_loss_ptr",
                                            "dloss_dlogp_ptr", "logp_ptr", "entropy_ptr", "lse_ptr",
                                            "pg_ptr", "kl_ptr", "log_ratio_ptr", "flags_ptr",
                                            "scalars_ptr"])
def _ppo_fwd_kernel(
    logits_ptr,  # [N, V] unit column stride, rows as in logprobs.row_pointer
    rows_inner,
    stride_outer,
    stride_inner,
    labels_ptr,  # [N] int, ignore_index where the token is masked out
    old_logp_ptr,  # [N]
    adv_ptr,  # [N]
    ref_logp_ptr,  # [N] (read only with KL_MODE > 0)
    rollout_logp_ptr,  # [N] (read only with HAS_TIS)
    token_loss_ptr,  # [N] out: pg + β·kl − η·H
    dloss_dlogp_ptr,  # [N] out
    logp_ptr,  # [N] out
    entropy_ptr,  # [N] out
    lse_ptr,  # [N] out
    pg_ptr,  # [N] out
    kl_ptr,  # [N] out
    log_ratio_ptr,  # [N] out: clamped Δ
    flags_ptr,  # [N] int8 out: bit 0 clipped, bit 1 clipped_lower
    scalars_ptr,  # [7] ACC dtype, SCALARS order; a tensor so float64 runs keep full precision
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    KL_MODE: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr,
    HAS_TIS: tl.constexpr,
    ALIGNED: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_temp = tl.load(scalars_ptr + 0)
    clip_low = tl.load(scalars_ptr + 1)
    clip_high = tl.load(scalars_ptr + 2)
    dual_clip = tl.load(scalars_ptr + 3)
    tis_cap = tl.load(scalars_ptr + 4)
    kl_coef = tl.load(scalars_ptr + 5)
    entropy_coef = tl.load(scalars_ptr + 6)
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    in_range = (label >= 0) & (label < V)
    row_ptr = row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner, ALIGNED)
    lse, entropy = row_lse_entropy(row_ptr, V, inv_temp, active & in_range, BLOCK_V, True, ACC)
    lse = tl.where(in_range, lse, float("nan"))
    s_label = tl.load(row_ptr + tl.where(in_range, label, 0), mask=active & in_range,
                      other=0.0).to(ACC)
    logp = s_label * inv_temp - lse

    adv = tl.load(adv_ptr + row).to(ACC)
    raw_log_ratio = logp - tl.load(old_logp_ptr + row).to(ACC)
    ratio_in = (raw_log_ratio >= -20.0) & (raw_log_ratio <= 20.0)
    log_ratio = tl.minimum(tl.maximum(raw_log_ratio, -20.0), 20.0)
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_loss = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = clipped_loss > unclipped
    pg = tl.where(clipped, clipped_loss, unclipped)
    dpg = tl.where(clipped | (~ratio_in), 0.0, unclipped)
    clipped_lower = tl.zeros((), tl.int1)
    if HAS_DUAL_CLIP:
        cap = -adv * dual_clip
        clipped_lower = (adv < 0) & (pg > cap)
        pg = tl.where(clipped_lower, cap, pg)
        dpg = tl.where(clipped_lower, 0.0, dpg)
    if HAS_TIS:
        old = tl.load(old_logp_ptr + row).to(ACC)
        is_log_ratio = old - tl.load(rollout_logp_ptr + row).to(ACC)
        is_log_ratio = tl.minimum(tl.maximum(is_log_ratio, -20.0), 20.0)
        is_weight = tl.minimum(tl.exp(is_log_ratio), tis_cap)
        pg = pg * is_weight
        dpg = dpg * is_weight
    if KL_MODE > 0:
        kl, dkl = _kl_and_grad(logp, tl.load(ref_logp_ptr + row).to(ACC), KL_MODE)
    else:
        kl = tl.zeros((), ACC)
        dkl = tl.zeros((), ACC)

    token_loss = pg + kl_coef * kl - entropy_coef * entropy
    dloss = dpg + kl_coef * dkl
    tl.store(token_loss_ptr + row, tl.where(active, token_loss, 0.0))
    tl.store(dloss_dlogp_ptr + row, tl.where(active, dloss, 0.0))
    tl.store(logp_ptr + row, tl.where(active, logp, 0.0))
    tl.store(entropy_ptr + row, tl.where(active, entropy, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    tl.store(pg_ptr + row, tl.where(active, pg, 0.0))
    tl.store(kl_ptr + row, tl.where(active, kl, 0.0))
    tl.store(log_ratio_ptr + row, tl.where(active, log_ratio, 0.0))
    flags = clipped.to(tl.int8) + 2 * clipped_lower.to(tl.int8)
    tl.store(flags_ptr + row, tl.where(active, flags, 0).to(tl.int8))


def plan_ppo_fwd(logits, layout, labels, old_logp, adv, ref_logp, rollout_logp, outputs, scalars,
                 *, ignore_index, has_dual_clip, kl_mode, acc) -> Launch:
    """The fused forward. ``outputs`` is a dict of preallocated [N] tensors named as the kernel's
    out-pointers (token_loss, dloss_dlogp, logp, entropy, lse, pg, kl, log_ratio, flags);
    ``scalars`` a device tensor of the ``SCALARS`` values in the accumulation dtype; ``kl_mode``
    a key of ``KL_MODES`` (None: no KL term).
    """
    n_rows, V = labels.numel(), logits.shape[-1]
    block, warps = block_config(V, logits.element_size())
    o = outputs
    return Launch(
        _ppo_fwd_kernel, (n_rows,),
        (logits, *layout, labels, old_logp, adv,
         old_logp if ref_logp is None else ref_logp,
         old_logp if rollout_logp is None else rollout_logp,
         o["token_loss"], o["dloss_dlogp"], o["logp"], o["entropy"], o["lse"], o["pg"], o["kl"],
         o["log_ratio"], o["flags"], scalars, V, ignore_index),
        dict(BLOCK_V=block, KL_MODE=KL_MODES[kl_mode if ref_logp is not None else None],
             HAS_DUAL_CLIP=has_dual_clip, HAS_TIS=rollout_logp is not None,
             ALIGNED=rows_aligned(logits, layout[1:]), ACC=acc),
        warps)


def ppo_fwd(*args, **kwargs) -> None:
    plan = plan_ppo_fwd(*args, **kwargs)
    if plan.grid[0]:
        plan()
