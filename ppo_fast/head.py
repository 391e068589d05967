"""The fused linear head inside a Hugging Face causal LM: completion log-probs and the PPO loss
from the model's last hidden states and its output embedding, never its ``[B, T, V]`` logits.

    reason = fused_head_unsupported(model, input_ids, attention_mask)   # None: exact, use it
    logp = completion_logprobs(model, sequences, attention_mask, prompt_len, temperature=0.7)
    loss, metrics = completion_ppo_loss(model, sequences, attention_mask, prompt_len,
                                        old_logp, advantages, mask, clip_low=0.2)

The model runs its own forward; only its output embedding's ``forward`` is swapped, for the one
call, for a function of the hidden states it receives. The head module itself is still called,
so DeepSpeed ZeRO-3 gathers its weight for the forward and again for the backward, as it would for
the logits. Whether the swap is exact is a property of the model, checked on a probe batch: the
logits the model returns must be exactly ``hidden @ weight.T + bias`` of the hidden states its
head receives. A logit soft-cap (Gemma 2), a logit scale (Cohere, Granite) or any other transform
after the head breaks that, and :func:`fused_head_unsupported` says so.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .functional import fused_linear_ppo_loss, fused_linear_token_logprobs
from .sequences import accepts_keyword, position_ids


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output embedding when it is an ``nn.Linear`` (a DeepSpeed engine's module's)."""
    module = getattr(model, "module", model)
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


@contextlib.contextmanager
def _head_forward(head: nn.Linear, forward):
    """``head.forward`` replaced by ``forward(hidden)`` (an instance attribute, so the module's
    hooks still run around it) until the block ends."""
    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _model_forward(model, sequences, attention_mask, prompt_len):
    n_completion = sequences.shape[1] - prompt_len
    keep = {"logits_to_keep": n_completion + 1} if accepts_keyword(model, "logits_to_keep") else {}
    return model(input_ids=sequences, attention_mask=attention_mask,
                 position_ids=position_ids(attention_mask), **keep).logits


def fused_head_unsupported(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
    """None when the model's logits on this batch are exactly its output embedding applied to the
    hidden states that embedding receives (then the fused head computes the same function);
    otherwise the reason, in words."""
    head = output_head(model)
    if head is None:
        return "the model has no nn.Linear output embedding (get_output_embeddings())"
    seen = {}

    def plain_head(hidden):
        seen["logits"] = nn.functional.linear(hidden, head.weight, head.bias)
        return seen["logits"]

    with torch.no_grad(), _head_forward(head, plain_head):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids(attention_mask)).logits
    if "logits" not in seen:
        return "the model's forward does not call its output embedding"
    expected = seen["logits"]
    if logits.shape != expected.shape:
        return (f"the model reshapes its head's output (logits {tuple(logits.shape)}, head output "
                f"{tuple(expected.shape)})")
    if not torch.equal(logits.to(expected.dtype), expected):
        gap = (logits.double() - expected.double()).abs().max().item()
        return (f"the model transforms its head's output (max |logits - head(hidden)| = {gap:.3g}: "
                "a logit soft-cap or scale after the head)")
    return None


def _through_head(model, sequences, attention_mask, prompt_len, compute):
    """The model's forward with its head replaced by ``compute(hidden [B, N, H], weight, bias)`` on
    the positions that predict ``sequences[:, prompt_len:]``; returns what ``compute`` returned,
    as it came out of the model (carrying ZeRO-3's backward hooks)."""
    head = output_head(model)
    n_completion = sequences.shape[1] - prompt_len

    def fused(hidden):
        return compute(hidden[:, -(n_completion + 1):-1], head.weight, head.bias)

    with _head_forward(head, fused):
        return _model_forward(model, sequences, attention_mask, prompt_len)


def completion_logprobs(model, sequences, attention_mask, prompt_len, *, temperature=1.0):
    """``[B, N]`` log-probs of ``sequences[:, prompt_len:]`` under softmax(logits / temperature),
    from the fused head (the model must pass :func:`fused_head_unsupported`)."""
    labels = sequences[:, prompt_len:]
    return _through_head(model, sequences, attention_mask, prompt_len, lambda hidden, weight, bias:
                         fused_linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature))


def completion_ppo_loss(model, sequences, attention_mask, prompt_len, old_logp, advantages, mask, **options):
    """``(loss, metrics)`` of :func:`ppo_fast.fused_linear_ppo_loss` on the completion tokens;
    ``options`` as there."""
    labels = sequences[:, prompt_len:]
    metrics = {}

    def loss(hidden, weight, bias):
        value, metrics_ = fused_linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, bias=bias,
                                                **options)
        metrics.update(metrics_)
        return value

    return _through_head(model, sequences, attention_mask, prompt_len, loss), metrics
