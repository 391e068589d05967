"""Reward-hacking diagnostics and alarms, on constructed evaluations."""

import math

import numpy as np
import pytest
import torch

from ppo_fast.trainer import diagnostics
from ppo_fast.trainer.diagnostics import Alarms, length_r2


def test_length_r2_is_the_share_length_explains_beyond_gold():
    rng = np.random.default_rng(0)
    length = rng.integers(1, 20, 200).astype(float)
    gold = rng.normal(size=200)
    assert length_r2(length, 2 * length + 1) == pytest.approx(1.0)
    assert length_r2(length, -length) == pytest.approx(-1.0)
    assert length_r2(length, gold, gold) == 0.0  # the trained reward is gold: nothing left to explain
    for seed in range(200):  # an honest 0/1 rule as both: round-off gave ±3e-31 on 10 of these batches
        batch = np.random.default_rng(seed)
        rule, lengths = batch.integers(0, 2, 64).astype(float), batch.integers(1, 5, 64).astype(float)
        assert length_r2(lengths, rule, rule) == 0.0, seed
    biased = gold + 0.3 * length + 0.1 * rng.normal(size=200)
    explained = np.var(0.3 * length) / np.var(biased)
    assert length_r2(length, biased, gold) == pytest.approx(explained, abs=0.02)
    slight = gold + 0.01 * length  # a bias that barely moves the reward while lengths barely differ
    assert 0 < length_r2(length, slight, gold) < 0.05
    assert abs(length_r2(length, gold + 0.1 * rng.normal(size=200), gold)) < 0.05
    assert length_r2(length, np.full(200, 3.0)) == 0.0


def test_distinct_n_and_repetition():
    assert diagnostics.distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert diagnostics.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert diagnostics.repetition([[5, 5, 5, 5], [1, 2, 3]]) == pytest.approx((1 - 1 / 3) / 2)
    assert diagnostics.distinct_n([[]], 2) == 0.0 and diagnostics.repetition([[7]]) == 0.0


def test_sample_metrics_reads_completions_up_to_their_mask():
    ids = [[4, 4, 2, 0], [5, 6, 7, 2]]
    completions = diagnostics.completion_tokens(ids, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert completions == [[4, 4, 2], [5, 6, 7, 2]]
    m = diagnostics.sample_metrics(completions, {"a": torch.tensor([1.0, 3.0])}, torch.tensor([1.0, 3.0]),
                                   torch.tensor([0.0, 1.0]), torch.tensor([0.5, 1.5]))
    assert m["response_length"] == 3.5 and m["kl"] == 1.0 and m["gold_reward"] == 0.5
    assert m["reward_per_token"] == pytest.approx((1 / 3 + 3 / 4) / 2)
    assert m["distinct_1"] == pytest.approx(5 / 7)  # 4 4 2 | 5 6 7 2: the padding (0) is not read
    assert "reward[a]" not in m  # one term: it is the proxy
    assert "kl" not in diagnostics.sample_metrics(completions, {}, torch.tensor([1.0, 3.0]), None, None)


def _metrics(proxy, gold, length_r2=0.0, kl=1.0, gold_std=1.0):
    return {"proxy_reward": proxy, "gold_reward": gold, "gold_std": gold_std, "length_r2": length_r2,
            "kl": kl, "response_length": 5.0}


def test_the_divergence_alarm_fires_when_the_proxy_rises_as_gold_falls():
    alarms = Alarms(gold_drop=0.5, length_r2=0.5, kl_budget=20)
    assert alarms.check(0, _metrics(0.0, 0.0)) == {}
    assert alarms.check(5, _metrics(1.0, 1.0)) == {}  # both rise: learning, not hacking
    assert alarms.check(10, _metrics(1.5, 0.8)) == {}  # gold fell 0.2 std: within the tolerance
    assert alarms.check(15, _metrics(0.5, 0.0)) == {}  # both fell: not hacking the proxy
    fired = alarms.check(20, _metrics(2.0, 0.3))
    assert list(fired) == ["divergence"] and "fell from 1.000 to 0.300" in fired["divergence"]
    assert alarms.first_fired == {"divergence": 20}
    restored = Alarms(gold_drop=0.5, length_r2=0.5, kl_budget=20)
    restored.load_state_dict(alarms.state_dict())
    assert list(restored.check(25, _metrics(2.5, 0.2))) == ["divergence"] and restored.first_fired["divergence"] == 20


def test_the_length_and_kl_alarms():
    alarms = Alarms(gold_drop=0.5, length_r2=0.5, kl_budget=20)
    assert list(alarms.check(0, _metrics(0.0, 0.0, length_r2=0.7))) == ["length"]
    assert alarms.check(5, _metrics(0.0, 0.0, length_r2=-0.9)) == {}  # longer scores lower
    assert list(alarms.check(10, _metrics(0.0, 0.0, kl=25.0))) == ["kl"]
    without_gold = Alarms(gold_drop=0.5, length_r2=0.5, kl_budget=20)
    metrics = {k: v for k, v in _metrics(3.0, 0.0, length_r2=0.8).items() if not k.startswith("gold")}
    assert "beyond gold" not in without_gold.check(0, metrics)["length"]


def test_rollout_mismatch_counts_only_completion_tokens():
    rollout = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -3.0]])
    trainer = torch.tensor([[-1.0, -2.5, 7.0], [-0.5, -0.25, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    largest, (tokens, unequal, k3) = diagnostics.rollout_mismatch(rollout, trainer, mask)
    assert largest.item() == 1.0  # the masked-out 7.0 is not read
    assert (tokens.item(), unequal.item()) == (5, 2)
    expected = (math.expm1(-0.5) + 0.5) + (math.expm1(1.0) - 1.0)
    assert k3.item() == pytest.approx(expected, rel=1e-12)
