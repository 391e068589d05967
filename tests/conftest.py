"""Test configuration: Triton kernels run under the interpreter on the CPU unless
PPO_FAST_TEST_DEVICE=cuda (the GPU suite, benches/gpu.sh), where they are compiled for real."""

import os

DEVICE = "cuda" if os.environ.get("PPO_FAST_TEST_DEVICE") == "cuda" else "cpu"
if DEVICE == "cpu":
    # Must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture
def use_backend(monkeypatch):
    """Force a backend for the rest of the test: ``use_backend("triton")``."""

    def force(name):
        monkeypatch.setenv("PPO_FAST_BACKEND", name)

    return force


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
