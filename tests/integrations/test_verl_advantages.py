"""ppo_fast.integrations.verl.advantages against verl 0.9.1's own estimators: same signatures,
same output structure and dtypes, values to 1e-9 in float64 on random inputs (holey masks, empty
rows, singleton and uneven groups of str uuids in shuffled rows) for every mask dtype verl
accepts, plus the quirks one at a time and the places where we deliberately differ."""

import inspect
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402

from ppo_fast import estimators as core  # noqa: E402
from ppo_fast.integrations.verl import advantages as ours  # noqa: E402

core_algos = peers.verl("trainer.ppo.core_algos")
AlgoConfig = peers.verl("trainer.config").AlgoConfig
VERL = core_algos.ADV_ESTIMATOR_REGISTRY

MASK_DTYPES = [torch.int64, torch.float32, torch.float64, torch.bool]
# verl's gae and reinforce_plus_plus compute 1 - mask, which torch refuses for bool.
NO_BOOL = {"gae", "reinforce_plus_plus"}


def uuids(pattern):
    table = {}
    return np.array([table.setdefault(p, str(uuid.uuid4())) for p in pattern], dtype=object)


def make_batch(seed, mask_dtype, B=11, T=7, holes=True, min_group=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    if holes:
        mask &= torch.rand(B, T, generator=g) > 0.25
    mask[:2, 0] = True
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    # Groups of 1 to 4 rows (at least min_group), shuffled across the batch; one group has equal
    # integral scores (std 0).
    pattern, label = [], 0
    while len(pattern) < B:
        size = int(torch.randint(min_group, 5, (1,), generator=g))
        pattern += [label] * size
        label += 1
    pattern = pattern[:B]
    if pattern.count(pattern[-1]) < min_group:
        pattern[-min_group:] = [pattern[-min_group - 1]] * min_group
    perm = torch.randperm(B, generator=g).tolist()
    pattern = [pattern[i] for i in perm]
    tie = [i for i, p in enumerate(pattern) if p == pattern[0]]
    # Every group has a token somewhere (verl's opo gives NaN otherwise, see below).
    mask[[pattern.index(p) for p in set(pattern)], -1] = True
    rewards[tie] = 0.0
    rewards[tie, -1] = 1.0
    return dict(
        token_level_rewards=rewards,
        values=torch.randn(B, T, generator=g, dtype=torch.float64),
        response_mask=mask.to(mask_dtype),
        index=uuids(pattern),
        old_log_probs=-3 * torch.rand(B, T, generator=g, dtype=torch.float64),
        sum_pi_squared=0.6 * torch.rand(B, T, generator=g, dtype=torch.float64),
        rollout_is_weights=2 * torch.rand(B, T, generator=g, dtype=torch.float64),
        reward_baselines=torch.randn(B, generator=g, dtype=torch.float64),
    )


def call_kwargs(name, b, seed):
    """The keyword arguments verl's trainer would pass (``compute_advantage``), varied by seed."""
    flag = bool(seed % 2)
    base = dict(token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"])
    if name == "gae":
        return dict(base, values=b["values"], gamma=[1.0, 0.93][seed % 2], lam=[1.0, 0.71][seed % 2])
    if name == "remax":
        return dict(base, reward_baselines=b["reward_baselines"], index=b["index"], config=None)
    if name == "reinforce_plus_plus":
        config = OmegaConf.create({"gamma": 0.9}) if flag else AlgoConfig()
        return dict(base, index=b["index"], config=config)
    base["index"] = b["index"]
    if name in ("grpo", "grpo_vectorized"):
        return dict(base, norm_adv_by_std_in_grpo=flag, epsilon=[1e-6, 1e-3][seed % 2])
    if name == "grpo_passk":
        # The argument says one thing, the config the other: verl reads the config.
        return dict(base, norm_adv_by_std_in_grpo=not flag, config=AlgoConfig(norm_adv_by_std_in_grpo=flag))
    if name == "gpg":
        return dict(base, f_norm=[1.0, 2.5][seed % 2], alpha=7.0, epsilon=0.5)
    if "optimal_token_baseline" in name:
        return dict(base, old_log_probs=b["old_log_probs"], sum_pi_squared=b["sum_pi_squared"],
                    rollout_is_weights=b["rollout_is_weights"] if seed % 3 else None, handle_zero_tail=flag)
    return dict(base, config=AlgoConfig())


def assert_same(expected, actual, tol=1e-9):
    assert isinstance(actual, tuple) and len(actual) == len(expected) == 2
    for e, a in zip(expected, actual):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Every estimator, every mask dtype
# --------------------------------------------------------------------------------------------


def test_registry_and_signatures_are_verls():
    assert set(ours.ESTIMATORS) == set(VERL)
    for name, fn in VERL.items():
        mine = ours.ESTIMATORS[name]
        assert mine.__name__ == fn.__name__ and getattr(ours, fn.__name__) is mine
        theirs = [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
        assert [(p.name, p.kind, p.default) for p in inspect.signature(mine).parameters.values()] == theirs, name


@pytest.mark.parametrize("name,mask_dtype", [(n, d) for n in sorted(VERL) for d in MASK_DTYPES
                                             if not (n in NO_BOOL and d == torch.bool)])
def test_matches_verl(name, mask_dtype):
    for seed in range(4):
        for holes in (True, False):
            b = make_batch(seed, mask_dtype, holes=holes, min_group=2 if name == "grpo_passk" else 1)
            kwargs = call_kwargs(name, b, seed)
            assert_same(VERL[name](**kwargs), ours.ESTIMATORS[name](**kwargs))


@pytest.mark.parametrize("name", sorted(VERL))
def test_float32_inputs_give_verls_dtypes(name):
    """verl computes float32 inputs in float32; we keep float64 statistics: dtypes equal, values
    to float32 rounding."""
    b = make_batch(5, torch.int64, min_group=2 if name == "grpo_passk" else 1)
    b = {k: v.float() if torch.is_tensor(v) and v.dtype == torch.float64 else v for k, v in b.items()}
    for mask_dtype in (torch.int64, torch.float64):
        b["response_mask"] = b["response_mask"].to(mask_dtype)
        kwargs = call_kwargs(name, b, 1)
        assert_same(VERL[name](**kwargs), ours.ESTIMATORS[name](**kwargs), tol=2e-5)


def test_the_core_is_verl_where_verl_has_no_quirk():
    """Right-padded masks, no singletons, float64 mask: the clean core gives verl's numbers too."""
    b = make_batch(3, torch.float64, holes=False, min_group=2)
    r, ids = b["token_level_rewards"], b["index"]
    m = (torch.arange(7) < torch.tensor([1, 7, 3, 5, 7, 2, 6, 4, 4, 1, 3]).unsqueeze(-1)).double()
    scores = r.sum(-1)
    pairs = [
        (VERL["grpo"](r, m, ids)[0], core.grpo(scores, m, ids).advantages),
        (VERL["rloo"](r, m, ids)[0], core.rloo(scores, m, ids).advantages),
        (VERL["opo"](r, m, ids)[0], core.opo(scores, m, ids).advantages),
        (VERL["optimal_token_baseline"](r, m, ids, b["old_log_probs"], b["sum_pi_squared"])[0],
         core.optimal_token_baseline(r, m, ids, b["old_log_probs"], b["sum_pi_squared"]).advantages),
    ]
    for expected, actual in pairs:
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# The quirks, one at a time
# --------------------------------------------------------------------------------------------


def test_grpo_singleton_divides_by_float32_one_plus_eps():
    r = torch.tensor([[5.0, 0.0]], dtype=torch.float64)
    m = torch.ones(1, 2, dtype=torch.int64)
    adv, ret = ours.compute_grpo_outcome_advantage(r, m, np.array(["a"], dtype=object))
    assert adv[0, 0].item() == 4.999995231632965 == VERL["grpo"](r, m, np.array(["a"], dtype=object))[0][0, 0].item()
    assert core.grpo(r, m, ["a"]).advantages[0, 0].item() == pytest.approx(5.0 / (1 + 1e-6), rel=1e-15)
    adv, _ = ours.compute_grpo_outcome_advantage(r, m, ["a"], norm_adv_by_std_in_grpo=False)
    assert adv[0, 0].item() == 5.0


def test_gae_masked_positions_hold_whitened_carried_values():
    b = make_batch(1, torch.int64)
    kwargs = call_kwargs("gae", b, 1)
    adv, ret = ours.compute_gae_advantage_return(**kwargs)
    masked = ~b["response_mask"].bool()
    assert (adv[masked] != 0).any() and (ret[masked] != 0).any()
    assert_same(VERL["gae"](**kwargs), (adv, ret))


def test_mask_dtype_changes_verls_whitening():
    """The float32 count and Bessel factor of verl's masked_whiten: int64 and float64 masks differ
    by far more than 1e-9, and each is reproduced."""
    b = make_batch(2, torch.int64, T=13)
    m = b["response_mask"]
    args = (b["token_level_rewards"], b["values"])
    as_int = ours.compute_gae_advantage_return(*args, m, 0.9, 0.8)[0]
    as_double = ours.compute_gae_advantage_return(*args, m.double(), 0.9, 0.8)[0]
    assert (as_int - as_double).abs().max() > 1e-9
    torch.testing.assert_close(as_int, VERL["gae"](*args, m, 0.9, 0.8)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(as_double, VERL["gae"](*args, m.double(), 0.9, 0.8)[0], rtol=1e-12, atol=1e-12)


def test_grpo_vectorized_labels_as_verl_reads_them():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(6, 3, generator=g, dtype=torch.float64)
    m = torch.ones(6, 3, dtype=torch.int64)
    indices = [
        np.array(["1", "01", "2", "02", "3", "3"], dtype=object),  # numeric strings: "1" == "01"
        np.array([0.5, 0.7, 1.5, 1.2, 2.0, 2.9]),  # non-integral floats truncate
        np.array([0.0, 0.0, 1.0000001, 1.0, 2.0, 3.0]),  # near-integral floats round
        torch.tensor([3, 3, 1, 1, 2, 3]),
        torch.tensor([0.5, 0.5, 1.5, 1.5, 2.5, 0.5]),
        ["a", 1, "a", 1, "b", 2],  # mixed: numpy turns them into strings
    ]
    for index in indices:
        assert_same(VERL["grpo_vectorized"](r, m, index), ours.compute_grpo_vectorized_outcome_advantage(r, m, index),
                    tol=1e-12)
    merged = ours.compute_grpo_vectorized_outcome_advantage(r, m, indices[0])[0]
    assert not torch.allclose(merged, ours.compute_grpo_outcome_advantage(r, m, indices[0])[0])


def test_grpo_vectorized_is_float32_inside():
    b = make_batch(6, torch.int64)
    exact = ours.compute_grpo_outcome_advantage(b["token_level_rewards"], b["response_mask"], b["index"])[0]
    emulated = ours.compute_grpo_vectorized_outcome_advantage(b["token_level_rewards"], b["response_mask"],
                                                              b["index"])[0]
    gap = (exact - emulated).abs().max()
    assert 1e-9 < gap < 1e-5


def test_rloo_and_rloo_vectorized_differ_on_singletons():
    r = torch.tensor([[2.0], [1.0], [4.0]], dtype=torch.float64)
    m = torch.ones(3, 1, dtype=torch.int64)
    ids = np.array(["a", "a", "b"], dtype=object)
    assert ours.compute_rloo_outcome_advantage(r, m, ids)[0][2, 0] == 4.0
    assert ours.compute_rloo_vectorized_outcome_advantage(r, m, ids)[0][2, 0] == 0.0
    for name in ("rloo", "rloo_vectorized"):
        assert_same(VERL[name](r, m, ids), ours.ESTIMATORS[name](r, m, ids))


def test_gpg_scale_is_float32_and_alpha_ignored():
    r = torch.zeros(15, 2, dtype=torch.float64)
    r[:14, 0] = torch.arange(1, 15, dtype=torch.float64)
    m = torch.ones(15, 2, dtype=torch.int64)
    ids = [i // 3 for i in range(15)]
    adv = ours.compute_gpg_outcome_advantage(r, m, np.array(ids), alpha=123.0)[0]
    assert_same(VERL["gpg"](r, m, np.array(ids)), (adv, adv))
    exact_alpha = core.gpg(r, m, ids).advantages
    assert (adv - exact_alpha).abs().max() > 1e-9  # 15/14 in float32 is 1.071428656578064


def test_otb_zero_tail_by_count_with_holes():
    """With holes, verl cuts the longest row at the second-longest *count* as a column index; the
    core cuts where the row is alone. Both reproduced: adapter = verl, core differs."""
    r = torch.randn(2, 6, dtype=torch.float64)
    m = torch.tensor([[1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 0]])
    lp, sp = -torch.rand(2, 6, dtype=torch.float64), 0.5 * torch.rand(2, 6, dtype=torch.float64)
    args = (r, m, np.array(["g", "g"], dtype=object), lp, sp)
    expected = VERL["optimal_token_baseline"](*args)
    assert_same(expected, ours.compute_optimal_token_baseline_advantage(*args), tol=1e-12)
    assert not torch.allclose(core.optimal_token_baseline(*args).advantages, expected[0])


def test_tir_leaves_empty_rows_out_of_their_group():
    r = torch.randn(3, 4, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    lp, sp = -torch.rand(3, 4, dtype=torch.float64), 0.5 * torch.rand(3, 4, dtype=torch.float64)
    for index in (np.array(["a", "a", "b"], dtype=object), ["a", "a", "b"], torch.tensor([4, 4, 5])):
        kwargs = dict(token_level_rewards=r, response_mask=m, index=index, old_log_probs=lp, sum_pi_squared=sp,
                      handle_zero_tail=False)
        actual = ours.compute_multi_turn_optimal_token_baseline_advantage(**kwargs)
        if not torch.is_tensor(index):
            assert_same(VERL["tir_optimal_token_baseline"](**kwargs), actual, tol=1e-12)
        # Row 0 is alone once row 1 (no tokens) is left out: baseline 0, advantage = return.
        torch.testing.assert_close(actual[0][0], actual[1][0] * m[0])


def test_passk_reads_config_and_needs_it():
    b = make_batch(0, torch.int64, min_group=2)
    kwargs = dict(token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"], index=b["index"])
    on = ours.compute_grpo_passk_outcome_advantage(**kwargs, norm_adv_by_std_in_grpo=False, config=AlgoConfig())
    off = ours.compute_grpo_passk_outcome_advantage(**kwargs, config={"norm_adv_by_std_in_grpo": False})
    assert not torch.equal(on[0], off[0])
    assert_same(VERL["grpo_passk"](**kwargs, config={"norm_adv_by_std_in_grpo": False}), off)
    with pytest.raises(ValueError, match="config must not be None"):
        ours.compute_grpo_passk_outcome_advantage(**kwargs)
    with pytest.raises(ValueError, match="at least 2 rows per group"):
        ours.compute_grpo_passk_outcome_advantage(b["token_level_rewards"], b["response_mask"],
                                                  uuids(range(11)), config=AlgoConfig())


def test_reinforce_plus_plus_reads_gamma_from_config():
    b = make_batch(0, torch.int64)
    args = (b["token_level_rewards"], b["response_mask"])
    assert not torch.equal(ours.compute_reinforce_plus_plus_outcome_advantage(*args, config=AlgoConfig())[1],
                           ours.compute_reinforce_plus_plus_outcome_advantage(*args, config=AlgoConfig(gamma=0.5))[1])
    with pytest.raises(ValueError, match="config must not be None"):
        ours.compute_reinforce_plus_plus_outcome_advantage(*args)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_gdpo_per_key_path(mask_dtype):
    """verl's per-key GDPO is float32 throughout; we compute its float32 inputs in float64 and
    return float32: agreement to float32 rounding."""
    b = make_batch(8, mask_dtype)
    B = b["response_mask"].shape[0]
    rng = np.random.default_rng(8)
    non_tensor = {"fmt": rng.integers(0, 2, B).astype(object), "acc": rng.normal(size=B), "uid": b["index"]}
    batch = {"prompts": torch.zeros(B, 3), "attention_mask": torch.cat([torch.ones(B, 3, dtype=torch.long),
                                                                        b["response_mask"].long()], 1)}
    for weights in (None, [0.3, 1.7]):
        config = AlgoConfig(gdpo_reward_keys=["fmt", "acc"], gdpo_reward_weights=weights)
        kwargs = dict(token_level_rewards=b["token_level_rewards"], response_mask=b["response_mask"],
                      index=b["index"], config=config, non_tensor_batch=non_tensor, batch=batch)
        assert_same(VERL["gdpo"](**kwargs), ours.compute_gdpo_outcome_advantage(**kwargs), tol=2e-5)
    with pytest.raises(ValueError, match="gdpo needs config.gdpo_reward_keys"):
        ours.compute_gdpo_outcome_advantage(**dict(kwargs, config=AlgoConfig()))
    with pytest.raises(ValueError, match=r"gdpo reward keys \['nope'\] are not in non_tensor_batch"):
        ours.compute_gdpo_outcome_advantage(**dict(kwargs, config=AlgoConfig(gdpo_reward_keys=["nope"])))
    with pytest.raises(ValueError, match="one weight per reward key"):
        ours.compute_gdpo_outcome_advantage(**dict(kwargs, config=AlgoConfig(gdpo_reward_keys=["fmt"],
                                                                              gdpo_reward_weights=[1.0, 2.0])))


# --------------------------------------------------------------------------------------------
# Where we differ on purpose
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NO_BOOL))
def test_bool_masks_work_where_verl_raises(name):
    b = make_batch(1, torch.bool)
    kwargs = call_kwargs(name, b, 1)
    with pytest.raises(RuntimeError):
        VERL[name](**kwargs)
    as_int = dict(kwargs, response_mask=b["response_mask"].long())
    assert_same(VERL[name](**as_int), ours.ESTIMATORS[name](**kwargs))


def test_integer_tensor_index_groups_by_value():
    b = make_batch(2, torch.int64)
    numbers = {u: i for i, u in enumerate(dict.fromkeys(b["index"]))}
    as_tensor = torch.tensor([numbers[u] for u in b["index"]])
    r, m = b["token_level_rewards"], b["response_mask"]
    with pytest.raises(KeyError):
        VERL["grpo"](r, m, as_tensor)
    for name in ("grpo", "rloo", "opo", "gpg", "reinforce_plus_plus_baseline", "gdpo"):
        assert_same(VERL[name](r, m, b["index"]), ours.ESTIMATORS[name](r, m, as_tensor))


def test_opo_group_without_tokens_is_not_nan():
    r = torch.randn(3, 2, dtype=torch.float64)
    m = torch.tensor([[0, 0], [0, 0], [1, 1]])
    ids = np.array(["a", "a", "b"], dtype=object)
    assert VERL["opo"](r, m, ids)[0][:2].isnan().all()
    adv = ours.compute_opo_outcome_advantage(r, m, ids)[0]
    assert (adv[:2] == 0).all()
    torch.testing.assert_close(adv[2], VERL["opo"](r, m, ids)[0][2])


@pytest.mark.parametrize("call,match", [
    (lambda b: ours.compute_grpo_outcome_advantage(b["token_level_rewards"], b["response_mask"] * 2, b["index"]),
     "response_mask must hold only 0 and 1"),
    (lambda b: ours.compute_grpo_outcome_advantage(b["token_level_rewards"][0], b["response_mask"], b["index"]),
     r"token_level_rewards must be \[B, T\]"),
    (lambda b: ours.compute_grpo_outcome_advantage(b["token_level_rewards"], b["response_mask"], b["index"][1:]),
     "group_ids must have B = 11"),
    (lambda b: ours.compute_gae_advantage_return(b["token_level_rewards"], b["values"], b["response_mask"], 1.5, 1.0),
     "gamma must be"),
    (lambda b: ours.compute_gae_advantage_return(b["token_level_rewards"], b["values"], b["response_mask"][:, :1]
                                                 .expand(-1, 7) * 0, 1.0, 1.0),
     "response_mask must select at least 2 tokens"),
    (lambda b: ours.compute_optimal_token_baseline_advantage(b["token_level_rewards"], b["response_mask"], b["index"],
                                                             b["old_log_probs"][:, 1:], b["sum_pi_squared"]),
     "old_log_probs must have shape"),
    (lambda b: ours.compute_grpo_outcome_advantage(b["token_level_rewards"], b["response_mask"], b["index"],
                                                   epsilon=0.0), "eps must be"),
])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_batch(0, torch.int64))


def test_importing_the_adapter_does_not_import_verl():
    code = ("import sys, ppo_fast.integrations.verl.advantages as a; "
            "assert not [m for m in sys.modules if m == 'verl' or m.startswith('verl.')], 'verl imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
