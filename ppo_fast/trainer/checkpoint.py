"""Checkpoints: both DeepSpeed engines, the trainer's state and every random stream, published
by an atomic pointer (``checkpoints/latest``, written last) so a kill mid-save leaves the previous
checkpoint in force."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """``<run>/checkpoints/{actor,critic}/step<N>`` (DeepSpeed), ``trainer/step<N>/rank<r>.pt``
    (everything else of each rank) and ``latest`` (the tag of the last complete one)."""

    def __init__(self, directory: Path, rank: int):
        self.directory = directory
        self.rank = rank

    def save(self, step: int, actor, critic, state: dict) -> Path:
        tag = f"step{step}"
        actor.save_checkpoint(str(self.directory / "actor"), tag=tag)
        critic.save_checkpoint(str(self.directory / "critic"), tag=tag)
        state_dir = self.directory / "trainer" / tag
        state_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, state_dir / f"rank{self.rank}.pt")
        torch.distributed.barrier()
        if self.rank == 0:
            tmp = self.directory / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.directory / "latest")
        torch.distributed.barrier()
        return self.directory / tag

    def load(self, actor, critic) -> dict | None:
        """Restore the engines from the last checkpoint and return the trainer's state; None
        when there is none."""
        pointer = self.directory / "latest"
        if not pointer.exists():
            return None
        tag = pointer.read_text().strip()
        for engine, name in ((actor, "actor"), (critic, "critic")):
            path, _ = engine.load_checkpoint(str(self.directory / name), tag=tag)
            if path is None:
                raise RuntimeError(f"checkpoint {tag} of the {name} is missing under {self.directory}")
        return torch.load(self.directory / "trainer" / tag / f"rank{self.rank}.pt",
                          weights_only=False)


def export_policy(actor, tokenizer, directory: Path, rank: int) -> None:
    """The policy as a Hugging Face directory (gathered from ZeRO-3 shards if needed)."""
    import deepspeed

    model = actor.module
    with deepspeed.zero.GatheredParameters(list(model.parameters()),
                                           enabled=actor.zero_optimization_stage() == 3):
        if rank == 0 and hasattr(model, "save_pretrained"):
            model.save_pretrained(str(directory))
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(directory))
