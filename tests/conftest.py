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


# The Triton interpreter's heaviest cases (seconds each on 2 cores) go to the slow tier; the same
# cases on the reference and native backends, and the interpreter's smaller shapes, stay in the
# default tier. On a GPU (PPO_FAST_TEST_DEVICE=cuda) they are fast and all run.
SLOW_UNDER_THE_INTERPRETER = {
    "tests/test_linear_head.py::test_log_probs_entropy_and_gradients_match_the_spec": ("-2100-3-7-", "-7-4097-50-"),
    "tests/test_linear_head.py::test_every_loss_type_matches_the_spec": ("-seq-mean-token-mean-",),
    "tests/test_linear_head.py::test_a_tokens_result_does_not_depend_on_the_batch": ("",),
}


def pytest_collection_modifyitems(config, items):
    if DEVICE != "cpu":
        return
    for item in items:
        cases = SLOW_UNDER_THE_INTERPRETER.get(item.nodeid.split("[")[0])
        if cases is not None and "[triton" in item.nodeid and any(case in item.nodeid for case in cases):
            item.add_marker(pytest.mark.slow)
