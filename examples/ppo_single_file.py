"""PPO with ppo_fast's ops, in one file you can read top to bottom (CleanRL style).

    python examples/ppo_single_file.py                  # about 2 s on a CPU
    python examples/ppo_single_file.py --iterations 60 --lr 0.03

The policy is a tiny autoregressive model over 32 tokens (each token's logits depend on the
previous token and the position); the reward is the fraction of even token ids, given at the last
token; a frozen copy of the initial policy is the KL reference. Each iteration runs the loop in the
order every PPO trainer runs it:

    rollout (no grad) → old and reference log-probs, values → per-token rewards (score − β·KL)
    → GAE → whitening → epochs × minibatches of the clipped actor and critic losses

The real trainer (``ppo-fast train``) runs the same steps on a Hugging Face causal LM under
DeepSpeed; this file is for seeing the ops work, not for training models.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import ppo_fast as pf


@dataclass
class Args:
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

    def forward(self, tokens: torch.Tensor):
        """tokens [B, T] → logits [B, T, V] of each token given its predecessor, values [B, T]."""
        prev = torch.cat([torch.full_like(tokens[:, :1], self.start), tokens[:, :-1]], dim=1)
        logits = self.prev(prev) + self.pos[: tokens.shape[1]]
        values = self.value_prev(prev).squeeze(-1) + self.value_pos[: tokens.shape[1]]
        return logits, values

    @torch.no_grad()
    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        token = torch.full((batch, 1), self.start, dtype=torch.long)
        out = []
        for t in range(length):
            probs = torch.softmax(self.prev(token[:, -1]) + self.pos[t], -1)
            token = torch.multinomial(probs, 1, generator=generator)
            out.append(token)
        return torch.cat(out, dim=1)


def score(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens % 2 == 0).float().mean(-1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Args):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = Args(**vars(parser.parse_args(argv)))

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    policy = ToyPolicy(args.vocab, args.length)
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    kl_ctl = pf.AdaptiveKLController(args.init_kl_coef, target=args.target_kl, horizon=500)
    B, T = args.batch_size, args.length
    mask = torch.ones(B, T, dtype=torch.bool)
    scores_seen = []
    print(f"{'iter':>4} {'score':>6} {'kl':>6} {'entropy':>7} {'clipfrac':>8} {'beta':>6}")
    for iteration in range(args.iterations):
        # 1. Rollout and experience, without gradients.
        tokens = policy.sample(B, T, generator)
        with torch.no_grad():
            logits, values = policy(tokens)
            old_logp = pf.token_logprobs(logits, tokens)
            ref_logp = pf.token_logprobs(reference(tokens)[0], tokens)
            scores = score(tokens)
            rewards = -kl_ctl.value * pf.kl_penalty(old_logp, ref_logp, "k1")
            rewards[:, -1] += scores
            advantages, returns = pf.gae(rewards, values, mask, gamma=1.0, lam=0.95)  # whitened

        # 2. Update: epochs × minibatches of the clipped actor loss and the value loss.
        for _ in range(args.ppo_epochs):
            for idx in torch.randperm(B, generator=generator).chunk(args.minibatches):
                logits, new_values = policy(tokens[idx])
                actor_loss, metrics = pf.ppo_loss(logits, tokens[idx], old_logp[idx],
                                                  advantages[idx], mask[idx], clip_low=0.2,
                                                  clip_high=0.28, entropy_coef=0.001)
                critic_loss, _ = pf.value_loss(new_values, values[idx], returns[idx], mask[idx],
                                               clip=0.2)
                optimizer.zero_grad()
                (actor_loss + 0.5 * critic_loss).backward()
                nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                optimizer.step()

        # 3. Adapt β towards the target KL and report.
        kl = (old_logp - ref_logp).sum(-1).mean().item()
        kl_ctl.update(kl, n_steps=B)
        scores_seen.append(scores.mean().item())
        print(f"{iteration:>4} {scores_seen[-1]:>6.3f} {kl:>6.3f} {metrics['entropy'].item():>7.3f} "
              f"{metrics['clipfrac'].item():>8.3f} {kl_ctl.value:>6.3f}")
    return {"score_before": scores_seen[0], "score_after": scores_seen[-1]}


if __name__ == "__main__":
    main()
