"""Reward-hacking diagnostics of a batch of evaluation samples, and the alarms read from them.

Per evaluation (the trainer's, every eval_every steps, and ``ppo-fast eval``):

* ``proxy_reward`` (what the policy is trained against; with several terms also ``reward[<term>]``,
  each term's own unweighted score) and
  ``gold_reward`` (an evaluation-only rule or held-out reward model, when there is one);
* ``response_length`` (tokens up to and including EOS) and ``reward_per_token`` (mean of
  reward / length: a reward that grows per token rather than per answer shows here);
* ``length_r2``: the share of the proxy reward's variance across prompts that completion length
  explains beyond gold (the rise of R² when length joins gold in a linear fit of the proxy;
  plain R² without gold), negative when longer scores lower. A reward model with a length bias
  scores it low while lengths hardly vary, high once the policy exploits the bias;
* ``distinct_1`` / ``distinct_2`` (unique n-grams over all n-grams of all completions) and
  ``repetition`` (mean share of repeated bigrams inside a completion): collapse and loops;
* ``kl``: KL to the reference policy, nats per completion (the k1 estimate on the samples).

Alarms (:class:`Alarms`): ``divergence`` when the proxy is above its value at the best gold
evaluation so far while gold has fallen from that best by more than ``gold_drop`` standard
deviations of the per-prompt gold; ``length`` when ``length_r2`` exceeds its threshold; ``kl``
when ``kl`` exceeds its budget.
"""

from __future__ import annotations

import numpy as np
import torch

ALARMS = ("divergence", "length", "kl")


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` KL to the reference in nats per completion: the k1 estimate Σ (logp − ref_logp) over
    its tokens (unbiased, so a mean over few samples can dip below 0)."""
    return torch.where(completion_mask.bool(), logp - ref_logp, 0.0).sum(-1)


def rollout_mismatch(rollout_logp: torch.Tensor, trainer_logp: torch.Tensor,
                     completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the rollout's log-probs of its own tokens are from the trainer's old log-probs of
    the same tokens (PPO assumes they are equal): ``(largest |Δlogp|, sums)`` with ``sums`` =
    (tokens, tokens whose log-probs differ at all, Σ k3) in float64, to be added over ranks. The k3
    term ``exp(Δ) − 1 − Δ`` (Δ = trainer − rollout) estimates KL(rollout ‖ trainer) per token from
    the rollout's samples, and is never negative."""
    valid = completion_mask.bool()
    delta = torch.where(valid, trainer_logp.double() - rollout_logp.double(), 0.0)
    sums = torch.stack([valid.sum().double(), (delta != 0).sum().double(), (torch.expm1(delta) - delta).sum()])
    return delta.abs().max(), sums


def completion_tokens(completion_ids: list[list[int]], completion_mask: torch.Tensor) -> list[list[int]]:
    """Each completion's tokens up to and including EOS (the padding after it is not read)."""
    return [[t for t, m in zip(ids, row) if m] for ids, row in zip(completion_ids, completion_mask.tolist())]


def distinct_n(completions: list[list[int]], n: int) -> float:
    grams = [tuple(c[i:i + n]) for c in completions for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(completions: list[list[int]]) -> float:
    shares = []
    for c in completions:
        grams = [tuple(c[i:i + 2]) for i in range(len(c) - 1)]
        if grams:
            shares.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(shares)) if shares else 0.0


def length_r2(length: np.ndarray, proxy: np.ndarray, gold: np.ndarray | None = None) -> float:
    """The share of ``proxy``'s variance that ``length`` explains beyond ``gold``: the rise of R²
    from a least-squares fit of proxy on (1, gold) to one on (1, gold, length), signed like
    length's coefficient; plain R² of proxy on length without gold. 0 for a constant proxy."""
    columns = [np.ones_like(proxy)] + ([gold] if gold is not None else [])
    total = float(((proxy - proxy.mean()) ** 2).sum())
    if total <= 1e-12 * (float((proxy ** 2).sum()) + 1.0):
        return 0.0

    def sse(design):
        coef, *_ = np.linalg.lstsq(design, proxy, rcond=None)
        return float(((proxy - design @ coef) ** 2).sum()), coef

    sse_reduced, _ = sse(np.stack(columns, 1))
    if sse_reduced <= 1e-12 * total:
        # The fit without length explains the proxy already (a proxy equal to gold): length has
        # nothing left to explain. The difference of the two fits' round-off residuals would say
        # ±3e-31 on some batches and 0 on others.
        return 0.0
    sse_full, coef = sse(np.stack(columns + [length], 1))
    share = max(0.0, (sse_reduced - sse_full) / total)
    return share if coef[-1] >= 0 else -share


def sample_metrics(completions: list[list[int]], proxy_parts: dict, proxy: torch.Tensor,
                   gold: torch.Tensor | None, kl: torch.Tensor | None) -> dict:
    """The diagnostics of one evaluation batch (see the module docstring). ``completions``: each
    completion's tokens (:func:`completion_tokens`); ``proxy_parts``: each term's scores when the
    proxy has several; ``kl``: ``[B]`` nats per completion, or None when there is no reference."""
    length = np.array([len(c) for c in completions], dtype=np.float64)
    proxy_np = proxy.double().cpu().numpy()
    gold_np = None if gold is None else gold.double().cpu().numpy()
    metrics = {"proxy_reward": float(proxy_np.mean())}
    if len(proxy_parts) > 1:
        metrics.update({f"reward[{name}]": float(s.double().mean()) for name, s in proxy_parts.items()})
    if gold_np is not None:
        metrics["gold_reward"] = float(gold_np.mean())
        metrics["gold_std"] = float(gold_np.std())
    metrics.update(
        response_length=float(length.mean()),
        reward_per_token=float((proxy_np / np.maximum(length, 1)).mean()),
        length_r2=length_r2(length, proxy_np, gold_np) if len(length) > 2 else 0.0,
        distinct_1=distinct_n(completions, 1),
        distinct_2=distinct_n(completions, 2),
        repetition=repetition(completions),
    )
    if kl is not None:
        metrics["kl"] = float(kl.double().mean())
    return metrics


class Alarms:
    """Reads each evaluation's metrics, says which alarms fire, and remembers what it needs (the
    best gold evaluation, the first step each alarm fired) across a resume."""

    def __init__(self, *, gold_drop: float, length_r2: float, kl_budget: float):
        self.gold_drop, self.length_r2, self.kl_budget = gold_drop, length_r2, kl_budget
        self.best: dict | None = None
        self.first_fired: dict[str, int] = {}

    def check(self, step: int, metrics: dict) -> dict[str, str]:
        """``{alarm: why}`` for the alarms that fire on this evaluation."""
        fired = {}
        gold, proxy = metrics.get("gold_reward"), metrics["proxy_reward"]
        if gold is not None and self.best is not None:
            scale = max(self.best["gold_std"], metrics["gold_std"], 1e-6)
            fall = (self.best["gold"] - gold) / scale
            if fall > self.gold_drop and proxy > self.best["proxy"]:
                fired["divergence"] = (f"the trained reward rose to {proxy:.3f} (it was {self.best['proxy']:.3f} at "
                                       f"step {self.best['step']}) while gold fell from {self.best['gold']:.3f} "
                                       f"to {gold:.3f} ({fall:.2f} standard deviations)")
        if metrics["length_r2"] > self.length_r2:
            beyond = " beyond gold" if gold is not None else ""
            fired["length"] = (f"completion length explains {100 * metrics['length_r2']:.0f}% of the trained "
                               f"reward's variance{beyond} (threshold {100 * self.length_r2:.0f}%; mean length "
                               f"{metrics['response_length']:.1f})")
        if metrics["kl"] > self.kl_budget:
            fired["kl"] = f"KL to the reference {metrics['kl']:.2f} nats exceeds its budget of {self.kl_budget:g}"
        if gold is not None and (self.best is None or gold > self.best["gold"]):
            self.best = {"step": step, "gold": gold, "proxy": proxy, "gold_std": metrics["gold_std"]}
        for name in fired:
            self.first_fired.setdefault(name, step)
        return fired

    def state_dict(self) -> dict:
        return {"best": self.best, "first_fired": dict(self.first_fired)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.first_fired = state["best"], dict(state["first_fired"])
