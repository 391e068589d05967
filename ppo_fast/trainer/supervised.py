"""The two steps before PPO: supervised fine-tuning (``ppo-fast sft``) and reward-model training
(``ppo-fast rm``), each from a Hugging Face directory and a local data file (data.py).

    ppo-fast sft --model base/ --data sft.jsonl                  # -> runs/<sft run>/model
    ppo-fast rm --model runs/<sft run>/model --data prefs.jsonl   # -> runs/<rm run>/model
    ppo-fast train --policy-model runs/<sft run>/model --reward runs/<rm run>/model ...

* sft: cross-entropy on the response tokens (EOS included) of prompt + response sequences; the
  held-out metrics are the loss and the exact match (the share of responses that greedy decoding
  reproduces token for token, measured with teacher forcing).
* rm: a scalar head on the model (``AutoModelForSequenceClassification``, ``num_labels=1``) that
  scores a sequence at its last token, trained with the Bradley-Terry loss
  ``-log sigmoid(r_chosen - r_rejected)``; the held-out metrics are that loss and the pair accuracy
  (the share of pairs whose chosen sequence scores higher).

Sequences are encoded as the PPO trainer encodes prompts and ends completions (data.py), so the
models fit ``ppo-fast train`` as they are. The data is read and checked before any model is built;
the run directory follows rundir.py (an existing one is refused unless resume or overwrite). A run
writes ``config.json``, ``metrics.jsonl`` (a row per step: the training loss, and the held-out
metrics at evaluations; step 0 is the evaluation before training), ``checkpoints/`` (checkpoint.py:
every save_every steps, after the last and on Ctrl-C or SIGTERM), ``summary.json`` and ``model/``
(model and tokenizer, published by one rename). A resume continues from the newest intact
checkpoint to the same weights and rows as a run that was never stopped: the batches of a step
follow from the seed and the step, and the checkpoint holds the optimizer, the learning-rate
schedule and every random stream. One process or the deepspeed launcher: each rank trains on its
share of every batch, and the held-out metrics are over all ranks' shares.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..sequences import left_pad, position_ids
from .checkpoint import (Checkpoints, StopSignals, _write_atomically, export_policy, install_safe_loading, rng_state,
                         seed_everything, set_rng_state)
from .config import ConfigError, RunConfig


@dataclass
class SFTConfig(RunConfig):
    # --- run ---------------------------------------------------------------------------------
    run_name: str = ""
    """Name of the run; its files go to <output_dir>/<run_name>/. Empty: a fresh name from the
    date and time. An existing run directory is refused unless resume or overwrite is set."""
    output_dir: str = "runs"
    """Directory that holds run directories."""
    seed: int = 0
    """Seed for the held-out split, the order of the rows and any freshly initialised weights."""
    resume: bool = False
    """Continue the run named run_name from its newest intact checkpoint (after Ctrl-C, SIGTERM or
    kill -9 too; a damaged checkpoint is passed over for the one before) to the same weights and
    metrics as a run never stopped. It keeps the settings the run started with (only save_every
    and eval_every may change); a finished run is left as it is; an error when the run has no
    checkpoint."""
    overwrite: bool = False
    """Delete an existing run directory of the same name and start over (refused when the run
    would delete its own model or data)."""

    # --- model and data ----------------------------------------------------------------------
    model: str = ""
    """Hugging Face causal-LM directory to fine-tune, with its tokenizer. One with config.json and
    tokenizer files but no weights (no model.safetensors, pytorch_model.bin or their sharded
    index) starts from fresh weights of that config."""
    data: str = ""
    """Training file (.jsonl, .json, .parquet or .csv) with prompt + response columns, or a chat
    messages column (rendered by the tokenizer's chat template; the final assistant answer follows
    at least one user turn)."""
    eval_fraction: float = 0.1
    """Share of the rows held out for the evaluations (0: none)."""
    max_len: int = 0
    """Longest prompt + response in tokens (EOS included); a longer row is an error naming it.
    0: the model's max_position_embeddings."""

    # --- training ----------------------------------------------------------------------------
    epochs: int = 40
    """Passes over the training rows, each in a fresh order (the rows left over after the last full
    batch sit that pass out)."""
    max_steps: int = 0
    """Stop after this many optimizer steps even if epochs remain (0: no such limit)."""
    batch_size: int = 32
    """Sequences per optimizer step on each rank."""
    micro_batch_size: int = 32
    """Sequences per forward/backward; batch_size / micro_batch_size is the gradient accumulation."""
    lr: float = 3e-3
    """Peak learning rate (AdamW; linear warm-up over the first 1/20 of the steps, then linear decay
    to 0). The default suits the tiny sample model; a pretrained LLM wants about 1e-5."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0: none)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3)."""
    eval_every: int = 100
    """Evaluate on the held-out rows every this many steps, as well as before the first step and
    after the last (0: only then)."""
    save_every: int = 100
    """Checkpoint (weights, optimizer, learning-rate schedule, random streams, metrics) every this
    many steps (0: never), and always after the last step and on Ctrl-C or SIGTERM."""

    def check(self) -> None:
        _check_fields(self)


@dataclass
class RMConfig(RunConfig):
    # --- run ---------------------------------------------------------------------------------
    run_name: str = ""
    """Name of the run; its files go to <output_dir>/<run_name>/. Empty: a fresh name from the
    date and time. An existing run directory is refused unless resume or overwrite is set."""
    output_dir: str = "runs"
    """Directory that holds run directories."""
    seed: int = 0
    """Seed for the held-out split, the order of the pairs and the new score head."""
    resume: bool = False
    """Continue the run named run_name from its newest intact checkpoint (after Ctrl-C, SIGTERM or
    kill -9 too; a damaged checkpoint is passed over for the one before) to the same weights and
    metrics as a run never stopped. It keeps the settings the run started with (only save_every
    and eval_every may change); a finished run is left as it is; an error when the run has no
    checkpoint."""
    overwrite: bool = False
    """Delete an existing run directory of the same name and start over (refused when the run
    would delete its own model or data)."""

    # --- model and data ----------------------------------------------------------------------
    model: str = ""
    """Hugging Face directory with weights (e.g. the model of an sft run) and its tokenizer; loaded
    as a sequence classifier with one output (a fresh score head on a causal LM)."""
    data: str = ""
    """Preference file (.jsonl, .json, .parquet or .csv) with chosen + rejected columns and an
    optional prompt column (texts, or chat messages rendered by the tokenizer's chat template; each
    answer follows at least one user turn)."""
    eval_fraction: float = 0.1
    """Share of the pairs held out for the evaluations (0: none)."""
    max_len: int = 0
    """Longest prompt + response in tokens (EOS included); a longer pair is an error naming its
    row. 0: the model's max_position_embeddings."""

    # --- training ----------------------------------------------------------------------------
    epochs: int = 20
    """Passes over the training pairs, each in a fresh order (the pairs left over after the last
    full batch sit that pass out)."""
    max_steps: int = 0
    """Stop after this many optimizer steps even if epochs remain (0: no such limit)."""
    batch_size: int = 32
    """Pairs per optimizer step on each rank."""
    micro_batch_size: int = 32
    """Pairs per forward/backward (two sequences each); batch_size / micro_batch_size is the
    gradient accumulation."""
    lr: float = 1e-3
    """Peak learning rate (AdamW; linear warm-up over the first 1/20 of the steps, then linear decay
    to 0). The default suits the tiny sample model; a pretrained LLM wants about 1e-5."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0: none)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3)."""
    eval_every: int = 50
    """Evaluate on the held-out pairs every this many steps, as well as before the first step and
    after the last (0: only then)."""
    save_every: int = 50
    """Checkpoint (weights, optimizer, learning-rate schedule, random streams, metrics) every this
    many steps (0: never), and always after the last step and on Ctrl-C or SIGTERM."""

    def check(self) -> None:
        _check_fields(self)


def _check_fields(config) -> None:
    if config.resume and not config.run_name:
        raise ConfigError("resume needs run_name: the name of the run to continue")
    if config.batch_size % config.micro_batch_size:
        raise ConfigError(f"batch_size ({config.batch_size}) must be a multiple of micro_batch_size "
                          f"({config.micro_batch_size})")


SFTConfig.RANGES = RMConfig.RANGES = {
    "output_dir": ((lambda v: bool(v)), "a directory"),
    "seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
    "eval_fraction": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    **{name: ((lambda v: v >= 0), ">= 0") for name in ("max_len", "max_steps", "grad_clip", "eval_every",
                                                        "save_every")},
    **{name: ((lambda v: v >= 1), ">= 1") for name in ("epochs", "batch_size", "micro_batch_size")},
    "lr": ((lambda v: v > 0), "> 0"),
    "zero_stage": ((lambda v: v in (0, 1, 2, 3)), "0, 1, 2 or 3"),
}
# Neither changes a weight or the order of the batches; every other field does.
SFTConfig.RESUMABLE = RMConfig.RESUMABLE = ("save_every", "eval_every")


# --------------------------------------------------------------------------------------------
# Batches and losses
# --------------------------------------------------------------------------------------------


def sft_batch(examples, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask, labels)`` of SFT examples (data.Example): the
    labels are the response tokens (EOS included) and -100 on the prompt and the padding."""
    ids, mask = left_pad([e.ids for e in examples], pad_token_id)
    labels = torch.full_like(ids, -100)
    for i, example in enumerate(examples):
        start = ids.shape[1] - len(example.ids) + example.prompt_len
        labels[i, start:] = ids[i, start:]
    return ids, mask, labels


def _sft_token_losses(model, examples, pad_token_id, device) -> tuple[torch.Tensor, ...]:
    """``[B, T-1]`` each: the cross-entropy of every next token (0 where there is no label), where
    the labels are, and where the argmax is the label."""
    ids, mask, labels = (t.to(device) for t in sft_batch(examples, pad_token_id))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    labelled = targets != -100
    losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return torch.where(labelled, losses, 0.0), labelled, logits.argmax(-1) == targets


def _sft_loss(model, examples, pad_token_id, device) -> torch.Tensor:
    losses, labelled, _ = _sft_token_losses(model, examples, pad_token_id, device)
    return losses.sum() / labelled.sum()


def _sft_eval(model, examples, pad_token_id, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-example (value, weight): the loss summed over the response tokens and their count, and
    whether greedy decoding reproduces the response (every response token is the argmax)."""
    losses, labelled, right = _sft_token_losses(model, examples, pad_token_id, device)
    exact = torch.where(labelled, right, True).all(-1).double()
    return {"eval_loss": (losses.sum(-1).double(), labelled.sum(-1).double()),
            "eval_exact_match": (exact, torch.ones_like(exact))}


def _pair_margins(model, pairs, pad_token_id, device) -> torch.Tensor:
    """r_chosen - r_rejected per pair: the model's score at each sequence's last token."""
    ids, mask = left_pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    scores = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, 0]
    return (scores[:len(pairs)] - scores[len(pairs):]).float()


def _rm_loss(model, pairs, pad_token_id, device) -> torch.Tensor:
    return -F.logsigmoid(_pair_margins(model, pairs, pad_token_id, device)).mean()


def _rm_eval(model, pairs, pad_token_id, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    margins = _pair_margins(model, pairs, pad_token_id, device).double()
    ones = torch.ones_like(margins)
    return {"eval_loss": (-F.logsigmoid(margins), ones), "eval_accuracy": ((margins > 0).double(), ones)}


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def _check_model(config, needs_weights: bool):
    """(whether the model directory holds weights, its tokenizer); ConfigError when it is no model
    directory, holds weights that are broken, none and ``needs_weights``, or no tokenizer."""
    from .modeldir import WEIGHT_FILES, check_model_dir, load_tokenizer

    if not config.model:
        raise ConfigError("model is required: a Hugging Face model directory")
    has_weights = check_model_dir("model", config.model, weights=False)
    if needs_weights and not has_weights:
        raise ConfigError(f"model: {config.model} holds no weights (none of {', '.join(WEIGHT_FILES)}); a "
                          "reward model starts from trained weights, e.g. the model directory of an sft run "
                          "(ppo-fast sft can start from a directory without weights)")
    return has_weights, load_tokenizer("model", config.model)


def _max_len(config) -> int:
    """config.max_len, checked against the model's positions (which it defaults to)."""
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(config.model), "max_position_embeddings", None)
    if positions and config.max_len > positions:
        raise ConfigError(f"max_len={config.max_len} is more than the model's "
                          f"max_position_embeddings ({positions})")
    if not (config.max_len or positions):
        raise ConfigError(f"max_len is required: the config of {config.model} gives no "
                          "max_position_embeddings")
    return config.max_len or positions


def _split(rows: list, config, world: int) -> tuple[list, list]:
    """(training rows, held-out rows), a seeded split; ConfigError when too few rows are left to
    fill one batch on every rank."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_eval = max(1, round(config.eval_fraction * len(rows))) if config.eval_fraction else 0
    train = [rows[i] for i in order[n_eval:]]
    if len(train) < config.batch_size * world:
        raise ConfigError(f"data: {config.data} has {len(rows)} rows; {len(train)} are left for training "
                          f"after holding out {n_eval} (eval_fraction={config.eval_fraction}), fewer than "
                          f"one step takes (batch_size {config.batch_size} x {world} ranks)")
    return train, [rows[i] for i in order[:n_eval]]


def _dtype_and_attention() -> dict:
    from ..hybrid import pick_attn_implementation

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return dict(dtype=dtype, attn_implementation=pick_attn_implementation(
        dtype, "cuda" if torch.cuda.is_available() else "cpu"))


def _engine(model, config, steps: int):
    """The DeepSpeed engine: AdamW, the learning rate warmed up linearly over the first 1/20 of
    the steps, then decayed linearly to 0 at the last."""
    import deepspeed

    from ..distributed import default_ds_config

    ds = default_ds_config(stage=config.zero_stage, micro_batch_size=config.micro_batch_size,
                           lr=config.lr, grad_clip=config.grad_clip)
    ds["gradient_accumulation_steps"] = config.batch_size // config.micro_batch_size
    warmup = max(1, steps // 20)
    # The warm-up starts above 0: DeepSpeed's first steps run at warmup_min_lr, and at 0 they
    # would train nothing.
    ds["scheduler"] = {"type": "WarmupDecayLR", "params": {
        "total_num_steps": steps, "warmup_min_lr": config.lr / (warmup + 1), "warmup_max_lr": config.lr,
        "warmup_num_steps": warmup, "warmup_type": "linear"}}
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters())
    install_safe_loading(engine)
    return engine


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------


def run_sft(config: SFTConfig, log=print) -> dict:
    """Supervised fine-tuning; returns the summary (see ``summary.json``; after Ctrl-C or SIGTERM
    ``{"interrupted_at": step}``, and ``{"finished_at": steps}`` when a resume finds the run
    finished). The model directory and the data are checked before anything is built."""
    from .data import sft_examples

    start = time.perf_counter()
    has_weights, tokenizer = _check_model(config, needs_weights=False)
    max_len = _max_len(config)
    examples = sft_examples(config.data, tokenizer, max_len)

    def build(say):
        from transformers import AutoConfig, AutoModelForCausalLM

        if has_weights:
            return AutoModelForCausalLM.from_pretrained(config.model, **_dtype_and_attention())
        say(f"sft: {config.model} holds no weights: the model starts from fresh weights of its config.json "
            f"(seed {config.seed})")
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model),
                                                **_dtype_and_attention())

    return _run("sft", config, tokenizer, examples, build, _sft_loss, _sft_eval, start, log)


def run_rm(config: RMConfig, log=print) -> dict:
    """Reward-model training; returns the summary (see ``summary.json``; after Ctrl-C or SIGTERM
    ``{"interrupted_at": step}``, and ``{"finished_at": steps}`` when a resume finds the run
    finished). The model directory and the data are checked before anything is built."""
    from .data import preference_pairs

    start = time.perf_counter()
    _, tokenizer = _check_model(config, needs_weights=True)
    pairs = preference_pairs(config.data, tokenizer, _max_len(config))

    def build(say):
        from transformers import AutoModelForSequenceClassification

        say(f"rm: {config.model} loaded as a sequence classifier with one output; from a causal LM "
            f"the score head is new, initialised with seed {config.seed}")
        model = AutoModelForSequenceClassification.from_pretrained(config.model, num_labels=1,
                                                                   **_dtype_and_attention())
        # The score is read at the last token that is not padding, found by the pad id.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    return _run("rm", config, tokenizer, pairs, build, _rm_loss, _rm_eval, start, log)


def _run(command, config, tokenizer, rows, build, loss_fn, eval_fn, start, log) -> dict:
    """What sft and rm share: split, run directory, engine, the loop and its checkpoints,
    evaluations, export. Returns the summary, or ``{"interrupted_at": step}`` after Ctrl-C or
    SIGTERM, or ``{"finished_at": steps}`` when a resume finds the run finished."""
    from transformers.utils import logging as hf_logging

    from ..distributed import init_distributed
    from .reporting import Reporter
    from .rundir import prepare_run_dir, release

    hf_logging.disable_progress_bar()
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    train_rows, eval_rows = _split(rows, config, world)
    steps = _total_steps(config, len(train_rows), world)
    config = prepare_run_dir(config, log)
    say = log if rank == 0 else (lambda *_: None)
    run_dir = Path(config.output_dir) / config.run_name
    checkpoints = Checkpoints(run_dir / "checkpoints", rank, say, names=("model",))
    report = Reporter(run_dir, rank, log)
    try:
        if config.resume and (run_dir / "summary.json").is_file():
            say(f"{command}: run {config.run_name!r} has finished its {steps} steps; nothing to do "
                f"(its model: {run_dir / 'model'})")
            return {"finished_at": steps}
        if not config.resume:
            report.start_fresh()
        report.write_config(config.to_dict())
        seed_everything(config.seed)
        # A resume's weights come from its checkpoint: what the build says about them is moot.
        engine = _engine(build(say if not config.resume else lambda *_: None), config, steps)
        loop = _Loop(config, engine, tokenizer.pad_token_id, loss_fn, eval_fn, eval_rows, rank, world)
        done, seconds_before = 0, 0.0
        if config.resume:
            done, state = checkpoints.load(engine, None)
            set_rng_state(state["rng"])
            report.restore(state["history"])
            seconds_before = state["seconds"]
            say(f"{command}: resumed from step {done} of {steps} ({checkpoints.directory / f'step{done}'}); "
                "any step after it is redone")
        else:
            say(f"{command}: {len(train_rows)} training rows, {len(eval_rows)} held out; {steps} steps "
                f"of {config.batch_size * world} ({world} rank{'s' * (world > 1)})")

        def seconds() -> float:
            return seconds_before + time.perf_counter() - start

        stopped_at = loop.train(train_rows, done, steps, report, checkpoints, seconds, say)
        if stopped_at is not None:
            saved = checkpoints.directory / f"step{stopped_at}"
            say(f"{command}: interrupted; step {stopped_at} of {steps} saved in {saved}; continue with "
                f"{_resume_command(command, config, world)}")
            return {"interrupted_at": stopped_at}
        _export(engine, tokenizer, run_dir, rank)
        summary = _summary(command, report.history, run_dir, steps, len(train_rows), len(eval_rows), seconds())
        if rank == 0:
            _write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
        say(format_summary(summary))
        return summary
    except KeyboardInterrupt:
        # A second Ctrl-C, or one before the loop.
        if checkpoints.published():
            say(f"{command}: aborted; continue from the newest checkpoint with "
                f"{_resume_command(command, config, world)}")
        elif any(row["step"] > 0 for row in report.history):
            say(f"{command}: aborted before the first checkpoint; nothing to resume (start over with "
                "--overwrite true)")
        elif rank == 0:
            # A fresh run (a resume has a checkpoint) that trained nothing: everything in the
            # directory is this process's (an existing one is refused or deleted first), so a rerun
            # of the same name may start over without --overwrite.
            shutil.rmtree(run_dir, ignore_errors=True)
            say(f"{command}: interrupted before the first step; {run_dir} removed")
        raise
    finally:
        release(config)


def _resume_command(command, config, world: int) -> str:
    launcher = f" (under the deepspeed launcher, with {world} ranks again)" if world > 1 else ""
    return f"ppo-fast {command} --output-dir {config.output_dir} --run-name {config.run_name} --resume true{launcher}"


def _total_steps(config, n_train: int, world: int) -> int:
    steps = config.epochs * (n_train // world // config.batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


class _Loop:
    """Optimizer steps over this rank's share of each batch, evaluations averaged over ranks."""

    def __init__(self, config, engine, pad_token_id, loss_fn, eval_fn, eval_rows, rank, world):
        self.config, self.engine, self.pad_token_id = config, engine, pad_token_id
        self.loss_fn, self.eval_fn = loss_fn, eval_fn
        self.rank, self.world = rank, world
        # Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively): the
        # shares are padded to equal length with rows that are not counted.
        share = eval_rows[rank::world]
        length = math.ceil(len(eval_rows) / world)
        self.eval_rows = share + eval_rows[:length - len(share)]
        self.eval_counted = [True] * len(share) + [False] * (length - len(share))

    def _batches(self, rows: list, done: int, steps: int):
        """This rank's share of the batches of steps done + 1 to steps: a fresh seeded order per
        pass, so a step's batch depends on the seed and the step alone (and a resume meets the
        batches the uninterrupted run would)."""
        per_step = self.config.batch_size * self.world
        per_pass = len(rows) // per_step
        order = None
        for step in range(done, steps):
            epoch, position = divmod(step, per_pass)
            if order is None or position == 0:
                order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(
                    self.config.seed + 1 + epoch)).tolist()
            batch = order[position * per_step:(position + 1) * per_step][self.rank::self.world]
            yield [rows[i] for i in batch]

    def train(self, rows: list, done: int, steps: int, report, checkpoints, seconds, say) -> int | None:
        """Steps done + 1 to steps (before step 1: the evaluation of step 0), a checkpoint every
        save_every steps, after the last and after a stop signal; returns the step a signal
        stopped the run at (None: it ran to the end)."""
        config, engine, device = self.config, self.engine, self.engine.device
        evaluate_now = {0, steps} | set(range(config.eval_every, steps, config.eval_every or steps))
        progress_every = max(1, steps // 10)
        with StopSignals(say) as signals:
            if done == 0:
                self._record({"step": 0, **self.evaluate()}, report, say)
            for step, batch in enumerate(self._batches(rows, done, steps), start=done + 1):
                engine.train()
                losses = []
                for first in range(0, len(batch), config.micro_batch_size):
                    loss = self.loss_fn(engine, batch[first:first + config.micro_batch_size],
                                        self.pad_token_id, device)
                    engine.backward(loss)
                    engine.step()
                    losses.append(loss.detach().double())
                row = {"step": step, "loss": self._mean_over_ranks(torch.stack(losses).mean())}
                if step in evaluate_now:
                    row.update(self.evaluate())
                self._record(row, report, say if step % progress_every == 0 or step in evaluate_now else None)
                stop = self._on_any_rank(signals.requested)
                if stop or step == steps or (config.save_every and step % config.save_every == 0):
                    checkpoints.save(step, engine, None, {"step": step, "rng": rng_state(),
                                                          "history": report.history, "seconds": seconds()})
                if stop:
                    return step
        return None

    def _on_any_rank(self, flag: bool) -> bool:
        """Whether any rank's flag is set: a signal seen by one rank stops every rank after the
        same step (a rank that went on alone would wait forever in the next collective)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.engine.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return value.item() == 1.0

    @staticmethod
    def _record(row: dict, report, say) -> None:
        report.row(row)
        if say is not None:
            say("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world > 1:
            torch.distributed.all_reduce(value)  # gloo has no AVG
        return value.item() / self.world

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The held-out metrics over every rank's share (none without held-out rows)."""
        if not self.eval_rows:
            return {}
        self.engine.eval()
        sums: dict[str, list] = {}
        size = self.config.micro_batch_size
        for first in range(0, len(self.eval_rows), size):
            counted = torch.tensor(self.eval_counted[first:first + size], device=self.engine.device)
            metrics = self.eval_fn(self.engine, self.eval_rows[first:first + size], self.pad_token_id,
                                   self.engine.device)
            for name, (values, weights) in metrics.items():
                total = sums.setdefault(name, [0.0, 0.0])
                total[0] = total[0] + torch.where(counted, values, 0.0).sum()
                total[1] = total[1] + torch.where(counted, weights, 0.0).sum()
        names = sorted(sums)
        totals = torch.stack([torch.stack(sums[name]) for name in names])
        if self.world > 1:
            torch.distributed.all_reduce(totals)
        return {name: (totals[i, 0] / totals[i, 1]).item() for i, name in enumerate(names)}


def _export(engine, tokenizer, run_dir: Path, rank: int) -> None:
    """The trained model and its tokenizer as ``<run_dir>/model``, written aside and renamed into
    place, so a kill never leaves a half-written model there."""
    partial = run_dir / ".model.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    torch.distributed.barrier()
    export_policy(engine, tokenizer, partial, rank)
    if rank == 0:
        os.replace(partial, run_dir / "model")
    torch.distributed.barrier()


def _summary(command, history, run_dir, steps, n_train, n_eval, seconds) -> dict:
    trained = [row for row in history if "loss" in row]
    evals = [row for row in history if "eval_loss" in row]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    summary = {"command": command, "run_dir": str(run_dir), "model_dir": str(run_dir / "model"),
               "steps": steps, "train_rows": n_train, "eval_rows": n_eval,
               "train_loss_first": trained[0]["loss"], "train_loss_last": trained[-1]["loss"],
               "eval_loss_before": first.get("eval_loss"), "eval_loss_after": last.get("eval_loss")}
    held_out = "eval_exact_match" if command == "sft" else "eval_accuracy"
    summary[f"{held_out}_before"] = first.get(held_out)
    summary[f"{held_out}_after"] = last.get(held_out)
    summary["seconds"] = seconds
    return summary


def format_summary(s: dict) -> str:
    """A few readable lines of a summary."""
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    held_out = "exact match (greedy)" if s["command"] == "sft" else "pair accuracy"
    key = "eval_exact_match" if s["command"] == "sft" else "eval_accuracy"
    lines = ["", f"{'':30}{'before':>10}{'after':>10}",
             f"{'held-out loss':30}{fmt(s['eval_loss_before']):>10}{fmt(s['eval_loss_after']):>10}",
             f"{'held-out ' + held_out:30}{fmt(s[key + '_before']):>10}{fmt(s[key + '_after']):>10}",
             f"training loss {s['train_loss_first']:.3f} at the first step, {s['train_loss_last']:.3f} "
             f"at the last; {s['steps']} steps in {s['seconds']:.0f} s",
             f"model: {s['model_dir']}"]
    return "\n".join(lines)
