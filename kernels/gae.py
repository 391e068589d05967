"""GAE for a whole batch in one launch: a reverse scan of two affine recurrences per sequence.

Going backwards in time, with m_t the mask, both quantities of the loop in reference.gae are
affine in their successor, x_t = a_t·x_{t+1} + b_t, and affine maps compose associatively:

    V^next_t = V^next_{t+1}                     if m_{t+1} = 0, else V_{t+1}
    A_t      = A_{t+1}                          if m_t = 0,     else γλ·A_{t+1} + r_t + γ·V^next_t − V_t

The maps are chosen with tl.where, never by multiplying with the mask: a masked token's reward
and value (NaN, inf, garbage) must not reach any output. Outputs at masked tokens are 0.

One program scans one sequence in chunks of BLOCK_T from its end; the chunk is loaded in reverse
time order so a forward ``tl.associative_scan`` composes the maps, and the value after each chunk
carries into the next. Positions outside the sequence load as masked tokens, whose maps are the
identity (a = 1, b = 0), so the last scan element always holds the carry for the next chunk.
"""

import triton
import triton.language as tl

from .launch import Launch


@triton.jit
def _compose_affine(a_prev, b_prev, a_cur, b_cur):
    """x ↦ a_cur·(a_prev·x + b_prev) + b_cur: apply the later-in-scan map last."""
    return a_prev * a_cur, a_cur * b_prev + b_cur


@triton.jit
def _gae_kernel(
    rewards_ptr,  # [total] packed tokens
    values_ptr,  # [total]
    mask_ptr,  # [total], any dtype; nonzero marks a token that counts
    cu_seqlens_ptr,  # [S + 1] int, sequence s is [cu[s], cu[s+1])
    adv_ptr,  # [total] out
    ret_ptr,  # [total] out
    scalars_ptr,  # [2] ACC dtype: gamma, gamma·lambda (a tensor: float64 keeps full precision)
    BLOCK_T: tl.constexpr,
    ACC: tl.constexpr,
):
    seq = tl.program_id(0)
    gamma = tl.load(scalars_ptr + 0)
    gamma_lam = tl.load(scalars_ptr + 1)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    lane = tl.arange(0, BLOCK_T)
    last_lane = lane == BLOCK_T - 1
    carry_next_value = tl.zeros((), ACC)
    carry_adv = tl.zeros((), ACC)
    n_chunks = tl.cdiv(end - start, BLOCK_T)
    for chunk in range(0, n_chunks):
        t = end - 1 - chunk * BLOCK_T - lane
        valid = t >= start
        succ_valid = valid & (t + 1 < end)
        keep_succ = tl.load(mask_ptr + t + 1, mask=succ_valid, other=0.0) != 0
        v_succ = tl.load(values_ptr + t + 1, mask=succ_valid, other=0.0).to(ACC)
        a_next, b_next = tl.associative_scan(
            (tl.where(keep_succ, 0.0, 1.0).to(ACC), tl.where(keep_succ, v_succ, 0.0)), 0,
            _compose_affine
        )
        next_value = a_next * carry_next_value + b_next

        keep = tl.load(mask_ptr + t, mask=valid, other=0.0) != 0
        v = tl.load(values_ptr + t, mask=valid, other=0.0).to(ACC)
        r = tl.load(rewards_ptr + t, mask=valid, other=0.0).to(ACC)
        a_adv, b_adv = tl.associative_scan(
            (tl.where(keep, gamma_lam, 1.0).to(ACC), tl.where(keep, r + gamma * next_value - v, 0.0)),
            0, _compose_affine
        )
        adv = a_adv * carry_adv + b_adv
        tl.store(adv_ptr + t, tl.where(keep, adv, 0.0), mask=valid)
        tl.store(ret_ptr + t, tl.where(keep, adv + v, 0.0), mask=valid)

        carry_adv = tl.sum(tl.where(last_lane, adv, 0.0), axis=0)
        carry_next_value = tl.sum(tl.where(last_lane, next_value, 0.0), axis=0)


def plan_gae(rewards, values, mask, cu_seqlens, advantages, returns, scalars, max_len,
             acc) -> Launch:
    """Over packed 1-D inputs (all contiguous; ``mask`` in any dtype, 0/1);
    ``scalars`` is a device tensor ``[gamma, gamma·lam]`` in that dtype and ``max_len`` the
    longest sequence, which sizes the chunks."""
    block = min(triton.next_power_of_2(max(int(max_len), 1)), 1024)
    return Launch(
        _gae_kernel, (cu_seqlens.numel() - 1,),
        (rewards, values, mask, cu_seqlens, advantages, returns, scalars),
        dict(BLOCK_T=block, ACC=acc),
        4 if block <= 256 else 8)


def gae(rewards, values, mask, cu_seqlens, advantages, returns, scalars, max_len, acc) -> None:
    if cu_seqlens.numel() <= 1 or rewards.numel() == 0:
        return
    plan_gae(rewards, values, mask, cu_seqlens, advantages, returns, scalars, max_len, acc)()
