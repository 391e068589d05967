"""The RLHF PPO loop, in the order a reader expects: rollout, score, advantages, update.

    trainer = PPOTrainer(config, components)   # models, tokenizer, prompts, rewards
    trainer.train()

Per step:
  1. generate_experience: the hybrid engine samples completions; no-grad passes give the old and
     reference log-probs (pf.token_logprobs, never a full-vocab log-softmax) and the critic's
     values; rewards are −β·KL per token plus the score at the last completion token; pf.gae and
     pf.masked_whiten give the advantages.
  2. train_on: ppo_epochs × minibatches (gradient accumulation over micro-batches) of pf.ppo_loss
     for the actor and pf.value_loss for the critic, each through its DeepSpeed engine.
  3. metrics to metrics.jsonl (and TensorBoard when installed); a checkpoint every save_every
     steps, at the end and on Ctrl-C; --resume continues from the last one, after kill -9 too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import ppo_fast as pf

from ..hybrid import accepts_keyword, left_pad, position_ids
from .config import PPOConfig


class TrainingStopped(RuntimeError):
    """Raised when the run stops on repeated non-finite losses (after saving a checkpoint)."""


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class CriticModel(nn.Module):
    """A causal-LM trunk with a scalar value head: values ``[B, T]`` for every position."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config
        self.value_head = nn.Linear(trunk.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()


@dataclass
class Components:
    """Everything a run needs besides the config."""

    policy: nn.Module
    """Causal LM to optimise (its weights also initialise the reference)."""
    reference: nn.Module
    """Frozen copy of the initial policy (the KL anchor)."""
    critic: nn.Module
    """Value model: ``critic(input_ids, attention_mask, position_ids) -> [B, T]``."""
    tokenizer: object
    """Encodes prompts (``encode``), decodes completions (``decode``), knows pad/eos ids."""
    prompts: list[str]
    """Training prompts."""
    reward_model: nn.Module | None = None
    """Sequence classifier giving one score per sequence; or use ``reward_fn``."""
    reward_fn: Callable | None = None
    """``reward_fn(prompts, completions) -> [B] scores`` (texts), instead of a reward model."""
    gold_fn: Callable | None = None
    """``gold_fn(prompt, completion_ids) -> float``: evaluation only, never optimised."""
    eval_prompts: list[str] = field(default_factory=list)
    """Fixed prompts for the gold / proxy evaluations."""


@dataclass
class Experience:
    sequences: torch.Tensor  # [B, P + N]
    attention_mask: torch.Tensor  # [B, P + N]
    action_mask: torch.Tensor  # [B, N] completion tokens up to and including EOS
    old_logp: torch.Tensor  # [B, N]
    ref_logp: torch.Tensor  # [B, N]
    values: torch.Tensor  # [B, N]
    rewards: torch.Tensor  # [B, N]
    advantages: torch.Tensor  # [B, N]
    returns: torch.Tensor  # [B, N]
    scores: torch.Tensor  # [B]
    prompt_length: int


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


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


def load_prompts(path: str) -> list[str]:
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts_file {path} holds no prompts")
    return prompts


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _ds_config(config: PPOConfig, lr: float) -> dict:
    from ..distributed import default_ds_config

    if config.ds_config:
        with open(config.ds_config) as f:
            ds = json.load(f)
        ds["optimizer"]["params"]["lr"] = lr
    else:
        ds = default_ds_config(stage=config.zero_stage, micro_batch_size=config.micro_batch_size,
                               lr=lr, grad_clip=config.grad_clip)
    ds["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    ds["gradient_accumulation_steps"] = config.minibatch_size // config.micro_batch_size
    ds.pop("train_batch_size", None)
    return ds


class PPOTrainer:
    def __init__(self, config: PPOConfig, components: Components, log=print):
        import deepspeed

        from ..distributed import init_distributed

        self.config, self.c, self.log = config, components, log
        if config.minibatch_size % config.micro_batch_size:
            raise ValueError(f"minibatch_size ({config.minibatch_size}) must be a multiple of "
                             f"micro_batch_size ({config.micro_batch_size})")
        if config.rollout_batch_size % config.minibatch_size:
            raise ValueError(f"rollout_batch_size ({config.rollout_batch_size}) must be a multiple of "
                             f"minibatch_size ({config.minibatch_size})")
        if components.reward_model is None and components.reward_fn is None:
            raise ValueError("a run needs a reward model or a reward_fn")
        init_distributed()
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.run_dir = Path(config.output_dir) / config.run_name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_dir.mkdir(parents=True, exist_ok=True)

        self.actor, *_ = deepspeed.initialize(model=components.policy,
                                              config=_ds_config(config, config.actor_lr),
                                              model_parameters=components.policy.parameters())
        self.critic, *_ = deepspeed.initialize(model=components.critic,
                                               config=_ds_config(config, config.critic_lr),
                                               model_parameters=components.critic.parameters())
        self.hybrid = pf.HybridEngine(
            self.actor, components.tokenizer, max_new_tokens=config.max_new_tokens, do_sample=True,
            temperature=config.temperature, top_p=config.top_p,
            max_gathered_bytes=config.max_gathered_bytes or None)
        self.reference = self._frozen(components.reference)
        self.reward_model = self._frozen(components.reward_model) if components.reward_model is not None else None
        self.kl_ctl = (pf.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
                       if config.adaptive_kl else pf.FixedKLController(config.kl_coef))
        self.sampler = PromptSampler(components.prompts, config.rollout_batch_size, config.seed,
                                     self.rank, self.world)
        self.shuffle = torch.Generator().manual_seed(config.seed + 7919 * self.rank)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.history: list[dict] = []
        self._stop_reason = None
        self._tensorboard = None

    # -- model plumbing ------------------------------------------------------------------------

    def _frozen(self, model: nn.Module):
        """Inference-only model: a ZeRO-3 engine when training is ZeRO-3 (parameters partitioned,
        and offloaded to CPU memory with offload_frozen), else the plain module in the actor's
        dtype."""
        model.requires_grad_(False).eval()
        if self.actor.zero_optimization_stage() == 3 or self.config.offload_frozen:
            import deepspeed

            zero = {"stage": 3}
            if self.config.offload_frozen:
                zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
            engine, *_ = deepspeed.initialize(model=model, config={
                "train_micro_batch_size_per_gpu": self.config.micro_batch_size,
                "zero_optimization": zero,
                "bf16": {"enabled": torch.cuda.is_available()}})
            return engine.module
        return model.to(device=self.device, dtype=next(self.actor.module.parameters()).dtype)

    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.c.tokenizer
        rows = [tok.encode(p, add_special_tokens=True) for p in prompts]
        too_long = [(i, len(r)) for i, r in enumerate(rows) if len(r) > self.config.max_prompt_len]
        if too_long:
            i, n = too_long[0]
            raise ValueError(f"prompt {prompts[i][:40]!r} is {n} tokens, longer than max_prompt_len="
                             f"{self.config.max_prompt_len} ({len(too_long)} such prompts in the batch)")
        ids, mask = left_pad(rows, tok.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _completion_logits(model, sequences, attention_mask, prompt_len):
        """Logits that predict the completion tokens, ``[B, N, V]``. Where the model takes
        ``logits_to_keep``, the LM head skips the prompt positions: no [B, P, V] is computed."""
        n_completion = sequences.shape[1] - prompt_len
        keep = {"logits_to_keep": n_completion + 1} if accepts_keyword(model, "logits_to_keep") else {}
        logits = model(input_ids=sequences, attention_mask=attention_mask,
                       position_ids=position_ids(attention_mask), **keep).logits
        return logits[:, -(n_completion + 1):-1]

    def _token_logprobs(self, model, sequences, attention_mask, prompt_len):
        logits = self._completion_logits(model, sequences, attention_mask, prompt_len)
        # The rollouts sample from softmax(z / T): score them under the same distribution.
        return pf.token_logprobs(logits, sequences[:, prompt_len:],
                                 temperature=self.config.temperature)

    def _scores(self, prompts, sequences, attention_mask, prompt_len) -> torch.Tensor:
        if self.c.reward_fn is not None:
            completions = [self.c.tokenizer.decode(row, skip_special_tokens=True)
                           for row in sequences[:, prompt_len:].tolist()]
            scores = self.c.reward_fn(prompts, completions)
            scores = torch.as_tensor(scores, dtype=torch.float32, device=self.device)
            if scores.shape != (len(prompts),):
                raise ValueError(f"reward_fn must return {len(prompts)} scores (one per prompt), "
                                 f"got shape {tuple(scores.shape)}")
        else:
            scores = self.reward_model(input_ids=sequences, attention_mask=attention_mask,
                                       position_ids=position_ids(attention_mask)).logits[:, 0].float()
        if not torch.isfinite(scores).all():
            bad = (~torch.isfinite(scores)).nonzero()[0].item()
            raise ValueError(f"the reward is not finite for prompt {prompts[bad][:40]!r}: "
                             f"{scores[bad].item()}")
        if self.config.score_clip > 0:
            scores = scores.clamp(-self.config.score_clip, self.config.score_clip)
        return scores

    # -- 1. experience -------------------------------------------------------------------------

    @torch.no_grad()
    def generate_experience(self, prompts: list[str]) -> tuple[Experience, dict]:
        cfg = self.config
        ids, mask = self._encode_prompts(prompts)
        out = self.hybrid.generate(ids, attention_mask=mask)
        generated = time.perf_counter()
        P = out.prompt_length
        seqs, attn = out.sequences, out.attention_mask
        action_mask = out.completion_mask[:, P:]
        self.actor.module.eval()
        old_logp = self._token_logprobs(self.actor.module, seqs, attn, P)
        self.actor.module.train()
        ref_logp = self._token_logprobs(self.reference, seqs, attn, P)
        values = self.critic.module(seqs, attn, position_ids(attn))[:, P - 1:-1]
        scores = self._scores(prompts, seqs, attn, P)
        kl = pf.kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * action_mask
        rewards = -self.kl_ctl.value * kl
        last = (action_mask.sum(-1) - 1).clamp(min=0)
        rewards[torch.arange(len(prompts), device=self.device), last] += scores
        advantages, returns = pf.gae(rewards, values, action_mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = pf.masked_whiten(advantages, action_mask)
        exp = Experience(seqs, attn, action_mask, old_logp, ref_logp, values, rewards, advantages,
                         returns, scores, P)
        stats = {
            "score": scores.mean().item(),
            "kl": kl.sum(-1).mean().item(),
            "response_length": action_mask.sum(-1).float().mean().item(),
            "explained_variance": self._explained_variance(values, returns, action_mask),
            "generate_seconds": out.metrics["generate_seconds"] + out.metrics["gather_seconds"],
            "score_seconds": time.perf_counter() - generated,
            "new_tokens": out.metrics["new_tokens"],
        }
        return exp, stats

    @staticmethod
    def _explained_variance(values, returns, mask) -> float:
        m = mask.bool()
        if m.sum() < 2:
            return 0.0
        var = returns[m].var()
        return (1 - (returns[m] - values[m]).var() / var).item() if var > 0 else 0.0

    # -- 2. update -----------------------------------------------------------------------------

    def train_on(self, exp: Experience) -> dict:
        cfg = self.config
        P = exp.prompt_length
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(exp.scores), generator=self.shuffle).to(self.device)
            for minibatch in order.split(cfg.minibatch_size):
                for idx in minibatch.split(cfg.micro_batch_size):
                    seqs, attn = exp.sequences[idx], exp.attention_mask[idx]
                    logits = self._completion_logits(self.actor, seqs, attn, P)
                    actor_loss, metrics = pf.ppo_loss(
                        logits, seqs[:, P:], exp.old_logp[idx], exp.advantages[idx],
                        exp.action_mask[idx], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        entropy_coef=cfg.entropy_coef, agg=cfg.loss_agg,
                        temperature=cfg.temperature)
                    values = self.critic(seqs, attn, position_ids(attn))[:, P - 1:-1]
                    critic_loss, vmetrics = pf.value_loss(
                        values, exp.values[idx], exp.returns[idx], exp.action_mask[idx],
                        clip=cfg.value_clip or None, agg=cfg.loss_agg)
                    if not self._finite_on_every_rank(actor_loss, critic_loss):
                        self._skip_nonfinite(actor_loss, critic_loss)
                        if self._stop_reason == "nonfinite":
                            return self._averages(sums, updates)
                        if self.actor.gradient_accumulation_steps() > 1:
                            # Keep DeepSpeed's accumulation boundaries where they were: the
                            # skipped micro-batch contributes nothing to its minibatch's update.
                            self.actor.step()
                            self.critic.step()
                        continue
                    self.nonfinite_in_a_row = 0
                    self.actor.backward(actor_loss)
                    self.actor.step()
                    self.critic.backward(critic_loss)
                    self.critic.step()
                    updates += 1
                    for name, value in {**metrics, **vmetrics, "actor_loss": actor_loss,
                                        "critic_loss": critic_loss}.items():
                        sums[name] = sums.get(name, 0.0) + value.item()
        return self._averages(sums, updates)

    @staticmethod
    def _averages(sums: dict, updates: int) -> dict:
        return {name: total / max(updates, 1) for name, total in sums.items()}

    def _finite_on_every_rank(self, *losses) -> bool:
        """Whether every rank's losses are finite: ranks skip together or not at all, since the
        backward passes are collective."""
        finite = all(bool(torch.isfinite(loss)) for loss in losses)
        if self.world == 1:
            return finite
        flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return flag.item() == 1.0

    def _skip_nonfinite(self, actor_loss, critic_loss):
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        where = "" if self.world == 1 else f" on at least one of {self.world} ranks"
        self.log(f"step {self.step + 1}: non-finite loss{where} (here: actor {actor_loss.item()}, "
                 f"critic {critic_loss.item()}); update skipped ({self.nonfinite_in_a_row} in a row)")
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_in_a_row:
            self._stop_reason = "nonfinite"

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Gold (if known) and proxy reward of the current policy on the fixed eval prompts,
        with its own random stream so evaluating does not change the training trajectory."""
        prompts = self.c.eval_prompts[: self.config.eval_prompts] or self.sampler.prompts[: self.config.eval_prompts]
        state = _rng_state()
        torch.manual_seed(self.config.seed + 12345 + self.rank)
        try:
            ids, mask = self._encode_prompts(prompts)
            out = self.hybrid.generate(ids, attention_mask=mask)
            P = out.prompt_length
            proxy = self._scores(prompts, out.sequences, out.attention_mask, P).mean().item()
            result = {"proxy_reward": proxy}
            if self.c.gold_fn is not None:
                completions = out.sequences[:, P:].tolist()
                gold = [self.c.gold_fn(p, c) for p, c in zip(prompts, completions)]
                result["gold_reward"] = float(np.mean(gold))
        finally:
            _set_rng_state(state)
        return self._mean_over_ranks(result)

    def _mean_over_ranks(self, metrics: dict) -> dict:
        if self.world == 1 or not metrics:
            return metrics
        names = sorted(metrics)
        values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return {n: v / self.world for n, v in zip(names, values.tolist())}

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        tag = f"step{self.step}"
        self.actor.save_checkpoint(str(self.ckpt_dir / "actor"), tag=tag)
        self.critic.save_checkpoint(str(self.ckpt_dir / "critic"), tag=tag)
        state_dir = self.ckpt_dir / "trainer" / tag
        state_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"step": self.step, "kl_ctl": self.kl_ctl.state_dict(),
                    "sampler": self.sampler.state_dict(), "shuffle": self.shuffle.get_state(),
                    "rng": _rng_state(), "nonfinite_total": self.nonfinite_total,
                    "history": self.history},
                   state_dir / f"rank{self.rank}.pt")
        torch.distributed.barrier()
        if self.rank == 0:
            # The pointer is written last and atomically: a kill mid-save leaves the previous one.
            tmp = self.ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.ckpt_dir / "latest")
        torch.distributed.barrier()
        return self.ckpt_dir / tag

    def load_checkpoint(self) -> bool:
        pointer = self.ckpt_dir / "latest"
        if not pointer.exists():
            return False
        tag = pointer.read_text().strip()
        for engine, name in ((self.actor, "actor"), (self.critic, "critic")):
            path, _ = engine.load_checkpoint(str(self.ckpt_dir / name), tag=tag)
            if path is None:
                raise RuntimeError(f"checkpoint {tag} of the {name} is missing under {self.ckpt_dir}")
        state = torch.load(self.ckpt_dir / "trainer" / tag / f"rank{self.rank}.pt", weights_only=False)
        self.step = state["step"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.sampler.load_state_dict(state["sampler"])
        self.shuffle.set_state(state["shuffle"])
        _set_rng_state(state["rng"])
        self.nonfinite_total = state["nonfinite_total"]
        self.history = state["history"]
        if self.rank == 0:
            # Steps logged after the checkpoint were lost with the crash; they are redone.
            path = self.run_dir / "metrics.jsonl"
            if path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= self.step]
                path.write_text("".join(line + "\n" for line in kept))
        return True

    # -- the loop ------------------------------------------------------------------------------

    def _log_metrics(self, row: dict) -> None:
        self.history.append(row)
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self._tensorboard = False
        if self._tensorboard:
            for name, value in row.items():
                if isinstance(value, (int, float)) and name != "step":
                    self._tensorboard.add_scalar(name, value, row["step"])

    def train(self) -> dict:
        cfg = self.config
        resumed = cfg.resume and self.load_checkpoint()
        if resumed:
            self.log(f"resumed from step {self.step} ({self.ckpt_dir})")
        elif self.rank == 0:
            (self.run_dir / "metrics.jsonl").write_text("")
        if self.rank == 0:
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if not resumed:
            before = self.evaluate()
            self._log_metrics({"step": 0, **{f"eval_{k}": v for k, v in before.items()},
                               "kl_coef": self.kl_ctl.value})
        previous_handler = signal.signal(signal.SIGINT, self._on_interrupt)
        start = time.perf_counter()
        try:
            progress = self._progress(cfg.steps, self.step)
            while self.step < cfg.steps and self._stop_reason is None:
                row = self._one_step()
                self._agree_on_interrupt()
                self._log_metrics(row)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(score=f"{row['score']:.2f}", kl=f"{row['kl']:.2f}")
                if self.step % cfg.save_every == 0 or self.step == cfg.steps or self._stop_reason:
                    self.save_checkpoint()
            if progress is not None:
                progress.close()
        finally:
            signal.signal(signal.SIGINT, previous_handler)
        if self._stop_reason == "interrupt":
            self.log(f"interrupted: checkpoint saved at step {self.step} in {self.ckpt_dir}; "
                     f"continue with --resume")
            return {"interrupted_at": self.step}
        if self._stop_reason == "nonfinite":
            raise TrainingStopped(
                f"stopped at step {self.step}: {cfg.max_nonfinite_in_a_row} updates in a row had a "
                f"non-finite loss. A checkpoint of step {self.step} is in {self.ckpt_dir}; no more "
                f"than the updates since then were lost. Continue with --resume after lowering the "
                f"learning rates or inspecting the rewards.")
        return self.finish(time.perf_counter() - start)

    def _agree_on_interrupt(self) -> None:
        """A Ctrl-C seen by any rank stops every rank after the same step (a rank that went on
        alone would wait forever in the next collective)."""
        if self.world == 1:
            return
        flag = torch.tensor([1.0 if self._stop_reason == "interrupt" else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 1.0 and self._stop_reason is None:
            self._stop_reason = "interrupt"

    def _on_interrupt(self, signum, frame):
        if self._stop_reason == "interrupt":
            raise KeyboardInterrupt
        self._stop_reason = "interrupt"
        self.log("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def _progress(self, total, initial):
        if self.rank != 0:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=initial, desc="PPO", unit="step", dynamic_ncols=True)

    def _one_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        prompts = self.sampler.next_batch()
        exp, stats = self.generate_experience(prompts)
        t1 = time.perf_counter()
        update = self.train_on(exp)
        t2 = time.perf_counter()
        self.step += 1
        self.kl_ctl.update(self._mean_over_ranks({"kl": stats["kl"]})["kl"],
                           n_steps=cfg.rollout_batch_size * self.world)
        trained_tokens = exp.attention_mask.sum().item() * cfg.ppo_epochs
        generate_seconds = stats.pop("generate_seconds")
        score_seconds = stats.pop("score_seconds")
        new_tokens = stats.pop("new_tokens")
        row = {
            "step": self.step,
            **stats,
            **{k: update[k] for k in ("entropy", "clipfrac", "approx_kl", "vf_loss", "actor_loss",
                                      "critic_loss", "vf_clipfrac", "ratio_max") if k in update},
            "kl_coef": self.kl_ctl.value,
            "nonfinite_skipped": self.nonfinite_total,
            "seconds_generate": generate_seconds,
            "seconds_score": score_seconds + (t1 - t0 - generate_seconds - score_seconds),
            "seconds_train": t2 - t1,
            "generate_share": generate_seconds / (t2 - t0),
            "tokens_per_second_generate": new_tokens / max(generate_seconds, 1e-9),
            "tokens_per_second_train": trained_tokens / max(t2 - t1, 1e-9),
        }
        row = {"step": self.step, **self._mean_over_ranks({k: v for k, v in row.items() if k != "step"})}
        if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
            row.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        return row

    # -- the end -------------------------------------------------------------------------------

    def finish(self, seconds: float) -> dict:
        steps = [r for r in self.history if r["step"] > 0]
        evals = [r for r in self.history if "eval_proxy_reward" in r]
        first, last = evals[0], evals[-1]
        summary = {
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "gold_reward_before": first.get("eval_gold_reward"),
            "gold_reward_after": last.get("eval_gold_reward"),
            "proxy_reward_before": first["eval_proxy_reward"],
            "proxy_reward_after": last["eval_proxy_reward"],
            "kl_final": steps[-1]["kl"] if steps else 0.0,
            "seconds_total": seconds,
            "tokens_per_second_generate": float(np.mean([r["tokens_per_second_generate"] for r in steps])) if steps else 0.0,
            "tokens_per_second_train": float(np.mean([r["tokens_per_second_train"] for r in steps])) if steps else 0.0,
            "generate_share": float(np.mean([r["generate_share"] for r in steps])) if steps else 0.0,
            "nonfinite_skipped": self.nonfinite_total,
            "checkpoint": str(self.ckpt_dir / f"step{self.step}"),
        }
        self._export_policy()
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._plot()
            self.log(format_summary(summary))
        return summary

    def _export_policy(self) -> None:
        """The final policy as a Hugging Face directory (gathered from ZeRO-3 shards if needed)."""
        import deepspeed

        model = self.actor.module
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.actor.zero_optimization_stage() == 3):
            if self.rank == 0 and hasattr(model, "save_pretrained"):
                model.save_pretrained(str(self.run_dir / "final_policy"))
                if hasattr(self.c.tokenizer, "save_pretrained"):
                    self.c.tokenizer.save_pretrained(str(self.run_dir / "final_policy"))

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("matplotlib is not installed: no plot (pip install 'ppo-fast[train]')")
            return
        evals = [r for r in self.history if "eval_proxy_reward" in r]
        steps = [r for r in self.history if "kl" in r]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        if evals and "eval_gold_reward" in evals[0]:
            ax1.plot([r["step"] for r in evals], [r["eval_gold_reward"] for r in evals], "o-", label="gold reward")
        ax1.plot([r["step"] for r in evals], [r["eval_proxy_reward"] for r in evals], "s--", label="proxy reward (RM)")
        ax1.set_xlabel("PPO step")
        ax1.set_title("reward on held-out prompts")
        ax1.legend()
        ax2.plot([r["step"] for r in steps], [r["kl"] for r in steps], label="KL to reference (nats/seq)")
        ax2.set_xlabel("PPO step")
        ax2.set_title("KL")
        ax2.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "rewards.png", dpi=100)
        plt.close(fig)


def format_summary(s: dict) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    rows = [("gold reward", s["gold_reward_before"], s["gold_reward_after"]),
            ("proxy reward", s["proxy_reward_before"], s["proxy_reward_after"])]
    lines = ["", f"{'':14}{'before':>10}{'after':>10}"]
    lines += [f"{name:14}{fmt(a):>10}{fmt(b):>10}" for name, a, b in rows]
    lines += [f"KL to the reference at the end: {fmt(s['kl_final'])} nats per sequence",
              f"{s['steps']} steps in {s['seconds_total']:.0f} s; generation "
              f"{s['tokens_per_second_generate']:.0f} tokens/s, training "
              f"{s['tokens_per_second_train']:.0f} tokens/s, {100 * s['generate_share']:.0f}% of "
              f"each step generating",
              f"run directory: {s['run_dir']} (metrics.jsonl, summary.json, rewards.png, "
              f"checkpoints/, final_policy/)"]
    return "\n".join(lines)
