"""The RLHF PPO loop, read top to bottom: generate, score, advantages, update.

    trainer = PPOTrainer(config, components)   # models, tokenizer, prompts, rewards
    trainer.train()

Per step:
  1. generate: the hybrid engine samples completions from the actor.
  2. score: no-grad passes give the old and reference log-probs (the fused head: from the last
     hidden states and the output embedding, never the logits; or pf.token_logprobs on the logits
     where a model's logits are not exactly its head's output) and the critic's values; the reward
     model or reward function scores each sequence.
  3. advantages: rewards are −β·KL per token plus the score at the last completion token; pf.gae
     and pf.masked_whiten turn them into advantages.
  4. update: ppo_epochs × minibatches (gradient accumulation over micro-batches) of the PPO loss
     (pf.fused_linear_ppo_loss through the fused head, or pf.ppo_loss on the logits) for the actor
     and pf.value_loss for the critic, each through its DeepSpeed engine.
Then a metrics row (reporting.py) and, every save_every steps, a checkpoint (checkpoint.py);
--resume continues from the last one, after kill -9 too. The models are built in models.py.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import ppo_fast as pf

from ..head import completion_logprobs, completion_ppo_loss, fused_head_unsupported
from ..sequences import completion_logits, position_ids
from .checkpoint import Checkpoints, export_policy, rng_state, seed_everything, set_rng_state
from .config import PPOConfig
from .models import Components, build_models
from .prompts import PromptSampler, encode_prompts
from .reporting import Reporter
from .rundir import prepare_run_dir, release


class TrainingStopped(RuntimeError):
    """Raised when the run stops on repeated non-finite losses (after saving a checkpoint)."""


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


class PPOTrainer:
    def __init__(self, config: PPOConfig, components: Components, log=print):
        from ..distributed import init_distributed

        if components.reward_model is None and components.reward_fn is None:
            raise ValueError("a run needs a reward model or a reward_fn")
        init_distributed()
        config = prepare_run_dir(config, log)
        self.config, self.c, self.log = config, components, log
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.run_dir = Path(config.output_dir) / config.run_name
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", self.rank, log)
        self.report = Reporter(self.run_dir, self.rank, log)

        self.models = build_models(config, components)
        self.device = self.models.device
        self.kl_ctl = (pf.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
                       if config.adaptive_kl else pf.FixedKLController(config.kl_coef))
        self.sampler = PromptSampler(components.prompts, config.rollout_batch_size, config.seed,
                                     self.rank, self.world)
        self.shuffle = torch.Generator().manual_seed(config.seed + 7919 * self.rank)
        self.step = 0
        # Per model ("actor", "reference"): whether it goes through the fused head; decided on the
        # first generated batch.
        self.fused_head: dict[str, bool] = {}
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._stop_reason = None
        # The run's random streams start from its seed, whether the default task was just built
        # (consuming random numbers) or came from the cache.
        seed_everything(config.seed)

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> dict:
        try:
            return self._train()
        finally:
            release(self.config)

    def _train(self) -> dict:
        cfg = self.config
        if cfg.resume:
            self.load_checkpoint()
            if self.step >= cfg.steps:
                self.log(f"run {cfg.run_name!r} has done its {self.step} steps already; nothing "
                         f"to do (resume with steps > {self.step} to continue it)")
                return {"finished_at": self.step}
        else:
            self.report.start_fresh()
        self.report.write_config(cfg.to_dict())
        if not cfg.resume:
            before = self.evaluate() if cfg.eval_every else {}
            self.report.row({"step": 0, **{f"eval_{k}": v for k, v in before.items()},
                             "kl_coef": self.kl_ctl.value})
        previous_handler = signal.signal(signal.SIGINT, self._on_interrupt)
        start = time.perf_counter()
        try:
            progress = self.report.progress(cfg.steps, self.step)
            while self.step < cfg.steps and self._stop_reason is None:
                row = self.one_step()
                self._agree_on_interrupt()
                self.report.row(row)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(score=f"{row['score']:.2f}", kl=f"{row['kl']:.2f}")
                periodic = cfg.save_every and self.step % cfg.save_every == 0
                if periodic or self.step == cfg.steps or self._stop_reason:
                    self.save_checkpoint()
            if progress is not None:
                progress.close()
        finally:
            signal.signal(signal.SIGINT, previous_handler)
        if self._stop_reason == "interrupt":
            self.log(f"interrupted: checkpoint saved at step {self.step} in "
                     f"{self.checkpoints.directory}; continue with --resume")
            return {"interrupted_at": self.step}
        if self._stop_reason == "nonfinite":
            raise TrainingStopped(
                f"stopped at step {self.step}: {cfg.max_nonfinite_in_a_row} updates in a row had a "
                f"non-finite loss. A checkpoint of step {self.step} is in "
                f"{self.checkpoints.directory}; no more than the updates since then were lost. "
                "Continue with --resume after lowering the learning rates or inspecting the rewards.")
        return self.finish(time.perf_counter() - start)

    def one_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        prompts = self.sampler.next_batch()
        exp, stats = self.make_experience(prompts)
        t1 = time.perf_counter()
        update = self.update(exp)
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
        if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
            row.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        return row

    # -- 1-3. experience: generate, score, advantages ------------------------------------------

    @torch.no_grad()
    def make_experience(self, prompts: list[str]) -> tuple[Experience, dict]:
        cfg, m = self.config, self.models
        ids, mask = encode_prompts(self.c.tokenizer, prompts, cfg.max_prompt_len, self.device)
        out = m.hybrid.generate(ids, attention_mask=mask)
        generated = time.perf_counter()

        P = out.prompt_length
        seqs, attn = out.sequences, out.attention_mask
        action_mask = out.completion_mask[:, P:]
        m.actor.module.eval()
        old_logp = self._token_logprobs("actor", m.actor.module, seqs, attn, P)
        m.actor.module.train()
        ref_logp = self._token_logprobs("reference", m.reference, seqs, attn, P)
        values = m.critic.module(seqs, attn, position_ids(attn))[:, P - 1:-1]
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

    def _uses_fused_head(self, name, model, sequences, attention_mask) -> bool:
        if name not in self.fused_head:
            reason = ("fused_head is off" if not self.config.fused_head
                      else fused_head_unsupported(model, sequences, attention_mask))
            self.fused_head[name] = reason is None
            if self.rank == 0:
                self.log(f"{name}: " + ("fused head (log-probs from hidden states, no logits)" if reason is None
                                        else f"logits path ({reason})"))
        return self.fused_head[name]

    def _token_logprobs(self, name, model, sequences, attention_mask, prompt_len):
        # The rollouts sample from softmax(z / T): score them under the same distribution.
        temperature = self.config.temperature
        if self._uses_fused_head(name, model, sequences, attention_mask):
            return completion_logprobs(model, sequences, attention_mask, prompt_len, temperature=temperature)
        logits = completion_logits(model, sequences, attention_mask, prompt_len)
        return pf.token_logprobs(logits, sequences[:, prompt_len:], temperature=temperature)

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
            scores = self.models.reward_model(
                input_ids=sequences, attention_mask=attention_mask,
                position_ids=position_ids(attention_mask)).logits[:, 0].float()
        if not torch.isfinite(scores).all():
            bad = (~torch.isfinite(scores)).nonzero()[0].item()
            raise ValueError(f"the reward is not finite for prompt {prompts[bad][:40]!r}: "
                             f"{scores[bad].item()}")
        if self.config.score_clip > 0:
            scores = scores.clamp(-self.config.score_clip, self.config.score_clip)
        return scores

    @staticmethod
    def _explained_variance(values, returns, mask) -> float:
        m = mask.bool()
        if m.sum() < 2:
            return 0.0
        var = returns[m].var()
        return (1 - (returns[m] - values[m]).var() / var).item() if var > 0 else 0.0

    # -- 4. update -----------------------------------------------------------------------------

    def update(self, exp: Experience) -> dict:
        cfg, actor, critic = self.config, self.models.actor, self.models.critic
        P = exp.prompt_length
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(exp.scores), generator=self.shuffle).to(self.device)
            for minibatch in order.split(cfg.minibatch_size):
                for idx in minibatch.split(cfg.micro_batch_size):
                    seqs, attn = exp.sequences[idx], exp.attention_mask[idx]
                    batch = (exp.old_logp[idx], exp.advantages[idx], exp.action_mask[idx])
                    options = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, entropy_coef=cfg.entropy_coef,
                                   agg=cfg.loss_agg, temperature=cfg.temperature)
                    if self.fused_head["actor"]:
                        actor_loss, metrics = completion_ppo_loss(actor, seqs, attn, P, *batch, **options)
                    else:
                        logits = completion_logits(actor, seqs, attn, P)
                        actor_loss, metrics = pf.ppo_loss(logits, seqs[:, P:], *batch, **options)
                    values = critic(seqs, attn, position_ids(attn))[:, P - 1:-1]
                    critic_loss, vmetrics = pf.value_loss(
                        values, exp.values[idx], exp.returns[idx], exp.action_mask[idx],
                        clip=cfg.value_clip or None, agg=cfg.loss_agg)
                    if not self._finite_on_every_rank(actor_loss, critic_loss):
                        self._skip_nonfinite(actor_loss, critic_loss)
                        if self._stop_reason == "nonfinite":
                            return self._averages(sums, updates)
                        if actor.gradient_accumulation_steps() > 1:
                            # Keep DeepSpeed's accumulation boundaries where they were: the
                            # skipped micro-batch contributes nothing to its minibatch's update.
                            actor.step()
                            critic.step()
                        continue
                    self.nonfinite_in_a_row = 0
                    actor.backward(actor_loss)
                    actor.step()
                    critic.backward(critic_loss)
                    critic.step()
                    updates += 1
                    for name, value in {**metrics, **vmetrics, "actor_loss": actor_loss,
                                        "critic_loss": critic_loss}.items():
                        sums[name] = sums.get(name, 0.0) + value.item()
        return self._averages(sums, updates)

    @staticmethod
    def _averages(sums: dict, updates: int) -> dict:
        return {name: total / max(updates, 1) for name, total in sums.items()}

    # -- faults --------------------------------------------------------------------------------

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

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Gold (if known) and proxy reward of the current policy on the fixed eval prompts,
        with its own random stream so evaluating does not change the training trajectory."""
        n = self.config.eval_prompts
        prompts = self.c.eval_prompts[:n] or self.sampler.prompts[:n]
        state = rng_state()
        torch.manual_seed(self.config.seed + 12345 + self.rank)
        try:
            ids, mask = encode_prompts(self.c.tokenizer, prompts, self.config.max_prompt_len,
                                       self.device)
            out = self.models.hybrid.generate(ids, attention_mask=mask)
            P = out.prompt_length
            proxy = self._scores(prompts, out.sequences, out.attention_mask, P).mean().item()
            result = {"proxy_reward": proxy}
            if self.c.gold_fn is not None:
                completions = out.sequences[:, P:].tolist()
                gold = [self.c.gold_fn(p, c) for p, c in zip(prompts, completions)]
                result["gold_reward"] = float(np.mean(gold))
        finally:
            set_rng_state(state)
        return self._mean_over_ranks(result)

    def _mean_over_ranks(self, metrics: dict) -> dict:
        if self.world == 1 or not metrics:
            return metrics
        names = sorted(metrics)
        values = torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return {n: v / self.world for n, v in zip(names, values.tolist())}

    # -- checkpoints and the end ---------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "kl_ctl": self.kl_ctl.state_dict(),
                 "sampler": self.sampler.state_dict(), "shuffle": self.shuffle.get_state(),
                 "rng": rng_state(), "nonfinite_total": self.nonfinite_total,
                 "history": self.report.history}
        return self.checkpoints.save(self.step, self.models.actor, self.models.critic, state)

    def load_checkpoint(self) -> None:
        step, state = self.checkpoints.load(self.models.actor, self.models.critic)
        self.step = step
        self.log(f"resumed from step {step} ({self.checkpoints.directory / f'step{step}'}); "
                 "any step after it is redone")
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.sampler.load_state_dict(state["sampler"])
        self.shuffle.set_state(state["shuffle"])
        set_rng_state(state["rng"])
        self.nonfinite_total = state["nonfinite_total"]
        self.report.restore(state["history"])

    def finish(self, seconds: float) -> dict:
        summary = self.report.summary(self.step, seconds,
                                      self.checkpoints.directory / f"step{self.step}",
                                      self.nonfinite_total)
        export_policy(self.models.actor, self.c.tokenizer, self.run_dir / "final_policy", self.rank)
        self.report.finish(summary)
        return summary
