"""verl 0.9.1's fused linear heads (``use_fused_kernels=True``) served by ppo_fast: our
``linear_cross_entropy`` and ``FusedLinearForPPO`` against verl's own torch implementation, directly
and through verl's patched model forwards (``dense_common.forward_with_torch_backend`` /
``forward_with_triton_backend``) after ``install()``: log-probs, entropy and their gradients.
verl computes its logits in float32 whatever the input dtype, so float64 inputs agree to float32
rounding (ours keep float64)."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peers  # noqa: E402

import ppo_fast.integrations.verl as pf_verl  # noqa: E402
from ppo_fast.integrations.verl import head  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    verl_functional = peers.verl("utils.experimental.torch_functional")
    dense_common = peers.verl("models.transformers.dense_common")
    verl_kernel = peers.verl("utils.kernel.linear_cross_entropy")

VERL_FUSED_LINEAR = verl_functional.FusedLinearForPPO
FLOAT32_ROUNDING = dict(rtol=1e-5, atol=2e-5)


@pytest.fixture
def installed():
    pf_verl.install()
    yield
    pf_verl.uninstall()


def _inputs(shape, H=24, V=131, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    upstream = (torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                                  dtype=torch.float64))
    return hidden, weight, labels, upstream


def _values_and_grads(fn, hidden, weight, labels, upstream):
    logp, entropy = fn(hidden, weight, labels)
    hidden.grad = weight.grad = None
    (logp.double().reshape(upstream[0].shape) * upstream[0]
     + entropy.double().reshape(upstream[1].shape) * upstream[1]).sum().backward()
    return logp.detach().reshape(upstream[0].shape), entropy.detach().reshape(upstream[1].shape), \
        hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("shape", [(37,), (3, 11)], ids=["2-D", "3-D"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_linear_for_ppo_gives_verls_values_and_gradients(shape, temperature):
    hidden, weight, labels, upstream = _inputs(shape)
    ours = _values_and_grads(lambda h, w, y: head.FusedLinearForPPO()(h, w, y, temperature), hidden, weight, labels,
                             upstream)
    theirs = _values_and_grads(lambda h, w, y: VERL_FUSED_LINEAR(chunk_size=16)(h, w, y, temperature), hidden, weight,
                               labels, upstream)
    for got, expected in zip(ours, theirs):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected.to(got.dtype), **FLOAT32_ROUNDING)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_has_verls_signature_shapes_and_reductions(reduction):
    hidden, weight, labels, _ = _inputs((3, 11))
    logp, entropy = head.linear_cross_entropy(hidden, weight, labels, 0.7, reduction)
    verl_logp, verl_entropy = VERL_FUSED_LINEAR()(hidden, weight, labels, 0.7)
    expected = {"none": verl_logp.reshape(-1), "sum": verl_logp.sum(), "mean": verl_logp.mean()}[reduction]
    assert logp.shape == expected.shape and entropy.shape == (33,)
    torch.testing.assert_close(logp, expected.double(), **FLOAT32_ROUNDING)
    torch.testing.assert_close(entropy, verl_entropy.reshape(-1).double(), **FLOAT32_ROUNDING)


def test_bad_arguments_are_named():
    hidden, weight, labels, _ = _inputs((5,))
    with pytest.raises(TypeError, match="temperature must be a float .* got int"):
        head.linear_cross_entropy(hidden, weight, labels, 1)
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'sum', 'mean', got 'max'"):
        head.linear_cross_entropy(hidden, weight, labels, 1.0, "max")
    with pytest.raises(ValueError, match="hidden_states must be 2D or 3D"):
        head.FusedLinearForPPO()(hidden[None, None], weight, labels[None, None])
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend: triton"):
        head.FusedLinearForPPO(impl_backend="triton")


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).double()


@pytest.mark.parametrize("backend", ["forward_with_torch_backend", "forward_with_triton_backend"])
def test_verls_model_forward_runs_our_head_after_install(backend, installed):
    """verl's Triton head cannot run on the CPU; its torch head (verl's code, the same math) is the
    reference for both forwards."""
    model = _llama()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    assert verl_functional.FusedLinearForPPO is head.FusedLinearForPPO
    assert verl_kernel.linear_cross_entropy is head.linear_cross_entropy

    def run(forward):
        model.zero_grad()
        out = forward(model, input_ids=ids, return_dict=True, temperature=0.9)
        (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
        return out.log_probs.detach().reshape(-1), out.entropy.detach().reshape(-1), \
            [p.grad.clone() for p in model.parameters()]

    ours = run(getattr(dense_common, backend))
    verl_functional.FusedLinearForPPO = VERL_FUSED_LINEAR
    try:
        theirs = run(dense_common.forward_with_torch_backend)
    finally:
        verl_functional.FusedLinearForPPO = head.FusedLinearForPPO
    torch.testing.assert_close(ours[0], theirs[0].double(), **FLOAT32_ROUNDING)
    torch.testing.assert_close(ours[1], theirs[1].double(), **FLOAT32_ROUNDING)
    for got, expected in zip(ours[2], theirs[2]):
        torch.testing.assert_close(got, expected, **FLOAT32_ROUNDING)
