"""Where a run writes: ``<output_dir>/<run_name>/``, decided before any expensive work.

A run directory that exists already is never written into by accident: it is refused unless the
run resumes it (and then it must hold a checkpoint) or ``overwrite`` is set (and then it is
deleted first, saying so). A run without a name gets a fresh one. Every rank agrees: rank 0
decides and the others receive its decision.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch

from .config import ConfigError, PPOConfig


def cache_dir(config: PPOConfig) -> Path:
    """Reusable work shared by runs (the default task's warm-up and reward model)."""
    return Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / ".cache"


def _fresh_name(output_dir: Path) -> str:
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    name, n = stamp, 1
    while (output_dir / name).exists():
        n += 1
        name = f"{stamp}-{n}"
    return name


def _has_checkpoint(run_dir: Path) -> bool:
    directory = run_dir / "checkpoints"
    return directory.is_dir() and any(p.name.startswith("step") for p in directory.iterdir())


def _decide(config: PPOConfig) -> tuple[str, str | None, bool]:
    """(run name, error or None, whether to delete the existing directory)."""
    output_dir = Path(config.output_dir)
    name = config.run_name or _fresh_name(output_dir)
    run_dir = output_dir / name
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if config.resume:
        if not _has_checkpoint(run_dir):
            return name, (f"resume: {run_dir} holds no checkpoint to resume from (start the run "
                          "without resume, or name a run that saved one)"), False
        return name, None, False
    if occupied and not config.overwrite:
        return name, (f"run directory {run_dir} exists already: pass resume to continue that "
                      "run, overwrite to delete it and start over, or another run_name"), False
    return name, None, occupied


def prepare_run_dir(config: PPOConfig, log=print) -> PPOConfig:
    """The config with its run name settled and its run directory ready; collective over the
    ranks of an initialised process group. Raises ConfigError (on every rank) when the run may
    not write there."""
    decision = [_decide(config) if torch.distributed.get_rank() == 0 else None]
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    name, error, delete = decision[0]
    if error is not None:
        raise ConfigError(error)
    run_dir = Path(config.output_dir) / name
    if torch.distributed.get_rank() == 0:
        if delete:
            log(f"overwrite: deleting the existing run directory {run_dir}")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    return dataclasses.replace(config, run_name=name, overwrite=False)
