"""The policy objectives: the per-token policy-gradient term of every loss variant that verl,
OpenRLHF and TRL ship, selected by ``loss_type``. Part of the spec (:mod:`ppo_fast.spec`).

Each objective maps per-token log-probs to a per-token loss ``pg``; the caller adds the KL and
entropy terms and aggregates with ``agg`` (:func:`ppo_fast.spec.reduce`). An objective needs
only the sampled tokens' log-probs, so from logits every variant runs on the fused log-prob kernel
and nothing of size ``[tokens, vocab]`` is made beyond what that kernel makes.

Notation (per token, ``[B, T]``): ``ℓ`` = logp, ``ℓ_old`` = old_logp, ``A`` = advantages,
``r = exp(clamp(ℓ − ℓ_old, ±20))``, ``w`` = importance weights (``rollout_is_weights`` times the
truncated weight from ``rollout_logp``; 1 without them), ``sg`` = stop-gradient,
``ε_lo, ε_hi`` = ``clip_low, clip_high``.

=============  ===============================================================================
loss_type      per-token loss (before ``w`` unless said)
=============  ===============================================================================
vanilla        ``max(−A·r, −A·clip(r, 1−ε_lo, 1+ε_hi))``; dual clip ``c``: ``min(·, −A·c)`` where A<0
dppo_tv        ``−A·sg(min(r, ratio_cap))·ℓ·keep``: keep a token unless its probability moved
               more than ε_hi up (A>0) or ε_lo down (A≤0) in total variation, ``|π − π_old|``
dppo_kl        as dppo_tv, the trust region in binary KL of the sampled token's probability
gspo           vanilla on the sequence ratio ``exp(mean_t(ℓ − ℓ_old))`` (GSPO-token gradient)
sapo           ``−A·(4/τ)·σ(τ·(r − 1))``, τ = tau_pos where A>0 else tau_neg
gpg            ``−A·ℓ`` (plain policy gradient; also ``reinforce``)
clip_cov       vanilla without dual clip; loss and gradient 0 for a random ``clip_cov_ratio`` share
               of the unclipped tokens whose centred ``A·ℓ`` covariance lies in
               (clip_cov_lb, clip_cov_ub)
kl_cov         ``−A·r``, plus ``kl_cov_coef·|ℓ − ℓ_old|`` on the ``kl_cov_ratio`` share of tokens
               with the largest centred ``A·ℓ`` covariance
geo_mean       ``−Ā·exp(mean_t clip_A(ℓ − ℓ_old))`` per sequence (GMPO): log-ratios clipped to
               [−ε_lo, ε_hi] on the side that lowers the loss; ``w`` enters as its geometric mean
dro            ``−(A·ℓ − β/2·(ℓ − ℓ_old)²)``
cispo          ``−sg(clip(r, ratio_min, ratio_max))·A·ℓ`` (defaults 1−ε_lo, 1+ε_hi)
vespo          ``−φ·A·ℓ`` with ``φ = e^λ·W^k·e^(−λW)`` (no gradient), ``W`` the sequence's
               product of ratios and of ``w`` (k, λ by the sign of A); a φ that is not finite
               (overflow, or NaN in the sequence's inputs) is 0, as TRL
=============  ===============================================================================

Ratio-based objectives (vanilla, sapo, cispo) take ``importance_level="sequence"`` to use the
sequence ratio as gspo does. Aliases: ``ppo`` → vanilla; TRL's ``grpo``, ``dapo``, ``bnpo`` and
``dr_grpo`` → vanilla with their aggregation as default ``agg`` (the sequence means count the
sequences that have a token; TRL's count every row, which ``num_seqs=B`` gives); ``luspo`` → gspo
summed over tokens; ``reinforce`` → gpg. :mod:`ppo_fast.integrations.trl` reproduces TRL exactly.

Batch invariance: every objective gives a token the same loss whatever else is in the batch,
except ``clip_cov`` (random selection over the batch) and ``kl_cov`` (top share over the batch);
``gspo``, ``geo_mean``, ``vespo`` and the sequence level depend on the token's own sequence only.

``torch.compile(fullgraph=True)`` traces every objective but ``clip_cov``, whose random draw
(verl's: ``randperm`` over the candidates, so a seeded run cuts the same tokens) has a size that
depends on the data.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

import torch


LOG_RATIO_CLAMP = 20.0
"""|log-ratio| clamp before ``exp``: no ratio overflows (also for the sequence ratio)."""

BINARY_KL_EPS = 1e-8
"""Added to ``1 − π`` inside dppo_kl's binary KL, as verl, so a probability of 1 gives no 0/0."""

VESPO_MIN_LOG_WEIGHT = math.log(1e-8)
"""Lower clamp of vespo's sequence log-weight (and of each log IS weight in it), as TRL."""

VESPO_MIN_LAMBDA = 1e-4


class ObjectiveTerms(NamedTuple):
    """The policy term per token (``[B, T]``, 0 at masked positions) and what it did there."""

    pg: torch.Tensor
    """The loss per token, weights applied; differentiable in ``logp``."""
    log_ratio: torch.Tensor
    """``ℓ − ℓ_old`` clamped to ±20 (detached), for the KL and ratio metrics."""
    clipped: torch.Tensor
    """bool: the token's term was clipped, truncated or cut (see ``FLAGS``)."""
    clipped_lower: torch.Tensor
    """bool: the objective's second flag (see ``FLAGS``)."""


class Objective(NamedTuple):
    fn: Callable
    params: Mapping[str, object]
    """``loss_params`` keys and their defaults (``REQUIRED`` where there is none)."""
    agg: str
    """Default aggregation."""
    uses_clip: bool
    """Whether ``clip_low`` / ``clip_high`` mean something to it."""


REQUIRED = object()

_RATIO_PARAMS = {"importance_level": "token", "token_gradient": True, "max_log_ratio": None}

FLAGS = {
    "vanilla": ("the clipped surrogate was the larger loss", "the dual-clip cap applied"),
    "dppo_tv": ("the token left the trust region (no gradient)", "kept, and r > ratio_cap"),
    "dppo_kl": ("the token left the trust region (no gradient)", "kept, and r > ratio_cap"),
    "gspo": ("the clipped surrogate was the larger loss", "never"),
    "sapo": ("never", "never"),
    "gpg": ("never", "never"),
    "clip_cov": ("the clipped surrogate was the larger loss", "chosen by covariance (no gradient)"),
    "kl_cov": ("chosen by covariance (KL term added)", "never"),
    "geo_mean": ("A > 0 and the log-ratio lies outside [−ε_lo, ε_hi]", "the same with A < 0"),
    "dro": ("never", "never"),
    "cispo": ("r was truncated", "never"),
    "vespo": ("never", "never"),
}
"""What ``clipped`` / ``clipped_lower`` mean for each objective (the clip-fraction metrics)."""


def _false(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, dtype=torch.bool)


def _token_counts(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.sum(-1, keepdim=True).clamp(min=1).to(dtype)


def _ratio(logp, old_logp, mask, params) -> torch.Tensor:
    """The importance ratio per token: the token's own, or its sequence's geometric mean.

    Sequence level: ``s = mean over the valid tokens of (ℓ − ℓ_old)`` (no clamp inside the mean),
    clamped to ``[−20, min(20, max_log_ratio)]``. ``token_gradient=True`` (GSPO-token, verl) gives
    token t the gradient of ``exp(s)·ℓ_t / sg(ℓ_t)``; False (TRL, OpenRLHF) that of ``exp(s)``.
    """
    if params["importance_level"] == "token":
        return (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    seq = ((logp - old_logp).sum(-1, keepdim=True) / _token_counts(mask, logp.dtype))
    if params["token_gradient"]:
        log_ratio = logp - logp.detach() + seq.detach()
    else:
        log_ratio = seq.expand_as(logp)
    high = LOG_RATIO_CLAMP
    if params["max_log_ratio"] is not None:
        high = min(high, params["max_log_ratio"])
    return log_ratio.clamp(-LOG_RATIO_CLAMP, high).exp()


def _clipped_surrogate(ratio, adv, clip_low, clip_high):
    unclipped = -adv * ratio
    clipped_loss = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped_loss), clipped_loss > unclipped


def _vanilla(logp, old_logp, adv, mask, opts, params):
    ratio = _ratio(logp, old_logp, mask, params)
    pg, clipped = _clipped_surrogate(ratio, adv, opts.clip_low, opts.clip_high)
    clipped_lower = _false(clipped)
    if opts.dual_clip is not None:
        cap = -adv * opts.dual_clip
        clipped_lower = (adv < 0) & (pg > cap)
        pg = torch.where(adv < 0, torch.minimum(pg, cap), pg)
    return pg, clipped, clipped_lower


def _gspo(logp, old_logp, adv, mask, opts, params):
    ratio = _ratio(logp, old_logp, mask, params)
    pg, clipped = _clipped_surrogate(ratio, adv, opts.clip_low, opts.clip_high)
    return pg, clipped, _false(clipped)


def _dppo(trust_region):
    def objective(logp, old_logp, adv, mask, opts, params):
        ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        truncated = ratio.clamp(max=params["ratio_cap"]).detach()
        prob, old_prob = logp.detach().exp(), old_logp.exp()
        keep = trust_region(prob, old_prob, logp.detach(), old_logp, adv, opts)
        # A product, not a select: a NaN at a valid token must show in the loss as it does in
        # the gradient (a select would hide it from the value and not from the gradient).
        pg = -adv * truncated * logp * keep.to(logp.dtype)
        return pg, ~keep, keep & (ratio.detach() > params["ratio_cap"])

    return objective


def _total_variation_region(prob, old_prob, logp, old_logp, adv, opts):
    moved = prob - old_prob
    return torch.where(adv > 0, moved <= opts.clip_high, moved >= -opts.clip_low)


def _binary_kl_region(prob, old_prob, logp, old_logp, adv, opts):
    # KL(Bernoulli(π_old) ‖ Bernoulli(π)) of "the sampled token or not".
    binary_kl = old_prob * (old_logp - logp) + (1 - old_prob) * torch.log(
        (1.0 - old_prob + BINARY_KL_EPS) / (1.0 - prob + BINARY_KL_EPS))
    up = (binary_kl <= opts.clip_high) | (prob <= old_prob)
    down = (binary_kl <= opts.clip_low) | (prob >= old_prob)
    return torch.where(adv > 0, up, down)


def _by_sign(condition, if_true: float, if_false: float, like: torch.Tensor) -> torch.Tensor:
    """Per-token choice between two coefficients, in ``like``'s dtype (a float64 run must not see
    them rounded to float32)."""
    return torch.where(condition, like.new_tensor(if_true), like.new_tensor(if_false))


def _sapo(logp, old_logp, adv, mask, opts, params):
    ratio = _ratio(logp, old_logp, mask, params)
    tau = _by_sign(adv > 0, params["tau_pos"], params["tau_neg"], ratio)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    pg = -gate * adv
    return pg, _false(pg), _false(pg)


def _gpg(logp, old_logp, adv, mask, opts, params):
    pg = -adv * logp
    return pg, _false(pg), _false(pg)


def _centred_covariance(adv, logp, mask):
    """``(A − mean A)·(ℓ − mean ℓ)`` per token, means over the valid tokens (no gradient)."""
    count = mask.sum().clamp(min=1)
    adv_mean = torch.where(mask, adv, 0.0).sum() / count
    logp_mean = torch.where(mask, logp, 0.0).sum() / count
    return (adv - adv_mean) * (logp.detach() - logp_mean.detach())


def _clip_cov(logp, old_logp, adv, mask, opts, params):
    ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    pg, clipped = _clipped_surrogate(ratio, adv, opts.clip_low, opts.clip_high)
    clipped = clipped & mask
    cov = _centred_covariance(adv, logp, mask)
    candidates = mask & ~clipped & (cov > params["clip_cov_lb"]) & (cov < params["clip_cov_ub"])
    positions = candidates.nonzero()
    budget = max(int(params["clip_cov_ratio"] * int(mask.sum())), 1)
    if positions.shape[0]:
        # Uniformly random among the candidates, from the global CPU generator and drawn whenever
        # there is a candidate, as verl draws: a run seeded alike cuts the same tokens.
        positions = positions[torch.randperm(positions.shape[0])[:budget].to(positions.device)]
    cut = _false(pg)
    cut[tuple(positions.unbind(-1))] = True
    return torch.where(cut, 0.0, pg), clipped, cut


def _kl_cov(logp, old_logp, adv, mask, opts, params):
    log_ratio = logp - old_logp
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    pg = -adv * ratio
    # The top share by rank, with shapes that do not depend on the data (torch.compile traces
    # it): the valid tokens sorted by covariance, the first max(⌊n·ratio⌋, 1) chosen.
    cov = torch.where(mask, _centred_covariance(adv, logp, mask), -torch.inf).reshape(-1)
    order = torch.argsort(cov, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    count = (mask.sum().to(torch.float64) * params["kl_cov_ratio"]).floor().clamp(min=1)
    chosen = (rank.view_as(mask) < count) & mask
    pg = torch.where(chosen, pg + params["kl_cov_coef"] * log_ratio.abs(), pg)
    return pg, chosen, _false(pg)


def _geo_mean(logp, old_logp, adv, mask, opts, params, weights):
    log_ratio = logp - old_logp
    bounded = log_ratio.clamp(-opts.clip_low, opts.clip_high)
    # The bound applies on the side that lowers the loss: min for A > 0, max for A < 0; a token
    # with A = 0 adds 0 (selected, so an infinite log-ratio there cannot make 0·inf).
    chosen = torch.where(adv > 0, torch.minimum(log_ratio, bounded),
                         torch.where(adv < 0, torch.maximum(log_ratio, bounded), 0.0))
    counts = _token_counts(mask, logp.dtype)
    seq_log_ratio = (chosen.sum(-1, keepdim=True) / counts).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    seq_adv = adv.sum(-1, keepdim=True) / counts
    seq_loss = -seq_adv * seq_log_ratio.exp()
    if weights is not None:
        seq_loss = seq_loss * (torch.where(mask, weights.log(), 0.0).sum(-1, keepdim=True) / counts).exp()
    outside = log_ratio.detach() != bounded.detach()
    pg = torch.where(mask, seq_loss.expand_as(logp), 0.0)
    return pg, outside & (adv > 0), outside & (adv < 0)


def _dro(logp, old_logp, adv, mask, opts, params):
    pg = -(logp * adv - 0.5 * params["beta"] * (logp - old_logp).square())
    return pg, _false(pg), _false(pg)


def _cispo(logp, old_logp, adv, mask, opts, params):
    ratio = _ratio(logp, old_logp, mask, params)
    low = 1 - opts.clip_low if params["ratio_min"] is None else params["ratio_min"]
    high = 1 + opts.clip_high if params["ratio_max"] is None else params["ratio_max"]
    truncated = ratio.clamp(low, high).detach()
    pg = -truncated * adv * logp
    return pg, ratio.detach() != truncated, _false(pg)


def _vespo(logp, old_logp, adv, mask, opts, params, weights):
    with torch.no_grad():
        log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        seq_log_weight = torch.where(mask, log_ratio, 0.0).sum(-1, keepdim=True)
        if weights is not None:
            log_w = weights.log().clamp(VESPO_MIN_LOG_WEIGHT, LOG_RATIO_CLAMP)
            seq_log_weight = seq_log_weight + torch.where(mask, log_w, 0.0).sum(-1, keepdim=True)
        seq_log_weight = seq_log_weight.clamp(VESPO_MIN_LOG_WEIGHT, LOG_RATIO_CLAMP)
        positive = adv >= 0
        k = _by_sign(positive, params["k_pos"], params["k_neg"], logp)
        lam = _by_sign(positive, params["lambda_pos"], params["lambda_neg"], logp).clamp(min=VESPO_MIN_LAMBDA)
        phi = torch.exp(lam + k * seq_log_weight - lam * seq_log_weight.exp())
        phi = torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)
    pg = -phi * adv * logp
    return pg, _false(pg), _false(pg)


OBJECTIVES: dict[str, Objective] = {
    "vanilla": Objective(_vanilla, _RATIO_PARAMS, "token-mean", True),
    "dppo_tv": Objective(_dppo(_total_variation_region), {"ratio_cap": 3.0}, "token-mean", True),
    "dppo_kl": Objective(_dppo(_binary_kl_region), {"ratio_cap": 3.0}, "token-mean", True),
    "gspo": Objective(_gspo, {"importance_level": "sequence", "token_gradient": True,
                              "max_log_ratio": 10.0}, "seq-mean-token-mean", True),
    "sapo": Objective(_sapo, {**_RATIO_PARAMS, "tau_pos": 1.0, "tau_neg": 1.05},
                      "seq-mean-token-mean", False),
    "gpg": Objective(_gpg, {}, "token-mean", False),
    "clip_cov": Objective(_clip_cov, {"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0},
                          "token-mean", True),
    "kl_cov": Objective(_kl_cov, {"kl_cov_ratio": 2e-4, "kl_cov_coef": 0.1}, "token-mean", False),
    "geo_mean": Objective(_geo_mean, {}, "seq-mean-token-mean", True),
    "dro": Objective(_dro, {"beta": REQUIRED}, "token-mean", False),
    "cispo": Objective(_cispo, {**_RATIO_PARAMS, "ratio_min": None, "ratio_max": None},
                       "token-mean", True),
    "vespo": Objective(_vespo, {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0},
                       "token-mean", False),
}
"""loss_type → objective (canonical names, verl's)."""

ALIASES: dict[str, tuple[str, str | None]] = {
    "ppo": ("vanilla", None),
    "grpo": ("vanilla", "seq-mean-token-mean"),
    "dapo": ("vanilla", "token-mean"),
    "bnpo": ("vanilla", "token-mean"),
    "dr_grpo": ("vanilla", "seq-mean-token-sum-norm"),
    "luspo": ("gspo", "seq-mean-token-sum"),
    "reinforce": ("gpg", None),
}
"""Other projects' names → (objective, default aggregation; None: the objective's)."""

LOSS_TYPES = tuple(OBJECTIVES) + tuple(ALIASES)

NOT_TOKEN_LOCAL = ("gspo", "geo_mean", "vespo", "clip_cov", "kl_cov")
"""Objectives whose term for a token reads other tokens' log-probs: its sequence's (gspo, geo_mean,
vespo) or the whole batch's (clip_cov, kl_cov); so does any objective at
``importance_level="sequence"``."""


def token_local(loss_type: str, params: Mapping[str, object]) -> bool:
    """Whether each token's term depends on that token's log-prob alone (the data fixed), so the
    loss is a sum of per-token functions (what lets the fused head compute its gradient chunk by
    chunk in the forward). ``loss_type`` canonical, ``params`` resolved (:class:`LossOptions`)."""
    return loss_type not in NOT_TOKEN_LOCAL and params.get("importance_level", "token") == "token"


WEIGHTS_INSIDE = ("geo_mean", "vespo")
"""Objectives that fold the importance weights into a sequence quantity instead of multiplying
each token's term (geo_mean: their geometric mean over the sequence; vespo: into ``W``)."""


def policy_terms(logp, old_logp, advantages, mask, opts, *, weights=None) -> ObjectiveTerms:
    """The objective of ``opts.loss_type`` per token, in the dtype of ``logp``.

    Every input is first set to 0 where ``mask`` is false (what masked positions hold reaches no
    term and no gradient); ``pg`` is 0 there. ``weights`` (``[B, T]``, no gradient) multiply each
    token's term, or enter as :data:`WEIGHTS_INSIDE` says.
    """
    dtype = logp.dtype
    mask = mask.bool()
    logp, old_logp, advantages, weights = (
        None if t is None else torch.where(mask, t.to(dtype), 0.0)
        for t in (logp, old_logp, advantages, weights))
    objective = OBJECTIVES[opts.loss_type]
    params = opts.loss_params
    if opts.loss_type in WEIGHTS_INSIDE:
        if weights is not None:
            # Masked positions hold weight 1, so a log or product over the sequence ignores them.
            weights = torch.where(mask, weights, 1.0)
        pg, clipped, clipped_lower = objective.fn(logp, old_logp, advantages, mask, opts, params, weights)
    else:
        pg, clipped, clipped_lower = objective.fn(logp, old_logp, advantages, mask, opts, params)
        if weights is not None:
            pg = pg * weights
    log_ratio = (logp - old_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return ObjectiveTerms(torch.where(mask, pg, 0.0), log_ratio, clipped & mask, clipped_lower & mask)
