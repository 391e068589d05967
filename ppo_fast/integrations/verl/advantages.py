"""verl 0.9.1's 14 registered advantage estimators, with verl's own signatures, on ppo_fast's core.

Each function has the name, parameters, defaults and return value of the function verl registers
(:data:`ESTIMATORS` maps verl's registry name to it) and gives verl's numbers, to 1e-9 in float64,
including the quirks that change them. The clean definitions are in :mod:`ppo_fast.estimators`;
what this module adds on top, all of it verl's (``verl/trainer/ppo/core_algos.py`` and
``verl/utils/torch_functional.py`` lines of the 0.9.1 wheel):

* Outcome scores sum the rewards over all T positions, masked or not (core_algos.py:304 and
  every outcome estimator): masked positions of ``token_level_rewards`` count.
* verl's ``masked_whiten`` (torch_functional.py:273-346) depends on the mask's dtype: for a
  float64 mask the mean and variance divide by ``n + 1e-8``; for every other mask dtype ``n +
  1e-8`` is float32 (the epsilon vanishes) and the Bessel factor ``n/(n − 1)`` is rounded to
  float32. The variance is the masked mean of squares times that factor.
* GAE (core_algos.py:249-262) carries the next valid token's value and advantage through masked
  positions, adds the values everywhere for the returns, and whitens without masking the result
  afterwards: masked positions hold whitened carried values. REMAX (:764) and both optimal
  token baselines (:924, :1040) also return the carried reward-to-go at masked positions.
* GRPO's group of one row divides by ``float32(1) + epsilon`` in float32 = 1.0000009536743164
  (:317, :326); with ``norm_adv_by_std_in_grpo=False`` it keeps the raw score.
* ``grpo_vectorized`` computes the group mean and std in float32 (utils/groupwise.py:164-222),
  with labels read by ``as_torch_index`` (:91-161), which turns all-numeric labels into integers
  ("01" and "1" are one group), rounds near-integral floats and truncates the others. It is emulated here: same
  float32 steps, same sequential order (CPU ``index_add_``), same torch float32 ``sqrt``, so it
  agrees to 1e-9 on the CPU; on CUDA verl's own ``index_add_`` adds atomically in no fixed order,
  so there both agree to float32 rounding only. Why emulate rather than compute it exactly: the
  promise of this module is verl's numbers, and an installed adapter must not move a run that
  used ``grpo_vectorized``; :func:`ppo_fast.estimators.grpo` is the exact float64 estimator.
* ``gdpo`` with ``config``, ``non_tensor_batch`` and ``batch`` reads one float32 score per key
  (``config.gdpo_reward_keys``) and float32 weights; verl then computes in float32 throughout.
  Here the same float32 inputs are computed in float64 and returned as float32: agreement to
  float32 rounding (about 1e-6), not 1e-9. Without them it uses ``token_level_rewards`` (exact).
* ``grpo_passk`` reads ``norm_adv_by_std_in_grpo`` from ``config`` and ignores its argument
  (:500); ``reinforce_plus_plus`` reads ``config.gamma``.
* ``gpg`` ignores ``alpha`` and ``epsilon``; its scale is ``B / max(#nonzero scores, 1)``
  evaluated by torch in float32 as ``float32(1/M)·B`` (:810-811).
* ``rloo`` keeps a group of one row's raw score (:628-633); ``rloo_vectorized`` gives it 0 (:864).
* ``optimal_token_baseline``'s ``handle_zero_tail`` uses each row's masked-token count as a
  column index (:975-982), which is the longest row's tail only for right-padded masks;
  ``tir_optimal_token_baseline`` leaves rows without masked tokens out of their groups (:1073-1076).

Where verl fails or gives NaN, these functions do better (and differ):

* Bool masks: verl's ``gae`` and ``reinforce_plus_plus`` raise (``1 − bool``); here they work
  and give what an int64 mask gives.
* Masks must hold only 0 and 1 (or be bool); verl would use other values as weights.
* Integer-tensor ``index``: verl's dict-based estimators raise ``KeyError`` (0-d tensors hash by
  identity) and its optimal token baselines make every row a group of one; here rows group by
  value.
* ``opo``: a group of several rows none of which has a masked token gets NaN in verl (0/0);
  here baseline 0.
* Options verl would turn into inf or NaN raise ``ValueError``: ``epsilon <= 0`` in GRPO,
  ``f_norm <= 0``, ``gamma`` or ``lam`` outside [0, 1]. ``gdpo``'s weights must match its keys
  in number (verl ignores extra weights and fails on missing ones).
* ``grpo_passk`` without ``config`` and ``reinforce_plus_plus`` without ``config`` raise
  ``ValueError`` (verl: ``AssertionError``); ``gdpo`` without reward keys, or with a key missing
  from ``non_tensor_batch``, likewise. ``gdpo`` does not read ``batch``: the position verl writes
  each score to does not change the result.

Outputs have verl's dtypes (the rewards' dtype promoted with a floating mask's). All run without
autograd, as verl's. verl itself is never imported.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ... import arguments as check
from ... import estimators as core

__all__ = [
    "ESTIMATORS",
    "compute_gae_advantage_return",
    "compute_gdpo_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_opo_outcome_advantage",
    "compute_optimal_token_baseline_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
]


# --------------------------------------------------------------------------------------------
# verl's arithmetic that the core does not share
# --------------------------------------------------------------------------------------------


def _check(token_level_rewards, response_mask) -> None:
    check.floating("token_level_rewards", check.tensor("token_level_rewards", token_level_rewards))
    if token_level_rewards.dim() != 2:
        raise ValueError("token_level_rewards must be [B, T], got shape "
                         f"{tuple(token_level_rewards.shape)}")
    check.mask_like("response_mask", response_mask, token_level_rewards.shape, "token_level_rewards.shape")
    check.same_device("token_level_rewards", token_level_rewards, response_mask=response_mask)


def _out_dtype(dtype: torch.dtype, mask: torch.Tensor) -> torch.dtype:
    """verl's outputs are ``x * response_mask``: a floating mask promotes them."""
    return torch.promote_types(dtype, mask.dtype) if mask.is_floating_point() else dtype


def _carried(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, T]`` with each masked position holding ``x`` at the row's next unmasked
    position (0 past the last): what verl's backward loops and flipped cumsums leave there."""
    T = x.shape[-1]
    position = torch.arange(T, device=x.device).expand(x.shape)
    nxt = torch.where(mask.bool(), position, T).flip(-1).cummin(-1).values.flip(-1)
    return torch.cat([x, x.new_zeros(x.shape[:-1] + (1,))], -1).gather(-1, nxt)


def _whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_whiten(values, mask)``, at every position (not re-masked).

    The mask's own dtype sets the arithmetic of the count: ``n + 1e-8`` and ``n/(n − 1)`` are
    float64 for a float64 mask and float32 otherwise (torch promotes an integer or bool sum with
    a Python float to float32); a floating mask also promotes the masked sums.
    """
    m = mask.bool()
    n = mask.sum()
    count = int(n)
    if count < 2:
        raise ValueError(f"response_mask must select at least 2 tokens to whiten (verl's masked_var), "
                         f"selects {count}")
    sum_dtype = _out_dtype(values.dtype, mask)
    denom = n + 1e-8
    mean = torch.where(m, values, 0.0).to(sum_dtype).sum() / denom
    centered = values - mean
    var = torch.where(m, centered.square(), 0.0).to(sum_dtype).sum() / denom * (n / (n - 1))
    return centered * torch.rsqrt(var + 1e-8)


def _take(index, rows: torch.Tensor):
    """``index`` (tensor, numpy array or sequence) at ``rows``."""
    if isinstance(index, torch.Tensor):
        return index[rows.to(index.device)]
    picked = rows.tolist()
    if isinstance(index, np.ndarray):
        return index[picked]
    return [index[i] for i in picked]


def _setting(config, key: str, default):
    """``config.get(key, default)`` for verl's AlgoConfig, an OmegaConf DictConfig or a dict."""
    if isinstance(config, Mapping) or hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _need_config(config, function: str, what: str) -> None:
    if config is None:
        raise ValueError(f"{function} reads {what} from config (verl's algorithm config); config must not "
                         "be None")


def _grpo(scores: torch.Tensor, response_mask, index, epsilon, norm: bool) -> torch.Tensor:
    """verl's GRPO advantages ``[B, T]`` from ``[B]`` scores: the core's, except that a group of
    one row divides by verl's float32 ``1 + epsilon``."""
    adv = core.grpo(scores, response_mask, index, eps=epsilon, normalize_std=norm).advantages
    if norm:
        groups = core._groups(index, scores.shape[0], scores.device)
        alone = (groups.sizes[groups.index] == 1).unsqueeze(-1) & response_mask.bool()
        # verl: torch.tensor(1.0) + epsilon, a float32 sum.
        one_plus_eps = float(torch.tensor(1.0, dtype=torch.float32) + epsilon)
        adv = torch.where(alone, scores.to(adv.dtype).unsqueeze(-1) / one_plus_eps, adv)
    return adv


def _vectorized_labels(index):
    """The labels ``grpo_vectorized`` groups by: verl's ``as_torch_index`` reads integers and
    near-integral floats as integers, then tries ``astype(int64)`` on anything else (numeric
    strings parse, other floats truncate), then sorts (``np.unique``), by ``str`` if it must."""
    if isinstance(index, torch.Tensor):
        if not index.is_floating_point():
            return index.reshape(-1).long()
        as_double = index.reshape(-1).double()
        rounded = torch.round(as_double)
        if torch.allclose(as_double, rounded, rtol=0.0, atol=1e-6):
            return rounded.long()
        return [str(x.item()) for x in index.reshape(-1)]
    arr = np.asarray(index).reshape(-1)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        rounded = np.rint(arr.astype(np.float64))
        if np.allclose(arr, rounded, rtol=0.0, atol=1e-6):
            return rounded.astype(np.int64)
    try:
        return arr.astype(np.int64)
    except (TypeError, ValueError, OverflowError):
        pass
    try:
        return np.unique(arr.astype(object), return_inverse=True)[1].reshape(-1)
    except TypeError:
        return np.unique(np.array([str(x) for x in arr], dtype=object), return_inverse=True)[1].reshape(-1)


# --------------------------------------------------------------------------------------------
# The estimators (verl's names, parameters and defaults)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's ``gae``: ``(advantages, returns)`` ``[B, T]``; :func:`ppo_fast.estimators.gae`
    without whitening, the carried values at masked positions, ``returns = A + values``
    everywhere, and verl's whitening (not re-masked)."""
    _check(token_level_rewards, response_mask)
    check.floating("values", check.tensor("values", values))
    out = _out_dtype(torch.promote_types(token_level_rewards.dtype, values.dtype), response_mask)
    adv, _ = core.gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam),
                      whiten=False)
    raw = _carried(adv, response_mask).to(out)
    return _whiten(raw, response_mask), raw + values


@torch.no_grad()
def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None):
    """verl's ``grpo``: :func:`ppo_fast.estimators.grpo` on the unmasked score sums, with verl's
    float32 ``1 + epsilon`` for groups of one. ``config`` is unused (as in verl)."""
    _check(token_level_rewards, response_mask)
    scores = token_level_rewards.sum(-1)
    adv = _grpo(scores, response_mask, index, epsilon, bool(norm_adv_by_std_in_grpo))
    adv = adv.to(_out_dtype(scores.dtype, response_mask))
    return adv, adv


@torch.no_grad()
def compute_grpo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                              norm_adv_by_std_in_grpo=True, config=None):
    """verl's ``grpo_vectorized``: GRPO with float32 group statistics, emulated (see the module
    docstring). ``config`` is unused (as in verl)."""
    _check(token_level_rewards, response_mask)
    scores = token_level_rewards.sum(-1)
    groups = core._groups(_vectorized_labels(index), scores.shape[0], scores.device)
    g, n_groups = groups.index, len(groups.labels)
    s32 = scores.to(torch.float32)

    def group_sum(x):
        return torch.zeros(n_groups, dtype=torch.float32, device=x.device).index_add_(0, g, x)

    count = group_sum(torch.ones_like(s32))
    mean = group_sum(s32) / count.clamp(min=1.0)
    centered = s32 - mean[g]
    std = (group_sum(centered * centered) / (count - 1.0).clamp(min=1.0)).clamp(min=0.0).sqrt()
    alone = count <= 1.0
    mean = mean.masked_fill(alone, 0.0)
    std = std.masked_fill(alone, 1.0)
    a = scores - mean[g]
    if norm_adv_by_std_in_grpo:
        a = a / (std[g] + epsilon)
    adv = torch.where(response_mask.bool(), a.unsqueeze(-1), 0.0).to(_out_dtype(scores.dtype, response_mask))
    return adv, adv


@torch.no_grad()
def compute_gdpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None, non_tensor_batch=None,
                                   batch=None, **kwargs):
    """verl's ``gdpo``: verl's GRPO per reward dimension, weighted sum, verl's whitening, masked.

    With ``config``, ``non_tensor_batch`` and ``batch`` all given, the dimensions are the float32
    scores ``non_tensor_batch[key]`` for ``key in config.gdpo_reward_keys``, weighted by float32
    ``config.gdpo_reward_weights`` (default 1), and the result is float32 (see the module
    docstring); otherwise one dimension, ``token_level_rewards``, weight 1.
    """
    _check(token_level_rewards, response_mask)
    B, device = token_level_rewards.shape[0], token_level_rewards.device
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = _setting(config, "gdpo_reward_keys", None)
        if not keys:
            raise ValueError("gdpo needs config.gdpo_reward_keys: the keys of non_tensor_batch that hold the "
                             "reward dimensions, e.g. ['format_reward', 'accuracy_reward']")
        keys = list(keys)
        missing = [key for key in keys if key not in non_tensor_batch]
        if missing:
            raise ValueError(f"gdpo reward keys {missing} are not in non_tensor_batch (keys: "
                             f"{list(non_tensor_batch.keys())})")
        dims = [torch.as_tensor(np.asarray(non_tensor_batch[key], dtype=np.float32), device=device)
                for key in keys]
        for key, d in zip(keys, dims):
            if tuple(d.shape) != (B,):
                raise ValueError(f"non_tensor_batch[{key!r}] must hold one score per row ({B}), got shape "
                                 f"{tuple(d.shape)}")
        weights = _setting(config, "gdpo_reward_weights", None)
        weights = [1.0] * len(keys) if weights is None else list(weights)
        if len(weights) != len(keys):
            raise ValueError(f"config.gdpo_reward_weights must hold one weight per reward key ({len(keys)}), "
                             f"got {len(weights)}")
        weights = [float(np.float32(w)) for w in weights]
        score_dtype = torch.float32
    else:
        dims, weights = [token_level_rewards.sum(-1)], [1.0]
        score_dtype = token_level_rewards.dtype
    norm = bool(norm_adv_by_std_in_grpo)
    total = sum(w * _grpo(d.to(torch.float64), response_mask, index, epsilon, norm)
                for w, d in zip(weights, dims))
    adv = torch.where(response_mask.bool(), _whiten(total, response_mask), 0.0)
    adv = adv.to(_out_dtype(score_dtype, response_mask))
    return adv, adv


@torch.no_grad()
def compute_grpo_passk_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                         norm_adv_by_std_in_grpo=True, config=None, **kwargs):
    """verl's ``grpo_passk``: :func:`ppo_fast.estimators.grpo_passk` on the unmasked score sums;
    ``norm_adv_by_std_in_grpo`` is read from ``config`` (default True), the argument is ignored,
    as in verl."""
    _need_config(config, "compute_grpo_passk_outcome_advantage", "norm_adv_by_std_in_grpo")
    _check(token_level_rewards, response_mask)
    norm = bool(_setting(config, "norm_adv_by_std_in_grpo", True))
    scores = token_level_rewards.sum(-1)
    adv = core.grpo_passk(scores, response_mask, index, eps=epsilon, normalize_std=norm).advantages
    adv = adv.to(_out_dtype(scores.dtype, response_mask))
    return adv, adv


@torch.no_grad()
def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask, index,
                                                           epsilon=1e-6, config=None, **kwargs):
    """verl's ``reinforce_plus_plus_baseline``: :func:`ppo_fast.estimators.
    reinforce_plus_plus_baseline` on the unmasked score sums, verl's whitening, masked.
    ``epsilon`` and ``config`` are unused (as in verl)."""
    _check(token_level_rewards, response_mask)
    scores = token_level_rewards.sum(-1)
    centred = core.reinforce_plus_plus_baseline(scores, response_mask, index, whiten=False).advantages
    centred = centred.to(_out_dtype(scores.dtype, response_mask))
    adv = torch.where(response_mask.bool(), _whiten(centred, response_mask), 0.0)
    return adv, adv


@torch.no_grad()
def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None,
                                   **kwargs):
    """verl's ``rloo``: :func:`ppo_fast.estimators.rloo` on the unmasked score sums (a group of
    one keeps its score). ``epsilon`` and ``config`` are unused (as in verl)."""
    _check(token_level_rewards, response_mask)
    scores = token_level_rewards.sum(-1)
    adv = core.rloo(scores, response_mask, index).advantages.to(_out_dtype(scores.dtype, response_mask))
    return adv, adv


@torch.no_grad()
def compute_rloo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                              config=None, **kwargs):
    """verl's ``rloo_vectorized``: as :func:`compute_rloo_outcome_advantage`, except that a group
    of one row gets 0. ``epsilon`` and ``config`` are unused (as in verl)."""
    _check(token_level_rewards, response_mask)
    scores = token_level_rewards.sum(-1)
    adv = core.rloo(scores, response_mask, index).advantages
    groups = core._groups(index, scores.shape[0], scores.device)
    adv = torch.where((groups.sizes[groups.index] > 1).unsqueeze(-1), adv, 0.0)
    adv = adv.to(_out_dtype(scores.dtype, response_mask))
    return adv, adv


@torch.no_grad()
def compute_opo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None,
                                  **kwargs):
    """verl's ``opo``: :func:`ppo_fast.estimators.opo` on the unmasked score sums. ``epsilon`` and
    ``config`` are unused (as in verl)."""
    _check(token_level_rewards, response_mask)
    scores = token_level_rewards.sum(-1)
    adv = core.opo(scores, response_mask, index).advantages.to(_out_dtype(scores.dtype, response_mask))
    return adv, adv


@torch.no_grad()
def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    """verl's ``reinforce_plus_plus``: :func:`ppo_fast.estimators.reinforce_plus_plus` with
    ``gamma = config.gamma``, verl's whitening, masked. Returns ``(advantages, returns)``; the
    returns are in the rewards' dtype, as verl's."""
    _need_config(config, "compute_reinforce_plus_plus_outcome_advantage", "gamma")
    _check(token_level_rewards, response_mask)
    gamma = _setting(config, "gamma", None)
    if gamma is None:
        raise ValueError("compute_reinforce_plus_plus_outcome_advantage needs config.gamma")
    returns = core.reinforce_plus_plus(token_level_rewards, response_mask, gamma=float(gamma),
                                       whiten=False).returns
    returns = returns.to(token_level_rewards.dtype)
    adv = torch.where(response_mask.bool(), _whiten(returns, response_mask), 0.0)
    return adv.to(_out_dtype(returns.dtype, response_mask)), returns


@torch.no_grad()
def compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask, config=None,
                                    **kwargs):
    """verl's ``remax``: :func:`ppo_fast.estimators.remax`, with the carried reward-to-go at
    masked positions of both outputs (``returns``, and ``advantages = returns − 0`` there).
    ``config`` is unused (as in verl)."""
    _check(token_level_rewards, response_mask)
    adv, returns = core.remax(token_level_rewards, response_mask, reward_baselines)
    returns = _carried(returns, response_mask)
    adv = torch.where(response_mask.bool(), adv, returns)
    rewards_dtype = _out_dtype(token_level_rewards.dtype, response_mask)
    return (adv.to(torch.promote_types(rewards_dtype, reward_baselines.dtype)), returns.to(rewards_dtype))


@torch.no_grad()
def compute_gpg_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0,
                                  alpha=1.0, config=None, **kwargs):
    """verl's ``gpg``: :func:`ppo_fast.estimators.gpg` on the unmasked score sums, with verl's
    float32 scale. ``alpha``, ``epsilon`` and ``config`` are unused (as in verl)."""
    _check(token_level_rewards, response_mask)
    scores = token_level_rewards.sum(-1)
    # torch evaluates int / int-tensor as reciprocal() * int, in float32: verl's alpha.
    verl_alpha = float(scores.shape[0] / torch.count_nonzero(scores).clamp(min=1))
    adv = core.gpg(scores, response_mask, index, f_norm=f_norm, alpha=verl_alpha).advantages
    adv = adv.to(_out_dtype(scores.dtype, response_mask))
    return adv, adv


def _otb_check(token_level_rewards, response_mask, old_log_probs, sum_pi_squared, rollout_is_weights):
    _check(token_level_rewards, response_mask)
    core._check_token_inputs(response_mask, old_log_probs=old_log_probs, sum_pi_squared=sum_pi_squared,
                             rollout_is_weights=rollout_is_weights)


def _otb_dtype(token_level_rewards, response_mask) -> torch.dtype:
    return _out_dtype(token_level_rewards.dtype, response_mask)


@torch.no_grad()
def compute_optimal_token_baseline_advantage(token_level_rewards, response_mask, index, old_log_probs,
                                             sum_pi_squared, rollout_is_weights=None, handle_zero_tail=True,
                                             epsilon=1e-8, **kwargs):
    """verl's ``optimal_token_baseline``: :func:`ppo_fast.estimators.optimal_token_baseline`
    with verl's ``handle_zero_tail`` (by mask count, see the module docstring) and the carried
    reward-to-go at masked positions of the returns."""
    _otb_check(token_level_rewards, response_mask, old_log_probs, sum_pi_squared, rollout_is_weights)
    adv, returns = core.optimal_token_baseline(token_level_rewards, response_mask, index, old_log_probs,
                                               sum_pi_squared, is_weights=rollout_is_weights,
                                               handle_zero_tail=False, eps=epsilon)
    if handle_zero_tail:
        # The unique longest row of a group of ≥ 2 gets baseline 0 (advantage = return) from
        # column L2 on, L2 the group's second-longest count.
        m = response_mask.bool()
        groups = core._groups(index, m.shape[0], m.device)
        g, n_groups = groups.index, len(groups.labels)
        length = m.sum(-1)
        longest = length.new_zeros(n_groups).scatter_reduce_(0, g, length, "amax")
        at_longest = length == longest[g]
        n_longest = length.new_zeros(n_groups).index_add_(0, g, at_longest.long())
        runner_up = length.new_full((n_groups,), -1).scatter_reduce_(
            0, g, torch.where(at_longest, -1, length), "amax")
        cut_row = at_longest & (n_longest[g] == 1) & (groups.sizes[g] > 1)
        past = torch.arange(m.shape[-1], device=m.device) >= runner_up[g].unsqueeze(-1)
        adv = torch.where(cut_row.unsqueeze(-1) & past & m, returns, adv)
    out = _otb_dtype(token_level_rewards, response_mask)
    return adv.to(out), _carried(returns, response_mask).to(out)


@torch.no_grad()
def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards, response_mask, index,
                                                        old_log_probs, sum_pi_squared, rollout_is_weights=None,
                                                        handle_zero_tail=True, epsilon=1e-8, **kwargs):
    """verl's ``tir_optimal_token_baseline``: :func:`ppo_fast.estimators.tir_optimal_token_baseline`
    over the rows that have masked tokens (verl leaves the others out of their groups; they get
    0), and the carried reward-to-go at masked positions of the returns."""
    _otb_check(token_level_rewards, response_mask, old_log_probs, sum_pi_squared, rollout_is_weights)
    m = response_mask.bool()
    rows = m.any(-1).nonzero().flatten()
    adv = torch.zeros_like(token_level_rewards, dtype=_otb_dtype(token_level_rewards, response_mask))
    returns = torch.zeros_like(adv)
    if rows.numel():
        kept = core.tir_optimal_token_baseline(
            token_level_rewards[rows], response_mask[rows], _take(index, rows), old_log_probs[rows],
            sum_pi_squared[rows], is_weights=None if rollout_is_weights is None else rollout_is_weights[rows],
            handle_zero_tail=bool(handle_zero_tail), eps=epsilon)
        adv[rows], returns[rows] = kept.advantages.to(adv.dtype), kept.returns.to(adv.dtype)
    return adv, _carried(returns, response_mask)


ESTIMATORS = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "optimal_token_baseline": compute_optimal_token_baseline_advantage,
    "tir_optimal_token_baseline": compute_multi_turn_optimal_token_baseline_advantage,
}
"""verl's registry name → the function here with verl's signature."""
