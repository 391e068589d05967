"""Advantage estimators: every estimator of verl 0.9.1's registry, one function each.

    from ppo_fast import estimators as A
    adv, ret = A.grpo(rewards, mask, uids)
    adv, ret = pf.advantages("grpo", rewards, mask, uids)      # by verl's name

The functions carry their own, documented semantics; :mod:`ppo_fast.integrations.verl.advantages`
reproduces verl's numbers, quirks included, on top of them. Conventions shared by every function:

* ``rewards`` ``[B, T]`` token-level rewards; ``mask`` ``[B, T]`` bool or 0/1 marks the response
  tokens that count. The outcome estimators also take ``rewards`` as ``[B]`` sequence scores. A
  row's score is ``s_i = Σ_t rewards[i, t]`` over its masked tokens (or the ``[B]`` value given).
* ``group_ids`` ``[B]`` says which prompt each row answers: an integer tensor, or any sequence or
  numpy array of hashable labels (verl passes a numpy object array of ``str`` uuids); labels that
  compare equal (``==`` and hash, so ``1``, ``1.0`` and ``True`` too) are one group. Rows of one
  group need not be adjacent. Every row belongs to its group, also a row whose mask is empty (its
  score is then 0 unless given as ``[B]`` scores).
* Every function returns ``(advantages, returns)`` (an :class:`AdvantageOutput`), both ``[B, T]``;
  the outcome estimators have no separate return and give the advantages twice. Both are 0 at
  masked positions whatever the inputs hold there (NaN, inf): masks select, never multiply.
* dtype: float64 when any floating input is float64, and then every step is float64; otherwise
  float32 (bfloat16/float16 inputs too). Per-row group statistics are always float64; per-token
  work (whitening, returns) runs in the output dtype.
* Advantages are data: computed without autograd.

Batch dependence. ``remax`` and, without whitening, ``gae`` and ``reinforce_plus_plus`` work row
by row: a row's advantages do not depend on the rest of the batch. All others are defined over
the batch and so are not batch-invariant (splitting a batch changes the numbers): ``grpo``,
``grpo_passk``, ``rloo``, ``opo``, ``gpg`` and both optimal-token-baseline estimators use
statistics of each row's group; whitening (``gae``, ``reinforce_plus_plus``,
``reinforce_plus_plus_baseline``, ``gdpo``) uses one mean and variance over every masked token of
the batch; ``gpg``'s scale counts the batch's nonzero scores.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import torch

from . import arguments as check
from . import functional
from .arguments import in_unit_interval, positive
from .spec import compute_dtype

__all__ = ["ESTIMATORS", "AdvantageOutput", "advantages", "gae", "gdpo", "gpg", "grpo",
           "grpo_passk", "opo", "optimal_token_baseline", "reinforce_plus_plus",
           "reinforce_plus_plus_baseline", "remax", "rloo", "tir_optimal_token_baseline"]


class AdvantageOutput(NamedTuple):
    advantages: torch.Tensor
    """``[B, T]``, 0 at masked positions."""
    returns: torch.Tensor
    """``[B, T]`` (the critic's target or the reward-to-go; the advantages for outcome
    estimators), 0 at masked positions."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------




def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def _flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_rewards(rewards, mask, *, scores_allowed: bool, name: str = "rewards") -> None:
    """rewards ``[B, T]`` with a mask of that shape, or (outcome estimators) ``[B]`` scores with a
    ``[B, T]`` mask."""
    check.floating(name, check.tensor(name, rewards))
    check.tensor("mask", mask)
    if rewards.dim() == 2:
        check.mask_like("mask", mask, rewards.shape, f"{name}.shape")
    elif rewards.dim() == 1 and scores_allowed:
        if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
            raise ValueError(f"mask must be [B, T] with B = {rewards.shape[0]} ({name}.shape[0]), "
                             f"got {_shape(mask)}")
        check.mask_like("mask", mask, mask.shape, "[B, T]")
    else:
        expected = "[B, T] token-level rewards or [B] sequence scores" if scores_allowed else "[B, T]"
        raise ValueError(f"{name} must be {expected}, got {_shape(rewards)}")
    check.same_device(name, rewards, mask=mask)


def _check_token_inputs(mask: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            check.token_tensor(name, t, mask.shape, "mask.shape")
    check.same_device("mask", mask, **tensors)


class _Groups(NamedTuple):
    index: torch.Tensor
    """``[B]`` int64 on the rewards' device: each row's group, numbered ``0 .. G-1``."""
    sizes: torch.Tensor
    """``[G]`` int64: rows per group."""
    labels: list
    """The label of each group, for messages."""


def _groups(group_ids, batch: int, device: torch.device) -> _Groups:
    """Number the groups of ``group_ids`` (see the module docstring for what it may be)."""
    if isinstance(group_ids, torch.Tensor):
        check.integer("group_ids", group_ids)
        if group_ids.dim() != 1 or group_ids.shape[0] != batch:
            raise ValueError(f"group_ids must be [B] with B = {batch} (rewards.shape[0]), got "
                             f"{_shape(group_ids)}")
        if group_ids.device != device:
            raise ValueError(f"group_ids is on {group_ids.device} but rewards is on {device}; move all inputs to "
                             "one device")
        labels, index, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
        return _Groups(index, sizes, labels.tolist())
    if isinstance(group_ids, (str, bytes, Mapping, set, frozenset)) or not hasattr(group_ids, "__len__"):
        raise TypeError("group_ids must be an integer tensor, or a sequence or numpy array of hashable "
                        f"labels, got {type(group_ids).__name__}")
    if isinstance(group_ids, np.ndarray):
        if group_ids.ndim != 1:
            raise ValueError(f"group_ids must be 1-D [B], got a numpy array of shape {group_ids.shape}")
        group_ids = group_ids.tolist()
    labels_in = list(group_ids)
    if len(labels_in) != batch:
        raise ValueError(f"group_ids must have B = {batch} labels (rewards.shape[0]), got {len(labels_in)}")
    numbers: dict = {}
    index = []
    for row, label in enumerate(labels_in):
        if isinstance(label, torch.Tensor):
            # A 0-d tensor hashes by identity: equal ids would silently form separate groups.
            raise TypeError(f"group_ids[{row}] is a torch.Tensor; pass an integer tensor as a whole, "
                            "or plain labels (int, str, ...)")
        if isinstance(label, float) and label != label:
            # NaN is unequal to itself: each NaN row would silently be a group of its own.
            raise ValueError(f"group_ids[{row}] is NaN; a group label must equal itself")
        try:
            index.append(numbers.setdefault(label, len(numbers)))
        except TypeError:
            raise TypeError(f"group_ids[{row}] = {label!r} is not hashable") from None
    index_t = torch.tensor(index, dtype=torch.int64)
    sizes = torch.bincount(index_t, minlength=len(numbers))
    return _Groups(index_t.to(device), sizes.to(device), list(numbers))


def _scores(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64 sequence scores: the masked sum of ``[B, T]`` rewards, or the given ``[B]``."""
    if rewards.dim() == 1:
        return rewards.to(torch.float64)
    return torch.where(mask.bool(), rewards, 0.0).sum(-1, dtype=torch.float64)


def _group_mean(groups: _Groups, s: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean of ``s`` over each row's group."""
    total = s.new_zeros(len(groups.labels)).index_add_(0, groups.index, s)
    return (total / groups.sizes.to(s.dtype))[groups.index]


def _group_std(groups: _Groups, s: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``[B]``: the unbiased (n − 1) std of ``s`` over each row's group (groups of ≥ 2 rows)."""
    sq = s.new_zeros(len(groups.labels)).index_add_(0, groups.index, (s - mean).square())
    return (sq / (groups.sizes - 1).clamp(min=1).to(s.dtype)).sqrt()[groups.index]


def _per_token(a: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B]`` → ``[B, T]``: each row's value on its masked tokens, 0 elsewhere."""
    return torch.where(mask.bool(), a.to(dtype).unsqueeze(-1), 0.0)


def _reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_t = r_t + γ·R_next`` over the masked tokens (masked tokens are skipped, not zeros in the
    chain), 0 at masked positions: GAE with ``V = 0`` and ``λ = 1``, so one kernel launch on CUDA."""
    returns, _ = functional.gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, whiten=False)
    return returns


# --------------------------------------------------------------------------------------------
# Estimators with a critic or a return
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95,
        whiten: bool = True) -> AdvantageOutput:
    """Generalised advantage estimation, whitened over the batch (verl's ``gae``).

    rewards, values, mask ``[B, T]``. Walking back from ``A_next = V_next = 0`` over the masked
    tokens only (masked tokens add no TD error and do not break the chain):

        δ_t = r_t + γ·V_next − V_t,   A_t = δ_t + γλ·A_next,   returns_t = A_t + V_t

    then ``advantages = masked_whiten(A, mask)`` (batch mean and unbiased variance over the masked
    tokens, ``(A − μ)/sqrt(σ² + 1e-8)``; needs ≥ 2 masked tokens) unless ``whiten=False``.
    Returns are not whitened. :func:`ppo_fast.functional.gae` (one Triton launch on CUDA), with
    the same default. Batch-invariant only with ``whiten=False``.
    """
    check.tensor("rewards", rewards)
    _flag("whiten", whiten)
    check.tensor("mask", mask)
    return AdvantageOutput(*functional.gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten))


@torch.no_grad()
def reinforce_plus_plus(rewards, mask, *, gamma: float = 1.0, whiten: bool = True) -> AdvantageOutput:
    """REINFORCE++ (arXiv 2501.03262): the discounted reward-to-go, whitened over the batch.

    rewards, mask ``[B, T]``. ``returns_t = r_t + γ·returns_next`` over the masked tokens (masked
    tokens are skipped, so rewards carry across observation spans); ``advantages =
    masked_whiten(returns, mask)`` (needs ≥ 2 masked tokens) unless ``whiten=False``; returns are
    not whitened. Batch-invariant only with ``whiten=False``.
    """
    check.tensor("rewards", rewards)
    _check_rewards(rewards, mask, scores_allowed=False)
    _flag("whiten", whiten)
    in_unit_interval("gamma", gamma)
    returns = _reward_to_go(rewards, mask, gamma)
    adv = functional.masked_whiten(returns, mask) if whiten else returns
    return AdvantageOutput(adv, returns)


@torch.no_grad()
def remax(rewards, mask, baselines) -> AdvantageOutput:
    """ReMax (arXiv 2310.10505): the reward-to-go minus a per-sequence baseline.

    rewards, mask ``[B, T]``; baselines ``[B]`` (the greedy rollout's score, in verl). With
    ``returns_t = Σ_{t' ≥ t, masked} r_t'``: ``advantages_t = returns_t − baselines``. Row by row
    (batch-invariant).
    """
    check.tensor("rewards", rewards)
    _check_rewards(rewards, mask, scores_allowed=False)
    check.floating("baselines", check.tensor("baselines", baselines))
    check.shape("baselines", baselines, rewards.shape[:1], "[B] = rewards.shape[:1]")
    check.same_device("rewards", rewards, baselines=baselines)
    dtype = compute_dtype(rewards, baselines)
    returns = _reward_to_go(rewards.to(dtype), mask, 1.0)
    adv = torch.where(mask.bool(), returns - baselines.to(dtype).unsqueeze(-1), 0.0)
    return AdvantageOutput(adv, returns)


# --------------------------------------------------------------------------------------------
# Outcome estimators: one score per row, compared within its group
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def grpo(rewards, mask, group_ids, *, eps: float = 1e-6, normalize_std: bool = True) -> AdvantageOutput:
    """GRPO (``normalize_std=True``) or Dr. GRPO (``False``) outcome advantages.

    rewards ``[B, T]`` or ``[B]`` scores, mask ``[B, T]``, group_ids ``[B]``.

        A_i = (s_i − mean_g) / (std_g + eps)      (std unbiased, n − 1)
        A_i =  s_i − mean_g                       (normalize_std=False)

    broadcast over the row's masked tokens. A group of one row has mean 0 and std 1 (its
    advantage is ``s_i / (1 + eps)``, or ``s_i``), as in verl. Built on
    :func:`ppo_fast.functional.group_advantages`, in float64. Also verl's ``grpo_vectorized``
    (the same estimator). Depends on the other rows of the group.
    """
    check.tensor("rewards", rewards)
    _check_rewards(rewards, mask, scores_allowed=True)
    positive("eps", eps)
    _flag("normalize_std", normalize_std)
    groups = _groups(group_ids, rewards.shape[0], rewards.device)
    a = functional.group_advantages(_scores(rewards, mask), groups.index,
                                    normalize_std=bool(normalize_std), eps=eps)
    adv = _per_token(a, mask, compute_dtype(rewards))
    return AdvantageOutput(adv, adv)


@torch.no_grad()
def gdpo(rewards, mask, group_ids, *, weights=None, eps: float = 1e-6, normalize_std: bool = True,
         whiten: bool = True) -> AdvantageOutput:
    """GDPO (arXiv 2601.05242): GRPO per reward dimension, weighted sum, whitened over the batch.

    rewards: the K reward dimensions, a sequence of K tensors each ``[B, T]`` or ``[B]`` scores
    (a single tensor is K = 1); mask ``[B, T]``; group_ids ``[B]``; weights: K numbers (default
    all 1).

        A = masked_whiten(Σ_k w_k · grpo_k, mask)

    with ``grpo_k`` the :func:`grpo` advantage of dimension k (same ``eps`` and
    ``normalize_std``). Whitening (needs ≥ 2 masked tokens) is batch-global; ``whiten=False``
    leaves the weighted sum. Not batch-invariant.
    """
    dims = [rewards] if isinstance(rewards, torch.Tensor) else list(rewards)
    if not dims:
        raise ValueError("rewards must hold at least one reward dimension, got an empty sequence")
    check.tensor("rewards", dims[0])
    for k, r in enumerate(dims):
        _check_rewards(r, mask, scores_allowed=True, name=f"rewards[{k}]" if len(dims) > 1 else "rewards")
        if r.shape[0] != dims[0].shape[0]:
            raise ValueError(f"rewards[{k}] has {r.shape[0]} rows, rewards[0] has {dims[0].shape[0]}")
    positive("eps", eps)
    _flag("normalize_std", normalize_std)
    _flag("whiten", whiten)
    if weights is None:
        weights = [1.0] * len(dims)
    weights = list(weights)
    if len(weights) != len(dims):
        raise ValueError(f"weights must hold one number per reward dimension ({len(dims)}), got {len(weights)}")
    for k, w in enumerate(weights):
        if not (isinstance(w, numbers.Real) and not isinstance(w, (bool, np.bool_)) and math.isfinite(w)):
            raise ValueError(f"weights[{k}] must be a finite number, got {w!r}")
    groups = _groups(group_ids, dims[0].shape[0], dims[0].device)
    total = sum(float(w) * functional.group_advantages(_scores(r, mask), groups.index,
                                                       normalize_std=bool(normalize_std), eps=eps)
                for w, r in zip(weights, dims))
    adv = _per_token(total, mask, compute_dtype(*dims))
    if whiten:
        adv = functional.masked_whiten(adv, mask)
    return AdvantageOutput(adv, adv)


@torch.no_grad()
def grpo_passk(rewards, mask, group_ids, *, eps: float = 1e-6, normalize_std: bool = True) -> AdvantageOutput:
    """Pass@k training (arXiv 2503.19595): only the best row of each group gets an advantage.

    rewards ``[B, T]`` or ``[B]`` scores, mask ``[B, T]``, group_ids ``[B]``; every group needs
    ≥ 2 rows. With ``s_(1) ≥ s_(2)`` the group's two best scores:

        A_best = (s_(1) − s_(2)) / (std_g + eps)   (std unbiased; no division when
                                                    normalize_std=False);  A = 0 for the others

    Among rows tied for the best, the first in row order is "best" (the gap is then 0 anyway).
    Depends on the other rows of the group.
    """
    check.tensor("rewards", rewards)
    _check_rewards(rewards, mask, scores_allowed=True)
    positive("eps", eps)
    _flag("normalize_std", normalize_std)
    groups = _groups(group_ids, rewards.shape[0], rewards.device)
    small = (groups.sizes < 2).nonzero().flatten().tolist()
    if small:
        g = small[0]
        raise ValueError(f"grpo_passk needs at least 2 rows per group in group_ids; group "
                         f"{groups.labels[g]!r} has {int(groups.sizes[g])} ({len(small)} such groups)")
    s = _scores(rewards, mask)
    # Rows by group, best score first within each group (ties in row order).
    by_score = torch.argsort(s, descending=True, stable=True)
    order = by_score[torch.argsort(groups.index[by_score], stable=True)]
    first = torch.cumsum(groups.sizes, 0) - groups.sizes
    best, runner_up = order[first], order[first + 1]
    gap = s[best] - s[runner_up]
    if normalize_std:
        mean = _group_mean(groups, s)
        gap = gap / (_group_std(groups, s, mean)[best] + eps)
    a = s.new_zeros(s.shape).index_put_((best,), gap)
    adv = _per_token(a, mask, compute_dtype(rewards))
    return AdvantageOutput(adv, adv)


@torch.no_grad()
def reinforce_plus_plus_baseline(rewards, mask, group_ids, *, whiten: bool = True) -> AdvantageOutput:
    """REINFORCE++ with a group baseline (arXiv 2501.03262): ``s_i − mean_g``, whitened over the
    batch.

    rewards ``[B, T]`` or ``[B]`` scores, mask ``[B, T]``, group_ids ``[B]``. A group of one row
    has baseline 0. ``advantages = masked_whiten(s_i − mean_g broadcast over the masked tokens,
    mask)`` (needs ≥ 2 masked tokens) unless ``whiten=False``. Not batch-invariant.
    """
    check.tensor("rewards", rewards)
    _check_rewards(rewards, mask, scores_allowed=True)
    _flag("whiten", whiten)
    groups = _groups(group_ids, rewards.shape[0], rewards.device)
    s = _scores(rewards, mask)
    baseline = torch.where(groups.sizes[groups.index] > 1, _group_mean(groups, s), 0.0)
    adv = _per_token(s - baseline, mask, compute_dtype(rewards))
    if whiten:
        adv = functional.masked_whiten(adv, mask)
    return AdvantageOutput(adv, adv)


@torch.no_grad()
def rloo(rewards, mask, group_ids) -> AdvantageOutput:
    """RLOO (arXiv 2402.14740): each score against the mean of the other rows of its group.

    rewards ``[B, T]`` or ``[B]`` scores, mask ``[B, T]``, group_ids ``[B]``.

        A_i = s_i − (Σ_{j∈g} s_j − s_i)/(n − 1) = n/(n − 1) · (s_i − mean_g)

    A group of one row has no other rows: baseline 0, its advantage is its score (as verl's
    ``rloo``; verl's ``rloo_vectorized`` gives 0 instead, see the verl adapter). Depends on the
    other rows of the group.
    """
    check.tensor("rewards", rewards)
    _check_rewards(rewards, mask, scores_allowed=True)
    groups = _groups(group_ids, rewards.shape[0], rewards.device)
    s = _scores(rewards, mask)
    n = groups.sizes[groups.index].to(s.dtype)
    a = torch.where(n > 1, (s - _group_mean(groups, s)) * (n / (n - 1).clamp(min=1)), s)
    adv = _per_token(a, mask, compute_dtype(rewards))
    return AdvantageOutput(adv, adv)


@torch.no_grad()
def opo(rewards, mask, group_ids) -> AdvantageOutput:
    """OPO (arXiv 2505.23585): the score minus the length-weighted mean score of the group.

    rewards ``[B, T]`` or ``[B]`` scores, mask ``[B, T]``, group_ids ``[B]``. With ``L_i`` the
    row's number of masked tokens:

        A_i = s_i − Σ_{j∈g} L_j·s_j / Σ_{j∈g} L_j

    A group of one row, or whose rows have no masked token, has baseline 0. Depends on the other
    rows of the group.
    """
    check.tensor("rewards", rewards)
    _check_rewards(rewards, mask, scores_allowed=True)
    groups = _groups(group_ids, rewards.shape[0], rewards.device)
    s = _scores(rewards, mask)
    length = mask.bool().sum(-1).to(s.dtype)
    G = len(groups.labels)
    weighted = s.new_zeros(G).index_add_(0, groups.index, length * s)[groups.index]
    total = s.new_zeros(G).index_add_(0, groups.index, length)[groups.index]
    use = (groups.sizes[groups.index] > 1) & (total > 0)
    a = s - torch.where(use, weighted / torch.where(use, total, 1.0), 0.0)
    adv = _per_token(a, mask, compute_dtype(rewards))
    return AdvantageOutput(adv, adv)


@torch.no_grad()
def gpg(rewards, mask, group_ids, *, f_norm: float = 1.0, alpha: float | None = None) -> AdvantageOutput:
    """GPG (arXiv 2504.02546): the group-centred score, scaled for the batch's zero scores.

    rewards ``[B, T]`` or ``[B]`` scores, mask ``[B, T]``, group_ids ``[B]``.

        A_i = α · (s_i − mean_g) / f_norm,    α = B / max(#{i : s_i ≠ 0}, 1)

    (verl's definition of α; pass ``alpha`` to fix it). A group of one row has mean 0. Not
    batch-invariant: α counts the whole batch.
    """
    check.tensor("rewards", rewards)
    _check_rewards(rewards, mask, scores_allowed=True)
    positive("f_norm", f_norm)
    if alpha is not None:
        positive("alpha", alpha)
    groups = _groups(group_ids, rewards.shape[0], rewards.device)
    s = _scores(rewards, mask)
    if alpha is None:
        alpha = s.shape[0] / torch.count_nonzero(s).clamp(min=1).to(s.dtype)
    baseline = torch.where(groups.sizes[groups.index] > 1, _group_mean(groups, s), 0.0)
    adv = _per_token(alpha * (s - baseline) / f_norm, mask, compute_dtype(rewards))
    return AdvantageOutput(adv, adv)


# --------------------------------------------------------------------------------------------
# Optimal token baseline
# --------------------------------------------------------------------------------------------


def _otb_check(rewards, mask, old_logp, sum_pi_squared, is_weights, eps, handle_zero_tail) -> None:
    _check_rewards(rewards, mask, scores_allowed=False)
    for name, t in (("old_logp", old_logp), ("sum_pi_squared", sum_pi_squared)):
        if t is None:
            raise ValueError(f"{name} is required ([B, T]): the optimal-token baselines weight each step by "
                             "1 − 2·π(token) + Σπ²; Σπ² comes from pf.token_logprobs(..., "
                             "return_sum_pi_squared=True)")
    _check_token_inputs(mask, old_logp=old_logp, sum_pi_squared=sum_pi_squared, is_weights=is_weights)
    positive("eps", eps)
    _flag("handle_zero_tail", handle_zero_tail)


def _otb_parts(rewards, mask, groups: _Groups, old_logp, sum_pi_squared, is_weights, *, eps: float,
               handle_zero_tail: bool, compact: bool):
    """``(baseline, returns)`` ``[B, T]`` of the optimal token baseline, both 0 at masked positions
    (see :func:`optimal_token_baseline`). ``compact``: time step k is each row's k-th masked token
    instead of position k."""
    dtype = compute_dtype(rewards, old_logp, sum_pi_squared, is_weights)
    m = mask.bool()
    returns = _reward_to_go(rewards.to(dtype), mask, 1.0)
    w = 1 - 2 * old_logp.to(dtype).exp() + sum_pi_squared.to(dtype)
    if is_weights is not None:
        w = w * is_weights.to(dtype).square()
    path = torch.where(m, w, 0.0).cumsum(-1)
    if compact:
        lengths = m.sum(-1)
        steps = int(lengths.max()) if lengths.numel() else 0
        valid = torch.arange(steps, device=m.device) < lengths.unsqueeze(-1)
        G, W = returns.new_zeros(valid.shape), returns.new_zeros(valid.shape)
        G[valid], W[valid] = returns[m], path[m]
    else:
        valid, G, W = m, returns, path
    n_groups = len(groups.labels)

    def group_sum(x):
        return x.new_zeros((n_groups, x.shape[-1])).index_add_(0, groups.index, x)[groups.index]

    num = group_sum(torch.where(valid, G * W, 0.0))
    den = group_sum(torch.where(valid, W, 0.0)) + eps
    baseline = num / den
    alone = (groups.sizes[groups.index] == 1).unsqueeze(-1)
    if handle_zero_tail:
        alone = alone | (group_sum(valid.to(dtype)) == 1)
    baseline = torch.where(valid & ~alone, baseline, 0.0)
    if compact:
        full = torch.zeros_like(returns)
        full[m] = baseline[valid]
        baseline = full
    return baseline, returns


def _otb(compact: bool, rewards, mask, group_ids, old_logp, sum_pi_squared, is_weights, handle_zero_tail,
         eps) -> AdvantageOutput:
    check.tensor("rewards", rewards)
    _otb_check(rewards, mask, old_logp, sum_pi_squared, is_weights, eps, handle_zero_tail)
    groups = _groups(group_ids, rewards.shape[0], rewards.device)
    baseline, returns = _otb_parts(rewards, mask, groups, old_logp, sum_pi_squared, is_weights, eps=eps,
                                   handle_zero_tail=bool(handle_zero_tail), compact=compact)
    return AdvantageOutput(torch.where(mask.bool(), returns - baseline, 0.0), returns)


@torch.no_grad()
def optimal_token_baseline(rewards, mask, group_ids, old_logp, sum_pi_squared, *, is_weights=None,
                           handle_zero_tail: bool = True, eps: float = 1e-8) -> AdvantageOutput:
    """Optimal token baseline (verl's OTB): a per-time-step baseline weighted by path variance.

    rewards, mask, old_logp (log π_old of the sampled token), sum_pi_squared (``Σ_v π(v)²`` at
    the position) and is_weights (optional rollout importance weights ρ) are ``[B, T]``;
    group_ids ``[B]``. Over the masked tokens:

        G_t = Σ_{t' ≥ t} r_t'                         (returns: the reward-to-go)
        w_t = (1 − 2·exp(old_logp_t) + sum_pi_squared_t) · ρ_t²     (ρ = 1 without is_weights)
        W_t = Σ_{t' ≤ t} w_t'                         (cumulative path variance)
        b_t = Σ_i G_it·W_it / (Σ_i W_it + eps)        (over the rows of the group valid at t)
        A_t = G_t − b_t

    Time step t is the position t. A group of one row has baseline 0 (its advantage is its
    return). ``handle_zero_tail``: where a row is the only row of its group with a token at time
    t, its baseline is 0 (otherwise it would be about its own return, advantage about 0); with
    right-padded masks that is the longest row's stretch past the second longest, as in verl.
    Depends on the other rows of the group.
    """
    return _otb(False, rewards, mask, group_ids, old_logp, sum_pi_squared, is_weights, handle_zero_tail,
                eps)


@torch.no_grad()
def tir_optimal_token_baseline(rewards, mask, group_ids, old_logp, sum_pi_squared, *, is_weights=None,
                               handle_zero_tail: bool = True, eps: float = 1e-8) -> AdvantageOutput:
    """:func:`optimal_token_baseline` for multi-turn, tool-integrated responses: time step k is
    each row's k-th masked token, so rows whose generated tokens are interleaved with observation
    spans at different positions line up by generated token. Equal to
    :func:`optimal_token_baseline` when every mask is a contiguous prefix. Depends on the other
    rows of the group."""
    return _otb(True, rewards, mask, group_ids, old_logp, sum_pi_squared, is_weights, handle_zero_tail,
                eps)


# --------------------------------------------------------------------------------------------
# By name
# --------------------------------------------------------------------------------------------


ESTIMATORS: Mapping[str, Callable[..., AdvantageOutput]] = MappingProxyType({
    "gae": gae,
    "grpo": grpo,
    "grpo_vectorized": grpo,
    "gdpo": gdpo,
    "grpo_passk": grpo_passk,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline,
    "rloo": rloo,
    "opo": opo,
    "reinforce_plus_plus": reinforce_plus_plus,
    "remax": remax,
    "gpg": gpg,
    "rloo_vectorized": rloo,
    "optimal_token_baseline": optimal_token_baseline,
    "tir_optimal_token_baseline": tir_optimal_token_baseline,
})
"""verl's estimator name → the function here (read-only). ``grpo_vectorized`` is :func:`grpo`
and ``rloo_vectorized`` is :func:`rloo`: one estimator each, computed one way."""


def advantages(name: str, *args, **kwargs) -> AdvantageOutput:
    """``pf.advantages``: the estimator registered under verl's ``name`` (see
    :data:`ESTIMATORS`), called with the rest of the arguments (that function's, e.g.
    ``rewards, mask, group_ids``)."""
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"name must be one of {', '.join(map(repr, ESTIMATORS))}; got {name!r}")
    return ESTIMATORS[name](*args, **kwargs)
