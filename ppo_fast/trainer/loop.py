"""The RLHF PPO loop, read top to bottom: generate, score, advantages, update.

    trainer = PPOTrainer(config, components)   # models, tokenizer, prompts, rewards
    trainer.train()

Per step:
  1. generate: the hybrid engine samples samples_per_prompt completions per prompt from the actor.
  2. score: no-grad passes give the old and reference log-probs (the fused head: from the last
     hidden states and the output embedding, never the logits; or pf.token_logprobs on the logits
     where a model's logits are not exactly its head's output) and, with PPO, the critic's values;
     the reward (reward models, functions, their weighted sum: rewards.py) scores each sequence.
  3. advantages: rewards are −β·KL per token plus the score at the last completion token. PPO:
     pf.gae and pf.masked_whiten; the critic-free algorithms: the estimator of that name
     (pf.advantages, with each prompt's completions as a group).
  4. update: ppo_epochs × minibatches (gradient accumulation over micro-batches) of the actor loss
     (pf.fused_linear_ppo_loss through the fused head, or pf.ppo_loss on the logits; loss_type and
     the optional KL loss) and, with PPO, pf.value_loss for the critic, each through its DeepSpeed
     engine.
Then a metrics row (reporting.py) and, every save_every steps, a checkpoint (checkpoint.py);
--resume continues from the last one, after kill -9 too. Every eval_every steps an evaluation on
held-out prompts logs the reward-hacking diagnostics and alarms (diagnostics.py) and keeps the
policy of the best gold evaluation in best_policy/, with that evaluation's record, which a resume
reads back. The models are built in models.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import ppo_fast as pf

from ..arguments import kl_estimator_name
from ..head import completion_head_inputs, completion_logprobs, completion_ppo_loss, fused_head_unsupported
from ..sequences import completion_logits, position_ids
from . import diagnostics
from .checkpoint import Checkpoints, StopSignals, _write_atomically, export_policy, rng_state, seed_everything, set_rng_state
from .config import GROUPED, PPOConfig
from .models import Components, build_models
from .prompts import PromptSampler, encode_prompts
from .reporting import Reporter
from .rewards import Completions, RewardError
from .rundir import prepare_run_dir, release


BEST_RECORD = "best.json"
"""In best_policy/: the evaluation that made it the best (step, measure, value, every metric)."""


class TrainingStopped(RuntimeError):
    """Raised when the run stops on repeated non-finite losses (after saving a checkpoint)."""


@dataclass
class Experience:
    sequences: torch.Tensor  # [B, P + N]
    attention_mask: torch.Tensor  # [B, P + N]
    action_mask: torch.Tensor  # [B, N] completion tokens up to and including EOS
    old_logp: torch.Tensor  # [B, N]
    ref_logp: torch.Tensor  # [B, N]
    values: torch.Tensor | None  # [B, N], PPO only
    rewards: torch.Tensor  # [B, N]
    advantages: torch.Tensor  # [B, N]
    returns: torch.Tensor  # [B, N]
    scores: torch.Tensor  # [B]
    prompt_length: int


class PPOTrainer:
    def __init__(self, config: PPOConfig, components: Components, log=print):
        from ..distributed import init_distributed

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
        self.kl_ctl = (pf.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon,
                                               proportional=config.kl_proportional,
                                               hold_until_target=config.kl_hold_until_target)
                       if config.adaptive_kl else pf.FixedKLController(config.kl_coef))
        self.sampler = PromptSampler(components.prompts, config.rollout_batch_size, config.seed,
                                     self.rank, self.world)
        self.alarms = diagnostics.Alarms(gold_drop=config.alarm_gold_drop, length_r2=config.alarm_length_r2,
                                         kl_budget=config.kl_budget or 2 * config.target_kl)
        self.best: dict | None = None
        """The record of the policy in best_policy/ (its BEST_RECORD); None before the first
        evaluation."""
        self.loss_options = config.loss_options()
        self.seconds_trained = 0.0
        # Wall seconds of the run's earlier processes up to the checkpoint this one resumed from
        # (the steps a killed process did after its last checkpoint are redone, so not counted).
        self.seconds_before = 0.0
        self.resumed_from = 0
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
            with pf.batch_invariant() if self.config.batch_invariant else contextlib.nullcontext():
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
            self.report.row({"step": 0, **before, "kl_coef": self.kl_ctl.value})
        self.segment_start = time.perf_counter()  # this process's part of the run's wall time
        with StopSignals(self.log) as signals:
            progress = self.report.progress(cfg.steps, self.step, cfg.algorithm)
            while self.step < cfg.steps and self._stop_reason is None:
                step_start = time.perf_counter()
                row = self.one_step()
                self.seconds_trained += time.perf_counter() - step_start
                if cfg.max_minutes and self.seconds_trained >= 60 * cfg.max_minutes and self.step < cfg.steps:
                    self.log(f"max_minutes: {self.seconds_trained / 60:.3g} minutes of training; ending the run "
                             f"at step {self.step} of {cfg.steps}")
                    self._stop_reason = "time"
                if signals.requested:
                    self._stop_reason = "interrupt"
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
        if self._stop_reason == "interrupt":
            self.log(f"interrupted: checkpoint saved at step {self.step} in "
                     f"{self.checkpoints.directory}; continue with --resume")
            return {"interrupted_at": self.step}
        if self._stop_reason == "alarm":
            self.log(f"stop_on_alarm: stopped at step {self.step} (checkpoint saved); the policy of the best "
                     f"gold evaluation (step {self.best['step']}) is in {self.run_dir / 'best_policy'}")
        if self._stop_reason == "nonfinite":
            raise TrainingStopped(
                f"stopped at step {self.step}: {cfg.max_nonfinite_in_a_row} updates in a row had a "
                f"non-finite loss. A checkpoint of step {self.step} is in "
                f"{self.checkpoints.directory}; no more than the updates since then were lost. "
                "Continue with --resume after lowering the learning rates or inspecting the rewards.")
        return self.finish(time.perf_counter() - self.segment_start)

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
                           n_steps=len(exp.scores) * self.world)
        trained_tokens = exp.attention_mask.sum().item() * cfg.ppo_epochs
        generate_seconds = stats.pop("generate_seconds")
        score_seconds = stats.pop("score_seconds")
        new_tokens = stats.pop("new_tokens")
        row = {
            "step": self.step,
            **stats,
            **{k: update[k] for k in ("entropy", "clipfrac", "approx_kl", "vf_loss", "actor_loss",
                                      "critic_loss", "vf_clipfrac", "ratio_max") if k in update},
            **({"kl_loss": update["kl_loss"]} if cfg.kl_loss_coef and "kl_loss" in update else {}),
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
            row.update(self.evaluate())
        return row

    # -- 1-3. experience: generate, score, advantages ------------------------------------------

    @torch.no_grad()
    def make_experience(self, prompts: list[str]) -> tuple[Experience, dict]:
        cfg, m = self.config, self.models
        n = cfg.samples_per_prompt
        prompts = [p for p in prompts for _ in range(n)]
        ids, mask = encode_prompts(self.c.tokenizer, prompts, cfg.max_prompt_len, self.device)
        out = m.hybrid.generate(ids, attention_mask=mask)
        generated = time.perf_counter()

        P = out.prompt_length
        seqs, attn = out.sequences, out.attention_mask
        action_mask = out.completion_mask[:, P:]
        if cfg.old_logprobs_from_rollout:
            old_logp = out.logprobs
            # Measured on one micro-batch (a fraction of the forward this saves): what the
            # update's first ratio sees.
            rows = slice(0, cfg.micro_batch_size)
            trainer_logp = self._old_logprobs(seqs[rows], attn[rows], P)
            mismatch = self._rollout_mismatch(out.logprobs[rows], trainer_logp, action_mask[rows])
        else:
            old_logp = self._old_logprobs(seqs, attn, P)
            mismatch = self._rollout_mismatch(out.logprobs, old_logp, action_mask)
        ref_logp = self._token_logprobs("reference", m.reference, seqs, attn, P)
        values = m.critic.module(seqs, attn, position_ids(attn))[:, P - 1:-1] if m.critic is not None else None
        parts = m.reward.parts(Completions(prompts, seqs, attn, P, self.c.tokenizer))
        scores = self._checked(m.reward.combine(parts), prompts)

        kl = pf.kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * action_mask
        rewards = -self.kl_ctl.value * kl
        last = (action_mask.sum(-1) - 1).clamp(min=0)
        rewards[torch.arange(len(prompts), device=self.device), last] += scores
        baselines = self._greedy_scores(prompts, ids, mask) if cfg.algorithm == "remax" else None
        advantages, returns = self._advantages(rewards, values, action_mask, parts, scores, baselines)

        exp = Experience(seqs, attn, action_mask, old_logp, ref_logp, values, rewards, advantages,
                         returns, scores, P)
        stats = {
            "score": scores.mean().item(),
            "kl": kl.sum(-1).mean().item(),
            "response_length": action_mask.sum(-1).float().mean().item(),
            "generate_seconds": out.metrics["generate_seconds"] + out.metrics["gather_seconds"],
            "score_seconds": time.perf_counter() - generated,
            "new_tokens": out.metrics["new_tokens"],
            **mismatch,
        }
        if values is not None:
            stats["explained_variance"] = self._explained_variance(values, returns, action_mask)
        if len(parts) > 1:
            stats.update({f"score[{name}]": s.mean().item() for name, s in parts.items()})
        return exp, stats

    def _old_logprobs(self, sequences, attention_mask, prompt_len) -> torch.Tensor:
        actor = self.models.actor.module
        actor.eval()
        try:
            return self._token_logprobs("actor", actor, sequences, attention_mask, prompt_len)
        finally:
            actor.train()

    def _rollout_mismatch(self, rollout_logp, old_logp, action_mask) -> dict:
        largest, sums = diagnostics.rollout_mismatch(rollout_logp, old_logp, action_mask)
        if self.world > 1:
            torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(sums)
        tokens, unequal, kl = sums.tolist()
        tokens = max(tokens, 1.0)
        return {"rollout_logp_max_abs_diff": largest.item(), "rollout_logp_unequal_fraction": unequal / tokens,
                "rollout_kl": kl / tokens}

    def _advantages(self, rewards, values, action_mask, parts, scores, baselines):
        cfg = self.config
        if cfg.algorithm == "ppo":
            return pf.gae(rewards, values, action_mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.algorithm == "remax":
            return pf.advantages("remax", rewards, action_mask, baselines)
        if cfg.algorithm == "reinforce_plus_plus":
            return pf.advantages("reinforce_plus_plus", rewards, action_mask, gamma=cfg.gamma)
        # The completions of one prompt are adjacent rows: one group each.
        groups = torch.arange(len(rewards) // cfg.samples_per_prompt, device=self.device).repeat_interleave(
            cfg.samples_per_prompt)
        if cfg.algorithm == "gdpo":
            # One dimension per reward term and one for the KL penalty, each normalised in its group.
            kl_rewards = torch.where(action_mask.bool(), rewards, 0.0)
            last = (action_mask.sum(-1) - 1).clamp(min=0)
            rows = torch.arange(len(rewards), device=self.device)
            kl_rewards[rows, last] -= scores
            weights = [w for w, _ in self.models.reward.terms] + [1.0]
            return pf.advantages("gdpo", [*parts.values(), kl_rewards], action_mask, groups, weights=weights)
        assert cfg.algorithm in GROUPED, cfg.algorithm
        return pf.advantages(cfg.algorithm, rewards, action_mask, groups)

    def _greedy_scores(self, prompts, prompt_ids, prompt_mask) -> torch.Tensor:
        """ReMax's baseline: the reward of each prompt's greedy completion."""
        out = self.models.hybrid.generate(prompt_ids, attention_mask=prompt_mask, do_sample=False)
        batch = Completions(prompts, out.sequences, out.attention_mask, out.prompt_length, self.c.tokenizer)
        return self._checked(self.models.reward(batch), prompts)

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
        return completion_logprobs(model, sequences, attention_mask, prompt_len, temperature=self.config.temperature,
                                   fused=self._uses_fused_head(name, model, sequences, attention_mask))

    def _checked(self, scores: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if not torch.isfinite(scores).all():  # finite terms can still sum to inf
            bad = (~torch.isfinite(scores)).nonzero()[0].item()
            raise RewardError(f"the reward is not finite for prompt {prompts[bad][:40]!r}: the weighted "
                              f"sum of its terms is {scores[bad].item()}")
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
                    options, fused = self._kl_loss_options(exp, idx)
                    if fused:
                        actor_loss, metrics = completion_ppo_loss(actor, seqs, attn, P, *batch, **options)
                    else:
                        logits = completion_logits(actor, seqs, attn, P)
                        actor_loss, metrics = pf.ppo_loss(logits, seqs[:, P:], *batch, **options)
                    critic_loss, vmetrics = actor_loss.new_zeros(()), {}
                    if critic is not None:
                        values = critic(seqs, attn, position_ids(attn))[:, P - 1:-1]
                        critic_loss, vmetrics = pf.value_loss(
                            values, exp.values[idx], exp.returns[idx], exp.action_mask[idx],
                            clip=cfg.value_clip or None, agg=cfg.loss_agg or "token-mean")
                    if not self._finite_on_every_rank(actor_loss, critic_loss):
                        self._skip_nonfinite(actor_loss, critic_loss)
                        if self._stop_reason == "nonfinite":
                            return self._averages(sums, updates)
                        if actor.gradient_accumulation_steps() > 1:
                            # Keep DeepSpeed's accumulation boundaries where they were: the
                            # skipped micro-batch contributes nothing to its minibatch's update.
                            for engine in (actor, critic):
                                if engine is not None:
                                    engine.step()
                        continue
                    self.nonfinite_in_a_row = 0
                    actor.backward(actor_loss)
                    actor.step()
                    if critic is not None:
                        critic.backward(critic_loss)
                        critic.step()
                    updates += 1
                    losses = {"actor_loss": actor_loss, **({"critic_loss": critic_loss} if critic is not None else {})}
                    for name, value in {**metrics, **vmetrics, **losses}.items():
                        sums[name] = sums.get(name, 0.0) + value.item()
        return self._averages(sums, updates)

    def _kl_loss_options(self, exp: Experience, idx: torch.Tensor) -> tuple[dict, bool]:
        """The actor loss's options for a micro-batch, with the KL term when kl_loss_coef is set,
        and whether the actor's loss goes through the fused head. An estimator reads the stored
        reference log-probs; the full KL reads the reference's distribution, from one more forward:
        its hidden states and head where both models take the fused head, else its logits (and
        then the actor's logits too: the fused loss takes the reference as a head)."""
        cfg = self.config
        options, fused = dict(self.loss_options), self.fused_head["actor"]
        if not cfg.kl_loss_coef:
            return options, fused
        estimator = kl_estimator_name(cfg.kl_loss_estimator, full=True)
        options.update(kl_coef=cfg.kl_loss_coef, kl_estimator=estimator)
        if estimator != "full":
            return dict(options, ref_logp=exp.ref_logp[idx]), fused
        seqs, attn, P, reference = exp.sequences[idx], exp.attention_mask[idx], exp.prompt_length, self.models.reference
        fused = fused and self.fused_head["reference"]
        if fused:
            ref_hidden, ref_weight, ref_bias = completion_head_inputs(reference, seqs, attn, P)
            return dict(options, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias), True
        with torch.no_grad():
            return dict(options, ref_logits=completion_logits(reference, seqs, attn, P)), False

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

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The reward-hacking diagnostics (diagnostics.py) of the current policy on the held-out
        prompts, as ``eval_*`` metrics, and the alarms they raise as ``alarm_*`` (0 or 1). Runs
        on its own random stream, so evaluating does not change the training trajectory. Keeps
        the policy of the best gold (else trained-reward) evaluation in ``best_policy/``."""
        n = self.config.eval_prompts
        prompts = self.c.eval_prompts[:n] or self.sampler.prompts[:n]
        state = rng_state()
        torch.manual_seed(self.config.seed + 12345 + self.rank)
        actor = self.models.actor.module
        try:
            ids, mask = encode_prompts(self.c.tokenizer, prompts, self.config.max_prompt_len, self.device)
            out = self.models.hybrid.generate(ids, attention_mask=mask)
            P, seqs, attn = out.prompt_length, out.sequences, out.attention_mask
            batch = Completions(prompts, seqs, attn, P, self.c.tokenizer)
            parts = self.models.reward.parts(batch)
            proxy = self._checked(self.models.reward.combine(parts), prompts)
            gold = self.models.gold(batch) if self.models.gold is not None else None
            completion_mask = out.completion_mask[:, P:]
            actor.eval()
            logp = self._token_logprobs("actor", actor, seqs, attn, P)
            actor.train()
            ref_logp = self._token_logprobs("reference", self.models.reference, seqs, attn, P)
            kl = diagnostics.sequence_kl(logp, ref_logp, completion_mask)
            completions = diagnostics.completion_tokens(batch.completion_ids, completion_mask)
            metrics = diagnostics.sample_metrics(completions, parts, proxy, gold, kl)
        finally:
            set_rng_state(state)
        metrics = self._mean_over_ranks(metrics)
        fired = self.alarms.check(self.step, metrics)
        for name, why in fired.items():
            if self.rank == 0:
                self.log(f"warning: reward-hacking alarm '{name}' at step {self.step}: {why}")
        if fired and self.config.stop_on_alarm and self.step > 0:
            # Before the first step an alarm describes the reward and the starting policy: nothing
            # trained yet to protect, so it is reported and the run goes on.
            self._stop_reason = "alarm"
        self._keep_best(metrics)
        return {**{f"eval_{k}": v for k, v in metrics.items()},
                **{f"alarm_{name}": float(name in fired) for name in diagnostics.ALARMS}}

    def _keep_best(self, metrics: dict) -> None:
        measure = "gold_reward" if "gold_reward" in metrics else "proxy_reward"
        if self.best is not None and metrics[measure] <= self.best["value"]:
            return
        self.best = {"step": self.step, "measure": measure, "value": metrics[measure], "metrics": metrics}
        final, partial, old = self._best_directories()
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        export_policy(self.models.actor, self.c.tokenizer, partial, self.rank)
        if self.rank == 0:
            # The record is written last, so a directory holding one is complete, and travels with
            # its policy: a resume reads the best from it (_published_best).
            _write_atomically(partial / BEST_RECORD, json.dumps(self.best, indent=1))
            # Swapped in by renames: a kill leaves the previous best or the new one, never half of
            # one (between the two renames, the new one complete beside it).
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)

    def _best_directories(self) -> tuple[Path, Path, Path]:
        """best_policy/, the next best while it is written, the previous one while it is replaced."""
        return (self.run_dir / "best_policy", self.run_dir / ".best_policy.partial",
                self.run_dir / ".best_policy.old")

    def _published_best(self) -> dict | None:
        """The record of the policy in best_policy/, read on rank 0 and given to every rank, after
        finishing a swap that a kill interrupted."""
        record = [None]
        if self.rank == 0:
            final, partial, old = self._best_directories()
            if not final.exists() and (partial / BEST_RECORD).is_file():
                os.replace(partial, final)
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
            if (final / BEST_RECORD).is_file():
                record[0] = json.loads((final / BEST_RECORD).read_text())
        if self.world > 1:
            torch.distributed.broadcast_object_list(record, src=0)
        return record[0]

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
                 "history": self.report.history, "alarms": self.alarms.state_dict(),
                 "best": self.best, "seconds_trained": self.seconds_trained,
                 "seconds_wall": self.seconds_before + time.perf_counter() - self.segment_start}
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
        self.alarms.load_state_dict(state["alarms"])
        self.best = self._published_best()
        best_policy = self.run_dir / "best_policy"
        if self.best is None and state["best"] is not None:
            self.log(f"warning: {best_policy} is gone (the checkpoint's best evaluation was step "
                     f"{state['best']['step']}'s); the next evaluation starts the best over")
        elif self.best != state["best"]:
            # A best published after the checkpoint, before the process ended: the policy of the
            # same run at that step, which the redone steps reproduce. Its record, not the
            # checkpoint's older one, describes best_policy/.
            self.log(f"{best_policy} holds the best evaluation so far, of step {self.best['step']} "
                     f"({self.best['measure']} {self.best['value']:.4g}), made after the checkpoint")
        self.seconds_trained = state["seconds_trained"]
        self.seconds_before = state["seconds_wall"]
        self.resumed_from = step
        self.report.restore(state["history"])

    def finish(self, seconds: float) -> dict:
        """The summary; ``seconds``: this process's training loop."""
        summary = self.report.summary(self.step, self.seconds_before + seconds,
                                      self.checkpoints.directory / f"step{self.step}",
                                      self.nonfinite_total)
        summary.update(algorithm=self.config.algorithm, samples_per_prompt=self.config.samples_per_prompt,
                       alarms=dict(self.alarms.first_fired),
                       stopped_by=self._stop_reason,
                       kl_target=self.config.target_kl if self.config.adaptive_kl else None,
                       this_process={"from_step": self.resumed_from, "steps": self.step - self.resumed_from,
                                     "seconds": seconds},
                       best_policy=self.best)
        export_policy(self.models.actor, self.c.tokenizer, self.run_dir / "final_policy", self.rank)
        self.report.finish(summary)
        return summary
