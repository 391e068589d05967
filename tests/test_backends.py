"""Every backend of every op against the spec (``ppo_fast.spec``, called directly), on fresh
random inputs.

``backend`` runs each test on the reference backend (PyTorch, with its hand-written gradients)
and on the Triton kernels: under TRITON_INTERPRET=1 on this CPU (set in conftest.py), compiled
for real with PPO_FAST_TEST_DEVICE=cuda. Exactness is checked in float64; low precision against
an error budget of 2x eager PyTorch in that dtype, both measured against float64.
"""

import math
import os

import pytest
import torch

import ppo_fast as pf
from ppo_fast import spec as R
from ppo_fast.arguments import MIN_TEMPERATURE

from helpers import assert_loss_matches_spec, max_err, random_labels, random_logits

F64 = torch.float64

LOGPROB_SHAPES = [
    (1, 7),
    (5, 1000),
    (17, 97),
    (3, 50257),
    (2, 151936),
]


def _spec_logprobs_and_grad(logits, labels, g_logp, g_ent, **kw):
    x = logits.detach().requires_grad_()
    logp, ent = R.token_logprobs(x, labels, return_entropy=True, **kw)
    (grad,) = torch.autograd.grad((logp * g_logp + ent * g_ent).sum(), x)
    return logp, ent, grad


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,V", LOGPROB_SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_float64_forward_and_backward(N, V, temperature, device, backend):
    logits = random_logits((N, V), F64, device).requires_grad_()
    labels = random_labels((N,), V, device)
    g_logp, g_ent = torch.randn(N, dtype=F64, device=device), torch.randn(N, dtype=F64, device=device)
    logp, ent = pf.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    (grad,) = torch.autograd.grad((logp * g_logp + ent * g_ent).sum(), logits)
    lp_r, ent_r, grad_r = _spec_logprobs_and_grad(logits, labels, g_logp, g_ent,
                                                  temperature=temperature)
    assert logp.dtype == F64 and logp.shape == (N,)
    torch.testing.assert_close(logp, lp_r, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ent, ent_r, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad, grad_r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,V", [(6, 1000), (2, 151936)])
def test_token_logprobs_low_precision_within_twice_eager_error(dtype, N, V, device, backend):
    logits = random_logits((N, V), dtype, device, scale=2.0).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    upstream = torch.randn(N, device=device)
    exact = logits.detach().double().requires_grad_()
    lp_exact = R.token_logprobs(exact, labels)
    (g_exact,) = torch.autograd.grad((lp_exact * upstream.double()).sum(), exact)

    eager_in = logits.detach().requires_grad_()
    lp_eager = torch.log_softmax(eager_in, -1).gather(-1, labels[:, None]).squeeze(-1)
    (g_eager,) = torch.autograd.grad((lp_eager * upstream.to(dtype)).sum(), eager_in)

    lp = pf.token_logprobs(logits, labels)
    (g,) = torch.autograd.grad((lp * upstream).sum(), logits)
    assert lp.dtype == torch.float32 and g.dtype == dtype
    # The floor covers float32 eager, which can be as exact as ours on short rows.
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert max_err(lp, lp_exact) <= 2 * max_err(lp_eager, lp_exact) + floor
    assert max_err(g, g_exact) <= 2 * max_err(g_eager, g_exact) + floor


def test_token_logprobs_leading_shape_and_non_contiguous(device, backend):
    base = random_logits((3, 40, 2 * 333), torch.float32, device)
    logits = base[:, 1:30, ::2].detach().requires_grad_()  # strided columns, shifted rows
    labels = random_labels((3, 29), 333, device)
    lp = pf.token_logprobs(logits, labels)
    (g,) = torch.autograd.grad(lp.sum() * 1.5, logits)
    x = logits.detach().double().requires_grad_()
    lp_r = R.token_logprobs(x, labels)
    (g_r,) = torch.autograd.grad(lp_r.sum() * 1.5, x)
    assert lp.shape == (3, 29)
    torch.testing.assert_close(lp.double(), lp_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), g_r, rtol=1e-5, atol=1e-6)


def test_token_logprobs_extreme_rows(device, backend):
    """All-negative rows, −inf (banned) tokens, and a huge logit."""
    V = 1000
    logits = random_logits((4, V), F64, device) - 1e4
    logits[1, :500] = float("-inf")
    logits[2, 7] = 1e4
    logits.requires_grad_()
    labels = torch.tensor([3, 600, 7, 999], device=device)
    g_logp, g_ent = torch.randn(4, dtype=F64, device=device), torch.randn(4, dtype=F64, device=device)
    lp, ent = pf.token_logprobs(logits, labels, return_entropy=True)
    (grad,) = torch.autograd.grad((lp * g_logp + ent * g_ent).sum(), logits)
    lp_r, ent_r, grad_r = _spec_logprobs_and_grad(logits, labels, g_logp, g_ent)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(lp, lp_r, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ent, ent_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, grad_r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("offset", [0.0, 1000.0, 5000.0])
def test_the_entropy_keeps_its_digits_when_the_logits_are_large(offset, device, backend):
    """float32 logits far from 0 (an offset, a low temperature): the entropy is a small number
    beside them, and every kernel keeps its sums relative to the row's maximum, so it stays within
    a few float32 ulps of (1 + H) of the float64 spec on the same rounded logits (Σ p·s subtracted
    from the log-sum-exp would lose the digits: 1e-3 off at an offset of 5000). The same for the
    PPO loss's entropy metric, and for the fused head, whose logits are exact here (small
    integers)."""
    torch.manual_seed(0)
    V, temperature = 3001, 0.5

    def assert_within_ulps(entropy, expected):
        bound = 8 * torch.finfo(torch.float32).eps * (1 + expected)
        assert ((entropy.double() - expected).abs() / bound).max() <= 1

    logits = (random_logits((4, V), F64, device, scale=2.0) + offset).float()
    labels = random_labels((4,), V, device, ignore_fraction=0.0)
    expected = R.token_logprobs(logits.double(), labels, temperature=temperature, return_entropy=True)[1]
    assert_within_ulps(pf.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)[1], expected)
    mask = torch.ones(4, dtype=torch.bool, device=device)
    zeros = torch.zeros(4, device=device)
    _, metrics = pf.ppo_loss(logits, labels, zeros, zeros, mask, temperature=temperature, entropy_coef=0.01)
    assert_within_ulps(metrics["entropy"], expected.mean())

    hidden = torch.randint(-1, 2, (4, 4), device=device).float()
    weight = torch.randint(-1, 2, (V, 4), device=device).float()
    bias = torch.randint(-2, 3, (V,), device=device).float() + offset
    exact = hidden.double() @ weight.double().T + bias.double()
    expected = R.token_logprobs(exact, labels, temperature=temperature, return_entropy=True)[1]
    assert_within_ulps(pf.fused_linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                                      return_entropy=True)[1], expected)


def test_a_banned_label_has_log_prob_minus_infinity_and_a_finite_gradient(device, backend):
    logits = random_logits((3, 50), F64, device)
    logits[1, 7] = float("-inf")
    logits[2, :10] = float("-inf")
    logits.requires_grad_()
    labels = torch.tensor([3, 7, 20], device=device)
    g_logp, g_ent = torch.randn(3, dtype=F64, device=device), torch.randn(3, dtype=F64, device=device)
    lp, ent = pf.token_logprobs(logits, labels, return_entropy=True)
    (grad,) = torch.autograd.grad((lp * g_logp + ent * g_ent).sum(), logits)
    lp_r, ent_r, grad_r = _spec_logprobs_and_grad(logits, labels, g_logp, g_ent)
    assert lp[1] == float("-inf") and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(lp, lp_r, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ent, ent_r, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad, grad_r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_a_temperature_whose_inverse_overflows_float32_is_refused(dtype, device, backend):
    logits = random_logits((3, 50), dtype, device)
    labels = torch.tensor([3, 7, -100], device=device)
    refused = r"temperature must be >= 2.939e-39 \(1 / the float32 maximum.*got 1e-45"
    with pytest.raises(ValueError, match=refused):
        pf.token_logprobs(logits, labels, temperature=1e-45)
    with pytest.raises(ValueError, match=refused):
        pf.ppo_loss(logits, labels, torch.zeros(3, device=device), torch.ones(3, device=device),
                    torch.ones(3, device=device), temperature=1e-45)
    # At the bound itself 1/temperature is finite: zero logits give the uniform distribution.
    uniform = pf.token_logprobs(torch.zeros_like(logits), labels, temperature=MIN_TEMPERATURE)
    torch.testing.assert_close(uniform[:2], torch.full((2,), -math.log(50), dtype=uniform.dtype, device=device))


@pytest.mark.parametrize("case", ["at_another_token", "at_the_label", "finite_over_tiny_temperature"])
def test_scaled_logits_reaching_plus_infinity_are_an_error_not_nan(case, device, backend):
    """Softmax puts all the mass on the +inf entries there, which no backend computes; every backend
    (and the spec) says which position, instead of returning NaN. An ignored row may hold +inf."""
    logits = random_logits((4, 50), torch.float32, device)
    labels = torch.tensor([3, 7, -100, 20], device=device)
    logits[2] = float("inf")
    temperature = 1.0
    if case == "at_another_token":
        logits[1, 0] = float("inf")
        cause = r"1 of its logits are \+inf"
    elif case == "at_the_label":
        logits[1, 7] = logits[1, 9] = float("inf")
        cause = r"2 of its logits are \+inf"
    else:
        logits[1, 4], temperature = 1e30, 1e-10
        cause = "its largest logit, 1e\\+30, times 1/temperature = 1e\\+10 overflows"
    message = rf"logits at position \(1,\) give \+inf once divided by temperature={temperature} \({cause}\)"
    with pytest.raises(ValueError, match=message):
        pf.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    with pytest.raises(ValueError, match=message):
        R.token_logprobs(logits, labels, temperature=temperature)
    # The actor loss, on its fused per-token path and on its log-prob path (importance weights);
    # the masked row holds +inf and a label out of the mask.
    mask = (labels != -100)[None]
    ppo_args = (labels.clamp(min=0)[None], torch.full((1, 4), -3.0, device=device), torch.ones(1, 4, device=device),
                mask)
    for extra in ({}, {"rollout_is_weights": torch.ones(1, 4, device=device)}):
        with pytest.raises(ValueError, match=message.replace(r"\(1,\)", r"\(0, 1\)")):
            pf.ppo_loss(logits[None], *ppo_args, temperature=temperature, **extra)
    logits[1] = 0.0
    logp = pf.token_logprobs(logits, labels, temperature=temperature)
    assert torch.isfinite(logp).all() and logp[2] == 0
    for extra in ({}, {"rollout_is_weights": torch.ones(1, 4, device=device)}):
        assert torch.isfinite(pf.ppo_loss(logits[None], *ppo_args, temperature=temperature, **extra)[0])


def test_ignored_rows_have_zero_output_and_gradient(device, backend):
    logits = random_logits((4, 300), torch.float32, device).requires_grad_()
    labels = torch.tensor([-100, 5, -100, 7], device=device)
    lp, ent = pf.token_logprobs(logits, labels, return_entropy=True)
    (g,) = torch.autograd.grad((lp + ent).sum(), logits)
    assert (lp[[0, 2]] == 0).all() and (ent[[0, 2]] == 0).all()
    assert (g[[0, 2]] == 0).all() and (g[[1, 3]] != 0).any()


def test_shifted_logits_are_read_in_place_without_a_copy(device, force_backend):
    """``logits[:, :-1]`` (the usual next-token shift) is addressed directly, forward, backward
    and in-place backward."""
    from ppo_fast.kernels.logprobs import row_layout

    full = random_logits((3, 12, 401), torch.bfloat16, device)
    shifted = full[:, :-1]
    addressed, layout = row_layout(shifted)
    assert addressed.data_ptr() == shifted.data_ptr() and layout == (11, 12 * 401, 401)
    labels = random_labels((3, 11), 401, device)
    upstream = torch.randn(3, 11, device=device)
    exact = shifted.detach().double().requires_grad_()
    (g_exact,) = torch.autograd.grad((R.token_logprobs(exact, labels) * upstream).sum(), exact)
    with force_backend("triton"):
        x = full.clone().requires_grad_()
        lp = pf.token_logprobs(x[:, :-1], labels)
        (g,) = torch.autograd.grad((lp * upstream).sum(), x)
        y = full.clone().requires_grad_()
        lp_inplace = pf.token_logprobs((y * 1)[:, :-1], labels, inplace_backward=True)
        (g_inplace,) = torch.autograd.grad((lp_inplace * upstream).sum(), y)
    torch.testing.assert_close(lp, R.token_logprobs(shifted.double(), labels).float(), rtol=1e-5, atol=1e-5)
    assert (g[:, -1] == 0).all()
    torch.testing.assert_close(g[:, :-1].double(), g_exact, rtol=8e-3, atol=1e-5)  # bf16 rounding
    torch.testing.assert_close(g_inplace, g, rtol=0, atol=0)


def test_inplace_backward_writes_gradient_into_logits(device, force_backend):
    source = random_logits((5, 777), torch.bfloat16, device)
    labels = random_labels((5,), 777, device)
    upstream = torch.randn(5, device=device)
    with force_backend("triton"):
        x = source.clone().requires_grad_()
        (expected,) = torch.autograd.grad((pf.token_logprobs(x, labels) * upstream).sum(), x)
        y = source.clone().requires_grad_()
        logits = y * 1  # a non-leaf, as a model's logits
        lp = pf.token_logprobs(logits, labels, inplace_backward=True)
        (got,) = torch.autograd.grad((lp * upstream).sum(), y)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(logits, got), "the gradient was not written into the logits buffer"


def test_inplace_backward_on_expanded_logits_gets_a_fresh_buffer(device, backend):
    """Rows that share memory (a stride-0 view): a gradient written over one row would be read
    back as another, so the backward writes a buffer of its own."""
    row = random_logits((1, 4, 97), torch.float32, device)
    labels = random_labels((3, 4), 97, device)
    grads = []
    for inplace in (False, True):
        leaf = row.clone().requires_grad_()
        logits = (leaf * 1.0).expand(3, 4, 97)
        pf.token_logprobs(logits, labels, inplace_backward=inplace).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_inplace_backward_on_logits_that_need_a_copy_falls_back(device, force_backend):
    """Logits the kernels cannot address directly are copied, so the gradient cannot go into them."""
    base = random_logits((2, 3, 6, 41), torch.float32, device)
    logits = base[:, :, :5].detach().requires_grad_()
    labels = random_labels((2, 3, 5), 41, device)
    (expected,) = torch.autograd.grad(R.token_logprobs(logits, labels).sum(), logits)
    with force_backend("triton"):
        (got,) = torch.autograd.grad(pf.token_logprobs(logits, labels, inplace_backward=True).sum(), logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_batch_invariance_is_bitwise(device, force_backend):
    """A token's log-prob and entropy do not depend on what else is in the batch or where it
    sits: alone, in a batch, shuffled, padded, or in a shifted [B, T, V] view."""
    V = 50257
    logits = random_logits((3, 4, V), torch.bfloat16, device)
    labels = torch.randint(0, V, (3, 4), device=device)
    flat, flat_labels = logits.view(-1, V), labels.view(-1)
    perm = torch.randperm(12, device=device)
    with force_backend("triton"):
        full = pf.token_logprobs(flat, flat_labels, return_entropy=True)
        alone = [pf.token_logprobs(flat[i:i + 1], flat_labels[i:i + 1], return_entropy=True)
                 for i in range(12)]
        shuffled = pf.token_logprobs(flat[perm], flat_labels[perm], return_entropy=True)
        padded = pf.token_logprobs(torch.cat([flat, flat[:3]]),
                                   torch.cat([flat_labels, torch.full((3,), -100, device=device)]),
                                   return_entropy=True)
        shifted = pf.token_logprobs(logits[:, :-1], labels[:, :-1], return_entropy=True)
    for k in range(2):
        assert torch.equal(torch.cat([a[k] for a in alone]), full[k])
        assert torch.equal(shuffled[k], full[k][perm])
        assert torch.equal(padded[k][:12], full[k])
        assert torch.equal(shifted[k], full[k].view(3, 4)[:, :-1])


# --------------------------------------------------------------------------------------------
# The actor loss
# --------------------------------------------------------------------------------------------


def _ppo_inputs(B, T, V, dtype, device):
    logits = random_logits((B, T, V), dtype, device, scale=2.0).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=device)
    labels[0, -1] = -100
    with torch.no_grad():
        lp = R.token_logprobs(logits.double(), labels)
    old = lp + 0.5 * torch.randn(B, T, dtype=F64, device=device)
    ref = lp + 0.5 * torch.randn(B, T, dtype=F64, device=device)
    ref[0, 0] = lp[0, 0] - 30  # beyond the ±20 log-ratio clamp
    rollout = old + 0.3 * torch.randn(B, T, dtype=F64, device=device)
    adv = torch.randn(B, T, dtype=F64, device=device)
    mask = torch.rand(B, T, device=device) > 0.25
    mask[-1] = False  # one sequence with no tokens at all
    return logits, labels, old, adv, mask, ref, rollout


PPO_OPTIONS = [
    dict(),
    dict(kl_coef=0.1, kl_estimator="k1"),
    dict(kl_coef=0.1, kl_estimator="abs", entropy_coef=0.02),
    dict(kl_coef=0.2, kl_estimator="k2", dual_clip=3.0),
    dict(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01, clip_high=0.28, dual_clip=2.0),
    dict(kl_coef=0.1, kl_estimator="k1+", tis=True, tis_cap=1.5),
    dict(kl_coef=0.1, kl_estimator="low_var_kl", entropy_coef=0.01, temperature=0.7),
    dict(kl_coef=0.1, kl_estimator="k3+", entropy_coef=0.03, dual_clip=3.0, tis=True),
    dict(kl_coef=0.0, kl_estimator="k3"),
]


@pytest.mark.parametrize("options", PPO_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("agg", R.AGG_MODES)
def test_ppo_loss_matches_spec_float64(options, agg, device, backend):
    options = dict(options)
    B, T, V = 3, 7, 389
    logits, labels, old, adv, mask, ref, rollout = _ppo_inputs(B, T, V, F64, device)
    use_tis = options.pop("tis", False)
    kw = dict(options, agg=agg, ref_logp=ref if "kl_coef" in options else None,
              rollout_logp=rollout if use_tis else None)
    assert_loss_matches_spec(pf.ppo_loss, R.ppo_loss, logits, labels, old, adv, mask, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ppo_loss_low_precision_within_twice_eager_error(dtype, device, backend):
    """Loss and gradient against float64, within twice the error of the eager composite (the
    spec run on the same low-precision logits with its log-softmax in that dtype)."""
    logits, labels, old, adv, mask, ref, _ = _ppo_inputs(4, 9, 1000, dtype, device)
    kw = dict(kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0)
    upstream = 1.7

    x = logits.detach().double().requires_grad_()
    exact_loss, _ = R.ppo_loss(x, labels, old, adv, mask, ref_logp=ref, **kw)
    (exact_grad,) = torch.autograd.grad(exact_loss * upstream, x)

    x = logits.detach().requires_grad_()
    log_probs = torch.log_softmax(x, -1)  # in the logits' own dtype
    ignored = labels == -100
    logp = log_probs.gather(-1, labels.masked_fill(ignored, 0)[..., None])[..., 0].float()
    entropy = -(log_probs.exp() * log_probs).sum(-1).float()
    opts = R.LossOptions(**kw)
    terms = R.ppo_token_terms(logp.masked_fill(ignored, 0), old.float(), adv.float(), opts,
                              entropy=entropy.masked_fill(ignored, 0), ref_logp=ref.float())
    eager_loss, _ = R.reduce(terms, mask & ~ignored, opts)
    (eager_grad,) = torch.autograd.grad(eager_loss * upstream, x)

    loss, _ = pf.ppo_loss(logits, labels, old.float(), adv.float(), mask, ref_logp=ref.float(), **kw)
    (grad,) = torch.autograd.grad(loss * upstream, logits)
    assert grad.dtype == dtype
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert max_err(loss, exact_loss) <= 2 * max_err(eager_loss, exact_loss) + floor
    assert max_err(grad, exact_grad) <= 2 * max_err(eager_grad, exact_grad) + floor


def test_ppo_loss_all_masked_is_zero_not_nan(device, backend):
    logits, labels, old, adv, mask, ref, _ = _ppo_inputs(2, 5, 100, torch.float32, device)
    loss, metrics = pf.ppo_loss(logits, labels, old.float(), adv.float(), torch.zeros_like(mask),
                                ref_logp=ref.float(), kl_coef=0.1, entropy_coef=0.1)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0 and (grad == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_ppo_loss_inplace_backward(device, force_backend):
    logits, labels, old, adv, mask, ref, _ = _ppo_inputs(2, 6, 500, torch.bfloat16, device)
    kw = dict(ref_logp=ref.float(), kl_coef=0.1, entropy_coef=0.01)
    with force_backend("triton"):
        (expected,) = torch.autograd.grad(
            pf.ppo_loss(logits, labels, old.float(), adv.float(), mask, **kw)[0], logits)
        x = logits.detach().clone().requires_grad_()
        loss, _ = pf.ppo_loss(x * 1, labels, old.float(), adv.float(), mask, inplace_backward=True, **kw)
        (got,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (4, 1000), (2, 2500)])
@pytest.mark.parametrize("mask_kind", ["ones", "random", "left_and_right_padding"])
def test_gae_matches_the_loop(B, T, mask_kind, device, backend):
    rewards = torch.randn(B, T, dtype=F64, device=device)
    values = torch.randn(B, T, dtype=F64, device=device)
    if mask_kind == "ones":
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
    elif mask_kind == "random":
        mask = torch.rand(B, T, device=device) > 0.4
        mask[0] = False
    else:
        idx = torch.arange(T, device=device)
        mask = (idx >= T // 4) & (idx < T - T // 5)
        mask = mask.expand(B, T)
    adv, ret = pf.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=False)
    adv_r, ret_r = R.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, adv_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ret_r, rtol=1e-10, atol=1e-10)


def test_gae_with_no_time_steps(device, backend):
    empty = torch.empty(3, 0, device=device)
    adv, ret = pf.gae(empty, empty, whiten=False)
    assert adv.shape == ret.shape == (3, 0)


def test_gae_float32_and_bfloat16_inputs(device, backend):
    rewards = torch.randn(3, 300, device=device).to(torch.bfloat16)
    values = torch.randn(3, 300, device=device)
    mask = torch.rand(3, 300, device=device) > 0.1
    adv, ret = pf.gae(rewards, values, mask, gamma=1.0, lam=0.95, whiten=False)
    adv_r, _ = R.gae(rewards.double(), values.double(), mask, gamma=1.0, lam=0.95)
    assert adv.dtype == torch.float32
    assert (adv.double() - adv_r).abs().max() < 1e-4 * adv_r.abs().max()


def test_gae_packed_varlen(device, backend):
    lengths = [0, 1, 17, 1030, 3, 0, 64]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device, dtype=torch.int32)
    total = sum(lengths)
    rewards = torch.randn(total, dtype=F64, device=device)
    values = torch.randn(total, dtype=F64, device=device)
    mask = torch.rand(total, device=device) > 0.3
    adv, ret = pf.gae(rewards, values, mask, gamma=0.97, lam=0.9, cu_seqlens=cu, whiten=False)
    adv_r, ret_r = R.gae_packed(rewards, values, mask, cu, gamma=0.97, lam=0.9)
    torch.testing.assert_close(adv, adv_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ret_r, rtol=1e-10, atol=1e-10)


def test_gae_whitens_by_default_as_the_gae_estimator(device, backend):
    rewards, values = torch.randn(4, 9, dtype=F64, device=device), torch.randn(4, 9, dtype=F64, device=device)
    mask = torch.rand(4, 9, device=device) > 0.3
    adv, ret = pf.gae(rewards, values, mask, gamma=0.99, lam=0.9)
    estimated = pf.advantages("gae", rewards, values, mask, gamma=0.99, lam=0.9)
    torch.testing.assert_close(adv, estimated.advantages, rtol=0, atol=0)
    torch.testing.assert_close(ret, estimated.returns, rtol=0, atol=0)
    raw, _ = R.gae(rewards, values, mask, gamma=0.99, lam=0.9)
    torch.testing.assert_close(adv, R.masked_whiten(raw, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_gae_gradients_match_the_spec(device, backend, packed, whiten):
    """GAE is linear in rewards and values: its backward against the spec's autograd, with
    gradients on both outputs, masked tokens inside the sequences and NaN where masked."""
    B, T = 3, 11
    mask = torch.rand(B, T, device=device) > 0.3
    mask[1, :4] = False
    rewards = torch.randn(B, T, dtype=F64, device=device).masked_fill(~mask, float("nan")).requires_grad_()
    values = torch.randn(B, T, dtype=F64, device=device).masked_fill(~mask, float("nan")).requires_grad_()
    w_adv, w_ret = torch.randn(B, T, dtype=F64, device=device), torch.randn(B, T, dtype=F64, device=device)

    def loss(adv, ret):
        return torch.where(mask, adv * w_adv + ret * w_ret, 0.0).sum()

    if packed:
        cu = torch.arange(B + 1, device=device) * T
        adv, ret = pf.gae(rewards.reshape(-1), values.reshape(-1), mask.reshape(-1), gamma=0.97, lam=0.9,
                          cu_seqlens=cu, whiten=whiten)
        adv, ret = adv.view(B, T), ret.view(B, T)
    else:
        adv, ret = pf.gae(rewards, values, mask, gamma=0.97, lam=0.9, whiten=whiten)
    got = torch.autograd.grad(loss(adv, ret), (rewards, values))
    clean_r = torch.where(mask, rewards, 0.0)
    clean_v = torch.where(mask, values, 0.0)
    adv_r, ret_r = R.gae(clean_r, clean_v, mask, gamma=0.97, lam=0.9)
    if whiten:
        adv_r = R.masked_whiten(adv_r, mask)
    want = torch.autograd.grad(loss(adv_r, ret_r), (rewards, values))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Registration, and every output element written
# --------------------------------------------------------------------------------------------


def test_ops_pass_torch_library_opcheck(device, backend):
    from ppo_fast.ops.gae import gae_op
    from ppo_fast.ops.ppo_loss import ppo_loss_tokens_op
    from ppo_fast.ops.token_logprobs import token_logprobs_op

    logits = random_logits((3, 5, 33), torch.float32, device).requires_grad_()
    labels = random_labels((3, 5), 33, device)
    torch.library.opcheck(token_logprobs_op, (logits, labels, 1.0, -100, True, False))
    old, adv = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    torch.library.opcheck(
        ppo_loss_tokens_op,
        (logits, labels, old, adv, old + 0.1, None, [1.0, 0.2, 0.3, 3.0, 2.0, 0.1, 0.01], -100, "k3", False),
    )
    r, v = torch.randn(20, device=device), torch.randn(20, device=device)
    cu = torch.tensor([0, 7, 20], device=device)
    torch.library.opcheck(gae_op, (r, v, torch.ones(20, device=device), cu, 0.99, 0.95))


def test_the_loss_coefficients_are_packed_in_the_order_the_kernels_read_them():
    from ppo_fast.kernels.ppo_loss import SCALARS
    from ppo_fast.ops.ppo_loss import LossCoefficients

    assert LossCoefficients._fields == SCALARS


def test_launchers_write_every_output_element(device):
    """Outputs poisoned with NaN before each launch must come back fully written and right."""
    import triton.language as tl

    from ppo_fast.kernels import gae as gae_k
    from ppo_fast.kernels import logprobs as lp_k
    from ppo_fast.kernels import ppo_loss as ppo_k

    N, V = 13, 1031
    logits = random_logits((N, V), F64, device)
    labels = random_labels((N,), V, device, ignore_fraction=0.3)
    layout = lp_k.row_layout(logits)[1]
    poison = lambda *shape, dtype=F64: torch.full(shape, float("nan"), dtype=dtype, device=device)  # noqa: E731
    inv_temp = torch.tensor([1.0], dtype=F64, device=device)
    logp, ent, lse = poison(N), poison(N), poison(N)
    lp_k.logprobs_fwd(logits, layout, labels, logp, ent, lse, inv_temp, -100, True, tl.float64)
    logp_r, ent_r = R.token_logprobs(logits, labels, return_entropy=True)
    torch.testing.assert_close(logp, logp_r)
    torch.testing.assert_close(ent, ent_r)

    dlogits = poison(N, V)
    lp_k.logprobs_bwd(logits, layout, dlogits, lp_k.row_layout(dlogits)[1], labels, lse, ent,
                      torch.randn(N, dtype=F64, device=device), torch.randn(N, dtype=F64, device=device),
                      inv_temp, -100, tl.float64)
    assert not dlogits.isnan().any()

    outputs = {name: poison(N) for name in ("token_loss", "dloss_dlogp", "logp", "entropy", "lse",
                                            "pg", "kl", "log_ratio")}
    outputs["flags"] = torch.full((N,), 99, dtype=torch.int8, device=device)
    scalars = torch.tensor([1.0, 0.2, 0.2, 3.0, 2.0, 0.1, 0.01], dtype=F64, device=device)
    old, adv = logp_r + 0.1, torch.randn(N, dtype=F64, device=device)
    ppo_k.ppo_fwd(logits, layout, labels, old, adv, old, old, outputs, scalars, ignore_index=-100,
                  has_dual_clip=True, kl_mode="k3", acc=tl.float64)
    assert all(not t.isnan().any() for t in outputs.values() if t.is_floating_point())
    assert ((outputs["flags"] >= 0) & (outputs["flags"] <= 3)).all()
    torch.testing.assert_close(outputs["logp"], logp_r)

    cu = torch.tensor([0, 0, 5, 1500, 1501], device=device)
    r, v = torch.randn(1501, dtype=F64, device=device), torch.randn(1501, dtype=F64, device=device)
    m = (torch.rand(1501, device=device) > 0.5).double()
    adv_out, ret_out = poison(1501), poison(1501)
    gae_k.gae(r, v, m, cu, adv_out, ret_out, torch.tensor([0.99, 0.99 * 0.95], dtype=F64, device=device),
              1495, tl.float64)
    adv_r, ret_r = R.gae_packed(r, v, m, cu, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv_out, adv_r)
    torch.testing.assert_close(ret_out, ret_r)


def test_out_of_range_label_gives_nan_not_a_wild_read(device):
    """Under torch.compile the host check of the label range is skipped; the kernel then returns
    NaN for such a row instead of reading outside it."""
    from ppo_fast.kernels import logprobs as lp_k
    import triton.language as tl

    logits = random_logits((3, 40), torch.float32, device)
    labels = torch.tensor([5, 40, -100], device=device)
    out = [torch.zeros(3, device=device) for _ in range(3)]
    lp_k.logprobs_fwd(logits, lp_k.row_layout(logits)[1], labels, *out,
                      torch.ones(1, device=device), -100, True, tl.float32)
    logp = out[0]
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and logp[2] == 0


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("PPO_FAST_TEST_DEVICE") != "cuda",
                    reason="needs a GPU: 2^21 rows, more than 2^31 logits elements")
def test_int64_offsets_past_two_billion_elements(device, force_backend):
    N, V = 1 << 21, 1100
    logits = torch.randn(N, V, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device=device)
    with force_backend("triton"):
        lp = pf.token_logprobs(logits, labels)
    tail = slice(N - 64, N)
    torch.testing.assert_close(lp[tail], R.token_logprobs(logits[tail].double(), labels[tail]).float(),
                               rtol=1e-5, atol=1e-5)
