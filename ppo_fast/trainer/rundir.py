"""Where a run writes: ``<output_dir>/<run_name>/``, decided before any expensive work.

A run directory that exists already is never written into by accident: it is refused unless the
run resumes it (and then it must hold a checkpoint, and the run's settings must not change) or
``overwrite`` is set (and then it is deleted first, saying so). A run without a name gets a fresh
one. While a process writes a run, it holds an exclusive lock on the run's name
(``<output_dir>/.locks/<name>.lock``; the system releases it when the process ends, kill -9
included; a run that ends in a longer-lived process releases it), so a second process cannot
write the same run at the same time. Every rank agrees:
rank 0 decides and the others receive its decision.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
import time
from pathlib import Path

import torch

from .config import LOCATION, ConfigError, resumed, saved_config


def cache_dir(config) -> Path:
    """Reusable work shared by runs (the default task's warm-up and reward model)."""
    return Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / ".cache"


_held_locks: dict[str, int] = {}


def _lock(output_dir: Path, name: str) -> None:
    """Hold the run's lock for the rest of this process (a no-op if it holds it already)."""
    path = output_dir / ".locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _held_locks:
        return
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        raise ConfigError(f"run {name!r} in {output_dir} is being written by another process right "
                          "now; wait for it or choose another run_name") from None
    _held_locks[key] = handle


def release(config) -> None:
    """Let other processes write the run again (at the end of a run in a longer-lived process)."""
    path = Path(config.output_dir) / ".locks" / f"{config.run_name}.lock"
    handle = _held_locks.pop(str(path.resolve()), None) if config.run_name else None
    if handle is not None:
        os.close(handle)


def _writable_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir {output_dir} cannot be created ({exc.strerror})") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir} is not writable")


def _claim_fresh_name(output_dir: Path) -> str:
    """A new run directory named from the date and time, created here so no other process can
    take the same name."""
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        name = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (output_dir / name).mkdir()
        except FileExistsError:
            continue
        return name
    raise ConfigError(f"no fresh run name left in {output_dir} for {stamp}")


def _has_checkpoint(run_dir: Path) -> bool:
    directory = run_dir / "checkpoints"
    return directory.is_dir() and any(p.name.startswith("step") for p in directory.iterdir())


def _decide(config) -> tuple:
    """(the run's config with its name, whether to delete an existing directory first); raises
    ConfigError."""
    output_dir = Path(config.output_dir)
    _writable_dir(output_dir)
    name = config.run_name or _claim_fresh_name(output_dir)
    _lock(output_dir, name)
    run_dir = output_dir / name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} exists and is a file")
    if getattr(config, "resume", False):
        if not _has_checkpoint(run_dir):
            where = "does not exist" if not run_dir.exists() else "holds no checkpoint"
            raise ConfigError(f"resume: run directory {run_dir} {where} to resume from (a run "
                              "that stopped before its first checkpoint starts over with "
                              "overwrite)")
        return resumed(dataclasses.replace(config, run_name=name), saved_config(run_dir, type(config))), False
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not config.overwrite:
        resume = "pass resume to continue that run, " if hasattr(config, "resume") else ""
        raise ConfigError(f"run directory {run_dir} exists already: {resume}overwrite to delete it and "
                          "start over, or another run_name")
    if occupied:
        _inputs_outside(config, run_dir)
    return dataclasses.replace(config, run_name=name, overwrite=False), occupied


def _inputs_outside(config, run_dir: Path) -> None:
    """Overwrite deletes the run directory before the run reads anything: refuse when a field
    names a file or directory inside it (a model, data, prompts, a reward spec's model), since the
    run would delete its own input."""
    inside = run_dir.resolve()
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in LOCATION or not isinstance(value, str) or not value:
            continue
        # A reward spec lists its terms as "[weight*]path-or-module:function" separated by commas.
        for part in {value, *re.split(r"[,:*()]", value)}:
            part = part.strip()
            if part and Path(part).exists() and (Path(part).resolve() == inside
                                                 or inside in Path(part).resolve().parents):
                raise ConfigError(f"overwrite would delete {field.name}={value!r} before the run reads it: "
                                  f"{part} lies inside the run directory {run_dir}. Copy it elsewhere, or "
                                  "choose another run_name")


def prepare_run_dir(config, log=print):
    """The config the run goes on with (its name settled; on a resume, the settings it started
    with) and its run directory ready; collective over the ranks of an initialised process group.
    Raises ConfigError (on every rank) when the run may not write there."""
    decision = [None]
    if torch.distributed.get_rank() == 0:
        try:
            settled, delete = _decide(config)
            decision[0] = (dataclasses.asdict(settled), delete, None)
        except ConfigError as exc:
            decision[0] = (None, False, str(exc))
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    fields, delete, error = decision[0]
    if error is not None:
        raise ConfigError(error)
    settled = type(config)(**fields)
    run_dir = Path(settled.output_dir) / settled.run_name
    if torch.distributed.get_rank() == 0:
        if delete:
            log(f"overwrite: deleting the existing run directory {run_dir}")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    return settled
