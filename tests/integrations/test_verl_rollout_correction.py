"""ppo_fast.integrations.verl.rollout_correction against verl 0.9.1's rollout_corr_helper: the
weights, the rejection mask and every metric (keys in order, Python floats within 1e-9) for every
IS level and threshold form, every RS option alone and combined, every mask dtype verl meets;
errors of the same type; installing the adapters into verl's module; batch normalisation over
two gloo ranks."""

import inspect
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402

from ppo_fast import correction as core  # noqa: E402
from ppo_fast.integrations.verl import rollout_correction as ours  # noqa: E402

helper = peers.verl("trainer.ppo.rollout_corr_helper")

MASK_DTYPES = [torch.bool, torch.int64, torch.float32, torch.float64]


def batch(seed, mask_dtype=torch.int64, B=8, T=9, spread=0.4, extreme=False):
    """Log-probs and a right-padded mask with an empty row, a single-token row and a hole; with
    ``extreme``, one token's |log r| exceeds verl's safety bound of 20."""
    g = torch.Generator().manual_seed(seed)
    old = -(torch.randn(B, T, generator=g, dtype=torch.float64) + 0.5).abs() - 0.01
    rollout = -(old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).abs() - 0.01
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate([9, 1, 0, 4, 3, 6, 8, 5][:B]):
        mask[b, :n] = True
    mask[0, 2] = False
    if extreme:
        rollout[5, 3] = old[5, 3] - 25.0
        old[6, 1] = rollout[6, 1] - 21.0
    return old, rollout, mask.to(mask_dtype)


def same_metrics(got, want):
    assert list(got) == list(want)
    for key, value in want.items():
        assert type(got[key]) is float, key
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-9), (key, got[key], value)


def test_names_and_signatures_are_verls():
    assert set(ours.FUNCTIONS) <= set(vars(helper))
    for name, function in ours.FUNCTIONS.items():
        assert function.__name__ == name
        mine, theirs = inspect.signature(function).parameters, inspect.signature(getattr(helper, name)).parameters
        assert [(p.name, p.kind, p.default) for p in mine.values()] == \
            [(p.name, p.kind, p.default) for p in theirs.values()], name
    assert ours.SUPPORTED_ROLLOUT_RS_OPTIONS == helper.SUPPORTED_ROLLOUT_RS_OPTIONS
    assert ours.TOKEN_LEVEL_ROLLOUT_RS_OPTIONS == helper.TOKEN_LEVEL_ROLLOUT_RS_OPTIONS
    assert ours.SAFETY_BOUND == helper.SAFETY_BOUND


IS_THRESHOLDS = [2.0, 3, 1.2, "1.5", " 1.2 ", "0.5_2.0", "0.8_1.25", "0.3_5", 1e9]


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("extreme", [False, True])
def test_weights_match_verl(mask_dtype, extreme):
    old, rollout, mask = batch(1, mask_dtype, extreme=extreme)
    log_ratio = old - rollout
    for level in ("token", "sequence"):
        for threshold in IS_THRESHOLDS:
            for normalize in (False, True):
                want_w, want_metrics = helper.compute_rollout_correction_weights(log_ratio, mask, level, threshold,
                                                                                 normalize)
                got_w, got_metrics = ours.compute_rollout_correction_weights(log_ratio, mask, level, threshold,
                                                                             normalize)
                assert got_w.dtype == want_w.dtype and not got_w.requires_grad
                assert torch.allclose(got_w, want_w, rtol=1e-12, atol=0), (level, threshold, normalize)
                same_metrics(got_metrics, want_metrics)


RS_CASES = (
    [("token_k1", t) for t in ("0.5_2.0", 1.5, "0.3_1.2", 2)]
    + [("seq_sum_k1", t) for t in ("0.2_5.0", "0.5_1.5", 4.0)]
    + [("seq_mean_k1", t) for t in ("0.8_1.25", "0.9_1.5", 1.2)]
    + [(f"{agg}_{k}", t) for agg in ("token", "seq_sum", "seq_mean", "seq_max") for k in ("k2", "k3")
       for t in (0.05, "0.2")]
    + [
        ("token_k1,seq_mean_k3", "0.5_2.0,0.02"),
        (" token_k2 , seq_max_k3,token_k2 ", "0.1, 0.3"),
        ("seq_sum_k1,seq_mean_k1,token_k1", "0.5_2.0"),
        ("seq_max_k2,seq_sum_k3,seq_mean_k2,token_k3", 0.3),
        ("seq_mean_k1,token_k3", "0.7_1.1,0.05"),
        ("token_k1,token_k1", "0.9_1.1"),
    ]
)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("extreme", [False, True])
def test_rejection_matches_verl(mask_dtype, extreme):
    old, rollout, mask = batch(2, mask_dtype, extreme=extreme)
    log_ratio = old - rollout
    for options, threshold in RS_CASES:
        want_mask, want_metrics = helper.compute_rollout_rejection_mask(log_ratio, mask, options, threshold)
        got_mask, got_metrics = ours.compute_rollout_rejection_mask(log_ratio, mask, options, threshold)
        assert got_mask.dtype == want_mask.dtype and torch.equal(got_mask, want_mask), (options, threshold)
        same_metrics(got_metrics, want_metrics)
        assert 0 < got_metrics["rollout_rs_masked_fraction"] < 1 or extreme, (options, threshold)


COMBINED = [
    {},
    {"rollout_is": "token"},
    {"rollout_is": "sequence", "rollout_is_threshold": "0.2_5.0", "rollout_is_batch_normalize": True},
    {"rollout_is": "token", "rollout_is_threshold": None, "rollout_rs": "token_k1", "rollout_rs_threshold": 1.5},
    {"rollout_rs": "seq_mean_k3,token_k1", "rollout_rs_threshold": "0.05,0.6_1.8"},
    {"rollout_is": "token", "rollout_is_threshold": "0.7_1.4", "rollout_is_batch_normalize": True,
     "rollout_rs": "seq_sum_k1,seq_max_k2", "rollout_rs_threshold": "0.3_3.0,0.2"},
]


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_combined_entry_point_matches_verl(mask_dtype):
    from verl.protocol import DataProto

    old, rollout, mask = batch(3, mask_dtype)
    for options in COMBINED:
        want_proto, want_mask, want_metrics = helper.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, **options)
        got_proto, got_mask, got_metrics = ours.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, **options)
        assert got_mask.dtype == want_mask.dtype and torch.equal(got_mask, want_mask)
        assert got_mask is not mask
        same_metrics(got_metrics, want_metrics)
        assert all(key.startswith("rollout_corr/") for key in got_metrics)
        if want_proto is None:
            assert got_proto is None
        else:
            assert isinstance(got_proto, DataProto) and list(got_proto.batch.keys()) == ["rollout_is_weights"]
            assert torch.allclose(got_proto.batch["rollout_is_weights"], want_proto.batch["rollout_is_weights"],
                                  rtol=1e-12, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32], ids=str)
def test_float32_log_probs_match_verl(mask_dtype):
    """float32 in, float32 arithmetic on both sides (a float64 mask would widen verl's to float64)."""
    old, rollout, mask = batch(13, mask_dtype)
    old, rollout = old.float(), rollout.float()
    for options in COMBINED:
        want_proto, want_mask, want_metrics = helper.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, **options)
        got_proto, got_mask, got_metrics = ours.compute_rollout_correction_and_rejection_mask(
            old, rollout, mask, **options)
        assert torch.equal(got_mask, want_mask)
        assert list(got_metrics) == list(want_metrics)
        assert all(math.isclose(got_metrics[k], v, rel_tol=1e-6, abs_tol=1e-6) for k, v in want_metrics.items())
        if want_proto is not None:
            got_w, want_w = got_proto.batch["rollout_is_weights"], want_proto.batch["rollout_is_weights"]
            assert got_w.dtype == torch.float32 and torch.allclose(got_w, want_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_offpolicy_and_metric_functions_match_verl(mask_dtype):
    old, rollout, mask = batch(4, mask_dtype, spread=0.8, extreme=True)
    same_metrics(ours.compute_offpolicy_metrics(old, rollout, mask),
                 helper.compute_offpolicy_metrics(old, rollout, mask))
    same_metrics(ours.compute_offpolicy_metrics(old, None, mask), helper.compute_offpolicy_metrics(old, None, mask))
    # The metric functions on inputs they did not compute themselves.
    g = torch.Generator().manual_seed(5)
    weights = torch.rand(old.shape, generator=g, dtype=torch.float64) * 3 * mask
    raw = weights * (1 + torch.rand(old.shape, generator=g, dtype=torch.float64))
    row_log = torch.randn(old.shape[0], 1, generator=g, dtype=torch.float64)
    for level, log_ratio in (("token", old - rollout), ("sequence", row_log)):
        for threshold, lower in ((2.0, None), (1.5, 0.4)):
            same_metrics(ours.compute_is_metrics(weights, raw, log_ratio, mask, level, threshold, lower),
                         helper.compute_is_metrics(weights, raw, log_ratio, mask, level, threshold, lower))
    statistic = torch.randn(old.shape, generator=g, dtype=torch.float64)
    rows = mask.sum(-1) > 0
    per_row = torch.randn(old.shape[0], generator=g, dtype=torch.float64)
    for kwargs in ({"level": "token", "per_sequence_values": None, "rollout_rs_threshold": 0.5,
                    "rollout_rs_threshold_lower": -0.3, "apply_lower_threshold": True},
                   {"level": "sequence", "per_sequence_values": per_row, "rollout_rs_threshold": 0.2,
                    "rollout_rs_threshold_lower": 0.0, "apply_lower_threshold": False}):
        same_metrics(ours.compute_rs_metrics("opt", statistic, mask, rows, **kwargs),
                     helper.compute_rs_metrics("opt", statistic, mask, rows, **kwargs))


def test_k1_bounds_reproduce_verls_inversion():
    """verl keeps 1/upper ≤ r ≤ 1/lower for k1 (rollout_corr_helper.py:316); the core keeps
    lower ≤ r ≤ upper. With reciprocal bounds they agree."""
    old, rollout, mask = batch(6, spread=1.0)
    ratio = (old - rollout).exp()
    valid = mask.bool()
    got, _ = ours.compute_rollout_rejection_mask(old - rollout, mask, "token_k1", "0.5_4.0")
    assert torch.equal(got.bool(), valid & (ratio >= 0.25) & (ratio <= 2.0))
    _, core_mask, _ = core.rollout_correction(old, rollout, mask, is_level=None, rejection={"token_k1": (0.5, 4.0)})
    assert torch.equal(core_mask.bool(), valid & (ratio >= 0.5) & (ratio <= 4.0))
    symmetric, _ = ours.compute_rollout_rejection_mask(old - rollout, mask, "seq_mean_k1", "0.5_2.0")
    _, core_mask, _ = core.rollout_correction(old, rollout, mask, is_level=None, rejection={"seq_mean_k1": 2.0})
    assert torch.equal(symmetric, core_mask)


def test_boundaries_are_verls():
    """Inclusive bounds and verl's float32 log-thresholds for the sequence-level IS fractions
    (rollout_corr_helper.py:700): a sequence log-ratio between fl32(log 2) and log 2 is not 'high'."""
    between = (torch.log(torch.tensor(2.0)).item() + math.log(2.0)) / 2
    log_ratio = torch.tensor([[between, 0.0], [-math.log(0.5), math.log(0.5)], [math.log(2.0), 0.1]],
                             dtype=torch.float64)
    mask = torch.tensor([[1, 0], [1, 1], [1, 1]])
    for level in ("token", "sequence"):
        for threshold in (2.0, "0.5_2.0"):
            want = helper.compute_rollout_correction_weights(log_ratio, mask, level, threshold)
            got = ours.compute_rollout_correction_weights(log_ratio, mask, level, threshold)
            assert torch.equal(got[0], want[0])
            same_metrics(got[1], want[1])
    _, metrics = ours.compute_rollout_correction_weights(log_ratio[:1], mask[:1], "sequence", 2.0)
    assert metrics["rollout_is_ratio_fraction_high"] == 0.0 and metrics["rollout_is_seq_fraction_high"] == 1.0
    k2 = 0.5 * math.log(2.0) ** 2
    for options, threshold in (("token_k1", "0.5_2.0"), ("token_k1,seq_max_k2", f"0.5_2.0,{k2!r}"), ("token_k2", k2)):
        want = helper.compute_rollout_rejection_mask(log_ratio, mask, options, threshold)
        got = ours.compute_rollout_rejection_mask(log_ratio, mask, options, threshold)
        assert torch.equal(got[0], want[0])
        same_metrics(got[1], want[1])
    kept, _ = ours.compute_rollout_rejection_mask(log_ratio, mask, "token_k1", "0.5_2.0")
    assert kept[1].tolist() == [1, 1]
    kept, _ = ours.compute_rollout_rejection_mask(log_ratio, mask, "token_k2", k2)
    assert kept[2].tolist() == [1, 1]


def test_masked_positions_change_nothing():
    old, rollout, mask = batch(7)
    options = {"rollout_is": "sequence", "rollout_is_threshold": "0.2_5.0", "rollout_is_batch_normalize": True,
               "rollout_rs": "token_k1,seq_mean_k3,seq_max_k2", "rollout_rs_threshold": "0.5_2.0,0.05,0.3"}
    clean = ours.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
    o, r = old.clone(), rollout.clone()
    o[~mask.bool()], r[~mask.bool()] = math.nan, math.inf
    poisoned = ours.compute_rollout_correction_and_rejection_mask(o, r, mask, **options)
    assert torch.equal(clean[0].batch["rollout_is_weights"], poisoned[0].batch["rollout_is_weights"])
    assert torch.equal(clean[1], poisoned[1]) and clean[2] == poisoned[2]
    assert not poisoned[0].batch["rollout_is_weights"][~mask.bool()].any()


def test_empty_batch_returns_the_mask_itself():
    log_ratio, mask = torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, 5, dtype=torch.int64)
    for module in (ours, helper):
        out, metrics = module.compute_rollout_rejection_mask(log_ratio, mask, "token_k2", 0.1)
        assert out is mask and metrics == {}


def test_icepop_rejecting_everything_divides_by_zero_like_verl():
    old, rollout, mask = batch(8)
    for module in (ours, helper):
        with pytest.raises(ZeroDivisionError):
            module.compute_rollout_correction_weights(old - rollout, mask, "token", "1000_2000")


def _errors(old, rollout, mask):
    lr = old - rollout
    empty = torch.zeros_like(mask)
    return [
        ("compute_rollout_correction_weights", (lr, mask, "seq")),
        ("compute_rollout_correction_weights", (lr, mask, "token", True)),
        ("compute_rollout_correction_weights", (lr, mask, "token", "  ")),
        ("compute_rollout_correction_weights", (lr, mask, "token", "abc")),
        ("compute_rollout_correction_weights", (lr, mask, "token", "0.5_x")),
        ("compute_rollout_correction_weights", (lr, mask, "token", [2.0])),
        ("compute_rollout_correction_weights", (lr, mask, "token", 0)),
        ("compute_rollout_correction_weights", (lr, mask, "token", "2_1")),
        ("compute_rollout_correction_weights", (lr, mask, "token", "-1_2")),
        ("compute_rollout_correction_weights", (lr, empty, "token", 2.0)),
        ("compute_rollout_rejection_mask", (lr, mask, None, 0.1)),
        ("compute_rollout_rejection_mask", (lr, mask, 5, 0.1)),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k2", None)),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k4", 0.1)),
        ("compute_rollout_rejection_mask", (lr, mask, "seq_max_k1", 2.0)),
        ("compute_rollout_rejection_mask", (lr, mask, " , ", 0.1)),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k2,token_k3,seq_max_k2", "0.1,0.2")),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k2", "0.1_0.2")),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k2", [0.1])),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k2", True)),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k2", ",")),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k1", "0.5_0.2")),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k1", "0_2")),
        ("compute_rollout_rejection_mask", (lr, mask, "token_k3", "-1")),
        ("compute_rollout_rejection_mask", (lr, empty, "token_k3", 0.1)),
        ("compute_rollout_correction_and_rejection_mask", (old, rollout[:, :3], mask)),
        ("compute_rollout_correction_and_rejection_mask", (old, rollout, mask[:, :3])),
        ("compute_rollout_correction_and_rejection_mask", (old, rollout, empty)),
        ("compute_rollout_correction_and_rejection_mask", (old, rollout, mask, None, 2.0, False, "token_k1", None)),
        ("compute_offpolicy_metrics", (old, rollout, empty)),
    ]


def test_errors_are_verls():
    old, rollout, mask = batch(9)
    for name, args in _errors(old, rollout, mask):
        with pytest.raises(Exception) as theirs:
            getattr(helper, name)(*args)
        with pytest.raises(theirs.type):
            getattr(ours, name)(*args)


def test_stricter_than_verl():
    """Bad input verl lets through: NaN thresholds, non-0/1 masks, non-[B, T] log-probs."""
    old, rollout, mask = batch(10)
    lr = old - rollout
    with pytest.raises(ValueError, match="NaN"):
        ours.compute_rollout_correction_weights(lr, mask, "token", "nan")
    with pytest.raises(ValueError, match="NaN"):
        ours.compute_rollout_rejection_mask(lr, mask, "token_k2", float("nan"))
    with pytest.raises(ValueError, match="bounds must be > 0"):
        ours.compute_rollout_rejection_mask(lr, mask, "token_k1", 0)
    with pytest.raises(ValueError, match="response_mask must hold only 0 and 1"):
        ours.compute_rollout_correction_weights(lr, mask * 2, "token", 2.0)
    with pytest.raises(ValueError, match=r"log_ratio must have shape \[B, T\]"):
        ours.compute_rollout_rejection_mask(lr[0], mask[0], "token_k2", 0.1)


def test_installed_into_verls_module(monkeypatch):
    """verl's own batch-level entry point runs on the adapters once they replace its module's
    functions (as ``install()`` does) and gives the same batch and metrics."""
    from verl.protocol import DataProto
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    old, rollout, mask = batch(11)
    config = RolloutCorrectionConfig(rollout_is="sequence", rollout_is_threshold="0.3_4.0",
                                     rollout_is_batch_normalize=True, rollout_rs="token_k1,seq_mean_k3",
                                     rollout_rs_threshold="0.5_2.0,0.05")

    def run():
        data = DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout,
                                            "response_mask": mask})
        return helper.compute_rollout_correction_and_add_to_batch(data, config)

    want_batch, want_metrics = run()
    for name, function in ours.FUNCTIONS.items():
        monkeypatch.setattr(helper, name, function)
    got_batch, got_metrics = run()
    same_metrics(got_metrics, want_metrics)
    assert torch.equal(got_batch.batch["response_mask"], want_batch.batch["response_mask"])
    assert torch.allclose(got_batch.batch["rollout_is_weights"], want_batch.batch["rollout_is_weights"],
                          rtol=1e-12, atol=0)


RANK_SCRIPT = textwrap.dedent("""
    import math, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from test_verl_rollout_correction import batch, helper, ours, same_metrics
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=rank, world_size=2)
    old, rollout, mask = batch(12, torch.int64)
    part = slice(0, 3) if rank == 0 else slice(3, None)
    lr = (old - rollout)[part]
    for level, threshold in (("token", 1.5), ("sequence", "0.2_5.0"), ("sequence", 3.0)):
        want_w, want_metrics = helper.compute_rollout_correction_weights(lr, mask[part], level, threshold, True)
        got_w, got_metrics = ours.compute_rollout_correction_weights(lr, mask[part], level, threshold, True)
        assert torch.allclose(got_w, want_w, rtol=1e-12, atol=0), level
        same_metrics(got_metrics, want_metrics)
        whole, _ = helper.compute_rollout_correction_weights(old - rollout, mask, level, threshold, True)
        assert torch.allclose(got_w, whole[part], rtol=1e-12, atol=0), level
    dist.destroy_process_group()
    print("rank ok")
""")


def test_batch_normalisation_is_all_reduced_like_verl(tmp_path):
    here = str(Path(__file__).resolve().parent)
    root = str(Path(here).parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(Path(here).parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path / "store"), here],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0 and "rank ok" in output, output
