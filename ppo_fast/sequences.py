"""Token-sequence helpers shared by the hybrid engine and the trainer: left padding, positions
that skip it, completion masks, and the logits that predict a completion."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as left-padded ``(input_ids, attention_mask)`` ``[B, max_len]``, the layout
    generation expects."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: every forward that scores a generated sequence must use
    the positions generation used."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_mask(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row."""
    if not eos_ids or completions.shape[1] == 0:
        return torch.ones_like(completions)
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return (eos_before == 0).long()


@functools.lru_cache(maxsize=None)
def _forward_accepts(cls: type, keyword: str) -> bool:
    return keyword in inspect.signature(cls.forward).parameters


def accepts_keyword(model: nn.Module, keyword: str) -> bool:
    """Whether the model's forward (a DeepSpeed engine's wrapped module) names ``keyword``;
    looked up once per class, not per call."""
    return _forward_accepts(type(getattr(model, "module", model)), keyword)


def completion_forward(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                       prompt_len: int) -> torch.Tensor:
    """The model's ``.logits`` output over (at least) the last ``N + 1`` positions, N the
    completion's length: where the model takes ``logits_to_keep``, its LM head skips the prompt
    positions. Position ``-(N + 1) + i`` predicts completion token ``i``."""
    n_completion = sequences.shape[1] - prompt_len
    keep = {"logits_to_keep": n_completion + 1} if accepts_keyword(model, "logits_to_keep") else {}
    return model(input_ids=sequences, attention_mask=attention_mask,
                 position_ids=position_ids(attention_mask), **keep).logits


def completion_logits(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_len: int) -> torch.Tensor:
    """Logits that predict the completion tokens ``sequences[:, prompt_len:]``, ``[B, N, V]``;
    no ``[B, P, V]`` is computed where the model takes ``logits_to_keep``."""
    n_completion = sequences.shape[1] - prompt_len
    return completion_forward(model, sequences, attention_mask, prompt_len)[:, -(n_completion + 1):-1]
