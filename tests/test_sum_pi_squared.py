"""Σ_v softmax(z/τ)_v² per position, the by-product of the log-prob pass
(``token_logprobs(..., return_sum_pi_squared=True)``), on every backend.

Oracles: a plain per-row loop written here, the float64 spec (``ppo_fast.spec``), the direct
``softmax(z/τ)².sum(-1)``, and verl's own ``calculate_sum_pi_squared_from_logits`` (of the tempered
logits, as verl's actor calls it). The Triton kernel runs under the interpreter on this CPU
(conftest.py) and compiled with PPO_FAST_TEST_DEVICE=cuda.
"""

import math

import pytest
import torch

import ppo_fast as pf
from ppo_fast import spec as R

import peers
from helpers import random_labels, random_logits

F64 = torch.float64

# V not a multiple of any block size (the Triton blocks are powers of 2 up to 16 KiB of logits),
# V = 1, and a GPT-2 vocabulary spanning many blocks.
SHAPES = [(1, 7), (4, 1), (9, 97), (2, 50257)]


def _loop_oracle(logits, labels, temperature, ignore_index=-100):
    """Σ p² row by row in float64 with Python floats: exp(2(s − max)) / (Σ exp(s − max))²."""
    rows = logits.double().reshape(-1, logits.shape[-1]).tolist()
    out = []
    for row, label in zip(rows, labels.reshape(-1).tolist()):
        if label == ignore_index:
            out.append(0.0)
            continue
        s = [z / temperature for z in row]
        m = max(s)
        d = sum(math.exp(v - m) for v in s)
        out.append(sum(math.exp(2 * (v - m)) for v in s) / (d * d))
    return torch.tensor(out, dtype=F64).reshape(labels.shape)


def _direct(logits, labels, temperature):
    value = torch.softmax(logits.double() / temperature, dim=-1).square().sum(-1)
    return value.masked_fill(labels == -100, 0.0)


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_spec_matches_loop_direct_softmax_and_verl(temperature):
    logits = random_logits((6, 5, 83), F64, "cpu")
    labels = random_labels((6, 5), 83, "cpu", ignore_fraction=0.25)
    logp, ent, spi = R.token_logprobs(logits, labels, temperature=temperature, return_entropy=True,
                                      return_sum_pi_squared=True)
    torch.testing.assert_close(spi, _loop_oracle(logits, labels, temperature), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(spi, _direct(logits, labels, temperature), rtol=1e-13, atol=1e-15)
    verl = peers.verl("utils.torch_functional").calculate_sum_pi_squared_from_logits(logits / temperature)
    active = labels != -100
    torch.testing.assert_close(spi[active], verl[active], rtol=1e-12, atol=1e-12)
    assert (spi[~active] == 0).all()
    assert ((spi[active] >= 1 / 83 - 1e-15) & (spi[active] <= 1 + 1e-15)).all()
    # The flag adds an output and changes none of the others.
    lp_only, ent_only = R.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    assert torch.equal(lp_only, logp) and torch.equal(ent_only, ent)


def test_spec_return_order_and_no_gradient():
    logits = random_logits((3, 11), F64, "cpu").requires_grad_()
    labels = torch.tensor([1, -100, 10])
    logp, spi = R.token_logprobs(logits, labels, return_sum_pi_squared=True)
    assert torch.equal(logp, R.token_logprobs(logits, labels))
    assert spi.shape == (3,) and spi.dtype == F64 and not spi.requires_grad and spi[1] == 0
    out = R.token_logprobs(logits, labels, return_entropy=True, return_sum_pi_squared=True)
    assert len(out) == 3 and torch.equal(out[2], spi)


# --------------------------------------------------------------------------------------------
# Every backend against the spec
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_backends_float64_match_spec_and_loop(N, V, temperature, with_entropy, device, backend):
    logits = random_logits((N, V), F64, device)
    labels = random_labels((N,), V, device, ignore_fraction=0.25)
    out = pf.token_logprobs(logits, labels, temperature=temperature, return_entropy=with_entropy,
                            return_sum_pi_squared=True)
    assert len(out) == (3 if with_entropy else 2)
    spi = out[-1]
    assert spi.dtype == F64 and spi.shape == (N,)
    _, spec_spi = R.token_logprobs(logits, labels, temperature=temperature, return_sum_pi_squared=True)
    torch.testing.assert_close(spi, spec_spi, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(spi.cpu(), _loop_oracle(logits.cpu(), labels.cpu(), temperature),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(spi, _direct(logits, labels, temperature), rtol=1e-12, atol=1e-14)
    assert (spi[labels == -100] == 0).all()
    # The new output leaves logp and entropy bitwise as they were without it.
    before = pf.token_logprobs(logits, labels, temperature=temperature, return_entropy=with_entropy)
    for old, new in zip(before if with_entropy else (before,), out[:-1]):
        assert torch.equal(old, new)


@pytest.mark.parametrize("N,V", [(9, 97), (2, 50257)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_backends_match_verl_in_float64(N, V, temperature, device, backend):
    """verl's actor calls ``calculate_sum_pi_squared_from_logits`` on the tempered logits."""
    logits = random_logits((N, V), F64, device)
    labels = random_labels((N,), V, device, ignore_fraction=0.25)
    logp, spi = pf.token_logprobs(logits, labels, temperature=temperature, return_sum_pi_squared=True)
    verl = peers.verl("utils.torch_functional").calculate_sum_pi_squared_from_logits(logits / temperature)
    active = labels != -100
    torch.testing.assert_close(spi[active], verl[active], rtol=1e-12, atol=1e-12)
    assert (spi[~active] == 0).all()


def test_temperature_changes_the_result(device, backend):
    logits = random_logits((5, 97), F64, device)
    labels = torch.randint(0, 97, (5,), device=device)
    _, cold = pf.token_logprobs(logits, labels, temperature=0.5, return_sum_pi_squared=True)
    _, hot = pf.token_logprobs(logits, labels, temperature=2.0, return_sum_pi_squared=True)
    # A sharper distribution concentrates its mass: Σ p² rises as τ falls.
    assert (cold > hot).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,V", [(7, 97), (3, 50257)])
def test_low_precision_logits_accumulate_in_float32(dtype, N, V, device, backend):
    """bf16/fp16 logits are exact in float64, so the only error is the float32 accumulation."""
    logits = random_logits((N, V), dtype, device)
    labels = random_labels((N,), V, device, ignore_fraction=0.25)
    logp, ent, spi = pf.token_logprobs(logits, labels, temperature=0.8, return_entropy=True,
                                       return_sum_pi_squared=True)
    assert spi.dtype == torch.float32
    expected = _direct(logits, labels, 0.8)
    torch.testing.assert_close(spi.double(), expected, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(logp, pf.token_logprobs(logits, labels, temperature=0.8), rtol=0, atol=0)


def test_leading_shape_and_shifted_view(device, backend):
    base = random_logits((2, 6, 41), torch.float32, device)
    logits = base[:, :-1]  # [B, T, V] not contiguous over rows
    labels = random_labels((2, 5), 41, device, ignore_fraction=0.25)
    logp, spi = pf.token_logprobs(logits, labels, return_sum_pi_squared=True)
    assert spi.shape == (2, 5) and logp.shape == (2, 5)
    torch.testing.assert_close(spi.double(), _direct(logits, labels, 1.0), rtol=1e-5, atol=1e-7)


def test_empty_batch(device, backend):
    logp, ent, spi = pf.token_logprobs(torch.empty(0, 9, device=device),
                                       torch.empty(0, dtype=torch.long, device=device),
                                       return_entropy=True, return_sum_pi_squared=True)
    assert logp.shape == ent.shape == spi.shape == (0,)


# --------------------------------------------------------------------------------------------
# Ignored positions, extremes
# --------------------------------------------------------------------------------------------


def test_ignored_rows_are_zero_whatever_they_hold(device, backend):
    logits = random_logits((6, 37), F64, device)
    labels = torch.randint(0, 37, (6,), device=device)
    labels[[1, 4]] = -100
    clean = pf.token_logprobs(logits, labels, return_entropy=True, return_sum_pi_squared=True)
    poisoned = logits.clone()
    poisoned[1] = float("nan")
    poisoned[4, ::2] = float("inf")
    poisoned[4, 1::2] = float("-inf")
    dirty = pf.token_logprobs(poisoned, labels, return_entropy=True, return_sum_pi_squared=True)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    assert (dirty[2][[1, 4]] == 0).all() and (dirty[2][[0, 2, 3, 5]] > 0).all()


@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.float16, 6e4), (torch.bfloat16, 3e38),
                                       (F64, 1e308)])
def test_huge_logits_do_not_overflow(dtype, big, device, backend):
    """2·z overflows where verl's exp(logsumexp(2z) − 2·logsumexp(z)) would see it; the max-shifted
    sums here never hold more than V. Two tied maxima give exactly 1/2, one dominant gives 1."""
    V = 50
    logits = torch.zeros(3, V, dtype=dtype, device=device)
    logits[0, 3] = logits[0, 17] = big
    logits[0, 20:] = -big
    logits[1, 5] = big
    logits[1, 6] = -big
    logits[2] = (torch.linspace(-1, 1, V, dtype=F64) * big).to(dtype)
    labels = torch.tensor([0, 5, 1], device=device)
    # τ = 1 keeps s = z/τ itself in range; 2s is not. Entropy is asked for so that Σ p² is
    # checked in the kernel variant that also accumulates Σ p·s.
    _, _, spi = pf.token_logprobs(logits, labels, return_entropy=True, return_sum_pi_squared=True)
    assert torch.isfinite(spi).all()
    torch.testing.assert_close(spi.double().cpu(), torch.tensor([0.5, 1.0, 1.0], dtype=F64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("where", ["late", "early"])
def test_running_max_jump_across_blocks(dtype, where, device, backend):
    """The largest logit sits in a later block than the first (the running sums are rescaled by
    exp(2(m_old − m_new)), which underflows to 0 here) or in the first block."""
    V = 5000  # > one block for float32 (4096) and float64 (2048)
    logits = (torch.randn(3, V, dtype=F64, device=device) * 0.1).to(dtype)
    col = V - 10 if where == "late" else 3
    logits[:2, col] = 120.0
    logits[1, col + 1] = 119.0
    logits[2, col] = 3.0  # a moderate jump: the old sums still count, scaled by exp(2·Δm)
    labels = torch.tensor([col, 0, 1], device=device)
    _, spi = pf.token_logprobs(logits, labels, return_sum_pi_squared=True)
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == F64 else dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(spi.double(), _direct(logits, labels, 1.0), **tol)


def test_banned_tokens_contribute_nothing(device, backend):
    logits = random_logits((3, 23), F64, device)
    logits[:, ::3] = float("-inf")
    labels = torch.tensor([1, 2, 4], device=device)
    _, spi = pf.token_logprobs(logits, labels, return_sum_pi_squared=True)
    _, narrow = pf.token_logprobs(logits[:, 1:3].contiguous(), torch.tensor([0, 1, 0], device=device),
                                  return_sum_pi_squared=True)
    torch.testing.assert_close(spi, _direct(logits, labels, 1.0), rtol=1e-12, atol=1e-15)
    assert torch.isfinite(spi).all() and not torch.equal(spi, narrow)


# --------------------------------------------------------------------------------------------
# No gradient, batch invariance, registration
# --------------------------------------------------------------------------------------------


def test_output_is_non_differentiable_and_leaves_gradients_alone(device, backend):
    logits = random_logits((4, 3, 29), F64, device).requires_grad_()
    labels = random_labels((4, 3), 29, device, ignore_fraction=0.25)
    g_lp, g_ent = torch.randn(4, 3, dtype=F64, device=device), torch.randn(4, 3, dtype=F64, device=device)
    logp, ent, spi = pf.token_logprobs(logits, labels, return_entropy=True, return_sum_pi_squared=True)
    assert logp.requires_grad and not spi.requires_grad and spi.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(spi.sum(), logits)
    (grad,) = torch.autograd.grad((logp * g_lp + ent * g_ent + spi).sum(), logits)
    lp0, ent0 = pf.token_logprobs(logits, labels, return_entropy=True)
    (grad0,) = torch.autograd.grad((lp0 * g_lp + ent0 * g_ent).sum(), logits)
    assert torch.equal(grad, grad0)
    with torch.no_grad():
        _, spi_ng = pf.token_logprobs(logits, labels, return_sum_pi_squared=True)
    assert torch.equal(spi_ng, spi)


def test_batch_invariance_is_bitwise(device, force_backend):
    """A token's Σ p² is the same alone, in a batch, shuffled, padded or in a shifted view."""
    V = 50257
    logits = random_logits((3, 4, V), torch.bfloat16, device)
    labels = torch.randint(0, V, (3, 4), device=device)
    flat, flat_labels = logits.view(-1, V), labels.view(-1)
    perm = torch.randperm(12, device=device)
    kw = dict(return_entropy=True, return_sum_pi_squared=True)
    with force_backend("triton"):
        full = pf.token_logprobs(flat, flat_labels, **kw)
        alone = [pf.token_logprobs(flat[i:i + 1], flat_labels[i:i + 1], **kw) for i in range(12)]
        copied = pf.token_logprobs(flat[5:6].clone(), flat_labels[5:6].clone(), **kw)
        shuffled = pf.token_logprobs(flat[perm], flat_labels[perm], **kw)
        padded = pf.token_logprobs(torch.cat([flat, flat[:3]]),
                                   torch.cat([flat_labels, torch.full((3,), -100, device=device)]), **kw)
        shifted = pf.token_logprobs(logits[:, :-1], labels[:, :-1], **kw)
        without = pf.token_logprobs(flat, flat_labels, return_entropy=True)
    for k in range(3):
        assert torch.equal(torch.cat([a[k] for a in alone]), full[k])
        assert torch.equal(copied[k], full[k][5:6])
        assert torch.equal(shuffled[k], full[k][perm])
        assert torch.equal(padded[k][:12], full[k])
        assert torch.equal(shifted[k], full[k].view(3, 4)[:, :-1])
    assert torch.equal(without[0], full[0]) and torch.equal(without[1], full[1])


def test_opcheck_with_and_without_the_flag(device, backend):
    from ppo_fast.ops.token_logprobs import token_logprobs_op

    logits = random_logits((3, 5, 33), torch.float32, device).requires_grad_()
    labels = random_labels((3, 5), 33, device, ignore_fraction=0.25)
    for args in ((1.0, -100, True, False, True), (0.5, -100, False, False, True), (1.0, -100, True, False)):
        torch.library.opcheck(token_logprobs_op, (logits, labels, *args))
    out = token_logprobs_op(logits, labels, 1.0, -100, True, False)
    assert len(out) == 4 and out[3].shape == (0,)


def test_compiles_in_one_graph(force_backend):
    logits = random_logits((2, 3, 19), torch.float32, "cpu")
    labels = random_labels((2, 3), 19, "cpu", ignore_fraction=0.25)

    def call():
        return pf.token_logprobs(logits, labels, temperature=0.9, return_sum_pi_squared=True)

    with force_backend("reference"):
        compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
        for a, b in zip(compiled(), call()):
            torch.testing.assert_close(a, b)


def test_launcher_writes_every_element_and_nan_for_out_of_range_labels(device):
    """Outputs poisoned with NaN come back written; a label outside [0, V) that is not ignored
    (the host check is skipped under torch.compile) gives NaN, like lse, not a stray read."""
    import triton.language as tl

    from ppo_fast.kernels import logprobs as lp_k

    N, V = 9, 1031
    logits = random_logits((N, V), F64, device)
    labels = random_labels((N,), V, device, ignore_fraction=0.3)
    labels[0], labels[8] = V + 5, 4
    poison = lambda: torch.full((N,), float("nan"), dtype=F64, device=device)  # noqa: E731
    logp, ent, lse, spi = poison(), poison(), poison(), poison()
    lp_k.logprobs_fwd(logits, lp_k.row_layout(logits)[1], labels, logp, ent, lse,
                      torch.tensor([1.0], dtype=F64, device=device), -100, False, tl.float64, spi)
    assert torch.isnan(spi[0]) and torch.isnan(lse[0])
    ok = labels != V + 5
    torch.testing.assert_close(spi[ok], _direct(logits[ok], labels[ok], 1.0), rtol=1e-12, atol=1e-15)
