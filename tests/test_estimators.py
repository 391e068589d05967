"""ppo_fast.estimators (pf.advantages) against plain per-row Python loops (float64), for every estimator and
option: odd shapes, masks with holes and empty rows, singleton and uneven groups given as str
uuids in non-adjacent rows, masked-position poisoning, errors, and GAE on the Triton path."""

import math
import uuid
import warnings

import numpy as np
import pytest
import torch

from ppo_fast import estimators as A
from ppo_fast import dispatch

B, T = 9, 7

# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_mask(B=B, T=T, device="cpu"):
    """Right-padded rows of varied lengths, a row with holes (observation tokens), an empty row."""
    lengths = torch.randint(1, T + 1, (B,))
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    mask[1] = torch.tensor([True, False, True, True, False, True, False])[:T]
    mask[6] = False  # an empty row (not the singleton, row 3)
    mask[B - 1] = True  # some group has a unique longest row
    return mask.to(device)


def uuids(pattern):
    """str uuids (as verl's trainer) for a pattern of small ints: equal ints, equal uuid."""
    table = {}
    return np.array([table.setdefault(p, str(uuid.uuid4())) for p in pattern], dtype=object)


# Uneven groups, not adjacent: sizes 3, 2, 1 (singleton), 3.
PATTERN = [0, 1, 0, 2, 3, 1, 3, 0, 3]
# Every group of >= 2 rows (Pass@k).
PAIRS = [0, 1, 0, 2, 1, 2, 0, 2, 1]


@pytest.fixture
def batch():
    torch.manual_seed(7)
    mask = make_mask()
    return dict(
        rewards=torch.randn(B, T, dtype=torch.float64),
        values=torch.randn(B, T, dtype=torch.float64),
        mask=mask,
        old_logp=-3 * torch.rand(B, T, dtype=torch.float64),
        sum_pi_squared=0.6 * torch.rand(B, T, dtype=torch.float64),
        is_weights=2 * torch.rand(B, T, dtype=torch.float64),
        baselines=torch.randn(B, dtype=torch.float64),
        ids=uuids(PATTERN),
    )


# --------------------------------------------------------------------------------------------
# Oracles: plain loops over rows and tokens on Python floats
# --------------------------------------------------------------------------------------------


def lists(*tensors):
    return [t.tolist() for t in tensors]


def groups_of(labels):
    rows = {}
    for i, label in enumerate(labels):
        rows.setdefault(label, []).append(i)
    return rows


def seq_scores(r, m):
    return [math.fsum(x for x, keep in zip(row, mrow) if keep) for row, mrow in zip(r, m)]


def broadcast(a, m):
    return torch.tensor([[a[i] if keep else 0.0 for keep in mrow] for i, mrow in enumerate(m)],
                        dtype=torch.float64)


def whiten(x, m):
    vals = [v for row, mrow in zip(x, m) for v, keep in zip(row, mrow) if keep]
    mu = math.fsum(vals) / len(vals)
    var = math.fsum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
    return [[(v - mu) / math.sqrt(var + 1e-8) if keep else 0.0 for v, keep in zip(row, mrow)]
            for row, mrow in zip(x, m)]


def mean_std(vals):
    mu = math.fsum(vals) / len(vals)
    return mu, math.sqrt(math.fsum((v - mu) ** 2 for v in vals) / (len(vals) - 1))


def oracle_grpo(s, labels, eps, norm):
    out = [0.0] * len(s)
    for rows in groups_of(labels).values():
        mu, sd = (0.0, 1.0) if len(rows) == 1 else mean_std([s[i] for i in rows])
        for i in rows:
            out[i] = (s[i] - mu) / (sd + eps) if norm else s[i] - mu
    return out


def oracle_passk(s, labels, eps, norm):
    out = [0.0] * len(s)
    for rows in groups_of(labels).values():
        ranked = sorted(rows, key=lambda i: -s[i])  # stable: ties keep row order
        gap = s[ranked[0]] - s[ranked[1]]
        out[ranked[0]] = gap / (mean_std([s[i] for i in rows])[1] + eps) if norm else gap
    return out


def oracle_rloo(s, labels):
    out = list(s)
    for rows in groups_of(labels).values():
        if len(rows) > 1:
            for i in rows:
                others = [s[j] for j in rows if j != i]
                out[i] = s[i] - math.fsum(others) / len(others)
    return out


def oracle_opo(s, lengths, labels):
    out = list(s)
    for rows in groups_of(labels).values():
        total = sum(lengths[i] for i in rows)
        if len(rows) > 1 and total > 0:
            b = math.fsum(lengths[i] * s[i] for i in rows) / total
            for i in rows:
                out[i] = s[i] - b
    return out


def oracle_centred(s, labels):
    out = list(s)
    for rows in groups_of(labels).values():
        if len(rows) > 1:
            mu = math.fsum(s[i] for i in rows) / len(rows)
            for i in rows:
                out[i] = s[i] - mu
    return out


def oracle_gae(r, v, m, gamma, lam):
    adv, ret = [], []
    for rr, vv, mm in zip(r, v, m):
        a_row, r_row = [0.0] * len(rr), [0.0] * len(rr)
        next_v = next_a = 0.0
        for t in reversed(range(len(rr))):
            if mm[t]:
                a = rr[t] + gamma * next_v - vv[t] + gamma * lam * next_a
                a_row[t], r_row[t] = a, a + vv[t]
                next_v, next_a = vv[t], a
        adv.append(a_row)
        ret.append(r_row)
    return adv, ret


def oracle_reward_to_go(r, m, gamma):
    out = []
    for rr, mm in zip(r, m):
        row, running = [0.0] * len(rr), 0.0
        for t in reversed(range(len(rr))):
            if mm[t]:
                running = rr[t] + gamma * running
                row[t] = running
        out.append(row)
    return out


def oracle_otb(r, m, labels, lp, sp, isw, eps, zero_tail, compact):
    """Per group and time step, from the definitions; compact: step k = the row's k-th token."""
    G = oracle_reward_to_go(r, m, 1.0)
    adv = [[0.0] * len(row) for row in r]
    steps = []  # per row: [(position, G, W)] over its masked tokens
    for i, (mm, row_lp, row_sp) in enumerate(zip(m, lp, sp)):
        W, seq = 0.0, []
        for t, keep in enumerate(mm):
            if keep:
                rho = 1.0 if isw is None else isw[i][t]
                W += (1 - 2 * math.exp(row_lp[t]) + row_sp[t]) * rho * rho
                seq.append((t, G[i][t], W))
        steps.append(seq)
    for rows in groups_of(labels).values():
        for i in rows:
            for k, (t, g, _) in enumerate(steps[i]):
                if compact:
                    at = [steps[j][k] for j in rows if k < len(steps[j])]
                else:
                    at = [x for j in rows for x in steps[j] if x[0] == t]
                if len(rows) == 1 or (zero_tail and len(at) == 1):
                    b = 0.0
                else:
                    b = math.fsum(x[1] * x[2] for x in at) / (math.fsum(x[2] for x in at) + eps)
                adv[i][t] = g - b
    return adv, G


def close(actual, expected, tol=1e-12):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# Each estimator against its oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.93, 0.81)])
@pytest.mark.parametrize("whiten_it", [True, False])
def test_gae(batch, gamma, lam, whiten_it):
    r, v, m = lists(batch["rewards"], batch["values"], batch["mask"])
    adv, ret = A.gae(batch["rewards"], batch["values"], batch["mask"], gamma=gamma, lam=lam, whiten=whiten_it)
    exp_adv, exp_ret = oracle_gae(r, v, m, gamma, lam)
    close(adv, whiten(exp_adv, m) if whiten_it else exp_adv)
    close(ret, exp_ret)
    assert adv.dtype == ret.dtype == torch.float64


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("whiten_it", [True, False])
def test_reinforce_plus_plus(batch, gamma, whiten_it):
    r, m = lists(batch["rewards"], batch["mask"])
    adv, ret = A.reinforce_plus_plus(batch["rewards"], batch["mask"], gamma=gamma, whiten=whiten_it)
    expected = oracle_reward_to_go(r, m, gamma)
    close(ret, expected)
    close(adv, whiten(expected, m) if whiten_it else expected)


def test_remax(batch):
    r, m, b = lists(batch["rewards"], batch["mask"], batch["baselines"])
    adv, ret = A.remax(batch["rewards"], batch["mask"], batch["baselines"])
    G = oracle_reward_to_go(r, m, 1.0)
    close(ret, G)
    close(adv, [[g - b[i] if keep else 0.0 for g, keep in zip(G[i], m[i])] for i in range(B)])


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_grpo(batch, normalize_std, eps):
    r, m = lists(batch["rewards"], batch["mask"])
    adv, ret = A.grpo(batch["rewards"], batch["mask"], batch["ids"], eps=eps, normalize_std=normalize_std)
    close(adv, broadcast(oracle_grpo(seq_scores(r, m), PATTERN, eps, normalize_std), m))
    assert ret is adv


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_passk(batch, normalize_std):
    r, m = lists(batch["rewards"], batch["mask"])
    r[6] = list(r[0])  # a tie for the best score would give gap 0 wherever it lands
    rewards = torch.tensor(r, dtype=torch.float64)
    adv, _ = A.grpo_passk(rewards, batch["mask"], uuids(PAIRS), normalize_std=normalize_std)
    close(adv, broadcast(oracle_passk(seq_scores(r, m), PAIRS, 1e-6, normalize_std), m))
    assert int((adv != 0).any(-1).sum()) <= 3


@pytest.mark.parametrize("whiten_it", [True, False])
def test_reinforce_plus_plus_baseline(batch, whiten_it):
    r, m = lists(batch["rewards"], batch["mask"])
    adv, _ = A.reinforce_plus_plus_baseline(batch["rewards"], batch["mask"], batch["ids"], whiten=whiten_it)
    centred = broadcast(oracle_centred(seq_scores(r, m), PATTERN), m).tolist()
    close(adv, whiten(centred, m) if whiten_it else centred)


def test_rloo(batch):
    r, m = lists(batch["rewards"], batch["mask"])
    adv, _ = A.rloo(batch["rewards"], batch["mask"], batch["ids"])
    close(adv, broadcast(oracle_rloo(seq_scores(r, m), PATTERN), m))


def test_opo(batch):
    r, m = lists(batch["rewards"], batch["mask"])
    adv, _ = A.opo(batch["rewards"], batch["mask"], batch["ids"])
    close(adv, broadcast(oracle_opo(seq_scores(r, m), [sum(row) for row in m], PATTERN), m))


def test_opo_group_without_tokens_has_baseline_zero():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[2, :2] = True
    scores = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    adv, _ = A.opo(scores, mask, [0, 0, 1])
    assert torch.isfinite(adv).all()
    close(adv[2], [3.0, 3.0, 0.0, 0.0])


@pytest.mark.parametrize("f_norm,alpha", [(1.0, None), (2.5, None), (1.0, 0.7)])
def test_gpg(batch, f_norm, alpha):
    r, m = lists(batch["rewards"], batch["mask"])
    r[2] = [0.0] * T  # a zero score changes alpha
    rewards = torch.tensor(r, dtype=torch.float64)
    adv, _ = A.gpg(rewards, batch["mask"], batch["ids"], f_norm=f_norm, alpha=alpha)
    s = seq_scores(r, m)
    a = B / max(sum(x != 0 for x in s), 1) if alpha is None else alpha
    close(adv, broadcast([a * c / f_norm for c in oracle_centred(s, PATTERN)], m))


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("whiten_it", [True, False])
def test_gdpo(batch, normalize_std, whiten_it):
    r, m = lists(batch["rewards"], batch["mask"])
    second = torch.randn(B, dtype=torch.float64)  # a [B]-score dimension
    weights = [0.3, 1.7]
    adv, _ = A.gdpo([batch["rewards"], second], batch["mask"], batch["ids"], weights=weights,
                    normalize_std=normalize_std, whiten=whiten_it)
    dims = [oracle_grpo(s, PATTERN, 1e-6, normalize_std) for s in (seq_scores(r, m), second.tolist())]
    total = broadcast([weights[0] * x + weights[1] * y for x, y in zip(*dims)], m).tolist()
    close(adv, whiten(total, m) if whiten_it else total)
    single, _ = A.gdpo(batch["rewards"], batch["mask"], batch["ids"], normalize_std=normalize_std,
                       whiten=whiten_it)
    only = broadcast(dims[0], m).tolist()
    close(single, whiten(only, m) if whiten_it else only)


@pytest.mark.parametrize("estimator,compact", [(A.optimal_token_baseline, False),
                                               (A.tir_optimal_token_baseline, True)])
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("with_is", [True, False])
def test_optimal_token_baseline(batch, estimator, compact, zero_tail, with_is):
    r, m, lp, sp, isw = lists(batch["rewards"], batch["mask"], batch["old_logp"], batch["sum_pi_squared"],
                              batch["is_weights"])
    mask = batch["mask"].clone()
    mask[8, 2] = False  # a second row with a hole: compact and positional steps differ
    m = mask.tolist()
    adv, ret = estimator(batch["rewards"], mask, batch["ids"], batch["old_logp"], batch["sum_pi_squared"],
                         is_weights=batch["is_weights"] if with_is else None, handle_zero_tail=zero_tail)
    exp_adv, exp_ret = oracle_otb(r, m, PATTERN, lp, sp, isw if with_is else None, 1e-8, zero_tail, compact)
    close(adv, exp_adv)
    close(ret, exp_ret)


def test_tir_equals_positional_for_prefix_masks(batch):
    mask = torch.arange(T) < torch.tensor([3, 7, 5, 0, 2, 7, 6, 1, 4]).unsqueeze(-1)
    args = (batch["rewards"], mask, batch["ids"], batch["old_logp"], batch["sum_pi_squared"])
    for zero_tail in (True, False):
        a = A.optimal_token_baseline(*args, handle_zero_tail=zero_tail)
        b = A.tir_optimal_token_baseline(*args, handle_zero_tail=zero_tail)
        close(a.advantages, b.advantages, 1e-15)


# --------------------------------------------------------------------------------------------
# Options change something, inputs in every accepted form
# --------------------------------------------------------------------------------------------


def test_every_option_changes_the_result(batch):
    r, m, ids = batch["rewards"], batch["mask"], batch["ids"]
    otb = (r, m, ids, batch["old_logp"], batch["sum_pi_squared"])
    pairs = [
        (A.gae(r, batch["values"], m, gamma=0.9), A.gae(r, batch["values"], m, gamma=0.8)),
        (A.gae(r, batch["values"], m, lam=0.9), A.gae(r, batch["values"], m, lam=0.8)),
        (A.gae(r, batch["values"], m), A.gae(r, batch["values"], m, whiten=False)),
        (A.reinforce_plus_plus(r, m), A.reinforce_plus_plus(r, m, whiten=False)),
        (A.reinforce_plus_plus(r, m, gamma=0.5), A.reinforce_plus_plus(r, m)),
        (A.grpo(r, m, ids), A.grpo(r, m, ids, normalize_std=False)),
        (A.grpo(r, m, ids), A.grpo(r, m, ids, eps=0.1)),
        (A.gdpo(r, m, ids), A.gdpo(r, m, ids, whiten=False)),
        (A.gdpo([r, r.flip(0)], m, ids), A.gdpo([r, r.flip(0)], m, ids, weights=[1.0, 2.0])),
        (A.reinforce_plus_plus_baseline(r, m, ids), A.reinforce_plus_plus_baseline(r, m, ids, whiten=False)),
        (A.gpg(r, m, ids), A.gpg(r, m, ids, f_norm=2.0)),
        (A.gpg(r, m, ids), A.gpg(r, m, ids, alpha=3.0)),
        (A.optimal_token_baseline(*otb), A.optimal_token_baseline(*otb, handle_zero_tail=False)),
        (A.optimal_token_baseline(*otb), A.optimal_token_baseline(*otb, is_weights=batch["is_weights"])),
        (A.optimal_token_baseline(*otb), A.optimal_token_baseline(*otb, eps=10.0)),
    ]
    for i, (a, b) in enumerate(pairs):
        assert not torch.equal(a.advantages, b.advantages) or not torch.equal(a.returns, b.returns), i
    s = torch.randn(4, dtype=torch.float64)
    mask = torch.ones(4, 3, dtype=torch.bool)
    assert not torch.equal(A.grpo_passk(s, mask, [0, 0, 1, 1]).advantages,
                           A.grpo_passk(s, mask, [0, 0, 1, 1], normalize_std=False).advantages)


@pytest.mark.parametrize("name", sorted(set(A.ESTIMATORS) - {"gae", "reinforce_plus_plus", "remax",
                                                            "optimal_token_baseline",
                                                            "tir_optimal_token_baseline"}))
def test_group_ids_in_every_form_group_alike(batch, name):
    pattern = PAIRS if name == "grpo_passk" else PATTERN
    kwargs = dict(rewards=batch["rewards"], mask=batch["mask"])
    forms = [uuids(pattern), [f"p{x}" for x in pattern], tuple(pattern), np.array(pattern),
             torch.tensor(pattern) * 7 - 3, np.array([str(x) for x in pattern])]
    results = [A.advantages(name, group_ids=ids, **kwargs).advantages for ids in forms]
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_rows_of_a_group_need_not_be_adjacent(batch):
    """Permuting the rows permutes the result."""
    perm = torch.randperm(B)
    r, m, ids = batch["rewards"], batch["mask"], batch["ids"]
    for name in ("grpo", "rloo", "opo", "gpg", "gdpo", "reinforce_plus_plus_baseline"):
        base = A.advantages(name, rewards=r, mask=m, group_ids=ids).advantages
        moved = A.advantages(name, rewards=r[perm], mask=m[perm], group_ids=ids[perm.numpy()]).advantages
        close(moved, base[perm], 1e-14)


def test_sequence_scores_equal_summed_token_rewards(batch):
    r, m, ids = batch["rewards"], batch["mask"], batch["ids"]
    scores = torch.where(m, r, 0.0).sum(-1)
    for name in ("grpo", "rloo", "opo", "gpg", "gdpo", "reinforce_plus_plus_baseline"):
        close(A.advantages(name, rewards=scores, mask=m, group_ids=ids).advantages,
              A.advantages(name, rewards=r, mask=m, group_ids=ids).advantages, 1e-14)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.float64, torch.uint8])
def test_mask_dtype_does_not_change_the_numbers(batch, mask_dtype):
    r, m, ids = batch["rewards"], batch["mask"], batch["ids"]
    ref = A.reinforce_plus_plus_baseline(r, m, ids)
    got = A.reinforce_plus_plus_baseline(r, m.to(mask_dtype), ids)
    assert torch.equal(ref.advantages, got.advantages)
    ref = A.gae(r, batch["values"], m)
    got = A.gae(r, batch["values"], m.to(mask_dtype))
    assert torch.equal(ref.advantages, got.advantages)


def test_float32_inputs_give_float32_close_to_float64(batch):
    r, v, m, ids = batch["rewards"], batch["values"], batch["mask"], batch["ids"]
    otb = (m, ids, batch["old_logp"], batch["sum_pi_squared"])
    for name, call in {
        "gae": lambda x: A.gae(x, v.to(x.dtype), m),
        "grpo": lambda x: A.grpo(x, m, ids),
        "rf++": lambda x: A.reinforce_plus_plus(x, m),
        "rloo": lambda x: A.rloo(x, m, ids),
        "otb": lambda x: A.optimal_token_baseline(x, *[t.to(x.dtype) if torch.is_tensor(t) else t
                                                        for t in otb]),
    }.items():
        lo, hi = call(r.float()), call(r)
        assert lo.advantages.dtype == torch.float32, name
        torch.testing.assert_close(lo.advantages.double(), hi.advantages, rtol=1e-5, atol=1e-5)
    assert A.grpo(r.bfloat16(), m, ids).advantages.dtype == torch.float32


def test_outputs_are_zero_at_masked_positions_and_carry_no_grad(batch):
    r = batch["rewards"].clone().requires_grad_()
    v = batch["values"].clone().requires_grad_()
    m, ids = batch["mask"], batch["ids"]
    outs = [A.gae(r, v, m), A.grpo(r, m, ids), A.remax(r, m, batch["baselines"]),
            A.optimal_token_baseline(r, m, ids, batch["old_logp"], batch["sum_pi_squared"])]
    for out in outs:
        for t in out:
            assert not t.requires_grad
            assert (t[~m] == 0).all()


# --------------------------------------------------------------------------------------------
# Masked positions hold poison
# --------------------------------------------------------------------------------------------


def all_calls(batch, **over):
    b = {**batch, **over}
    r, m, ids = b["rewards"], b["mask"], b["ids"]
    otb = (r, m, ids, b["old_logp"], b["sum_pi_squared"])
    return {
        "gae": A.gae(r, b["values"], m, gamma=0.9, lam=0.8),
        "rf++": A.reinforce_plus_plus(r, m, gamma=0.9),
        "remax": A.remax(r, m, b["baselines"]),
        "grpo": A.grpo(r, m, ids),
        "passk": A.grpo_passk(r, m, uuids(PAIRS)),
        "rf++b": A.reinforce_plus_plus_baseline(r, m, ids),
        "rloo": A.rloo(r, m, ids),
        "opo": A.opo(r, m, ids),
        "gpg": A.gpg(r, m, ids),
        "gdpo": A.gdpo([r, b["baselines"]], m, ids),
        "otb": A.optimal_token_baseline(*otb, is_weights=b["is_weights"]),
        "tir": A.tir_optimal_token_baseline(*otb, is_weights=b["is_weights"]),
    }


def poisoned(t, mask):
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=t.dtype)
    fill = bad[torch.arange(t.numel()) % 3].view(t.shape)
    return torch.where(mask, t, fill)


def test_poison_at_masked_positions_changes_nothing(batch):
    m = batch["mask"]
    clean = all_calls(batch)
    dirty = all_calls(batch, **{k: poisoned(batch[k], m) for k in
                                ("rewards", "values", "old_logp", "sum_pi_squared", "is_weights")})
    for name in clean:
        for a, b in zip(clean[name], dirty[name]):
            assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------
# GAE (and the reward-to-go estimators) on the Triton path
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:PPO_FAST_BACKEND=triton:UserWarning")
def test_triton_path(device, force_backend):
    torch.manual_seed(3)
    b, t = 8, 6
    r, v = torch.randn(b, t, dtype=torch.float64), torch.randn(b, t, dtype=torch.float64)
    m = make_mask(b, t)
    m[2] = torch.tensor([False, True, True, False, True, False])
    poison_r, poison_v = poisoned(r, m), poisoned(v, m)
    rl, vl, ml = lists(r, v, m)
    with force_backend("triton"):
        dev = [x.to(device) for x in (poison_r, poison_v, m)]
        adv, ret = A.gae(*dev, gamma=0.9, lam=0.7)
        exp_adv, exp_ret = oracle_gae(rl, vl, ml, 0.9, 0.7)
        close(adv, whiten(exp_adv, ml))
        close(ret, exp_ret)
        adv, ret = A.reinforce_plus_plus(dev[0], dev[2], gamma=0.8, whiten=False)
        close(ret, oracle_reward_to_go(rl, ml, 0.8))
        assert dispatch.choose("gae", device) == "triton"


# --------------------------------------------------------------------------------------------
# Registry, dispatch, errors
# --------------------------------------------------------------------------------------------


def test_registry_is_verls_names_and_read_only():
    assert set(A.ESTIMATORS) == {
        "gae", "grpo", "grpo_vectorized", "gdpo", "grpo_passk", "reinforce_plus_plus_baseline", "rloo", "opo",
        "reinforce_plus_plus", "remax", "gpg", "rloo_vectorized", "optimal_token_baseline",
        "tir_optimal_token_baseline"}
    with pytest.raises(TypeError):
        A.ESTIMATORS["grpo"] = A.rloo
    assert A.ESTIMATORS["grpo_vectorized"] is A.grpo and A.ESTIMATORS["rloo_vectorized"] is A.rloo


def test_estimators_run_their_spec_whatever_the_forced_backend(batch, monkeypatch):
    """Outside the dispatch table (one implementation each): a forced backend changes nothing and
    warns about nothing; GAE, whose op is in the table, reads it."""
    assert "advantages" not in dispatch.TABLE
    want = A.rloo(batch["rewards"], batch["mask"], batch["ids"])
    monkeypatch.setenv("PPO_FAST_BACKEND", "native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = A.rloo(batch["rewards"], batch["mask"], batch["ids"])
    assert torch.equal(got.advantages, want.advantages)
    monkeypatch.setenv("PPO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PPO_FAST_BACKEND must be one of"):
        A.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("call,error,match", [
    (lambda b: A.grpo(b["rewards"][None], b["mask"], b["ids"]), ValueError, "rewards must be"),
    (lambda b: A.grpo(b["rewards"].long(), b["mask"], b["ids"]), ValueError, "rewards must be a floating"),
    (lambda b: A.grpo(b["rewards"], b["mask"][:, 1:], b["ids"]), ValueError, "mask must have shape"),
    (lambda b: A.grpo(b["rewards"][:, 0], b["mask"][1:], b["ids"]), ValueError, "mask must be .B, T. with B = 9"),
    (lambda b: A.grpo(b["rewards"], b["mask"] * 2, b["ids"]), ValueError, "mask must hold only 0 and 1"),
    (lambda b: A.grpo(b["rewards"], b["mask"], b["ids"][1:]), ValueError, "group_ids must have B = 9"),
    (lambda b: A.grpo(b["rewards"], b["mask"], torch.zeros(B)), ValueError, "group_ids must be an integer"),
    (lambda b: A.grpo(b["rewards"], b["mask"], torch.zeros(B, 1, dtype=torch.long)), ValueError,
     "group_ids must be .B."),
    (lambda b: A.grpo(b["rewards"], b["mask"], list(torch.zeros(B, dtype=torch.long))), TypeError,
     r"group_ids\[0\] is a torch.Tensor"),
    (lambda b: A.grpo(b["rewards"], b["mask"], [[1]] * B), TypeError, r"group_ids\[0\] = \[1\] is not hashable"),
    (lambda b: A.grpo(b["rewards"], b["mask"], "abcdefghi"), TypeError, "group_ids must be an integer tensor, or"),
    (lambda b: A.grpo(b["rewards"], b["mask"], np.zeros((B, 1))), ValueError, "group_ids must be 1-D"),
    (lambda b: A.grpo(b["rewards"], b["mask"], b["ids"], eps=0.0), ValueError, "eps must be a finite number > 0"),
    (lambda b: A.grpo(b["rewards"], b["mask"], b["ids"], normalize_std=1), ValueError,
     "normalize_std must be True or False"),
    (lambda b: A.grpo_passk(b["rewards"], b["mask"], b["ids"]), ValueError,
     "grpo_passk needs at least 2 rows per group in group_ids; group '.*' has 1"),
    (lambda b: A.gae(b["rewards"], b["values"], torch.eye(B, T, dtype=torch.bool)[:1].expand(B, T) & False),
     ValueError, "mask must select at least 2 tokens"),
    (lambda b: A.gae(b["rewards"], b["values"], b["mask"], gamma=1.5), ValueError, "gamma must be a number in"),
    (lambda b: A.gae(b["rewards"], b["values"][:, 1:], b["mask"]), ValueError, "values must have shape"),
    (lambda b: A.gae(b["rewards"], b["values"], None), TypeError, "mask must be a torch.Tensor"),
    (lambda b: A.reinforce_plus_plus(b["rewards"], b["mask"], gamma=-0.1), ValueError, "gamma must be"),
    (lambda b: A.reinforce_plus_plus(b["rewards"][:, 0], b["mask"]), ValueError, r"rewards must be \[B, T\]"),
    (lambda b: A.remax(b["rewards"], b["mask"], b["baselines"][1:]), ValueError, "baselines must have shape"),
    (lambda b: A.gdpo([], b["mask"], b["ids"]), ValueError, "at least one reward dimension"),
    (lambda b: A.gdpo(b["rewards"], b["mask"], b["ids"], weights=[1.0, 2.0]), ValueError,
     "weights must hold one number per reward dimension"),
    (lambda b: A.gdpo(b["rewards"], b["mask"], b["ids"], weights=[float("nan")]), ValueError,
     r"weights\[0\] must be a finite number"),
    (lambda b: A.gdpo([b["rewards"], b["rewards"][:, 0].long()], b["mask"], b["ids"]), ValueError,
     r"rewards\[1\] must be a floating"),
    (lambda b: A.gpg(b["rewards"], b["mask"], b["ids"], f_norm=0.0), ValueError, "f_norm must be"),
    (lambda b: A.gpg(b["rewards"], b["mask"], b["ids"], alpha=-1.0), ValueError, "alpha must be"),
    (lambda b: A.optimal_token_baseline(b["rewards"], b["mask"], b["ids"], b["old_logp"][:, 1:],
                                        b["sum_pi_squared"]), ValueError, "old_logp must have shape"),
    (lambda b: A.tir_optimal_token_baseline(b["rewards"], b["mask"], b["ids"], b["old_logp"],
                                            b["sum_pi_squared"], is_weights=b["is_weights"][1:]),
     ValueError, "is_weights must have shape"),
    (lambda b: A.optimal_token_baseline(b["rewards"], b["mask"], b["ids"], b["old_logp"], b["sum_pi_squared"],
                                        eps=0.0), ValueError, "eps must be"),
    (lambda b: A.advantages("ppo", rewards=b["rewards"]), ValueError, "name must be one of 'gae'"),
    (lambda b: A.advantages(["grpo"], b["rewards"]), ValueError, "name must be one of 'gae'"),
    (lambda b: A.grpo(b["rewards"], b["mask"], [float("nan")] * B), ValueError, r"group_ids\[0\] is NaN"),
    (lambda b: A.optimal_token_baseline(b["rewards"], b["mask"], b["ids"], b["old_logp"], None), ValueError,
     "sum_pi_squared is required"),
])
def test_errors_name_the_argument(batch, call, error, match):
    with pytest.raises(error, match=match):
        call(batch)


def test_whitening_needs_two_tokens():
    r = torch.randn(2, 3, dtype=torch.float64)
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[0, 1] = True
    for call in (lambda: A.gae(r, r, one), lambda: A.reinforce_plus_plus(r, one),
                 lambda: A.reinforce_plus_plus_baseline(r, one, [0, 0]), lambda: A.gdpo(r, one, [0, 1])):
        with pytest.raises(ValueError, match="mask must select at least 2 tokens to estimate a variance, selects 1"):
            call()


def test_empty_batch():
    r = torch.zeros(0, 4, dtype=torch.float64)
    m = torch.zeros(0, 4, dtype=torch.bool)
    for out in (A.grpo(r, m, []), A.rloo(r, m, []), A.grpo_passk(r, m, []), A.remax(r, m, torch.zeros(0)),
                A.optimal_token_baseline(r, m, [], r, r), A.tir_optimal_token_baseline(r, m, [], r, r)):
        assert out.advantages.shape == (0, 4)
