"""One module per backend, each implementing the ops of the dispatch table (``ppo_fast.dispatch``)
under the same function names and signatures:

    token_logprobs_forward(logits, labels, inv_temp, ignore_index, with_entropy,
                           with_sum_pi_squared=False) -> (logp, entropy, lse[, sum_pi_squared])
    token_logprobs_backward(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                            inv_temp, ignore_index)              writes ∂loss/∂logits into dlogits
    writes_in_place(logits) -> bool                              may dlogits be the logits buffer
    empty_dlogits(logits) -> Tensor                              a fresh buffer for dlogits
    ppo_loss_forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp, inv_temp,
                     ignore_index, clip_low, clip_high, dual_clip, tis_cap, kl_coef,
                     entropy_coef, kl_estimator) -> PPO_OUTPUTS, per token
    gae_forward(rewards, values, mask, cu_seqlens, gamma, lam) -> (advantages, returns)

and, for the ops that only the reference implements, ``ppo_token_terms``, ``value_loss``,
``kl_penalty``, ``masked_whiten``, ``masked_mean`` and ``group_advantages`` as in
:mod:`ppo_fast.reference`.
"""

PPO_OUTPUTS = ("token_loss", "dloss_dlogp", "logp", "entropy", "lse", "pg", "kl", "log_ratio",
               "flags")
"""The per-token outputs of ``ppo_loss_forward``, in order; ``flags`` is int8 (bit 0: clipped,
bit 1: clipped by the dual-clip cap), the rest are float32 (float64 for float64 logits)."""


def rows_apart(logits) -> bool:
    """Whether the rows of ``logits [..., V]`` (unit stride on V) occupy disjoint memory, so a
    gradient written over one row cannot change another that is still to be read. An expanded
    view (stride 0) or overlapping strides fail; sizes of 1 do not count."""
    extent = logits.shape[-1]
    for stride, size in sorted((abs(t), s) for s, t in zip(logits.shape[:-1], logits.stride()[:-1]) if s > 1):
        if stride < extent:
            return False
        extent += stride * (size - 1)
    return True
