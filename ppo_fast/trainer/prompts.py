"""Prompts: reading them, sampling this rank's share in checkpointable order, and encoding them
for generation."""

from __future__ import annotations

from pathlib import Path

import torch

from ..sequences import left_pad
from .data import FORMATS, exists_as_file, prompt_texts, utf8_text


def load_prompts(path: str, tokenizer=None) -> list[str]:
    """The ``prompt`` column of a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, or its
    chat ``messages`` rendered by ``tokenizer``'s chat template (:func:`data.prompt_texts`), or one
    prompt per line of any other file."""
    if Path(path).suffix.lower() in FORMATS:
        return prompt_texts(path, tokenizer)
    exists_as_file(Path(path), "prompt file")
    prompts = [line for line in utf8_text(Path(path)).splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts_file {path} holds no prompts")
    return prompts


class PromptSampler:
    """Shuffled passes over this rank's share of the prompts; its position is checkpointed."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int, rank: int, world: int):
        self.prompts = prompts[rank::world] if world > 1 else prompts
        if not self.prompts:
            raise ValueError(f"no prompts for rank {rank} of {world}: the prompt list has "
                             f"{len(prompts)} entries")
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        return torch.randperm(len(self.prompts),
                              generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_batch(self) -> list[str]:
        batch = []
        while len(batch) < self.batch_size:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            batch.append(self.prompts[self._order[self.index]])
            self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``; a prompt longer than ``max_prompt_len`` tokens
    is an error naming it."""
    rows = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    too_long = [(i, len(r)) for i, r in enumerate(rows) if len(r) > max_prompt_len]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"prompt {prompts[i][:40]!r} is {n} tokens, longer than max_prompt_len="
                         f"{max_prompt_len} ({len(too_long)} such prompts in the batch)")
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    return ids.to(device), mask.to(device)
