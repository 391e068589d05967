"""verl's log-prob, entropy and Σπ² functions of logits, computed by ppo_fast's fused op.

verl turns logits into per-token values in ``verl.utils.torch_functional`` (and its engines import
``logprobs_from_logits`` by name). These have verl's signatures; underneath, one pass of
:func:`ppo_fast.token_logprobs` over each logits row (the Triton kernel on CUDA), with no float32
copy of bf16 logits and no ``[tokens, vocab]`` softmax. Differences from verl, on purpose:

* Outputs are float32 (float64 for float64 logits) whatever the logits' dtype; verl returns bf16
  log-probs for bf16 logits on its fallback path.
* Labels equal to -100 give 0 (flash-attn's cross-entropy, which verl prefers, does the same;
  verl's fallback would fail on them).
* ``calculate_sum_pi_squared_from_logits`` carries no gradient (verl's would; verl computes it for
  the old policy's advantages, where none is taken).
"""

from __future__ import annotations

import torch

from ...functional import token_logprobs

__all__ = ["calculate_sum_pi_squared_from_logits", "entropy_from_logits",
           "entropy_from_logits_with_chunking", "logprobs_from_logits"]


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """Log-probs of ``labels`` under ``softmax(logits)``; ``inplace_backward`` writes the gradient
    into the logits buffer, as verl's flash-attn path does (verl passes False where it still
    needs the logits)."""
    return token_logprobs(logits, labels, inplace_backward=bool(inplace_backward))


def _entropy(logits):
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs(logits, labels, return_entropy=True)[1]


def entropy_from_logits(logits):
    """Entropy of ``softmax(logits)`` per position, differentiable."""
    return _entropy(logits)


def entropy_from_logits_with_chunking(logits, chunk_size=2048):
    """Entropy per position; the fused kernel streams each row, so ``chunk_size`` (verl's memory
    bound for its float32 chunks) has nothing to bound and is only checked."""
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be an int > 0, got {chunk_size!r}")
    return _entropy(logits)


def calculate_sum_pi_squared_from_logits(logits):
    """``Σ_v softmax(logits)_v²`` per position (no gradient), for the optimal-token-baseline
    advantages."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return token_logprobs(logits, labels, return_sum_pi_squared=True)[1]
