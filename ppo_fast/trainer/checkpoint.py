"""Checkpoints that a crash cannot tear and a resume can trust.

Layout: ``<run>/checkpoints/step<N>/`` holds a directory per DeepSpeed engine (train: ``actor/``
and ``critic/``, no critic for the critic-free algorithms; sft and rm: ``model/``),
``trainer/rank<r>.pt`` (everything else of each rank: tensors and plain values only) and
``manifest.json`` (every file's size and sha256). A checkpoint is written under a temporary name
(``.step<N>.partial``) and published by one atomic rename once every rank has written and the
manifest is complete; ``latest`` then names it, for people. A kill at any moment leaves the
previous checkpoints as they were.

Resume takes the newest checkpoint whose files match its manifest, and says which one it skipped
and why. Nothing a resume reads is unpickled with arbitrary globals: the trainer's state loads
with ``weights_only=True``, and DeepSpeed's own files, which DeepSpeed 0.19 loads with
``weights_only=False``, are loaded by :class:`SafeCheckpointEngine` with ``weights_only=True``
and an allowlist of the few types DeepSpeed writes. A manifest detects damage, not tampering;
the loader is what keeps a planted pickle from running.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed; the message names every file that failed."""


# --------------------------------------------------------------------------------------------
# Random streams, as tensors and plain values
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Loading DeepSpeed's files without arbitrary unpickling
# --------------------------------------------------------------------------------------------


def _deepspeed_globals() -> list:
    """The non-tensor types DeepSpeed 0.19 writes into its checkpoints (found by loading its
    ZeRO 0-3 checkpoints with ``weights_only=True``)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path, map_location=None):
    """``torch.load`` with ``weights_only=True`` and DeepSpeed's types allowed; an error names the
    file."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if refused:
            raise CheckpointError(
                f"cannot load {path}: it holds a {refused.group(1)} object, which is neither a "
                "tensor, a plain value nor a type DeepSpeed writes; unpickling it could run code, "
                "so it is refused (was the file replaced?)") from exc
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        detail = unpickler.group(1) if unpickler else text.splitlines()[0] if text else ""
        raise CheckpointError(f"cannot load {path}: {type(exc).__name__}: {detail}") from exc


def install_safe_loading(engine) -> None:
    """Make a DeepSpeed engine load its checkpoint files through :func:`safe_load` (every file
    it reads goes through its checkpoint engine's ``load``)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = engine.checkpoint_engine
    if type(checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(f"the DeepSpeed engine checkpoints through "
                              f"{type(checkpoint_engine).__name__}; ppo_fast loads checkpoints "
                              "safely only through torch's (remove the checkpoint writer from the "
                              "DeepSpeed config)")
    checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)


# --------------------------------------------------------------------------------------------
# Writing and finding checkpoints
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _step_of(directory: Path) -> int | None:
    name = directory.name
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def problems(directory: Path) -> list[str]:
    """What is wrong with a checkpoint directory, judged by its manifest (empty: intact). Files
    the manifest does not list are no damage: nothing reads them."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
        well_formed = isinstance(expected, dict) and all(
            isinstance(name, str) and isinstance(entry, dict)
            and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            for name, entry in expected.items())
        step = manifest["step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{manifest_path}: unreadable manifest ({type(exc).__name__})"]
    if not well_formed or not expected:
        return [f"{manifest_path}: malformed manifest"]
    if step != _step_of(directory):
        return [f"{manifest_path}: the manifest is of step {step!r}, not {directory.name}"]
    found = []
    for name, entry in expected.items():
        path = directory / name
        if not path.is_file():
            found.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"]:
            found.append(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']}")
        elif _sha256(path) != entry["sha256"]:
            found.append(f"{path}: sha256 differs from the manifest")
    return found


class Checkpoints:
    """The checkpoints of one run, in ``<run>/checkpoints``; ``names``: the directories of the
    engines given as ``actor`` and ``critic`` (one name: a single engine, passed as ``actor``)."""

    def __init__(self, directory: Path, rank: int, log=print, names=("actor", "critic")):
        self.directory = directory
        self.rank = rank
        self.log = log
        self.names = names

    def save(self, step: int, actor, critic, state: dict) -> Path:
        """Write step ``step``'s checkpoint and publish it; collective over the ranks."""
        final = self.directory / f"step{step}"
        partial = self.directory / f".step{step}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a kill during an earlier save
            partial.mkdir(parents=True)
        torch.distributed.barrier()
        for engine, name in self._engines(actor, critic):
            engine.save_checkpoint(str(partial), tag=name, save_latest=False)
        (partial / "trainer").mkdir(exist_ok=True)
        torch.save(state, partial / "trainer" / f"rank{self.rank}.pt")
        torch.distributed.barrier()
        if self.rank == 0:
            files = {p.relative_to(partial).as_posix(): {"size": p.stat().st_size,
                                                         "sha256": _sha256(p)}
                     for p in _files(partial)}
            _write_atomically(partial / MANIFEST, json.dumps({"step": step, "files": files},
                                                             indent=1))
            if final.exists():
                # The run resumed from an earlier checkpoint and has redone this step.
                self.log(f"replacing {final}, which the resumed run passed over")
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_atomically(self.directory / "latest", final.name)
        torch.distributed.barrier()
        return final

    def published(self) -> list[Path]:
        """Published checkpoints, newest first (intact or not)."""
        steps = [p for p in self.directory.glob("step*") if p.is_dir() and _step_of(p) is not None]
        return sorted(steps, key=_step_of, reverse=True)

    def load(self, actor, critic) -> tuple[int, dict]:
        """Restore the engines and return (step, trainer state) from the newest checkpoint whose
        files match its manifest and load; each one passed over is named with the reason.
        Collective: every rank passes over a checkpoint that fails on any rank."""
        failures = []
        for directory in self.published():
            found = problems(directory) if self.rank == 0 else []
            if torch.distributed.get_world_size() > 1:
                shared = [found]
                torch.distributed.broadcast_object_list(shared, src=0)
                found = shared[0]
            if not found:
                state, error = self._try_load(directory, actor, critic)
                found = _gather_errors(error)
                if not found:
                    return _step_of(directory), state
            line = f"checkpoint {directory.name} is damaged, passed over: {'; '.join(found)}"
            self.log(line)
            failures.append(line)
        raise CheckpointError(f"no intact checkpoint in {self.directory}" +
                              "".join(f"\n  {line}" for line in failures))

    def _try_load(self, directory: Path, actor, critic) -> tuple[dict | None, str | None]:
        try:
            for engine, name in self._engines(actor, critic):
                path, _ = engine.load_checkpoint(str(directory), tag=name)
                if path is None:
                    return None, f"{directory / name}: DeepSpeed found no checkpoint there"
            state = safe_load(directory / "trainer" / f"rank{self.rank}.pt")
        except CheckpointError as exc:
            return None, str(exc)
        if state.get("step") != _step_of(directory):
            return None, (f"{directory / 'trainer' / f'rank{self.rank}.pt'}: holds step "
                          f"{state.get('step')!r}")
        return state, None

    def _engines(self, actor, critic) -> list:
        """The engines a checkpoint holds (no critic for the critic-free algorithms)."""
        return [(actor, self.names[0])] + ([(critic, self.names[1])] if critic is not None else [])


def _gather_errors(error: str | None) -> list[str]:
    """Every rank's load error (an empty list when all loaded)."""
    if torch.distributed.get_world_size() == 1:
        return [error] if error else []
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    return [e for e in errors if e]


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


class StopSignals:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop after the current step, with a checkpoint;
    a second Ctrl-C aborts. SIGTERM never aborts: the deepspeed launcher answers a Ctrl-C by
    sending its ranks SIGTERM too (and kills them 30 s later), and a rank that got both must still
    save."""

    def __init__(self, say):
        self.say, self.requested, self._previous = say, False, {}

    def __enter__(self):
        # Python runs signal handlers in the main thread only, and only it may install them.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.say(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                     "(Ctrl-C again to abort)")
        self.requested = True
