"""Test configuration: Triton kernels run under the interpreter on the CPU unless
PPO_FAST_TEST_DEVICE=cuda (the GPU suite, benches/gpu.sh), where they are compiled for real."""

import os

DEVICE = "cuda" if os.environ.get("PPO_FAST_TEST_DEVICE") == "cuda" else "cpu"
if DEVICE == "cpu":
    # Must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture
def force_backend(monkeypatch):
    """``with force_backend("triton"): ...`` runs the block with PPO_FAST_BACKEND set (the one
    way the tests force a backend)."""

    @contextmanager
    def force(name):
        with monkeypatch.context() as patch:
            patch.setenv("PPO_FAST_BACKEND", name)
            yield

    return force


# The native C++ kernels serve CPU tensors only; without them (PPO_FAST_NATIVE=0) their cases skip.
BACKEND_PARAMS = ["reference", "triton"] + (["native"] if DEVICE == "cpu" else [])


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, force_backend):
    """Runs the test body with this backend forced for every public call."""
    if request.param == "native":
        from ppo_fast import native

        if native.unavailable() is not None:
            pytest.skip(f"native kernels: {native.unavailable()}")
    with force_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# The Triton interpreter's heavy cases (seconds each on 2 cores). The default tier runs a
# representative set under the interpreter, the slow tier a few more (SLOW_UNDER_THE_INTERPRETER),
# and the rest only a GPU runs (GPU_ONLY_UNDER_THE_INTERPRETER; PPO_FAST_TEST_DEVICE=cuda runs every
# case): their reference and native twins run here in the default tier.
def _any_of(*cases):
    return lambda case: any(name in case for name in cases)


SLOW_UNDER_THE_INTERPRETER = {
    # The odd 40 x 100 x 1003 shape stays, with a bias at temperature 1.
    "tests/test_linear_head.py::test_log_probs_entropy_and_gradients_match_the_spec":
        _any_of("-7-4097-50-", "-5-1-7-", "-9-7-97-", "-40-100-1003-False-0.7]"),
    "tests/test_linear_head.py::test_low_precision_within_twice_the_eager_error": _any_of("-dtype1]", "-dtype2]"),
    "tests/test_linear_head.py::test_loss_gradients_in_the_forward_match_the_spec":
        _any_of("-1x7-4097-50-", "-dppo-kl-", "-sapo-"),
}

_REPRESENTATIVE_LOSSES = _any_of("[triton-token-mean-vanilla]", "[triton-token-mean-gspo]",
                                 "[triton-token-mean-cispo]")

GPU_ONLY_UNDER_THE_INTERPRETER = {
    # 152k vocabulary: 40 s interpreted; 2100 tokens: 14 s a case; 4097-wide rows: one case in the
    # slow tier.
    "tests/test_linear_head.py::test_log_probs_entropy_and_gradients_match_the_spec":
        _any_of("-3-5-151936]", "-2100-3-7-", "-7-4097-50-True-1.0]", "-7-4097-50-True-0.7]",
                "-7-4097-50-False-1.0]"),
    # Token-mean vanilla, gspo and cispo stay in the default tier (gradients in the forward, the
    # sequence ratio, the truncation); the other objectives differ only after the kernel.
    "tests/test_linear_head.py::test_every_loss_type_matches_the_spec": lambda case: not _REPRESENTATIVE_LOSSES(case),
    # 24 s interpreted; its loss-gradient twin runs in the default tier.
    "tests/test_linear_head.py::test_a_tokens_result_does_not_depend_on_the_batch": lambda case: True,
    # Every vanilla case (the fused loss kernel) stays, and every objective once, unweighted at
    # token-mean: the others run the same log-prob kernel with the spec's objective.
    "tests/test_objectives.py::test_fused_path_matches_the_spec_float64":
        lambda case: "-vanilla-" not in case and "[triton-unweighted-token-mean-" not in case,
}


def pytest_collection_modifyitems(config, items):
    if DEVICE != "cpu":
        return
    for item in items:
        name = item.nodeid.split("[")[0]
        if "[triton" not in item.nodeid:
            continue
        gpu_only = GPU_ONLY_UNDER_THE_INTERPRETER.get(name)
        if gpu_only is not None and gpu_only(item.nodeid):
            item.add_marker(pytest.mark.skip(reason="a GPU runs this Triton case (PPO_FAST_TEST_DEVICE=cuda); the "
                                                    "interpreter runs a representative set (tests/conftest.py)"))
            continue
        slow = SLOW_UNDER_THE_INTERPRETER.get(name)
        if slow is not None and slow(item.nodeid):
            item.add_marker(pytest.mark.slow)
