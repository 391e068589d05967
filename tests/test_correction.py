"""ppo_fast.correction (pf.rollout_correction): the core against a plain-loop float64 oracle written here from the
documented semantics (every option, every mask dtype, metric keys in order), masked-position
poisoning, errors, distributed batch normalisation over two gloo ranks; ``integrations.openrlhf.openrlhf_coefficients``
against OpenRLHF 0.11.2's real ``PolicyLoss``; the TRL 1.16.0 vLLM IS modes expressed with the
core's options."""

import itertools
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

from ppo_fast import dispatch  # noqa: E402
from ppo_fast import correction as rc  # noqa: E402
from ppo_fast.integrations import openrlhf  # noqa: E402

MASK_DTYPES = [torch.bool, torch.int64, torch.float32, torch.float64]
LENGTHS = [7, 1, 0, 4, 3, 6, 7, 5]
TOL = dict(rel_tol=1e-9, abs_tol=1e-9)


def batch(seed, mask_dtype=torch.bool, B=8, T=7, spread=0.5, lengths=LENGTHS):
    """Log-probs of sampled tokens (≤ 0) and a right-padded mask with one hole (multi-turn)."""
    g = torch.Generator().manual_seed(seed)
    old = -(torch.randn(B, T, generator=g, dtype=torch.float64) + 0.5).abs() - 0.01
    rollout = -(old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).abs() - 0.01
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths[:B]):
        mask[b, :n] = True
    mask[0, 2] = False
    return old, rollout, mask.to(mask_dtype)


# --------------------------------------------------------------------------------------------
# The oracle: plain Python loops over floats, from the module docstring
# --------------------------------------------------------------------------------------------

def _summary(xs):
    if not xs:
        return [0.0] * 4
    mean = math.fsum(xs) / len(xs)
    return [mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / len(xs)), min(xs), max(xs)]


def _frac(conditions):
    return sum(map(bool, conditions)) / len(conditions) if conditions else 0.0


def _band(x, lo, hi):
    return x == x and (lo is None or x >= lo) and (hi is None or x <= hi)


def _bounds(name, spec):
    if isinstance(spec, (int, float)):
        return (1 / spec, spec) if name.endswith("_k1") else (None, spec)
    return tuple(spec)


def oracle(old, rollout, mask, *, is_level="token", is_seq_stat="sum", is_mode="truncate", is_upper=2.0,
           is_lower=None, is_batch_normalize=False, rejection=None, log_ratio_bound=20.0):
    B, T = old.shape
    o, r, v = old.tolist(), rollout.tolist(), mask.bool().tolist()

    def clamp(x):
        return x if log_ratio_bound is None else min(max(x, -log_ratio_bound), log_ratio_bound)

    lr = [[o[b][t] - r[b][t] if v[b][t] else 0.0 for t in range(T)] for b in range(B)]
    toks = [[t for t in range(T) if v[b][t]] for b in range(B)]
    rows = [b for b in range(B) if toks[b]]
    valid = [(b, t) for b in range(B) for t in toks[b]]
    metrics = {}

    def bounded(x):
        if is_mode == "mask":
            return x if _band(x, is_lower, is_upper) else 0.0
        if is_lower is not None:
            x = max(x, is_lower)
        return x if is_upper is None else min(x, is_upper)

    if is_level is not None:
        if is_level == "token":
            raw = [[math.exp(clamp(lr[b][t])) for t in range(T)] for b in range(B)]
        else:
            logs = [math.fsum(lr[b][t] for t in toks[b]) for b in range(B)]
            if is_seq_stat == "mean":
                logs = [s / len(toks[b]) if toks[b] else 0.0 for b, s in enumerate(logs)]
            raw = [[math.exp(clamp(logs[b]))] * T for b in range(B)]
        w0 = [[bounded(raw[b][t]) if v[b][t] else 0.0 for t in range(T)] for b in range(B)]
        ws = [w0[b][t] for b, t in valid]
        metrics.update(zip(["is_mean", "is_std", "is_min", "is_max"], _summary(ws)))
        squares = math.fsum(w * w for w in ws)
        metrics["is_ess"] = math.fsum(ws) ** 2 / (len(ws) * squares) if squares > 0 else 0.0
        units = [raw[b][t] for b, t in valid] if is_level == "token" else [raw[b][0] for b in rows]
        metrics["is_fraction_high"] = 0.0 if is_upper is None else _frac([x > is_upper for x in units])
        metrics["is_fraction_low"] = 0.0 if is_lower is None else _frac([x < is_lower for x in units])
        metrics["is_oob_fraction"] = _frac([not _band(raw[b][t], is_lower, is_upper) for b, t in valid])
        if is_level == "token":
            row_w = [math.fsum(w0[b][t] for t in toks[b]) / len(toks[b]) for b in rows]
            row_raw = [math.fsum(raw[b][t] for t in toks[b]) / len(toks[b]) for b in rows]
        else:
            row_w = [bounded(raw[b][0]) for b in rows]
            row_raw = [raw[b][0] for b in rows]
        metrics.update(zip(["is_seq_mean", "is_seq_std", "is_seq_min", "is_seq_max"], _summary(row_w)))
        metrics["is_seq_max_deviation"] = max((abs(x - 1) for x in row_w), default=0.0)
        metrics["is_seq_fraction_high"] = 0.0 if is_upper is None else _frac([x > is_upper for x in row_raw])
        metrics["is_seq_fraction_low"] = 0.0 if is_lower is None else _frac([x < is_lower for x in row_raw])

    kept = [list(row) for row in v]
    rs_metrics = {}
    for name, spec in (rejection or {}).items():
        lo, hi = _bounds(name, spec)
        agg, stat = next((name[: -len(s) - 1], s) for s in rc.STATISTICS if name.endswith("_" + s))

        def token_stat(b, t):
            c = clamp(lr[b][t])
            if stat == "k1":
                return -c
            if stat == "k2":
                return 0.5 * c * c
            if stat == "k3":
                return math.exp(c) - 1 - c
            p = min(max(math.exp(r[b][t]), 1e-6), 1 - 1e-6)
            q = min(max(math.exp(o[b][t]), 1e-6), 1 - 1e-6)
            if stat == "tv":
                return abs(p - q)
            return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

        def passes(x):
            return _band(math.exp(-x) if stat == "k1" else x, lo, hi)

        stats = {(b, t): token_stat(b, t) for b, t in valid}
        if agg == "token":
            keep = {(b, t): passes(stats[b, t]) for b, t in valid}
            units = [stats[b, t] for b, t in valid]
        else:
            reduce = {"seq_sum": math.fsum, "seq_mean": lambda xs: math.fsum(xs) / len(xs), "seq_max": max}[agg]
            row_stat = {b: reduce([stats[b, t] for t in toks[b]]) for b in rows}
            keep = {(b, t): passes(row_stat[b]) for b, t in valid}
            units = [row_stat[b] for b in rows]
        p = f"rs_{name}"
        rs_metrics.update(zip([f"{p}_mean", f"{p}_std", f"{p}_min", f"{p}_max"], _summary(units)))
        compared = [math.exp(-x) if stat == "k1" else x for x in units]
        rs_metrics[f"{p}_fraction_high"] = 0.0 if hi is None else _frac([x > hi for x in compared])
        rs_metrics[f"{p}_fraction_low"] = 0.0 if lo is None else _frac([x < lo for x in compared])
        rs_metrics[f"{p}_masked_fraction"] = _frac([not keep[k] for k in valid])
        rs_metrics[f"{p}_seq_masked_fraction"] = _frac([any(not keep[b, t] for t in toks[b]) for b in rows])
        if agg == "token":
            row_means = [math.fsum(stats[b, t] for t in toks[b]) / len(toks[b]) for b in rows]
            rs_metrics.update(zip([f"{p}_seq_mean", f"{p}_seq_std", f"{p}_seq_min", f"{p}_seq_max"],
                                  _summary(row_means)))
        for b, t in valid:
            kept[b][t] = kept[b][t] and keep[b, t]
    if rejection:
        rs_metrics["rs_masked_fraction"] = _frac([not kept[b][t] for b, t in valid])
        rs_metrics["rs_seq_masked_fraction"] = _frac([any(not kept[b][t] for t in toks[b]) for b in rows])

    weights = None
    if is_level is not None:
        weights = [[w0[b][t] if kept[b][t] else 0.0 for t in range(T)] for b in range(B)]
        if is_batch_normalize:
            if is_level == "token":
                units = [w0[b][t] for b, t in valid if kept[b][t]]
            else:
                units = [w0[b][toks[b][0]] for b in rows if any(kept[b])]
            mean = math.fsum(units) / len(units) if units else 0.0
            factor = mean if mean > 0 else 1.0
            weights = [[x / factor for x in row] for row in weights]
            metrics["is_batch_norm_factor"] = factor
    metrics.update(rs_metrics)

    mo = {b: math.fsum(o[b][t] for t in toks[b]) / len(toks[b]) for b in rows}
    mr = {b: math.fsum(r[b][t] for t in toks[b]) / len(toks[b]) for b in rows}
    d = [mr[b] - mo[b] for b in rows]

    def mean(xs):
        xs = list(xs)
        return math.fsum(xs) / len(xs) if xs else 0.0

    cl = {k: clamp(lr[k[0]][k[1]]) for k in valid}
    metrics.update({
        "training_ppl": mean(math.exp(-mo[b]) for b in rows),
        "training_log_ppl": mean(-mo[b] for b in rows),
        "kl": mean(r[b][t] - o[b][t] for b, t in valid),
        "k3_kl": mean(math.exp(c) - 1 - c for c in cl.values()),
        "rollout_ppl": mean(math.exp(-mr[b]) for b in rows),
        "rollout_log_ppl": mean(-mr[b] for b in rows),
        "log_ppl_diff": mean(d),
        "log_ppl_abs_diff": mean(abs(x) for x in d),
        "log_ppl_diff_max": max(d, default=0.0),
        "log_ppl_diff_min": min(d, default=0.0),
        "ppl_ratio": mean(math.exp(x) for x in d),
        "chi2_token": mean(math.exp(c) ** 2 - 1 for c in cl.values()),
        "chi2_seq": mean(math.exp(2 * clamp(math.fsum(lr[b][t] for t in toks[b]))) - 1 for b in rows),
    })
    return weights, kept, metrics


def check_against_oracle(old, rollout, mask, **options):
    weights, new_mask, metrics = rc.rollout_correction(old, rollout, mask, **options)
    want_w, want_mask, want_metrics = oracle(old, rollout, mask, **options)
    assert new_mask.dtype == mask.dtype and torch.equal(new_mask.bool(), torch.tensor(want_mask))
    if want_w is None:
        assert weights is None
    else:
        assert weights.dtype == torch.float64 and not weights.requires_grad
        for got_row, want_row in zip(weights.tolist(), want_w):
            for got, want in zip(got_row, want_row):
                assert math.isclose(got, want, **TOL), (got, want)
    assert list(metrics) == list(want_metrics)
    for key, want in want_metrics.items():
        got = metrics[key]
        assert got.dim() == 0 and not got.requires_grad
        assert math.isclose(got.item(), want, **TOL), (key, got.item(), want)
    return weights, new_mask, metrics


K1 = (0.7, 1.6)
FILTER_BOUNDS = {
    "token_k1": K1, "seq_sum_k1": (0.4, 2.5), "seq_mean_k1": (0.85, 1.2),
    "token_k2": 0.08, "seq_sum_k2": 0.6, "seq_mean_k2": 0.17, "seq_max_k2": 0.4,
    "token_k3": 0.08, "seq_sum_k3": 0.6, "seq_mean_k3": 0.17, "seq_max_k3": 0.4,
    "token_binary_kl": (0.0, 0.02), "seq_sum_binary_kl": (0.0, 0.7), "seq_mean_binary_kl": (0.0, 0.15),
    "seq_max_binary_kl": (0.0, 0.45),
    "token_tv": (None, 0.15), "seq_sum_tv": (None, 0.8), "seq_mean_tv": (None, 0.18), "seq_max_tv": (None, 0.4),
}


def filter_bounds(name):
    return FILTER_BOUNDS[name]


IS_CONFIGS = [
    {},
    {"is_level": "sequence"},
    {"is_level": "sequence", "is_seq_stat": "mean", "is_upper": 1.2},
    {"is_mode": "mask", "is_lower": 0.5, "is_upper": 1.5},
    {"is_lower": 0.8, "is_upper": None},
    {"is_upper": None},
    {"is_level": "sequence", "is_mode": "mask", "is_lower": 0.3, "is_upper": None},
    {"is_level": "sequence", "is_mode": "mask", "is_upper": 3.0},
    {"is_lower": 0.7, "is_upper": 1.3, "is_batch_normalize": True},
    {"is_level": "sequence", "is_upper": 3.0, "is_batch_normalize": True},
    {"is_level": "sequence", "is_seq_stat": "mean", "is_mode": "mask", "is_lower": 0.6, "is_upper": 1.6,
     "is_batch_normalize": True},
    {"is_upper": None, "log_ratio_bound": 0.3},
    {"is_level": "sequence", "is_upper": None, "log_ratio_bound": 1.0},
    {"is_level": "sequence", "is_upper": None, "log_ratio_bound": None},
]
REJECTION_CONFIGS = (
    [{"is_level": None, "rejection": {name: filter_bounds(name)}} for name in rc.REJECTION_FILTERS]
    + [
        {"is_level": None, "rejection": {"token_k1": 1.5}},
        {"is_level": None, "rejection": {"seq_mean_k1": (0.9, None)}},
        {"is_level": None, "rejection": {"token_k1": (None, 1.2), "seq_max_k3": 0.2}},
        {"is_level": None, "rejection": {"token_k3": (0.01, 0.1)}, "log_ratio_bound": 0.2},
        {"rejection": {"token_k1": K1, "seq_mean_k3": 0.1}, "is_batch_normalize": True},
        {"is_level": "sequence", "is_mode": "mask", "is_lower": 0.2, "is_upper": 5.0, "is_batch_normalize": True,
         "rejection": {"seq_max_tv": 0.3, "token_binary_kl": (0.0, 0.05), "seq_sum_k2": 0.5}},
        {"is_upper": None, "log_ratio_bound": None, "rejection": {"seq_mean_k1": (0.8, 1.25)}},
    ]
)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_every_option_against_the_oracle(mask_dtype):
    old, rollout, mask = batch(1, mask_dtype)
    for options in IS_CONFIGS + REJECTION_CONFIGS:
        check_against_oracle(old, rollout, mask, **options)


def test_rejection_filters_reject_some_tokens_but_not_all():
    """The bounds of the grid above bite: every filter rejects something and keeps something."""
    old, rollout, mask = batch(1)
    for name in rc.REJECTION_FILTERS:
        _, new_mask, metrics = rc.rollout_correction(old, rollout, mask, is_level=None,
                                                     rejection={name: filter_bounds(name)})
        assert 0 < metrics["rs_masked_fraction"] < 1, name
        assert new_mask.sum() < mask.sum()


def test_each_option_changes_the_result():
    old, rollout, mask = batch(2, spread=1.5)
    base_w, base_mask, base_metrics = rc.rollout_correction(old, rollout, mask)
    changes = [
        {"is_level": "sequence"}, {"is_upper": 1.5}, {"is_upper": None}, {"is_lower": 0.9},
        {"is_mode": "mask"}, {"is_batch_normalize": True}, {"log_ratio_bound": 0.5},
    ]
    for options in changes:
        w, _, _ = rc.rollout_correction(old, rollout, mask, **options)
        assert not torch.equal(w, base_w), options
    seq = {"is_level": "sequence", "is_upper": None}
    assert not torch.equal(rc.rollout_correction(old, rollout, mask, **seq)[0],
                           rc.rollout_correction(old, rollout, mask, is_seq_stat="mean", **seq)[0])
    assert not torch.equal(rc.rollout_correction(old, rollout, mask, **seq)[0],
                           rc.rollout_correction(old, rollout, mask, log_ratio_bound=3.0, **seq)[0])
    far = rollout.clone()
    far[3, 0] -= 25.0
    assert not torch.equal(rc.rollout_correction(old, far, mask, **seq)[0],
                           rc.rollout_correction(old, far, mask, log_ratio_bound=None, **seq)[0])
    w, new_mask, _ = rc.rollout_correction(old, rollout, mask, rejection={"token_k1": K1})
    assert not torch.equal(new_mask, base_mask) and not torch.equal(w, base_w)
    assert bool((w[~new_mask] == 0).all())
    assert rc.rollout_correction(old, rollout, mask, compute_metrics=False)[2] == {}
    assert rc.rollout_correction(old, rollout, mask)[1] is not mask
    assert base_metrics


def test_k1_bounds_are_bounds_on_the_ratio():
    old, rollout, mask = batch(3, spread=1.0)
    ratio = (old - rollout).exp()
    _, new_mask, _ = rc.rollout_correction(old, rollout, mask, is_level=None, rejection={"token_k1": (0.5, 4.0)})
    assert torch.equal(new_mask, mask & (ratio >= 0.5) & (ratio <= 4.0))
    _, seq_mask, _ = rc.rollout_correction(old, rollout, mask, is_level=None,
                                           rejection={"seq_sum_k1": (0.5, 4.0)})
    product = torch.where(mask, old - rollout, 0.0).sum(-1).exp()
    assert torch.equal(seq_mask, mask & ((product >= 0.5) & (product <= 4.0)).unsqueeze(-1))


def test_bounds_are_inclusive():
    """Tokens exactly at a bound are kept: ratios 0.5 and 1.6 (exp(log x) == x here), a k2 of
    exactly the upper bound; one ulp past a bound is out."""
    log_ratio = torch.tensor([[math.log(0.5), math.log(1.6), math.log(0.5) - 1e-12, math.log(1.6) + 1e-12]],
                             dtype=torch.float64)
    assert torch.equal(log_ratio.exp()[0, :2], torch.tensor([0.5, 1.6], dtype=torch.float64))
    zeros, mask = torch.zeros_like(log_ratio), torch.ones_like(log_ratio, dtype=torch.bool)
    w, _, _ = rc.rollout_correction(log_ratio, zeros, mask, is_mode="mask", is_lower=0.5, is_upper=1.6)
    assert w[0].tolist() == [0.5, 1.6, 0.0, 0.0]
    w, _, _ = rc.rollout_correction(log_ratio, zeros, mask, is_lower=0.5, is_upper=1.6)
    assert w[0].tolist() == [0.5, 1.6, 0.5, 1.6]
    _, kept, _ = rc.rollout_correction(log_ratio, zeros, mask, is_level=None, rejection={"token_k1": (0.5, 1.6)})
    assert kept[0].tolist() == [True, True, False, False]
    k2 = (0.5 * log_ratio.square())[0, 1].item()
    _, kept, _ = rc.rollout_correction(log_ratio, zeros, mask, is_level=None, rejection={"token_k2": k2})
    assert kept[0].tolist() == [False, True, False, False]


def test_batch_normalised_weights_average_one_over_the_kept_tokens():
    old, rollout, mask = batch(4, spread=1.0)
    w, kept, metrics = rc.rollout_correction(old, rollout, mask, is_batch_normalize=True,
                                             rejection={"token_k2": 0.3})
    assert math.isclose(w[kept].mean().item(), 1.0, rel_tol=1e-12)
    w, kept, _ = rc.rollout_correction(old, rollout, mask, is_level="sequence", is_upper=None,
                                       is_batch_normalize=True)
    rows = kept.any(-1)
    assert math.isclose(w[rows].amax(-1).mean().item(), 1.0, rel_tol=1e-12)
    # Not batch-invariant: the same sequence's weight depends on the rest of the batch.
    alone, _, _ = rc.rollout_correction(old[:1], rollout[:1], mask[:1], is_batch_normalize=True)
    assert not torch.allclose(alone, w[:1])
    # All kept weights 0 (IcePop rejecting everything): left alone, factor 1.
    w, _, metrics = rc.rollout_correction(old, rollout, mask, is_mode="mask", is_lower=1e6, is_upper=2e6,
                                          is_batch_normalize=True)
    assert not w.any() and metrics["is_batch_norm_factor"] == 1.0


POISON_CONFIGS = [
    {},
    {"is_level": "sequence", "is_seq_stat": "mean", "is_batch_normalize": True},
    {"is_level": "sequence", "is_mode": "mask", "is_lower": 0.3, "is_upper": 3.0,
     "rejection": {f"seq_{agg}_{stat}": filter_bounds(f"seq_{agg}_{stat}") for agg in ("sum", "mean")
                   for stat in ("k1", "k2", "k3", "binary_kl", "tv")}},
    {"is_upper": None, "log_ratio_bound": None, "is_batch_normalize": True,
     "rejection": {name: filter_bounds(name) for name in rc.REJECTION_FILTERS
                   if name.startswith(("token", "seq_max"))}},
]


@pytest.mark.parametrize("options", POISON_CONFIGS)
def test_masked_positions_change_nothing(options):
    old, rollout, mask = batch(5)
    clean = rc.rollout_correction(old, rollout, mask, **options)
    for poison_old, poison_rollout in [(math.nan, math.inf), (-math.inf, math.nan), (1e30, -1e30)]:
        o, r = old.clone(), rollout.clone()
        o[~mask], r[~mask] = poison_old, poison_rollout
        weights, new_mask, metrics = rc.rollout_correction(o, r, mask, **options)
        assert torch.equal(weights, clean[0]) and torch.equal(new_mask, clean[1])
        assert list(metrics) == list(clean[2])
        assert all(torch.equal(metrics[k], clean[2][k]) for k in metrics)
        assert bool((weights[~mask] == 0).all())


def test_nan_at_a_valid_token():
    old, rollout, mask = batch(6)
    old[0, 0] = math.nan
    w, kept, _ = rc.rollout_correction(old, rollout, mask)
    assert math.isnan(w[0, 0]) and kept[0, 0]
    w, _, metrics = rc.rollout_correction(old, rollout, mask, is_mode="mask", is_lower=0.1)
    assert w[0, 0] == 0 and metrics["is_oob_fraction"] > 0
    _, kept, _ = rc.rollout_correction(old, rollout, mask, is_level=None, rejection={"token_k2": 100.0})
    assert not kept[0, 0] and kept[0, 1]


def test_empty_batches():
    old, rollout, mask = batch(7)
    none = torch.zeros_like(mask)
    options = {"is_level": "sequence", "is_batch_normalize": True, "rejection": {"token_k1": K1, "seq_max_k2": 1.0}}
    w, kept, metrics = rc.rollout_correction(old, rollout, none, **options)
    assert not w.any() and not kept.any()
    assert all(v == 0 for k, v in metrics.items() if k != "is_batch_norm_factor")
    for shape in [(0, 5), (3, 0)]:
        w, kept, metrics = rc.rollout_correction(torch.zeros(shape), torch.zeros(shape),
                                                 torch.zeros(shape, dtype=torch.bool), **options)
        assert w.shape == shape and kept.shape == shape
        assert all(v.item() == 0 for k, v in metrics.items() if k != "is_batch_norm_factor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    old, rollout, mask = batch(8)
    w, _, metrics = rc.rollout_correction(old.to(dtype).requires_grad_(), rollout.to(dtype), mask.int(),
                                          is_batch_normalize=True, rejection={"token_k3": 0.2})
    assert w.dtype == torch.float32 and not w.requires_grad
    assert all(v.dtype == torch.float32 for v in metrics.values())
    reference, _, _ = rc.rollout_correction(old.to(dtype).double(), rollout.to(dtype).double(), mask,
                                            is_batch_normalize=True, rejection={"token_k3": 0.2})
    assert torch.allclose(w.double(), reference, rtol=1e-5, atol=1e-6)


def test_traces_under_torch_compile():
    old, rollout, mask = batch(9)

    def fn(o, r, m):
        return rc.rollout_correction(o, r, m, is_level="sequence", is_batch_normalize=True,
                                     rejection={"token_k1": K1, "seq_max_tv": 0.3})

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    got, want = compiled(old, rollout, mask), fn(old, rollout, mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(got[2][k], want[2][k]) for k in want[2])


def test_rollout_correction_runs_its_spec_whatever_the_forced_backend(force_backend):
    """Outside the dispatch table (it has one implementation): a forced backend changes nothing
    and warns about nothing."""
    assert "rollout_correction" not in dispatch.TABLE
    old, rollout, mask = batch(10)
    want = rc.rollout_correction(old, rollout, mask)
    for backend in ("triton", "native"):
        with force_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("error")
            got = rc.rollout_correction(old, rollout, mask)
            openrlhf.openrlhf_coefficients(old, rollout, mask, "token", "clip", "ratio", (0.5, 2.0))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


ERRORS = [
    ({"is_level": "tokens"}, "is_level"),
    ({"is_seq_stat": "max", "is_level": "sequence"}, "is_seq_stat"),
    ({"is_seq_stat": "mean"}, "is_seq_stat='mean' applies to is_level='sequence'"),
    ({"is_mode": "clip"}, "is_mode"),
    ({"is_upper": 0.0}, "is_upper"),
    ({"is_upper": math.nan}, "is_upper"),
    ({"is_lower": -1.0}, "is_lower"),
    ({"is_lower": 3.0, "is_upper": 2.0}, "is_lower must be <= is_upper"),
    ({"is_mode": "mask", "is_upper": None}, "is_mode='mask'"),
    ({"is_batch_normalize": 1}, "is_batch_normalize"),
    ({"group": object(), "is_batch_normalize": True}, "group must be a torch.distributed ProcessGroup, got object"),
    ({"group": object()}, "group only serves"),
    ({"is_level": None, "is_upper": 3.0}, "is_upper only apply"),
    ({"is_level": None, "is_batch_normalize": True}, "is_batch_normalize only apply"),
    ({"rejection": {"seq_max_k1": 2.0}}, "rejection filter"),
    ({"rejection": {"token_k4": 2.0}}, "rejection filter"),
    ({"rejection": [("token_k1", 2.0)]}, "rejection must be a mapping"),
    ({"rejection": {"token_k1": 0.5}}, "u must be >= 1"),
    ({"rejection": {"token_k1": (0.0, 2.0)}}, "lower bound"),
    ({"rejection": {"token_k2": (None, None)}}, "at least one side"),
    ({"rejection": {"token_k2": (0.3, 0.1)}}, "lower bound 0.3 > upper bound 0.1"),
    ({"rejection": {"token_k2": "0.1"}}, "a number .* or a .lower, upper. pair"),
    ({"rejection": {"token_tv": (0.0, math.inf)}}, "upper bound"),
    ({"rejection": {"token_k2": -1.0}}, "k2 is never negative"),
    ({"rejection": {"seq_mean_binary_kl": (None, -0.5)}}, "binary_kl is never negative"),
    ({"log_ratio_bound": 0.0}, "log_ratio_bound"),
    ({"compute_metrics": "yes"}, "compute_metrics"),
]


@pytest.mark.parametrize("options,match", ERRORS)
def test_bad_options_are_named(options, match):
    old, rollout, mask = batch(11)
    with pytest.raises(ValueError, match=match):
        rc.rollout_correction(old, rollout, mask, **options)


def test_bad_tensors_are_named():
    old, rollout, mask = batch(12)
    with pytest.raises(TypeError, match="old_logp"):
        rc.rollout_correction(old.tolist(), rollout, mask)
    with pytest.raises(ValueError, match="old_logp must be a floating-point"):
        rc.rollout_correction(old.long(), rollout, mask)
    with pytest.raises(ValueError, match=r"old_logp must have shape \[B, T\]"):
        rc.rollout_correction(old[0], rollout[0], mask[0])
    with pytest.raises(ValueError, match="rollout_logp must have shape"):
        rc.rollout_correction(old, rollout[:, :3], mask)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        rc.rollout_correction(old, rollout, mask * 0.5)
    with pytest.raises(ValueError, match="mask must have shape"):
        rc.rollout_correction(old, rollout, mask[:2])


# --------------------------------------------------------------------------------------------
# Two ranks: the normalising mean is the whole world's
# --------------------------------------------------------------------------------------------

RANK_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[4])
    from test_correction import batch
    from ppo_fast import correction as rc
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    old, rollout, mask = batch(13)
    part = slice(0, 3) if rank == 0 else slice(3, None)
    for options in [{"is_upper": 1.5}, {"is_level": "sequence", "is_upper": None},
                    {"rejection": {"token_k1": (0.6, 1.8)}},
                    {"is_level": "sequence", "is_mode": "mask", "is_upper": 2.0, "rejection": {"seq_max_k2": 0.4}}]:
        whole, _, whole_metrics = rc.rollout_correction(old, rollout, mask, is_batch_normalize=True, **options)
        mine, _, metrics = rc.rollout_correction(old[part], rollout[part], mask[part], is_batch_normalize=True,
                                                 group=dist.group.WORLD, **options)
        assert torch.allclose(mine, whole[part], rtol=1e-13, atol=0), options
        assert abs(metrics["is_batch_norm_factor"] - whole_metrics["is_batch_norm_factor"]) < 1e-13
        alone, _, _ = rc.rollout_correction(old[part], rollout[part], mask[part], is_batch_normalize=True, **options)
        assert not torch.allclose(alone, mine), options
    dist.destroy_process_group()
    print("rank ok")
""")


def test_batch_normalisation_over_a_process_group(tmp_path):
    here = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(here).parent), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path / "store"), "2", here],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0 and "rank ok" in output, output


# --------------------------------------------------------------------------------------------
# TRL 1.16.0: vllm_importance_sampling_mode, clip_min, clip_max (grpo_trainer.py:2660-2708)
# --------------------------------------------------------------------------------------------

def trl_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL's formula, as in the trainer: NaN-free differences summed for sequence modes."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_trl_vllm_importance_sampling_modes(mode):
    old, rollout, mask = batch(14, spread=0.3)
    for clip_min, clip_max in [(None, 3.0), (0.5, 3.0), (0.8, None), (0.5, 1.5)]:
        want = trl_ratio(old, rollout, mask, mode, clip_min, clip_max).expand_as(old)
        got, _, _ = rc.rollout_correction(old, rollout, mask, is_level=mode.split("_")[0],
                                          is_mode=mode.split("_")[1], is_lower=clip_min, is_upper=clip_max,
                                          log_ratio_bound=None)
        assert torch.allclose(got[mask], want[mask], rtol=1e-12, atol=0)
        assert not got[~mask].any()


# --------------------------------------------------------------------------------------------
# OpenRLHF 0.11.2: PolicyLoss(is_correction_level, _mode, _gating, _threshold)
# --------------------------------------------------------------------------------------------

OPENRLHF_SETTINGS = [
    (level, mode, gating, threshold)
    for level, mode, gating in itertools.product(openrlhf.OPENRLHF_LEVELS, openrlhf.OPENRLHF_MODES, openrlhf.OPENRLHF_GATINGS)
    if mode == "mask" or (level == "token" and gating == "ratio")
    for threshold in ([(0.7, 1.4), (0.0, 1.3), (-1.0, 0.9)] if gating == "ratio"
                      else [(0.0, 0.18), (-0.5, 0.25)] if gating == "tv" else [(0.0, 0.1), (-1.0, 0.2)])
]


def openrlhf_reference(loss_module, old, rollout, mask, level, mode, gating, threshold):
    """coef from the gradient: log_probs = old gives ratio 1 (no clipping), so each token's loss
    is −A·coef and, summed with batch_num_tokens=1, ∂loss/∂A = −coef·mask exactly."""
    policy = loss_module.PolicyLoss(is_correction_level=level, is_correction_mode=mode,
                                    is_correction_gating=gating, is_correction_threshold=threshold)
    advantages = torch.randn(old.shape, dtype=torch.float64, requires_grad=True)
    loss, _, _, vllm_kl, filtered = policy(old.clone(), old, advantages, mask, rollout, batch_num_tokens=1.0)
    (grad,) = torch.autograd.grad(loss, advantages)
    return -grad, filtered, vllm_kl


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_openrlhf_coefficients_match_policy_loss(mask_dtype):
    loss_module = peers.openrlhf("loss")
    old, rollout, mask = batch(15, mask_dtype, spread=0.6)
    valid = mask.bool()
    for setting in OPENRLHF_SETTINGS:
        want_coef, want_filtered, want_kl = openrlhf_reference(loss_module, old, rollout, mask, *setting)
        coef, filtered, vllm_kl = openrlhf.openrlhf_coefficients(old, rollout, mask, *setting)
        assert coef.shape == old.shape and not coef[~valid].any()
        assert torch.allclose(coef, want_coef, rtol=1e-12, atol=0), setting
        assert filtered.dtype == want_filtered.dtype and filtered.item() == want_filtered.item(), setting
        assert vllm_kl.dtype == want_kl.dtype and math.isclose(vllm_kl.item(), want_kl.item(), **TOL)
        if setting[:3] != ("token", "clip", "ratio"):
            assert 0 < filtered.item() < 1, setting


def test_openrlhf_coefficients_poison_and_empty_rows():
    old, rollout, mask = batch(16, spread=0.6)
    for setting in OPENRLHF_SETTINGS:
        clean = openrlhf.openrlhf_coefficients(old, rollout, mask, *setting)
        o, r = old.clone(), rollout.clone()
        o[~mask], r[~mask] = math.nan, math.inf
        poisoned = openrlhf.openrlhf_coefficients(o, r, mask, *setting)
        assert all(torch.equal(a, b) for a, b in zip(clean, poisoned)), setting
    # Row 2 is empty: OpenRLHF's seq statistic is 0/0 = NaN there, so the row counts as filtered.
    _, filtered, _ = openrlhf.openrlhf_coefficients(old, rollout, mask, "seq", "mask", "ratio", (1e-9, 1e9))
    assert filtered.item() == pytest.approx(1 / 8)
    coef, filtered, vllm_kl = openrlhf.openrlhf_coefficients(old, rollout, torch.zeros_like(mask), "token", "mask",
                                                       "tv", (0.0, 0.1))
    assert not coef.any() and filtered.item() == 0 and vllm_kl.item() == 0


@pytest.mark.parametrize("args,match", [
    (("off", "mask", "ratio", (0.5, 2.0)), "level"),
    (("token", "drop", "ratio", (0.5, 2.0)), "mode"),
    (("token", "mask", "kl", (0.0, 2.0)), "gating"),
    (("seq", "clip", "ratio", (0.5, 2.0)), "mode='clip' needs"),
    (("token", "clip", "tv", (0.0, 2.0)), "mode='clip' needs"),
    (("token", "mask", "binary_kl", (0.5, 5.0)), "low must be <= 0"),
    (("token", "mask", "ratio", (2.0, 0.5)), "low <= high"),
    (("token", "mask", "ratio", (-1.0, 0.0)), "high > 0"),
    (("token", "mask", "ratio", (0.5,)), "threshold must be a .low, high. pair"),
    (("token", "mask", "ratio", (0.5, math.nan)), "threshold must be a .low, high. pair"),
])
def test_openrlhf_coefficients_errors(args, match):
    old, rollout, mask = batch(17)
    with pytest.raises(ValueError, match=match):
        openrlhf.openrlhf_coefficients(old, rollout, mask, *args)


def test_a_valid_token_neither_policy_can_sample_is_an_error_naming_it():
    old = torch.full((2, 4), -1.0)
    rollout = torch.full((2, 4), -1.2)
    old[1, 2] = rollout[1, 2] = float("-inf")
    mask = torch.ones(2, 4, dtype=torch.bool)
    for level in ("token", "sequence"):
        with pytest.raises(ValueError, match=r"old_logp and rollout_logp are both -inf at position \(1, 2\), a "
                                             r"token of the mask"):
            rc.rollout_correction(old, rollout, mask, is_level=level)
    mask[1, 2] = False
    weights, _, metrics = rc.rollout_correction(old, rollout, mask, is_level="sequence")
    assert torch.isfinite(weights).all() and torch.isfinite(metrics["is_mean"])
