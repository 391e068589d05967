"""verl's fused linear heads (``use_fused_kernels=True``), computed by ppo_fast's fused head.

verl 0.9.1 turns the last hidden states and ``lm_head.weight`` into log-probs and entropy without
the logits through one of two functions, imported by name inside
``verl.models.transformers.dense_common`` (and the multimodal models) at each call:

* ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (its Triton backend, CUDA only):
  ``(hidden, weight, labels, temperature, reduction, dist_process_group) -> (logprobs, entropy)``;
* ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (its torch backend):
  ``FusedLinearForPPO(chunk_size, impl_backend)(hidden_states, vocab_weights, input_ids, temperature)``.

These have verl's signatures and return shapes; underneath, :func:`ppo_fast.fused_linear_token_logprobs`
(the Triton kernel forward on CUDA, chunked GEMMs and the native row kernel on the CPU), on any
device, differentiable in the hidden states and the weight. Differences from verl, on purpose:
labels equal to -100 give 0 and no gradient (verl's kernels would read them as a vocabulary index),
and a vocabulary sharded over ``dist_process_group`` is refused rather than reduced.
"""

from __future__ import annotations

import torch

from ...functional import fused_linear_token_logprobs

__all__ = ["FusedLinearForPPO", "linear_cross_entropy"]

_REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl's ``linear_cross_entropy``: the log-probs of ``labels`` under
    ``softmax(hidden @ weight.T / temperature)`` and the entropy, both flattened to ``[tokens]``;
    ``reduction="sum"`` / ``"mean"`` reduce the log-probs to a scalar (the entropy stays per token),
    as verl's kernel does."""
    if not isinstance(temperature, float):
        raise TypeError(f"temperature must be a float (verl's contract), got {type(temperature).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}")
    if dist_process_group is not None and torch.distributed.get_world_size(dist_process_group) > 1:
        raise NotImplementedError(
            "ppo_fast's fused head takes the whole vocabulary: a weight sharded over dist_process_group (world size "
            f"{torch.distributed.get_world_size(dist_process_group)}) is not supported; gather the lm_head first "
            "or leave use_fused_kernels to verl for tensor-parallel heads")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy = fused_linear_token_logprobs(hidden, weight, labels.reshape(-1), temperature=temperature,
                                                    return_entropy=True)
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO``: ``(log_probs, entropy)`` shaped like ``input_ids``. ``chunk_size``
    and ``impl_backend`` are verl's knobs for its own implementations; ppo_fast's head chooses its
    chunking itself, so they are only checked."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        if not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ValueError(f"chunk_size must be an int > 0, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        if hidden_states.ndim not in (2, 3):
            raise ValueError(f"hidden_states must be 2D or 3D, got shape {tuple(hidden_states.shape)}")
        if input_ids.shape != hidden_states.shape[:-1]:
            raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape "
                             f"{tuple(hidden_states.shape[:-1])}")
        return fused_linear_token_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                           temperature=float(temperature), return_entropy=True)
