"""``kl_estimator="full"``: the exact KL to the reference over the whole vocabulary, from the two
models' logits (``pf.ppo_loss(ref_logits=...)``) and from their hidden states and heads
(``pf.fused_linear_ppo_loss(ref_hidden=..., ref_weight=...)``), against the float64 spec, which is
itself held against ``torch.distributions``."""

import pytest
import torch

import ppo_fast as pf
from ppo_fast import spec
from ppo_fast.ops import full_kl as full_kl_module
from ppo_fast.ops import linear_logprobs

from helpers import gemm_flops, random_labels, random_logits

TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
             torch.bfloat16: dict(rtol=2e-5, atol=2e-6)}
"""Against the spec on the same (rounded) inputs in float64: every backend computes in float32 for
16-bit and float32 inputs."""


def _actor_batch(lead, dtype, device):
    mask = torch.rand(lead, device=device) > 0.25
    mask[..., 0] = True
    return dict(old_logp=torch.randn(lead, dtype=torch.float64, device=device).to(dtype) - 3,
                advantages=torch.randn(lead, dtype=torch.float64, device=device).to(dtype)), mask


def _poisoned(t, rows):
    """``t`` with NaN in the rows where ``rows`` is false: they must reach no output and no gradient."""
    return torch.where(rows.unsqueeze(-1), t, torch.full((), float("nan"), dtype=t.dtype, device=t.device))


def test_the_spec_is_the_kl_of_torch_distributions_with_banned_tokens_and_a_temperature():
    logits = random_logits((6, 41), torch.float64, "cpu")
    ref = random_logits((6, 41), torch.float64, "cpu")
    for banned in ([3, 7], [0]):
        logits[:, banned], ref[:, banned] = float("-inf"), float("-inf")
    logits[2, 11] = float("-inf")  # banned by the policy alone: no term, whatever the reference says
    for temperature in (1.0, 0.6):
        expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits / temperature),
                                                     torch.distributions.Categorical(logits=ref / temperature))
        torch.testing.assert_close(spec.full_kl(logits, ref, temperature), expected, rtol=1e-12, atol=1e-12)
    assert bool((spec.full_kl(logits, logits) == 0).all())
    # Its gradient is finite where a token is banned, and is the one of the same distributions with
    # −inf as −1e4 (e^{−1e4} is exactly 0 in float64).
    for z in (logits, torch.where(logits == float("-inf"), -1e4, logits)):
        x = z.clone().requires_grad_()
        spec.full_kl(x, ref, 0.6).sum().backward()
        if z is logits:
            banned_grad = x.grad
    assert bool(torch.isfinite(banned_grad).all())
    torch.testing.assert_close(banned_grad, x.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("loss_type", ["vanilla", "gspo"])
def test_ppo_loss_with_the_full_kl_matches_the_spec(backend, dtype, loss_type, device):
    """Loss, metrics and the logits' gradient; the vanilla case goes through the fused token op,
    gspo through the log-prob rows. Masked rows hold NaN in both models' logits."""
    lead, V = (3, 7), 45
    labels = random_labels(lead, V, device)
    data, mask = _actor_batch(lead, dtype, device)
    logits = _poisoned(random_logits((*lead, V), dtype, device), mask)
    ref_logits = _poisoned(random_logits((*lead, V), torch.float32, device), mask)
    options = dict(kl_estimator="full", kl_coef=0.3, entropy_coef=0.01, temperature=0.7, loss_type=loss_type)
    x = logits.detach().requires_grad_()
    loss, metrics = pf.ppo_loss(x, labels, data["old_logp"], data["advantages"], mask, ref_logits=ref_logits,
                                **options)
    (grad,) = torch.autograd.grad(loss * 2.5, x)
    x64 = logits.detach().double().requires_grad_()
    loss_r, metrics_r = spec.ppo_loss(x64, labels, data["old_logp"].double(), data["advantages"].double(), mask,
                                      ref_logits=ref_logits.double(), **options)
    (grad_r,) = torch.autograd.grad(loss_r * 2.5, x64)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(loss.double(), loss_r, **tolerance)
    grad_r = torch.where(mask.unsqueeze(-1), grad_r, 0.0)
    if dtype == torch.bfloat16:
        # Two bfloat16 gradients, the policy terms' and the full KL's, each rounded once, are summed
        # by autograd in bfloat16: three roundings, each within an ulp of what it rounds (half an ulp
        # for a correctly rounded value; one ulp is the budget of every bfloat16 gradient in these tests).
        x64 = logits.detach().double().requires_grad_()
        policy_loss, _ = spec.ppo_loss(x64, labels, data["old_logp"].double(), data["advantages"].double(), mask,
                                       ref_logits=ref_logits.double(), **{**options, "kl_coef": 0.0})
        (policy_grad,) = torch.autograd.grad(policy_loss * 2.5, x64)
        policy_grad = torch.where(mask.unsqueeze(-1), policy_grad, 0.0)
        rounded = policy_grad.abs() + (grad_r - policy_grad).abs() + grad_r.abs()
        bound = torch.finfo(dtype).eps * rounded + 1e-30
        excess = ((grad.double() - grad_r).abs() / bound).max().item()
        assert excess <= 1, f"{excess:.3f} of the bound"
    else:
        torch.testing.assert_close(grad.double(), grad_r, **tolerance)
    for name in ("kl", "kl_loss", "pg_loss", "entropy"):
        torch.testing.assert_close(metrics[name].double(), metrics_r[name], **tolerance, msg=name)
    assert metrics["kl"] > 0.1
    assert not torch.isnan(grad).any()


def _banned_as_floor(t):
    """−inf as −1e4, in float64: the same distribution (e^{−1e4} is exactly 0 there), and the spec's
    autograd stays finite where a token is banned."""
    return torch.where(t == float("-inf"), -1e4, t.double())


@pytest.mark.parametrize("dtype,ref_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.float64, torch.float64)])
def test_every_backends_full_kl_op_and_its_gradient_match_the_spec(backend, dtype, ref_dtype, device):
    """The op on logits read as a shifted view (``logits[:, :-1]``) with V not a multiple of any
    block, tokens both models ban, one only the policy bans, NaN in the ignored rows of both, a
    temperature, an upstream gradient that is not 1: the KL, both log-sum-exps and the gradient
    against the float64 spec."""
    B, T, V, temperature = 3, 5, 301, 0.7
    full = random_logits((B, T + 1, V), dtype, device)
    ref = random_logits((B, T, V), ref_dtype, device)
    labels = random_labels((B, T), V, device)
    labels[0, 0], labels[2, 1] = 3, -100
    ignored = (labels == -100).unsqueeze(-1)
    full[:, :-1, 4], ref[..., 4], full[0, 2, 9] = float("-inf"), float("-inf"), float("-inf")
    full[:, :-1] = torch.where(ignored, float("nan"), full[:, :-1])
    ref = torch.where(ignored, float("nan"), ref)
    leaf = full.clone().requires_grad_()
    kl, lse, ref_lse, _, _ = full_kl_module.full_kl_op(leaf[:, :-1], ref, labels, 1.0 / temperature, -100)
    upstream = torch.randn(B, T, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad((kl * upstream.to(kl.dtype)).sum(), leaf)

    z64 = torch.where(ignored, 0.0, _banned_as_floor(full[:, :-1])).requires_grad_()
    r64 = torch.where(ignored, 0.0, _banned_as_floor(ref))
    kl_r = torch.where(ignored.squeeze(-1), 0.0, spec.full_kl(z64, r64, temperature))
    (grad_r,) = torch.autograd.grad((kl_r * upstream).sum(), z64)
    tolerance = TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(kl.double(), kl_r, **tolerance)
    for got, rows in ((lse, z64), (ref_lse, r64)):
        expected = torch.where(ignored.squeeze(-1), 0.0, torch.logsumexp(rows.detach() / temperature, -1))
        torch.testing.assert_close(got.double(), expected, **tolerance)
    assert grad.dtype == dtype and not torch.isnan(grad).any()
    assert bool((grad[:, -1] == 0).all()), "the row outside the view got a gradient"
    grad = grad[:, :-1].double()
    if dtype == torch.float64:
        torch.testing.assert_close(grad, grad_r, **tolerance)
    else:
        # Error budget: float32 work on s − lse and s_ref − lse_ref (each within a few ulps of its
        # terms' sizes), through π_v = e^{s − lse} and log π_v − log ρ_v − KL, then one rounding
        # to the logits' dtype (half an ulp, one for the interpreter's cast; a subnormal's ulp is
        # fixed).
        with torch.no_grad():
            s64, s_ref64 = z64 / temperature, r64 / temperature
            lse64, ref_lse64 = torch.logsumexp(s64, -1, keepdim=True), torch.logsumexp(s_ref64, -1, keepdim=True)
            p = (s64 - lse64).exp()
            gap = (s64 - lse64) - (s_ref64 - ref_lse64) - kl_r.unsqueeze(-1)
            size, ref_size = s64.abs() + lse64.abs(), s_ref64.abs() + ref_lse64.abs()
            sizes = torch.where(p > 0, size * gap.abs() + size + ref_size + kl_r.abs().unsqueeze(-1), 0.0)
            work = 4 * torch.finfo(torch.float32).eps * p * sizes * (upstream.abs() / temperature).unsqueeze(-1)
        finfo = torch.finfo(dtype)
        bound = work + finfo.eps * torch.clamp(grad_r.abs(), min=finfo.tiny)
        excess = ((grad - grad_r).abs() / bound).max().item()
        assert excess <= 1, f"{excess:.3f} of the bound"
    assert kl[0, 0] > 0.1
    # The gradient written over the reference's logits (as the fused loss does) is the same.
    args = (full[:, :-1], ref, labels, kl.detach(), lse, ref_lse, upstream.to(kl.dtype), 1.0 / temperature, -100)
    fresh, aliased = torch.empty_like(ref), ref.clone()
    full_kl_module.full_kl_backward_op(fresh, *args)
    full_kl_module.full_kl_backward_op(aliased, full[:, :-1], aliased, *args[2:])
    assert torch.equal(aliased, fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_full_kl_ops_log_prob_and_entropy_and_the_one_backward_of_all_three_match_the_spec(backend, dtype,
                                                                                                device):
    """The op's log-prob of the label and entropy, and the gradient of a loss over the KL, the
    log-prob and the entropy at once (the PPO loss's), against the float64 spec: logits read as a
    shifted view, V not a multiple of any block, a token both models ban, NaN in the ignored rows;
    the same gradient written over the logits, and a gradient of the log-prob alone (a zero for the
    entropy's)."""
    B, T, V, temperature = 2, 5, 301, 0.7
    full = random_logits((B, T + 1, V), dtype, device)
    ref = random_logits((B, T, V), torch.float32, device)
    labels = random_labels((B, T), V, device)
    labels[1, 3] = -100
    ignored = (labels == -100).unsqueeze(-1)
    full[:, :-1, 4], ref[..., 4] = float("-inf"), float("-inf")
    full[:, :-1] = torch.where(ignored, float("nan"), full[:, :-1])
    ref = torch.where(ignored, float("nan"), ref)
    upstream = torch.randn(3, B, T, dtype=torch.float64, device=device)

    def loss(kl, logp, entropy, weights=upstream):
        return sum((t * w.to(t.dtype)).sum() for t, w in zip((kl, logp, entropy), weights))

    leaf = full.clone().requires_grad_()
    kl, _, _, logp, entropy = full_kl_module.full_kl_op(leaf[:, :-1], ref, labels, 1.0 / temperature, -100)
    (grad,) = torch.autograd.grad(loss(kl, logp, entropy), leaf)

    z64 = torch.where(ignored, 0.0, _banned_as_floor(full[:, :-1])).requires_grad_()
    r64 = torch.where(ignored, 0.0, _banned_as_floor(ref))
    kept = ~ignored.squeeze(-1)
    logp_r, entropy_r = spec.token_logprobs(z64, labels.masked_fill(~kept, 0), temperature=temperature,
                                            return_entropy=True)
    expected = [torch.where(kept, t, 0.0) for t in (spec.full_kl(z64, r64, temperature), logp_r, entropy_r)]
    (grad_r,) = torch.autograd.grad(loss(*expected), z64, retain_graph=True)
    tolerance = TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32]
    for got, want, name in zip((kl, logp, entropy), expected, ("kl", "logp", "entropy")):
        torch.testing.assert_close(got.double(), want.detach(), **tolerance, msg=name)
    assert grad.dtype == dtype and not torch.isnan(grad).any() and bool((grad[:, -1] == 0).all())
    grad = grad[:, :-1].double()
    # float32 work on each term of the gradient (within a few ulps of its size), then one rounding
    # to the logits' dtype.
    with torch.no_grad():
        s64 = z64 / temperature
        lse64 = torch.logsumexp(s64, -1, keepdim=True)
        p = (s64 - lse64).exp()
        size = s64.abs() + lse64.abs() + 1
        u_kl, u_y, u_h = (u.abs().unsqueeze(-1) / temperature for u in upstream)
        terms = p * size * (u_kl * (size + r64.abs() / temperature + 1) + u_y + u_h * (size + entropy_r.abs().unsqueeze(-1)))
        work = 8 * torch.finfo(torch.float32).eps * (terms + u_y)
    finfo = torch.finfo(dtype)
    bound = work + finfo.eps * torch.clamp(grad_r.abs(), min=finfo.tiny)
    excess = ((grad - grad_r).abs() / bound).max().item()
    assert excess <= 1, f"{excess:.3f} of the bound"

    over_logits = full.clone()[:, :-1].requires_grad_()
    x = full[:, :-1].clone().requires_grad_()
    fresh_kl = full_kl_module.full_kl_op(x, ref, labels, 1.0 / temperature, -100, False)
    (fresh,) = torch.autograd.grad(loss(*fresh_kl[:1], *fresh_kl[3:]), x)
    in_place = full_kl_module.full_kl_op(over_logits, ref, labels, 1.0 / temperature, -100, True)
    (written,) = torch.autograd.grad(loss(*in_place[:1], *in_place[3:]), over_logits)
    assert torch.equal(written, fresh)

    x = full[:, :-1].clone().requires_grad_()
    _, _, _, logp_alone, _ = full_kl_module.full_kl_op(x, ref, labels, 1.0 / temperature, -100)
    (grad_logp_alone,) = torch.autograd.grad((logp_alone * upstream[1].to(logp_alone.dtype)).sum(), x)
    (grad_logp_r,) = torch.autograd.grad((expected[1] * upstream[1]).sum(), z64)
    torch.testing.assert_close(grad_logp_alone.double(), grad_logp_r,
                               **(tolerance if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_full_kl_ops_log_prob_and_entropy_are_bitwise_token_logprobs(backend, dtype, device):
    """On the kernels' backends the full-KL pass takes the policy's sums as the log-prob kernels
    do, block for block: a rollout's log-probs (``pf.token_logprobs``) and those of the loss with
    the full KL are the same numbers, so the first step's ratio is exactly 1. V spans several
    blocks of every dtype."""
    if backend == "reference":
        pytest.skip("the reference backend's two ops are different PyTorch compositions (close, not equal)")
    lead, V = (2, 3), 20011
    logits = random_logits((*lead, V), dtype, device)
    labels = random_labels(lead, V, device)
    for temperature in (1.0, 0.7):
        _, _, _, logp, entropy = full_kl_module.full_kl_op(logits, random_logits((*lead, V), torch.float32, device),
                                                           labels, 1.0 / temperature, -100)
        rollout_logp, rollout_entropy = pf.token_logprobs(logits, labels, temperature=temperature,
                                                          return_entropy=True)
        assert torch.equal(logp, rollout_logp) and torch.equal(entropy, rollout_entropy)


def test_ppo_loss_with_the_full_kl_writes_its_gradient_over_the_logits_when_asked(backend, device):
    """``inplace_backward=True`` with ``ref_logits``: the gradient is the one computed apart, bit
    for bit, written over the logits' buffer where the backend can (native, Triton)."""
    lead, V = (3, 6), 53
    labels = random_labels(lead, V, device)
    data, mask = _actor_batch(lead, torch.float32, device)
    logits = random_logits((*lead, V), torch.float32, device)
    ref_logits = random_logits((*lead, V), torch.bfloat16, device)
    options = dict(kl_estimator="full", kl_coef=0.2, entropy_coef=0.01, temperature=0.9, clip_high=0.28)
    grads = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        loss, _ = pf.ppo_loss(x, labels, data["old_logp"], data["advantages"], mask, ref_logits=ref_logits,
                              inplace_backward=inplace, **options)
        (grad,) = torch.autograd.grad(loss, x)
        grads.append(grad)
        if inplace and backend != "reference":
            assert grad.data_ptr() == x.data_ptr()
    assert torch.equal(*grads)


def test_one_token_as_1_d_logits_on_every_backend(backend, device):
    """Logits ``[V]`` with a 0-d label: the op's shapes have no token dimension at all."""
    z, r = random_logits((29,), torch.float32, device).requires_grad_(), random_logits((29,), torch.float32, device)
    kl, _, _ = full_kl_module.full_kl_from_logits(z, r, torch.tensor(3, device=device), 0.8, -100)
    (grad,) = torch.autograd.grad(kl, z)
    z64 = z.detach().double().requires_grad_()
    expected = spec.full_kl(z64, r.double(), 0.8)
    (grad_r,) = torch.autograd.grad(expected, z64)
    assert kl.shape == ()
    torch.testing.assert_close(kl.double(), expected, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad.double(), grad_r, rtol=1e-4, atol=1e-6)


def test_a_non_finite_full_kl_names_the_model_and_the_token_on_every_backend(backend, device):
    """NaN or +inf anywhere in a row, a row of −inf, a token only the reference bans: an error naming
    whose logits and which token, whichever backend computes it."""
    V = 37
    logits, ref = random_logits((2, 3, V), torch.float32, device), random_logits((2, 3, V), torch.float32, device)
    labels = torch.randint(0, V, (2, 3), device=device)

    def kl(z=logits, r=ref):
        return full_kl_module.full_kl_from_logits(z, r, labels, 0.9, -100)[0]

    assert torch.isfinite(kl()).all()
    for bad in (float("nan"), float("inf")):
        policy, reference = logits.clone(), ref.clone()
        policy[1, 0, 20], reference[0, 1, 30] = bad, bad
        with pytest.raises(ValueError, match=r"^logits at token 3 .* give no distribution"):
            kl(z=policy)
        with pytest.raises(ValueError, match=r"^ref_logits at token 1 .* give no distribution"):
            kl(r=reference)
    policy, reference = logits.clone(), ref.clone()
    policy[0, 2], reference[1, 1] = float("-inf"), float("-inf")
    with pytest.raises(ValueError, match=r"^logits at token 2 .* give no distribution"):
        kl(z=policy)
    with pytest.raises(ValueError, match=r"^ref_logits at token 4 .* give no distribution"):
        kl(r=reference)
    reference = ref.clone()
    reference[0, 0, 3] = 3.3e38  # +inf once divided by the temperature, 0.9
    with pytest.raises(ValueError, match=r"^ref_logits at token 0 .* give no distribution"):
        kl(r=reference)
    reference = ref.clone()
    reference[1, 2, 11] = float("-inf")
    with pytest.raises(ValueError, match=r"^ref_logits at token 5 .* the full KL is \+inf"):
        kl(r=reference)
    policy = logits.clone()
    policy[1, 2, 11] = float("-inf")
    assert torch.isfinite(kl(z=policy, r=reference)).all()


@pytest.mark.parametrize("in_forward", [True, False], ids=["gradients-in-forward", "recomputed"])
def test_the_fused_heads_full_kl_matches_the_spec_across_chunks(monkeypatch, in_forward):
    """Both heads in chunks of 4 tokens (the last one padded), the reference with its own hidden
    size and dtype, NaN in the masked rows of both hidden states; gradients of hidden, weight and
    bias."""
    monkeypatch.setattr(linear_logprobs, "CHUNK_BYTES", 8 * 53 * 4)
    monkeypatch.setattr(linear_logprobs, "_gradients_in_forward", lambda *args: in_forward)
    lead, H, H_ref, V = (3, 5), 12, 7, 53
    labels = random_labels(lead, V, "cpu")
    data, mask = _actor_batch(lead, torch.float32, "cpu")
    hidden = _poisoned(torch.randn(*lead, H), mask).requires_grad_()
    weight = (torch.randn(V, H) / 2).requires_grad_()
    bias = torch.randn(V).requires_grad_()
    ref_hidden = _poisoned(torch.randn(*lead, H_ref, dtype=torch.float64), mask)
    ref_weight, ref_bias = torch.randn(V, H_ref, dtype=torch.float64) / 2, torch.randn(V, dtype=torch.float64)
    options = dict(kl_estimator="full", kl_coef=0.2, entropy_coef=0.05, temperature=0.9)
    loss, metrics = pf.fused_linear_ppo_loss(hidden, weight, labels, data["old_logp"], data["advantages"], mask,
                                             bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                             ref_bias=ref_bias, **options)
    grads = torch.autograd.grad(loss * 1.5, (hidden, weight, bias))
    # The spec sees zeros where ours sees NaN: what masked rows hold changes nothing (the spec's
    # weight gradient would be 0·NaN there).
    clean_hidden = torch.where(mask.unsqueeze(-1), hidden, 0.0)
    inputs64 = [t.detach().double().requires_grad_() for t in (clean_hidden, weight, bias)]
    loss_r, metrics_r = spec.fused_linear_ppo_loss(inputs64[0], inputs64[1], labels, data["old_logp"].double(),
                                                   data["advantages"].double(), mask, bias=inputs64[2],
                                                   ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                                                   **options)
    grads_r = torch.autograd.grad(loss_r * 1.5, inputs64)
    tolerance = TOLERANCE[torch.float32]
    torch.testing.assert_close(loss.double(), loss_r, **tolerance)
    grads_r = (torch.where(mask.unsqueeze(-1), grads_r[0], 0.0), *grads_r[1:])
    for name, got, expected in zip(("hidden", "weight", "bias"), grads, grads_r):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    for name in ("kl", "kl_loss"):
        torch.testing.assert_close(metrics[name].double(), metrics_r[name], **tolerance, msg=name)


def test_the_fused_loss_takes_the_full_kl_in_its_chunks_with_one_gemm_more():
    """Where the gradients are computed in the forward, the full KL joins the policy's chunks: the
    policy's three GEMMs and one for the reference's logits, against nine (the KL apart: two GEMMs
    forward, four backward) where they are not; the same loss, metrics and gradients both ways,
    and a fault in the reference's logits is still an error naming the token."""
    N, H, H_ref, V = 300, 8, 6, 1000
    padded = -(-N // linear_logprobs.linear_chunk_tokens(V, torch.float32)) * linear_logprobs.linear_chunk_tokens(
        V, torch.float32)
    policy_gemm, ref_gemm = 2 * padded * H * V, 2 * padded * H_ref * V
    hidden, weight = torch.randn(N, H, requires_grad=True), (torch.randn(V, H) / 3).requires_grad_()
    ref_hidden, ref_weight = torch.randn(N, H_ref), torch.randn(V, H_ref) / 3
    labels = random_labels((N,), V, "cpu")
    data, mask = _actor_batch((N,), torch.float32, "cpu")
    options = dict(kl_estimator="full", kl_coef=0.3, entropy_coef=0.01, ref_hidden=ref_hidden, ref_weight=ref_weight)
    results = {}

    def run(in_forward):
        def step():
            saved = linear_logprobs._gradients_in_forward
            linear_logprobs._gradients_in_forward = lambda *args: in_forward
            try:
                loss, metrics = pf.fused_linear_ppo_loss(hidden, weight, labels, data["old_logp"], data["advantages"],
                                                         mask, **options)
                results[in_forward] = (loss, metrics, torch.autograd.grad(loss, (hidden, weight)))
            finally:
                linear_logprobs._gradients_in_forward = saved
        return step

    assert gemm_flops(run(True)) == 3 * policy_gemm + ref_gemm
    recomputed = gemm_flops(run(False))
    assert recomputed > 3 * policy_gemm + ref_gemm
    (loss, metrics, grads), (loss_r, metrics_r, grads_r) = results[True], results[False]
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-7)
    for name in ("kl", "kl_loss", "pg_loss", "entropy"):
        torch.testing.assert_close(metrics[name], metrics_r[name], rtol=1e-5, atol=1e-7, msg=name)
    for got, want in zip(grads, grads_r):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    faulty = ref_hidden.clone()
    faulty[int(mask.nonzero()[3])] = float("nan")
    with pytest.raises(ValueError, match=rf"the reference head's logits at token {int(mask.nonzero()[3])} "):
        pf.fused_linear_ppo_loss(hidden, weight, labels, data["old_logp"], data["advantages"], mask,
                                 **dict(options, ref_hidden=faulty))


def test_the_full_kl_from_logits_differentiates_twice_and_from_heads_refuses_to():
    """create_graph=True: from logits the gradient is itself differentiable (second derivatives
    checked against finite differences); from two heads, whose kernels' gradient is a constant to
    autograd, a second backward is an error, not a silent zero, in the fused loss and apart."""
    V = 7
    logits = torch.randn(3, 4, V, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(3, 4, V, dtype=torch.float64)
    labels = torch.randint(0, V, (3, 4))
    labels[1, 2] = -100

    def kl(x):
        return full_kl_module.full_kl_from_logits(x, ref_logits, labels, 0.8, -100)[0]

    def with_log_prob_and_entropy(x):
        value, logp, entropy = full_kl_module.full_kl_from_logits(x, ref_logits, labels, 0.8, -100)
        return 0.7 * value - 1.3 * logp + 0.4 * entropy

    for function in (kl, with_log_prob_and_entropy):
        assert torch.autograd.gradcheck(function, (logits,)) and torch.autograd.gradgradcheck(function, (logits,))
        (with_graph,) = torch.autograd.grad(function(logits).sum(), logits, create_graph=True)
        (kernels,) = torch.autograd.grad(function(logits).sum(), logits)
        torch.testing.assert_close(with_graph, kernels, rtol=1e-12, atol=1e-14)

    hidden, weight = torch.randn(6, 5, dtype=torch.float64, requires_grad=True), torch.randn(V, 5, dtype=torch.float64)
    ref_hidden, ref_weight = torch.randn(6, 4, dtype=torch.float64), torch.randn(V, 4, dtype=torch.float64)
    zeros, mask = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.bool)
    head_labels = labels.view(-1)[:6] % V
    loss, _ = pf.fused_linear_ppo_loss(hidden, weight, head_labels, zeros, zeros + 1, mask, kl_estimator="full",
                                       kl_coef=0.5, ref_hidden=ref_hidden, ref_weight=ref_weight)
    apart = linear_logprobs.full_kl_from_heads(hidden, weight, None, ref_hidden, ref_weight, None, head_labels, 0.8,
                                               -100).sum()
    for value in (loss, apart):
        (dhidden,) = torch.autograd.grad(value, hidden, create_graph=True)
        with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
            torch.autograd.grad(dhidden.square().sum(), hidden)


def test_a_tokens_full_kl_does_not_depend_on_the_batch_or_the_chunks(monkeypatch, backend):
    """Bitwise, the KL and its gradient: a row alone, in a batch, at another position, and with
    chunks of 1, 3 or all rows (the reference's)."""
    V = 300
    logits, ref_logits = random_logits((10, V), torch.float32, "cpu"), random_logits((10, V), torch.float32, "cpu")
    labels = torch.randint(0, V, (10,))

    def kl(rows, chunk_rows):
        monkeypatch.setattr(full_kl_module, "CHUNK_BYTES", chunk_rows * V * 4)
        x = logits[rows].clone().requires_grad_()
        value, logp, entropy = full_kl_module.full_kl_from_logits(x, ref_logits[rows], labels[rows], 0.8, -100)
        (grad,) = torch.autograd.grad((value + 0.5 * logp - 0.25 * entropy).sum(), x)
        return torch.stack([value, logp, entropy]), grad

    whole, whole_grad = kl(torch.arange(10), 10)
    for chunk_rows in (1, 3):
        assert all(map(torch.equal, kl(torch.arange(10), chunk_rows), (whole, whole_grad)))
    shuffled = torch.randperm(10)
    assert all(map(torch.equal, kl(shuffled, 3), (whole[:, shuffled], whole_grad[shuffled])))
    assert all(map(torch.equal, kl(torch.tensor([6]), 10), (whole[:, 6:7], whole_grad[6:7])))

    # From the heads: chunks of 4 tokens, the last one padded, so every GEMM has one shape.
    monkeypatch.setattr(linear_logprobs, "CHUNK_BYTES", 8 * V * 4)
    hidden, weight = torch.randn(10, 24), torch.randn(V, 24) / 4
    ref_hidden, ref_weight = torch.randn(10, 16), torch.randn(V, 16) / 4

    def kl_of_heads(rows):
        return linear_logprobs.full_kl_from_heads(hidden[rows], weight, None, ref_hidden[rows], ref_weight, None,
                                                  labels[rows], 0.8, -100)

    whole = kl_of_heads(torch.arange(10))
    assert torch.equal(kl_of_heads(shuffled), whole[shuffled])
    assert torch.equal(kl_of_heads(torch.tensor([6])), whole[6:7])


def test_a_full_kl_without_the_reference_or_with_the_wrong_one_is_a_clear_error():
    lead, V = (2, 3), 11
    logits, labels = random_logits((*lead, V), torch.float32, "cpu"), random_labels(lead, V, "cpu")
    labels[0, 1], labels[1, 1], labels[1, 2] = 2, 5, 7  # the tokens the faults below are at are not ignored
    old, adv, mask = torch.randn(lead), torch.randn(lead), torch.ones(lead, dtype=torch.bool)

    def loss(**kwargs):
        return pf.ppo_loss(logits, labels, old, adv, mask, **kwargs)

    with pytest.raises(ValueError, match="kl_estimator='full' needs ref_logits"):
        loss(kl_estimator="full", kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logits is read by kl_estimator='full' only, got kl_estimator='k3'"):
        loss(ref_logits=logits)
    with pytest.raises(ValueError, match="does not read ref_logp: pass ref_logits instead"):
        loss(kl_estimator="full", ref_logp=old, ref_logits=logits)
    with pytest.raises(ValueError, match=r"ref_logits must have shape \(2, 3, 11\) \(logits.shape\)"):
        loss(kl_estimator="full", ref_logits=logits[..., :-1])
    banned = logits.clone()
    banned[1, 2, 4] = float("-inf")
    with pytest.raises(ValueError, match=r"ref_logits at token 5 .* the full KL is \+inf"):
        loss(kl_estimator="full", kl_coef=0.1, ref_logits=banned)
    for bad in (float("nan"), float("inf")):
        faulty = logits.clone()
        faulty[0, 1, 3] = bad
        with pytest.raises(ValueError, match=r"ref_logits at token 1 .* give no distribution: they hold NaN or \+inf"):
            loss(kl_estimator="full", kl_coef=0.1, ref_logits=faulty)
    with pytest.raises(ValueError, match="give no distribution"):
        loss(kl_estimator="full", ref_logits=torch.full_like(logits, float("-inf")))
    with pytest.raises(ValueError, match="^estimator='full' is the KL over the whole vocabulary"):
        pf.kl_penalty(old, old, "full")

    hidden, weight = torch.randn(*lead, 4), torch.randn(V, 4)

    def head_loss(**kwargs):
        return pf.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, kl_estimator="full", **kwargs)

    with pytest.raises(ValueError, match="kl_estimator='full' needs ref_hidden and ref_weight .* ref_weight missing"):
        head_loss(ref_hidden=hidden)
    with pytest.raises(ValueError, match=r"ref_weight must cover the policy's vocabulary of 11 tokens"):
        head_loss(ref_hidden=hidden, ref_weight=weight[:-1])
    with pytest.raises(ValueError, match=r"ref_hidden must have shape \(2, 3, 4\) \(hidden's tokens\)"):
        head_loss(ref_hidden=hidden[:1], ref_weight=weight)
    with pytest.raises(ValueError, match="ref_weight must have ref_hidden's dtype torch.float32"):
        head_loss(ref_hidden=hidden, ref_weight=weight.double())
    with pytest.raises(ValueError, match="kl_estimator='full' needs ref_hidden and ref_weight .* ref_hidden and "
                                         "ref_weight missing"):
        head_loss(ref_bias=torch.zeros(V))
    with pytest.raises(ValueError, match="ref_bias is read by kl_estimator='full' only, got kl_estimator='low_var_kl'"):
        pf.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, ref_bias=torch.zeros(V),
                                 kl_estimator="low_var_kl")
    with pytest.raises(ValueError, match=r"ref_weight must cover the policy's vocabulary of 11 tokens"):
        head_loss(ref_hidden=hidden, ref_weight=torch.randn(V + 1, 4), ref_bias=torch.zeros(V))
    poisoned = torch.randn(*lead, 4)
    poisoned[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"the reference head's logits at token 4 .* give no distribution"):
        head_loss(ref_hidden=poisoned, ref_weight=weight, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"the policy's logits at token 4 .* give no distribution"):
        pf.fused_linear_ppo_loss(poisoned, weight, labels, old, adv, mask, kl_estimator="full", ref_hidden=hidden,
                                 ref_weight=weight, kl_coef=0.1)


def test_the_trainers_kl_from_log_probs_refuses_the_full_kl_by_name_and_its_kl_loss_takes_it():
    from ppo_fast.trainer.config import ConfigError, PPOConfig

    with pytest.raises(ConfigError, match="kl_estimator='full' needs both models' whole distributions; the KL penalty"
                                          ".* the full KL goes in the actor loss \\(kl_loss_estimator='full'"):
        PPOConfig(kl_estimator="full")
    assert PPOConfig(kl_loss_coef=0.1, kl_loss_estimator="full").kl_loss_estimator == "full"
    assert PPOConfig(kl_loss_estimator="low_var_kl").kl_loss_estimator == "low_var_kl"
    with pytest.raises(ConfigError, match="kl_loss_estimator must be one of .*'full'; got 'k4'"):
        PPOConfig(kl_loss_estimator="k4")


def test_both_forms_compile_in_one_graph():
    """The logits form and the two heads' (whose chunks are not skipped by label while tracing)."""
    lead, V = (2, 5), 13
    labels = random_labels(lead, V, "cpu")
    old, mask = torch.zeros(lead, dtype=torch.float64), torch.ones(lead, dtype=torch.bool)
    hidden, weight = torch.randn(*lead, 4, dtype=torch.float64), torch.randn(V, 4, dtype=torch.float64)
    ref_hidden, ref_weight = torch.randn(*lead, 3, dtype=torch.float64), torch.randn(V, 3, dtype=torch.float64)
    ref_logits = torch.nn.functional.linear(ref_hidden, ref_weight)

    def of_logits(h):
        return pf.ppo_loss(torch.nn.functional.linear(h, weight), labels, old, old + 1, mask, kl_estimator="full",
                           ref_logits=ref_logits, kl_coef=0.2)[0]

    def of_heads(h):
        return pf.fused_linear_ppo_loss(h, weight, labels, old, old + 1, mask, kl_estimator="full",
                                        ref_hidden=ref_hidden, ref_weight=ref_weight, kl_coef=0.2)[0]

    for step in (of_logits, of_heads):
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        x = hidden.clone().requires_grad_()
        torch.testing.assert_close(compiled(x), step(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(step(x), x)[0],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_name", ["default", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_heads_full_kl_with_16_bit_weights_goes_vocabulary_outer(monkeypatch, dtype, backend_name):
    """Fewer tokens than vocabulary entries: the KL's backward takes the vocabulary-outer order
    (13 chunks of 16 entries over tiles of 16 tokens), allocates no float32 buffer of the weight's
    size, and its gradients are within twice those of the token-outer order from the float64 spec,
    with NaN in the reference's ignored rows reaching nothing. The default backend's reference head
    is float32 (GEMMs over both heads); on Triton it has the policy's dtype, so each tile's
    dlogits come from the kernel (the interpreter copies the kernel's arguments, so the allocation
    bound is checked on the default backend only)."""
    from test_linear_head import _largest_allocation

    N, H, H_ref, V = 37, 24, 10, 203
    monkeypatch.setattr(linear_logprobs, "TILE_BYTES", 16 * H * 4)
    labels = random_labels((N,), V, "cpu")
    labels[4] = -100
    hidden = torch.randn(N, H).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) / 3).to(dtype).requires_grad_()
    bias = torch.randn(V).to(dtype).requires_grad_()
    ref_dtype = torch.float32 if backend_name == "default" else dtype
    ref_hidden, ref_weight = torch.randn(N, H_ref).to(ref_dtype), (torch.randn(V, H_ref) / 3).to(ref_dtype)
    ref_hidden[4] = float("nan")
    if backend_name == "triton":
        monkeypatch.setenv("PPO_FAST_BACKEND", "triton")
    upstream = torch.randn(N)

    def kl_grads(*inputs):
        kl = linear_logprobs.full_kl_from_heads(*inputs[:3], ref_hidden, ref_weight, None, labels, 0.8, -100)
        return torch.autograd.grad((kl * upstream.to(kl)).sum(), inputs)

    exact = kl_grads(*(t.detach().double().requires_grad_() for t in (hidden, weight, bias)))
    kl = linear_logprobs.full_kl_from_heads(hidden, weight, bias, ref_hidden, ref_weight, None, labels, 0.8, -100)
    if backend_name == "default":
        largest = _largest_allocation(lambda: torch.autograd.grad((kl * upstream).sum(), (hidden, weight, bias)))
        assert largest < V * H * 4
    outer = kl_grads(hidden, weight, bias)
    monkeypatch.setattr(linear_logprobs, "vocabulary_outer", lambda *args: False)
    inner = kl_grads(hidden, weight, bias)
    for name, got, other, want in zip(("hidden", "weight", "bias"), outer, inner, exact):
        assert got.dtype == dtype and not torch.isnan(got).any(), name
        rounding = torch.finfo(dtype).eps * want.abs().max().item()
        assert (got.double() - want).abs().max() <= 2 * (other.double() - want).abs().max() + rounding, name


# --------------------------------------------------------------------------------------------
# The two heads on Triton: one forward kernel, one dlogits kernel per chunk or tile
# --------------------------------------------------------------------------------------------

F64 = torch.float64


def _two_heads(N, H, H_ref, V, dtype, device, bias=True, seed=3):
    """Policy and reference heads of one dtype, an ignored row 1 whose hidden states hold NaN."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(device=device, dtype=dtype)

    hidden, weight, ref_hidden, ref_weight = draw(N, H), draw(V, H, scale=3 / H ** 0.5), draw(N, H_ref), \
        draw(V, H_ref, scale=3 / H_ref ** 0.5)
    b, ref_b = (draw(V), draw(V)) if bias else (None, None)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[1] = -100
    hidden[1], ref_hidden[1] = float("nan"), float("nan")
    return hidden, weight, b, ref_hidden, ref_weight, ref_b, labels


def _kernel_logits(hidden, weight, bias, active):
    """A head's logits as the kernels make them, in float64: summed in float32 (float64 for float64
    inputs), the bias added, rounded once to the inputs' dtype; ignored rows from zeros."""
    acc = F64 if hidden.dtype == F64 else torch.float32
    clean = torch.where(active.unsqueeze(-1), hidden, 0.0).to(acc)
    z = torch.nn.functional.linear(clean, weight.to(acc), None if bias is None else bias.to(acc))
    return z.to(hidden.dtype).double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_the_triton_heads_full_kl_and_its_gradients_match_the_spec(dtype, bias, force_backend, device,
                                                                   monkeypatch):
    """An odd 13 x 37 policy head and a 21-wide reference over V = 203 at temperature 0.7: the KL
    and the gradients of hidden, weight and bias (upstream ≠ 1) against float64 through the spec
    over the same logits (the chain rule through them: dhidden = dz·W, dW = dzᵀ·x), NaN in both
    hidden states of the ignored row reaching nothing. The forward runs no GEMM and the backward
    two (dhidden, dweight), where the GEMM path runs two and four."""

    N, H, H_ref, V, temperature = 13, 37, 21, 203, 0.7
    # Chunks of 16 tokens (the least): the interpreter runs each padding row's tiles too.
    monkeypatch.setattr(linear_logprobs, "CHUNK_BYTES", 16 * V * 4)
    hidden, weight, b, ref_hidden, ref_weight, ref_b, labels = _two_heads(N, H, H_ref, V, dtype, device, bias)
    active = labels != -100
    upstream = torch.randn(N, dtype=F64, generator=torch.Generator().manual_seed(7)).to(device)
    inputs = [t.clone().requires_grad_() for t in (hidden, weight, b) if t is not None]

    def kl_and_grads():
        kl = linear_logprobs.full_kl_from_heads(inputs[0], inputs[1], inputs[2] if bias else None, ref_hidden,
                                                ref_weight, ref_b, labels, temperature, -100)
        return kl, torch.autograd.grad((kl * upstream.to(kl)).sum(), inputs)

    with force_backend("triton"):
        kl, grads = kl_and_grads()
        if dtype == torch.bfloat16 and bias:
            # 16-bit weights, fewer tokens than entries: the vocabulary-outer order's token tiles.
            padded = linear_logprobs.vocabulary_tile(V, H)[0]
            assert gemm_flops(lambda: linear_logprobs.full_kl_from_heads(
                hidden, weight, b, ref_hidden, ref_weight, ref_b, labels, temperature, -100)) == 0
            assert gemm_flops(kl_and_grads) == 2 * (2 * padded * H * V)
    z = _kernel_logits(hidden, weight, b, active).requires_grad_()
    expected = torch.where(active, spec.full_kl(z, _kernel_logits(ref_hidden, ref_weight, ref_b, active),
                                                temperature), 0.0)
    (dz,) = torch.autograd.grad((expected * upstream).sum(), z)
    clean = torch.where(active.unsqueeze(-1), hidden, 0.0).double()
    expected_grads = [dz @ weight.double(), dz.t() @ clean, dz.sum(0)][:len(inputs)]
    # Relative to the largest value: the KL is float32 sums over the same logits; the gradients are
    # rounded to the 16-bit dtype twice (dlogits, then the GEMMs').
    kl_tolerance = 2e-6
    grad_tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert kl.dtype == linear_logprobs.out_dtype(dtype) and kl[1] == 0
    torch.testing.assert_close(kl.double(), expected, rtol=0, atol=kl_tolerance * expected.abs().max().item())
    for name, got, want in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert got.dtype == dtype and not torch.isnan(got).any(), name
        torch.testing.assert_close(got.double(), want, rtol=0, atol=grad_tolerance * want.abs().max().item(),
                                   msg=name)
    assert expected.max() > 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_tokens_triton_full_kl_does_not_depend_on_the_batch_and_its_dlogits_not_on_the_range(dtype,
                                                                                              force_backend, device):
    """Bitwise: a row's KL alone, in the batch and at another position; the dlogits kernel over
    any range of the vocabulary gives the columns of the whole."""
    N, H, H_ref, V, inv_temp = 11, 24, 16, 150, 1 / 0.8
    hidden, weight, b, ref_hidden, ref_weight, ref_b, labels = _two_heads(N, H, H_ref, V, dtype, device)

    def kl(rows):
        with force_backend("triton"):
            return linear_logprobs.full_kl_from_heads(hidden[rows], weight, b, ref_hidden[rows], ref_weight, ref_b,
                                                      labels[rows], 0.8, -100)

    whole = kl(torch.arange(N))
    shuffled = torch.randperm(N)
    assert torch.equal(kl(shuffled), whole[shuffled])
    assert torch.equal(kl(torch.tensor([6])), whole[6:7])

    kl, lse, ref_lse = linear_logprobs.triton_full_kl_forward(hidden, weight, b, ref_hidden, ref_weight, ref_b,
                                                              labels, inv_temp, -100)
    upstream = torch.randn(N, device=device, dtype=kl.dtype)

    def dlogits(first=0, entries=V):
        part = slice(first, first + entries)
        return linear_logprobs.triton_full_kl_dlogits(hidden, weight[part], b[part], ref_hidden, ref_weight[part],
                                                      ref_b[part], V, labels, kl, lse, ref_lse, upstream, inv_temp,
                                                      -100, kl.dtype)

    every = dlogits()
    assert (every[1] == 0).all() and not torch.isnan(every).any()
    for first, entries in ((16, 64), (100, 50), (37, 1), (0, 149)):
        assert torch.equal(dlogits(first, entries), every[:, first:first + entries]), (first, entries)


def test_the_triton_heads_full_kl_of_a_head_to_itself_is_zero_and_a_banned_token_an_error(force_backend, device):
    """Exactly 0 (value and gradient) for the reference equal to the policy; +inf where the
    reference alone bans a token is the error naming the token, never an inf loss; a token banned
    by both adds nothing. Float32 and float64 heads take the GEMM path on every backend."""
    hidden, weight, b, _, _, _, labels = _two_heads(9, 20, 20, 70, torch.bfloat16, device)
    b[5] = float("-inf")
    with force_backend("triton"):
        x = hidden.clone().requires_grad_()
        kl = linear_logprobs.full_kl_from_heads(x, weight, b, hidden, weight, b, labels, 0.9, -100)
        (grad,) = torch.autograd.grad(kl.sum(), x)
        assert bool((kl == 0).all()) and bool((grad == 0).all())
        banned = b.clone()
        banned[11] = float("-inf")
        with pytest.raises(ValueError, match=r"the reference head's logits at token 0 .* the full KL is \+inf"):
            linear_logprobs.full_kl_from_heads(hidden, weight, b, hidden, weight, banned, labels, 0.9, -100)
        for dtype in (torch.float32, F64):
            assert not linear_logprobs._heads_on_triton(hidden.to(dtype), hidden.to(dtype))
        assert not linear_logprobs._heads_on_triton(hidden, hidden.float())
        assert linear_logprobs._heads_on_triton(hidden, hidden)


@pytest.mark.parametrize("order", ["banned-first", "banned-last"])
def test_a_token_only_the_reference_bans_counts_by_its_final_probability_on_triton(order, force_backend, device):
    """The reference bans a token the policy gives a probability that underflows to 0 once a far
    larger logit is seen: the term is 0 (π = 0), as on the PyTorch path, whether the large logit
    comes before the banned token in the vocabulary or after it (the kernel must not decide from
    the running maximum)."""
    V, H, dtype = 32, 16, torch.bfloat16
    hidden, weight = torch.zeros(3, H, device=device, dtype=dtype), torch.zeros(V, H, device=device, dtype=dtype)
    banned, top = (0, 20) if order == "banned-first" else (20, 0)
    bias = torch.full((V,), -100.0, device=device, dtype=dtype)
    bias[banned], bias[top] = 0.0, 200.0
    ref_bias = torch.zeros(V, device=device, dtype=dtype)
    ref_bias[banned] = float("-inf")
    labels = torch.tensor([1, -100, 2], device=device)
    kl = {}
    for backend in ("reference", "triton"):
        with force_backend(backend):
            kl[backend] = linear_logprobs.full_kl_from_heads(hidden, weight, bias, hidden, weight, ref_bias, labels,
                                                             1.0, -100)
    torch.testing.assert_close(kl["triton"], kl["reference"], rtol=1e-6, atol=1e-6)
    assert kl["triton"][0] > 3
