"""pytest-benchmark suite: every op against its baselines, side by side in one run.

Run with ``pytest benches/ --benchmark-enable`` (the repo's addopts disable benchmarks, so a plain
``pytest benches/`` only runs each case once as a smoke test). CUDA when available, with the
issue's shapes; otherwise small CPU shapes, where ``ppo_fast`` runs its native backend (its
reference one is timed beside it) and the Triton backend is skipped.
"""

from __future__ import annotations

import pytest

import bench_providers as bp
from bench_providers import SUITE_DEVICE as DEVICE
from bench_providers import SUITE_SHAPES as SHAPES
from bench_providers import ForcedBackend

# Rotating among several input sets keeps a set from sitting in cache between rounds.
N_INPUT_SETS = 3

# Enough rounds for a stable median while keeping the CPU suite near a minute.
pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=0.5, warmup=False)

# On the CPU the public functions run the native kernels where built, the reference ops otherwise:
# benchmark both under their own names, and list the Triton backend so the report shows it was
# skipped rather than absent.
PPO_FAST_BACKENDS = ("triton",) if DEVICE.type == "cuda" else ("triton", "native", "reference")


def provider_params(providers: dict):
    params = []
    for name in providers:
        if name == "ppo_fast":
            params += [pytest.param(("ppo_fast", b), id=f"ppo_fast-{b}") for b in PPO_FAST_BACKENDS]
        else:
            params.append(pytest.param((name, None), id=name))
    return params


def run_provider(measure, group, providers, provider, input_sets, n_bytes):
    name, forced = provider
    if forced == "triton" and DEVICE.type != "cuda":
        pytest.skip("Triton backend needs CUDA; its CPU interpreter is too slow to benchmark")
    if forced == "native":
        from ppo_fast import native

        if native.unavailable() is not None:
            pytest.skip(f"native kernels: {native.unavailable()}")
    label = forced or "eager PyTorch"
    if forced is None:
        measure(group, name, providers[name], input_sets, n_bytes, label)
        return
    with ForcedBackend(forced):
        measure(group, name, providers[name], input_sets, n_bytes, f"ppo_fast on {forced}")


@pytest.fixture(scope="module")
def logits_sets():
    return [bp.make_logits_inputs(SHAPES, DEVICE, seed) for seed in range(N_INPUT_SETS)]


@pytest.fixture(scope="module")
def gae_sets():
    return [bp.make_gae_inputs(SHAPES, DEVICE, seed) for seed in range(N_INPUT_SETS)]


LOGPROBS_FWD = bp.logprobs_fwd_providers()
LOGPROBS_FWD_BWD = bp.logprobs_fwd_bwd_providers()
PPO_LOSS = bp.ppo_loss_providers()
GAE = bp.gae_providers()


@pytest.mark.parametrize("provider", provider_params(LOGPROBS_FWD))
def test_token_logprobs_fwd(measure, logits_sets, provider):
    run_provider(measure, "token_logprobs fwd", LOGPROBS_FWD, provider, logits_sets,
                 bp.logprobs_fwd_bytes(logits_sets[0]))


@pytest.mark.parametrize("provider", provider_params(LOGPROBS_FWD_BWD))
def test_token_logprobs_fwd_bwd(measure, logits_sets, provider):
    run_provider(measure, "token_logprobs fwd+bwd", LOGPROBS_FWD_BWD, provider, logits_sets,
                 bp.logits_fwd_bwd_bytes(logits_sets[0]))


@pytest.mark.parametrize("provider", provider_params(PPO_LOSS))
def test_ppo_loss_fwd_bwd(measure, logits_sets, provider):
    run_provider(measure, "ppo_loss fwd+bwd", PPO_LOSS, provider, logits_sets,
                 bp.logits_fwd_bwd_bytes(logits_sets[0]))


@pytest.mark.parametrize("provider", provider_params(GAE))
def test_gae(measure, gae_sets, provider):
    run_provider(measure, "gae", GAE, provider, gae_sets, bp.gae_bytes(gae_sets[0]))
