"""ppo_fast: fused, exact PPO ops for RLHF of language models.

    import ppo_fast as pf
    logp = pf.token_logprobs(logits, labels)
    loss, metrics = pf.ppo_loss(logits, labels, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.05)
    loss, metrics = pf.ppo_loss(..., loss_type="gspo")        # every verl / OpenRLHF / TRL objective
    adv, returns = pf.advantages("grpo", rewards, mask, group_ids)   # verl's 14 estimators
    weights, mask, stats = pf.rollout_correction(old_logp, rollout_logp, mask, is_level="token")
    with pf.batch_invariant():                                # a row's logits, whatever its batch
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits

The specification is ``ppo_fast.spec``; the ops (``ppo_fast.ops``, one module each) run it in
PyTorch, as fused Triton kernels on CUDA (``ppo_fast.kernels``) or as C++ kernels on the CPU.
``ppo_fast.dispatch`` chooses which backend serves each call; ``PPO_FAST_BACKEND=reference|
triton|native`` forces one.
"""

from .batch_invariant import attention as batch_invariant_attention
from .batch_invariant import (batch_invariant, batch_invariant_bfloat16_gemm, disable_batch_invariant,
                              enable_batch_invariant, is_batch_invariant)
from .correction import rollout_correction
from .dispatch import BackendUnavailable
from .estimators import advantages
from .functional import (
    fused_linear_ppo_loss,
    fused_linear_token_logprobs,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    ppo_loss,
    token_logprobs,
    value_loss,
)
from .hybrid import GenerationOutput, HybridEngine
from .kl_control import AdaptiveKLController, FixedKLController
from .losses import PPOLoss, ValueLoss
from .objectives import LOSS_TYPES

__version__ = "0.1.0"

__all__ = [
    "AdaptiveKLController",
    "BackendUnavailable",
    "FixedKLController",
    "GenerationOutput",
    "HybridEngine",
    "LOSS_TYPES",
    "PPOLoss",
    "ValueLoss",
    "advantages",
    "batch_invariant",
    "batch_invariant_bfloat16_gemm",
    "batch_invariant_attention",
    "disable_batch_invariant",
    "enable_batch_invariant",
    "fused_linear_ppo_loss",
    "fused_linear_token_logprobs",
    "gae",
    "group_advantages",
    "is_batch_invariant",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "ppo_loss",
    "rollout_correction",
    "token_logprobs",
    "value_loss",
]
