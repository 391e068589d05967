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

from .functional import fused_linear_ppo_loss, fused_linear_token_logprobs, token_logprobs
from .sequences import completion_forward, completion_logits, position_ids


def _output_embedding(model: nn.Module):
    module = getattr(model, "module", model)
    get = getattr(module, "get_output_embeddings", None)
    return get() if callable(get) else None


def _head_problem(head) -> str | None:
    if not isinstance(head, nn.Linear):
        return "the model has no nn.Linear output embedding (get_output_embeddings())"
    if type(head).forward is not nn.Linear.forward:
        return f"its output embedding is a {type(head).__name__} with its own forward, not nn.Linear's"
    if "forward" in vars(head):
        # accelerate's offload and device-map hooks live there: swapping it would bypass them.
        return "its output embedding's forward is wrapped (an instance attribute, e.g. accelerate hooks)"
    return None


def output_head(model: nn.Module) -> nn.Linear:
    """The model's output embedding, an ``nn.Linear`` with nn.Linear's own unwrapped forward (a
    DeepSpeed engine's module's); a ValueError saying why otherwise."""
    head = _output_embedding(model)
    problem = _head_problem(head)
    if problem:
        raise ValueError(f"the fused head cannot serve this model: {problem}")
    return head


@contextlib.contextmanager
def _head_forward(head: nn.Linear, forward):
    """``head.forward`` replaced by ``forward(hidden)`` (an instance attribute, so the module's
    hooks still run around it) until the block ends."""
    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _check_call(sequences, attention_mask, prompt_len):
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise ValueError(f"sequences must be a [B, T] tensor of token ids, got "
                         f"{getattr(sequences, 'shape', type(sequences).__name__)}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != sequences.shape:
        raise ValueError(f"attention_mask must be a tensor of sequences' shape {tuple(sequences.shape)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 0 < prompt_len <= sequences.shape[1]:
        raise ValueError(f"prompt_len must be an int in [1, {sequences.shape[1]}] (the completion follows at least "
                         f"one prompt token), got {prompt_len!r}")


def fused_head_unsupported(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
    """None when the model's logits on this batch are exactly its output embedding applied to the
    hidden states that embedding receives (then the fused head computes the same function);
    otherwise the reason, in words."""
    head = _output_embedding(model)
    problem = _head_problem(head)
    if problem:
        return problem
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
    # NaN equals NaN here: eager attention leaves NaN at fully padded positions on both sides.
    if not torch.allclose(logits.to(expected.dtype), expected, rtol=0, atol=0, equal_nan=True):
        gap = (logits.double() - expected.double()).nan_to_num().abs().max().item()
        return (f"the model transforms its head's output (max |logits - head(hidden)| = {gap:.3g}: "
                "a logit soft-cap or scale after the head)")
    return None


def _through_head(model, sequences, attention_mask, prompt_len, compute):
    """The model's forward with its head replaced by ``compute(hidden [B, N, H], weight, bias)`` on
    the positions that predict ``sequences[:, prompt_len:]``; returns what ``compute`` returned,
    as it came out of the model (carrying ZeRO-3's backward hooks)."""
    head = output_head(model)
    n_completion = sequences.shape[1] - prompt_len
    computed = []

    def fused(hidden):
        computed.append(compute(hidden[:, -(n_completion + 1):-1], head.weight, head.bias))
        return computed[-1]

    with _head_forward(head, fused):
        out = completion_forward(model, sequences, attention_mask, prompt_len)
    # What the model returns must be what the head gave it (ZeRO-3 may hand back a new tensor with
    # the same values): a soft-cap or scale after the head would otherwise act on log-probs or the loss.
    if len(computed) != 1 or out.shape != computed[0].shape or not torch.allclose(
            out.to(computed[0].dtype), computed[0], rtol=0, atol=0, equal_nan=True):
        raise ValueError("the model transforms its head's output, so the fused head would give wrong numbers: "
                         "use the logits path (fused_head_unsupported(model, ...) says why)")
    return out


def completion_logprobs(model, sequences, attention_mask, prompt_len, *, temperature=1.0, fused=True):
    """``[B, N]`` log-probs of ``sequences[:, prompt_len:]`` under softmax(logits / temperature),
    from the fused head; a ValueError where the model's logits are not its head's output (see
    :func:`fused_head_unsupported`). ``fused=False``: from the model's logits (pf.token_logprobs),
    for a model the fused head cannot serve."""
    _check_call(sequences, attention_mask, prompt_len)
    labels = sequences[:, prompt_len:]
    if not fused:
        return token_logprobs(completion_logits(model, sequences, attention_mask, prompt_len), labels,
                              temperature=temperature)
    return _through_head(model, sequences, attention_mask, prompt_len, lambda hidden, weight, bias:
                         fused_linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature))


def completion_head_inputs(model, sequences, attention_mask, prompt_len):
    """``(hidden [B, N, H], weight [V, H], bias [V] or None)``: what the model's head receives on
    the positions that predict ``sequences[:, prompt_len:]``, and its parameters, as data (no
    graph), from one forward without the logits: the reference head of a full KL
    (``completion_ppo_loss(..., kl_estimator="full", ref_hidden=..., ref_weight=...)``). The
    parameters are copied while the head's forward holds them, so a ZeRO-3 partitioned head hands
    back whole ones (one head's size in memory while they live)."""
    _check_call(sequences, attention_mask, prompt_len)
    captured = {}

    def capture(hidden, weight, bias):
        captured.update(hidden=hidden, weight=weight.detach().clone(),
                        bias=None if bias is None else bias.detach().clone())
        return hidden

    with torch.no_grad():
        # What the head received, not what the model returns: a model that upcasts its logits
        # would hand back float32 hidden states beside a 16-bit head.
        _through_head(model, sequences, attention_mask, prompt_len, capture)
    return captured["hidden"], captured["weight"], captured["bias"]


def completion_ppo_loss(model, sequences, attention_mask, prompt_len, old_logp, advantages, mask, **options):
    """``(loss, metrics)`` of :func:`ppo_fast.fused_linear_ppo_loss` on the completion tokens;
    ``options`` as there."""
    _check_call(sequences, attention_mask, prompt_len)
    labels = sequences[:, prompt_len:]
    metrics = {}

    def loss(hidden, weight, bias):
        value, metrics_ = fused_linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, bias=bias,
                                                **options)
        metrics.update(metrics_)
        return value

    return _through_head(model, sequences, attention_mask, prompt_len, loss), metrics
