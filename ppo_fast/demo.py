"""A small PPO run built only from ppo_fast's ops, to watch them work on a CPU in seconds.

The policy is a tiny autoregressive model over a 32-token vocabulary (each token's logits depend on
the previous token and the position). The reward is the fraction of tokens of a target class
(even ids), given at the last token; a frozen copy of the initial policy is the KL reference.
Each iteration runs the loop in the order a PPO trainer runs it:

    rollout (no grad) -> old / reference log-probs and values -> per-token rewards (score − β·KL)
    -> GAE -> whitening -> epochs x minibatches of the clipped actor and critic losses

and prints score, KL, entropy, clip fraction and the adaptive KL coefficient.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

import ppo_fast as pf


@dataclass
class DemoConfig:
    iterations: int = 30
    """PPO iterations (rollout + update)."""
    batch_size: int = 64
    """Sequences sampled per iteration."""
    length: int = 12
    """Tokens generated per sequence."""
    vocab: int = 32
    """Vocabulary size of the toy policy."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    minibatches: int = 2
    """Minibatches per pass."""
    lr: float = 0.05
    """Adam learning rate (actor and critic)."""
    init_kl_coef: float = 0.05
    """Initial β of the adaptive KL controller."""
    target_kl: float = 2.0
    """KL per sequence the controller steers towards."""
    seed: int = 0
    """Random seed."""


class ToyPolicy(nn.Module):
    """logits_t = E[token_{t−1}] + P[t]; a value head of the same form gives V_t."""

    def __init__(self, vocab: int, length: int):
        super().__init__()
        self.prev = nn.Embedding(vocab + 1, vocab)  # index `vocab` is the start token
        self.pos = nn.Parameter(torch.zeros(length, vocab))
        self.value_prev = nn.Embedding(vocab + 1, 1)
        self.value_pos = nn.Parameter(torch.zeros(length))
        nn.init.normal_(self.prev.weight, std=0.5)
        nn.init.zeros_(self.value_prev.weight)
        self.start = vocab

    def inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(tokens[:, :1], self.start)
        return torch.cat([start, tokens[:, :-1]], dim=1)

    def forward(self, tokens: torch.Tensor):
        """tokens [B, T] → logits [B, T, V] for each token given its predecessors, values [B, T]."""
        prev = self.inputs(tokens)
        logits = self.prev(prev) + self.pos[: tokens.shape[1]]
        values = self.value_prev(prev).squeeze(-1) + self.value_pos[: tokens.shape[1]]
        return logits, values

    @torch.no_grad()
    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        tokens = torch.full((batch, 1), self.start, dtype=torch.long)
        out = []
        for t in range(length):
            logits = self.prev(tokens[:, -1]) + self.pos[t]
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            out.append(nxt)
            tokens = nxt
        return torch.cat(out, dim=1)


def score(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens % 2 == 0).float().mean(-1)


def run(config: DemoConfig | None = None, log=print) -> dict:
    config = config or DemoConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    policy = ToyPolicy(config.vocab, config.length)
    reference_policy = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    kl_ctl = pf.AdaptiveKLController(config.init_kl_coef, target=config.target_kl, horizon=500)
    B, T = config.batch_size, config.length
    mask = torch.ones(B, T, dtype=torch.bool)
    history = []
    start_time = time.perf_counter()
    log(f"{'iter':>4} {'score':>6} {'kl':>6} {'entropy':>7} {'clipfrac':>8} {'beta':>6}")
    for iteration in range(config.iterations):
        # Rollout and experience, no gradients.
        tokens = policy.sample(B, T, generator)
        with torch.no_grad():
            logits, values = policy(tokens)
            old_logp = pf.token_logprobs(logits, tokens)
            ref_logp = pf.token_logprobs(reference_policy(tokens)[0], tokens)
            scores = score(tokens)
            rewards = -kl_ctl.value * pf.kl_penalty(old_logp, ref_logp, "k1")
            rewards[:, -1] += scores
            advantages, returns = pf.gae(rewards, values, mask, gamma=1.0, lam=0.95)
            advantages = pf.masked_whiten(advantages, mask)
        # Update.
        for _ in range(config.ppo_epochs):
            for idx in torch.randperm(B).chunk(config.minibatches):
                logits, new_values = policy(tokens[idx])
                actor_loss, metrics = pf.ppo_loss(logits, tokens[idx], old_logp[idx],
                                                  advantages[idx], mask[idx], clip_low=0.2,
                                                  clip_high=0.28, entropy_coef=0.001)
                critic_loss, _ = pf.value_loss(new_values, values[idx], returns[idx], mask[idx],
                                               clip=0.2)
                optimizer.zero_grad()
                (actor_loss + 0.5 * critic_loss).backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                optimizer.step()
        kl = (old_logp - ref_logp).sum(-1).mean().item()
        kl_ctl.update(kl, n_steps=B)
        row = dict(iteration=iteration, score=scores.mean().item(), kl=kl,
                   entropy=metrics["entropy"].item(), clipfrac=metrics["clipfrac"].item(),
                   kl_coef=kl_ctl.value)
        history.append(row)
        log(f"{iteration:>4} {row['score']:>6.3f} {kl:>6.3f} {row['entropy']:>7.3f} "
            f"{row['clipfrac']:>8.3f} {kl_ctl.value:>6.3f}")
    seconds = time.perf_counter() - start_time
    summary = dict(score_before=history[0]["score"], score_after=history[-1]["score"],
                   kl_final=history[-1]["kl"], seconds=seconds, iterations=config.iterations)
    log(f"score {summary['score_before']:.3f} -> {summary['score_after']:.3f}, "
        f"KL to the reference {summary['kl_final']:.3f} nats per sequence, {seconds:.1f} s")
    return summary
