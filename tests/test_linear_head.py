"""The fused linear head against its spec (the same ops on ``hidden @ weight.T + bias``) in float64:
log-probs, entropy, every loss type, gradients of hidden, weight and bias; odd H and V, chunk
boundaries, low precision within twice eager's error, masks, batch invariance, errors."""

import pytest
import torch

import ppo_fast as pf
from helpers import OBJECTIVE_PARAMS, gemm_flops, max_err
from ppo_fast import objectives
from ppo_fast import spec as R
from ppo_fast.arguments import LossOptions
from ppo_fast.ops import linear_logprobs
from ppo_fast.ops.linear_logprobs import linear_chunk_tokens

F64 = torch.float64


def _head(N, H, V, dtype, device, seed=0, bias=True, lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*(lead or (N,)), H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) / H ** 0.5 * 3
    b = torch.randn(V, generator=g, dtype=F64) if bias else None
    labels = torch.randint(0, V, hidden.shape[:-1], generator=g)
    labels[..., 1] = -100
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return to(hidden), to(weight), to(b), labels.to(device)


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    outs = out if isinstance(out, tuple) else (out,)
    weights = [torch.randn(o.shape, generator=g, dtype=F64).to(o) for o in outs]
    total = sum((o * w).sum() for o, w in zip(outs, weights))
    return torch.autograd.grad(total, [t for t in inputs if t is not None])


SHAPES = [(5, 1, 7), (9, 7, 97), (40, 100, 1003), (7, 4097, 50), (2100, 3, 7)]
# The interpreter runs the Triton tiles one by one: the default tier takes two of the four
# bias x temperature configurations of each shape (each option on and off once), the slow tier
# the other two and the 152k vocabulary.
DEFAULT_TIER = {(True, 1.0), (False, 0.7)}
LARGE_VOCAB = [pytest.param(3, 5, 151936, True, 0.7, id="3-5-151936", marks=pytest.mark.slow)]


@pytest.mark.parametrize("N,H,V,bias,temperature", [
    pytest.param(*shape, bias, temperature, marks=() if (bias, temperature) in DEFAULT_TIER else pytest.mark.slow)
    for shape in SHAPES for bias in (True, False) for temperature in (1.0, 0.7)
] + LARGE_VOCAB)
def test_log_probs_entropy_and_gradients_match_the_spec(N, H, V, bias, temperature, device, backend):
    hidden, weight, b, labels = _head(N, H, V, F64, device, bias=bias)
    out = pf.fused_linear_token_logprobs(hidden, weight, labels, bias=b, temperature=temperature,
                                         return_entropy=True, return_sum_pi_squared=True)
    want = R.fused_linear_token_logprobs(hidden, weight, labels, bias=b, temperature=temperature,
                                         return_entropy=True, return_sum_pi_squared=True)
    for got, exp in zip(out, want):
        torch.testing.assert_close(got, exp, rtol=1e-11, atol=1e-12)
    assert not out[2].requires_grad  # Σπ² is forward only
    for got, exp in zip(_grads(out[:2], (hidden, weight, b)), _grads(want[:2], (hidden, weight, b))):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-11)


def test_the_shapes_span_several_padded_chunks():
    assert 2100 > 2 * linear_chunk_tokens(7, F64)
    assert linear_chunk_tokens(50257, torch.bfloat16) == linear_chunk_tokens(50257, torch.float32)


def test_leading_shape_and_log_probs_alone(device, backend):
    hidden, weight, b, labels = _head(None, 11, 53, F64, device, lead=(3, 4))
    logp = pf.fused_linear_token_logprobs(hidden, weight, labels, bias=b)
    assert logp.shape == (3, 4)
    torch.testing.assert_close(logp, R.fused_linear_token_logprobs(hidden, weight, labels, bias=b))
    assert (logp[..., 1] == 0).all()


LOSS_CASES = [(name, params[0]) for name, params in OBJECTIVE_PARAMS.items()]


@pytest.mark.parametrize("loss_type, params", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_every_loss_type_matches_the_spec(loss_type, params, agg, device, backend):
    hidden, weight, b, labels = _head(None, 9, 131, F64, device, lead=(4, 6))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lp = R.fused_linear_token_logprobs(hidden, weight, labels, bias=b)
    old = lp + 0.3 * torch.randn(4, 6, generator=g, dtype=F64).to(device)
    ref = lp + 0.3 * torch.randn(4, 6, generator=g, dtype=F64).to(device)
    adv = torch.randn(4, 6, generator=g, dtype=F64).to(device)
    mask = (torch.rand(4, 6, generator=g) > 0.2).to(device)
    weights = (0.2 * torch.randn(4, 6, generator=g, dtype=F64)).exp().to(device)
    kw = dict(loss_type=loss_type, loss_params=params, agg=agg, ref_logp=ref, kl_coef=0.05, entropy_coef=0.01,
              rollout_is_weights=weights)
    results = []
    for fn in (pf.fused_linear_ppo_loss, R.fused_linear_ppo_loss):
        torch.manual_seed(0)
        loss, metrics = fn(hidden, weight, labels, old, adv, mask, bias=b, **kw)
        results.append((loss, metrics, torch.autograd.grad(loss * 2.5, (hidden, weight, b))))
    (loss, metrics, grads), (loss_r, metrics_r, grads_r) = results
    torch.testing.assert_close(loss, loss_r, rtol=1e-10, atol=1e-12)
    for got, exp in zip(grads, grads_r):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)
    assert metrics.keys() == metrics_r.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics_r[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_within_twice_the_eager_error(dtype, device, backend):
    """Against float64: the fused head's loss and gradients err at most twice what eager PyTorch
    errs in the same dtype (the logits in that dtype, then :func:`pf.ppo_loss`)."""
    hidden, weight, b, labels = _head(None, 64, 1000, dtype, device, lead=(4, 20))
    g = torch.Generator().manual_seed(2)
    old = (-torch.rand(4, 20, generator=g, dtype=F64) * 5).to(device)
    adv = torch.randn(4, 20, generator=g, dtype=F64).to(device)
    mask = torch.ones(4, 20, dtype=torch.bool, device=device)
    kw = dict(entropy_coef=0.01, loss_type="vanilla")

    def run(fn, *tensors):
        loss, _ = fn(*tensors, labels, old, adv, mask, **kw)
        return [loss] + list(torch.autograd.grad(loss, tensors))

    exact = run(lambda h, w, bb, *a, **k: pf.fused_linear_ppo_loss(h, w, *a, bias=bb, **k),
                *(t.detach().double().requires_grad_() for t in (hidden, weight, b)))
    eager = run(lambda h, w, bb, *a, **k: pf.ppo_loss(torch.nn.functional.linear(h, w, bb), *a, **k),
                hidden, weight, b)
    fused = run(lambda h, w, bb, *a, **k: pf.fused_linear_ppo_loss(h, w, *a, bias=bb, **k), hidden, weight, b)
    for name, got, eag, ex in zip(("loss", "hidden", "weight", "bias"), fused, eager, exact):
        assert got.dtype == eag.dtype, name
        # Plus one rounding of the result in the inputs' dtype: eager's error on a single number
        # (the loss) can be near 0 by luck.
        rounding = torch.finfo(dtype).eps * ex.abs().max().item()
        assert max_err(got, ex) <= 2 * max_err(eag, ex) + rounding, name


def test_masked_and_ignored_tokens_reach_nothing(device, backend):
    hidden, weight, b, labels = _head(None, 8, 77, F64, device, lead=(3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool, device=device)
    mask[0, 4:] = False
    g = torch.Generator().manual_seed(4)
    old = (-torch.rand(3, 10, generator=g, dtype=F64)).to(device)
    adv = torch.randn(3, 10, generator=g, dtype=F64).to(device)
    results = []
    for poison in (None, float("nan"), float("inf")):
        h = hidden.detach().clone()
        lab = labels.clone()
        if poison is not None:
            h[~mask | (labels == -100)] = poison
            lab[~mask] = 10**6  # garbage after EOS
        h.requires_grad_()
        loss, metrics = pf.fused_linear_ppo_loss(h, weight, lab, old, adv, mask, bias=b, entropy_coef=0.1)
        grads = torch.autograd.grad(loss, (h, weight, b))
        results.append((loss, grads))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        for got, exp in zip(grads, results[0][1]):
            assert torch.equal(got, exp)


def test_all_masked_batch_is_zero_not_nan(device, backend):
    hidden, weight, b, labels = _head(None, 8, 77, torch.float32, device, lead=(2, 5))
    zeros = torch.zeros(2, 5, device=device)
    loss, metrics = pf.fused_linear_ppo_loss(hidden, weight, labels, zeros, zeros, zeros.bool(), bias=b,
                                             entropy_coef=0.1)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert loss.item() == 0 and all((g == 0).all() for g in grads)
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_a_tokens_result_does_not_depend_on_the_batch(device, backend):
    """Bitwise: each chunk has one shape whatever the batch (the last one padded), so the GEMMs a
    token goes through are the same alone and in any batch."""
    hidden, weight, b, labels = _head(300, 64, 500, torch.float32, device, bias=True)
    logp, entropy, sum_sq = pf.fused_linear_token_logprobs(hidden, weight, labels, bias=b, return_entropy=True,
                                                           return_sum_pi_squared=True)
    (dh,) = torch.autograd.grad(logp.sum() + entropy.sum(), hidden)
    for rows in ([0], [5, 6, 7], list(range(250, 300)), [299, 3, 100]):
        sub = hidden.detach()[rows].requires_grad_()
        lp, ent, sq = pf.fused_linear_token_logprobs(sub, weight, labels[rows], bias=b, return_entropy=True,
                                                     return_sum_pi_squared=True)
        (dsub,) = torch.autograd.grad(lp.sum() + ent.sum(), sub)
        assert torch.equal(lp, logp[rows]) and torch.equal(ent, entropy[rows]) and torch.equal(sq, sum_sq[rows])
        assert torch.equal(dsub, dh[rows])


def test_under_batch_invariant_a_tokens_numbers_do_not_depend_on_the_chunk_size(monkeypatch):
    """With ``pf.batch_invariant()`` the head's GEMMs are the mode's fixed-order kernels, so a
    token's log-prob, entropy, Σπ², full KL and hidden gradient keep their bits when the chunks
    change size too (chunks of 16, 64 and 1024 tokens), not only when its batch or position does.
    (Torch's own float32 GEMM keeps a row's bits across these shapes on this project's AVX2 VM
    too; not on AVX-512 CPUs nor GPUs, where tests/test_batch_invariant*.py show the mode off
    failing.)"""
    from ppo_fast.batch_invariant import kernels_missing

    if kernels_missing().get("CPU"):
        pytest.skip(f"the CPU kernels of the batch-invariant mode: {kernels_missing()['CPU']}")
    hidden, weight, b, labels = _head(150, 48, 500, torch.float32, "cpu", bias=True)
    ref_hidden, ref_weight = torch.randn(150, 40), torch.randn(500, 40) / 6

    def numbers(rows, chunk_tokens):
        monkeypatch.setattr(linear_logprobs, "CHUNK_BYTES", chunk_tokens * 500 * 4)
        sub = hidden.detach()[rows].requires_grad_()
        with pf.batch_invariant():
            lp, ent, sq = pf.fused_linear_token_logprobs(sub, weight, labels[rows], bias=b, return_entropy=True,
                                                         return_sum_pi_squared=True)
            (dsub,) = torch.autograd.grad(lp.sum() + ent.sum(), sub)
            kl = linear_logprobs.full_kl_from_heads(sub.detach(), weight, b, ref_hidden[rows], ref_weight, None,
                                                    labels[rows], 1.0, -100)
        return lp, ent, sq, dsub, kl

    whole = numbers(list(range(150)), 1024)
    for rows, chunk_tokens in (([7], 16), ([149, 7, 0], 64), (list(range(150))[::-1], 16)):
        for got, want in zip(numbers(rows, chunk_tokens), whole):
            assert torch.equal(got, want[rows]), (rows, chunk_tokens)


def test_scoring_under_no_grad_keeps_no_graph(device, backend):
    hidden, weight, b, labels = _head(20, 8, 60, torch.float32, device)
    with torch.no_grad():
        logp = pf.fused_linear_token_logprobs(hidden, weight, labels, bias=b)
    assert not logp.requires_grad


@pytest.mark.parametrize("loss_type", ["gspo", "vanilla"])  # vanilla: eager computes its gradients in the forward
def test_compiles_in_one_graph(loss_type):
    hidden, weight, b, labels = _head(None, 8, 60, torch.float32, "cpu", lead=(2, 5))
    old = torch.zeros(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)

    def step(h):
        return pf.fused_linear_ppo_loss(h, weight, labels, old, old + 1, mask, bias=b, loss_type=loss_type)[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(hidden), step(hidden))
    torch.testing.assert_close(torch.autograd.grad(compiled(hidden), hidden)[0],
                               torch.autograd.grad(step(hidden), hidden)[0])


def test_module_takes_hidden_and_lm_head():
    hidden, weight, b, labels = _head(None, 8, 60, F64, "cpu", lead=(2, 5))
    head = torch.nn.Linear(8, 60, bias=True, dtype=F64)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(b)
    old = torch.zeros(2, 5, dtype=F64)
    adv = torch.ones(2, 5, dtype=F64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    module = pf.PPOLoss(loss_type="sapo", entropy_coef=0.01)
    got, _ = module(labels=labels, old_logp=old, advantages=adv, mask=mask, hidden=hidden, lm_head=head)
    want, _ = module(torch.nn.functional.linear(hidden, weight, b), labels, old, adv, mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    got_w, _ = module(labels=labels, old_logp=old, advantages=adv, mask=mask, hidden=hidden, lm_head=weight)
    want_w, _ = module(hidden @ weight.T, labels, old, adv, mask)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="either logits or hidden"):
        module(hidden @ weight.T, labels, old, adv, mask, hidden=hidden, lm_head=head)
    with pytest.raises(ValueError, match="lm_head"):
        module(labels=labels, old_logp=old, advantages=adv, mask=mask, hidden=hidden)


@pytest.mark.parametrize("call, match", [
    (lambda h, w, b, y: pf.fused_linear_token_logprobs(h, w[:, 1:], y), r"weight must have shape \[V, H\]"),
    (lambda h, w, b, y: pf.fused_linear_token_logprobs(h, w.float(), y), "weight must have hidden's dtype"),
    (lambda h, w, b, y: pf.fused_linear_token_logprobs(h, w, y, bias=b[1:]), "bias must have shape"),
    (lambda h, w, b, y: pf.fused_linear_token_logprobs(h, w, y[:-1]), "labels must have shape"),
    (lambda h, w, b, y: pf.fused_linear_token_logprobs(h, w, y + 1000), r"labels must lie in \[0, 60\)"),
    (lambda h, w, b, y: pf.fused_linear_token_logprobs(h.long(), w, y), "hidden must be a floating"),
    (lambda h, w, b, y: pf.fused_linear_token_logprobs(h, w, y, temperature=0.0), "temperature"),
    (lambda h, w, b, y: pf.fused_linear_ppo_loss(h, w, y, y * 0.0, y * 0.0, y > 0, kl_coef=0.1), "needs ref_logp"),
])
def test_bad_inputs_are_named(call, match):
    hidden, weight, b, labels = _head(10, 8, 60, F64, "cpu")
    with pytest.raises(ValueError, match=match):
        call(hidden, weight, b, labels.clamp(min=0))


def test_objectives_table_is_covered():
    assert {name for name, _ in LOSS_CASES} == set(objectives.OBJECTIVES)


def test_a_frozen_head_gets_no_weight_gradient_and_the_same_hidden_gradient():
    hidden, weight, b, labels = _head(40, 16, 300, F64, "cpu")
    frozen = weight.detach()
    (dh,) = torch.autograd.grad(pf.fused_linear_token_logprobs(hidden, frozen, labels, bias=b.detach()).sum(), hidden)
    (dh_r,) = torch.autograd.grad(R.fused_linear_token_logprobs(hidden, frozen, labels, bias=b.detach()).sum(), hidden)
    torch.testing.assert_close(dh, dh_r, rtol=1e-11, atol=1e-12)
    (dw,) = torch.autograd.grad(pf.fused_linear_token_logprobs(hidden.detach(), weight, labels).sum(), weight)
    (dw_r,) = torch.autograd.grad(R.fused_linear_token_logprobs(hidden.detach(), weight, labels).sum(), weight)
    torch.testing.assert_close(dw, dw_r, rtol=1e-11, atol=1e-12)


def test_module_refuses_a_head_it_cannot_compute():
    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    hidden, weight, b, labels = _head(None, 8, 60, F64, "cpu", lead=(2, 5))
    zeros = torch.zeros(2, 5, dtype=F64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="own forward"):
        pf.PPOLoss()(labels=labels, old_logp=zeros, advantages=zeros, mask=mask, hidden=hidden,
                     lm_head=ScaledHead(8, 60, dtype=F64))
    with pytest.raises(ValueError, match="lm_head without hidden"):
        pf.PPOLoss()(hidden @ weight.T, labels, zeros, zeros, mask, lm_head=weight)


# --------------------------------------------------------------------------------------------
# The loss's gradients computed in its forward (three GEMMs per chunk where the op takes four)
# --------------------------------------------------------------------------------------------


def _actor_batch(lead, V, dtype, device, seed=5, garbage=True):
    """old/ref/rollout log-probs, advantages, IS weights and a mask for ``lead`` tokens; with
    ``garbage`` the masked positions of every per-token tensor hold NaN/inf (as after EOS)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(lead, generator=g, dtype=F64) * 4 - 1
    ref = old + 0.3 * torch.randn(lead, generator=g, dtype=F64)
    rollout = old + 0.2 * torch.randn(lead, generator=g, dtype=F64)
    adv = torch.randn(lead, generator=g, dtype=F64)
    is_weights = (0.2 * torch.randn(lead, generator=g, dtype=F64)).exp()
    mask = torch.rand(lead, generator=g) > 0.25
    mask.view(-1)[0] = True
    if garbage:
        for t, bad in ((old, float("nan")), (ref, float("inf")), (rollout, float("-inf")), (adv, float("nan")),
                       (is_weights, float("inf"))):
            t[~mask] = bad
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(old_logp=to(old), advantages=to(adv), ref_logp=to(ref), rollout_logp=to(rollout),
                rollout_is_weights=to(is_weights)), mask.to(device)


# Every token-local loss option: clip-higher and dual clip, temperature, entropy bonus, KL to the
# reference, rollout IS weights and truncation, each aggregation.
LOSS_OPTIONS = {
    "vanilla-dual-clip": dict(loss_type="vanilla", clip_low=0.2, clip_high=0.28, dual_clip=3.0, temperature=0.7,
                              entropy_coef=0.01, kl_coef=0.05, agg="token-mean"),
    "grpo-seq-mean": dict(loss_type="grpo", clip_low=0.1, entropy_coef=0.02, kl_coef=0.1, kl_estimator="k2",
                          tis_cap=1.5, agg="seq-mean-token-mean", use_rollout=True),
    "cispo-token-sum": dict(loss_type="cispo", temperature=1.3, entropy_coef=0.05, agg="token-sum",
                            use_is_weights=True),
    "dppo-kl-dr-grpo": dict(loss_type="dppo_kl", kl_coef=0.02, kl_estimator="k3+", agg="seq-mean-token-sum-norm",
                            use_rollout=True, use_is_weights=True),
    "sapo-seq-sum": dict(loss_type="sapo", entropy_coef=0.01, agg="seq-mean-token-sum", temperature=0.9),
}


def _loss_kwargs(options, data):
    options = dict(options)
    kw = {name: data[name] for name in ("old_logp", "advantages")}
    if options.get("kl_coef"):
        kw["ref_logp"] = data["ref_logp"]
    if options.pop("use_rollout", False):
        kw["rollout_logp"] = data["rollout_logp"]
    if options.pop("use_is_weights", False):
        kw["rollout_is_weights"] = data["rollout_is_weights"]
    return {**kw, **options}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 tokens (the fewest), so a few dozen tokens span several, the last padded."""
    monkeypatch.setattr(linear_logprobs, "CHUNK_BYTES", 1)
    assert linear_chunk_tokens(7, F64) == 16


# Every option set on several chunks; the odd sizes with two of them each.
GRADIENT_CASES = [pytest.param((3, 21), 3, 7, True, name, id=f"3x21-3-7-{name}") for name in LOSS_OPTIONS] + [
    pytest.param((2, 9), 100, 1003, False, name, id=f"2x9-100-1003-{name}")
    for name in ("vanilla-dual-clip", "cispo-token-sum")] + [
    pytest.param((1, 7), 4097, 50, True, name, id=f"1x7-4097-50-{name}")
    for name in ("grpo-seq-mean", "sapo-seq-sum")]


@pytest.mark.parametrize("lead, H, V, bias, options", GRADIENT_CASES)
def test_loss_gradients_in_the_forward_match_the_spec(lead, H, V, bias, options, small_chunks, backend):
    """Loss, metrics and the gradients of hidden, weight and bias against the float64 spec, with
    the loss scaled (3.7) and added to another term that reaches hidden and weight too; masked
    positions hold NaN/inf in every per-token input and in the hidden states."""
    hidden, weight, b, labels = _head(None, H, V, F64, "cpu", bias=bias, lead=lead)
    data, mask = _actor_batch(lead, V, F64, "cpu")
    kw = _loss_kwargs(LOSS_OPTIONS[options], data)
    old, adv = kw.pop("old_logp"), kw.pop("advantages")
    poisoned = torch.where(mask.unsqueeze(-1), hidden, float("nan"))
    loss, metrics = pf.fused_linear_ppo_loss(poisoned, weight, labels, old, adv, mask, bias=b, **kw)
    loss_r, metrics_r = R.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, bias=b, **kw)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    def other():
        return (torch.where(mask.unsqueeze(-1), hidden, 0.0) * 0.3).sin().sum() + (weight ** 2).sum() * 1e-3

    grads = torch.autograd.grad(3.7 * loss + other(), inputs)
    grads_r = torch.autograd.grad(3.7 * loss_r + other(), inputs)
    torch.testing.assert_close(loss, loss_r, rtol=1e-10, atol=1e-12)
    for got, exp in zip(grads, grads_r):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)
    for name in metrics_r:
        torch.testing.assert_close(metrics[name], metrics_r[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_loss_in_low_precision_within_twice_the_eager_error(dtype):
    """As the low-precision test above, with the gradient scaled by 3.7 after the fact (one more
    rounding of the hidden and weight gradients in their dtype than eager takes)."""
    hidden, weight, b, labels = _head(None, 64, 1000, dtype, "cpu", lead=(4, 20))
    data, mask = _actor_batch((4, 20), 1000, torch.float32, "cpu", garbage=False)
    kw = dict(old_logp=data["old_logp"], advantages=data["advantages"], entropy_coef=0.01, temperature=0.8)

    def run(loss_fn, *tensors):
        loss, _ = loss_fn(*tensors, labels, mask=mask, **kw)
        return [loss] + list(torch.autograd.grad(3.7 * loss, tensors))

    def fused(h, w, bb, labels, **k):
        return pf.fused_linear_ppo_loss(h, w, labels, k.pop("old_logp"), k.pop("advantages"), bias=bb, **k)

    def eager(h, w, bb, labels, **k):
        return pf.ppo_loss(torch.nn.functional.linear(h, w, bb), labels, k.pop("old_logp"), k.pop("advantages"), **k)

    exact = run(fused, *(t.detach().double().requires_grad_() for t in (hidden, weight, b)))
    got, eag = run(fused, hidden, weight, b), run(eager, hidden, weight, b)
    for name, g, e, ex in zip(("loss", "hidden", "weight", "bias"), got, eag, exact):
        rounding = torch.finfo(dtype).eps * ex.abs().max().item()
        assert max_err(g, ex) <= 2 * max_err(e, ex) + rounding, name


def test_the_loss_takes_three_gemms_per_chunk_and_only_those_it_needs(monkeypatch):
    """GEMM FLOPs of one forward+backward, in units of one chunk-padded logits GEMM (2·N·H·V):
    3 for the loss (4 before: the backward recomputed the logits), 2 when hidden or the weight is
    frozen, 1 for scoring under no_grad; 4 where the gradient cannot be known in the forward (a
    sequence-level objective, per-token log-probs differentiated with any weights)."""
    N, H, V = 300, 8, 1000
    padded = -(-N // linear_chunk_tokens(V, torch.float32)) * linear_chunk_tokens(V, torch.float32)
    hidden, weight, b, labels = _head(N, H, V, torch.float32, "cpu")
    labels[1] = 3
    data, mask = _actor_batch((N,), V, torch.float32, "cpu", garbage=False)
    mask[:] = True
    old, adv = data["old_logp"], data["advantages"]

    def units(inputs, loss_type="vanilla"):
        def run():
            loss, _ = pf.fused_linear_ppo_loss(*inputs, labels, old, adv, mask, loss_type=loss_type, entropy_coef=0.1)
            if loss.requires_grad:
                torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
        return gemm_flops(run) / (2 * padded * H * V)

    assert units((hidden, weight)) == 3
    assert units((hidden, weight.detach())) == 2
    assert units((hidden.detach(), weight)) == 2
    with torch.no_grad():
        assert units((hidden, weight)) == 1
    assert units((hidden, weight), loss_type="gspo") == 4
    logp = lambda: torch.autograd.grad(  # noqa: E731
        (pf.fused_linear_token_logprobs(hidden, weight, labels) * adv).sum(), (hidden, weight))
    assert gemm_flops(logp) / (2 * padded * H * V) == 4


def test_the_triton_backward_takes_only_the_two_gradient_gemms(force_backend, device):
    """On the Triton backend the recomputing backward's logits come from the dlogits kernel, not a
    GEMM: 2 units per chunk (dhidden, dweight), 1 with a frozen head, where the GEMM-then-rows
    backends take 3 and 2; the Triton forward takes none."""
    N, H, V = 40, 8, 200
    padded = -(-N // linear_chunk_tokens(V, torch.float32)) * linear_chunk_tokens(V, torch.float32)
    hidden, weight, b, labels = _head(N, H, V, torch.float32, device)
    upstream = torch.randn(N, device=device)

    def units(inputs):
        def run():
            logp = pf.fused_linear_token_logprobs(inputs[0], inputs[1], labels, bias=b)
            torch.autograd.grad((logp * upstream).sum(), [t for t in inputs if t.requires_grad])
        return gemm_flops(run) / (2 * padded * H * V)

    for backend, full, frozen in (("triton", 2, 1), ("reference", 4, 3)):
        with force_backend(backend):
            assert units((hidden, weight)) == full, backend
            assert units((hidden, weight.detach())) == frozen, backend


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, grad_entropy", [(True, True), (False, False)])
def test_the_triton_dlogits_kernel_is_the_row_backward_of_the_heads_logits(dtype, bias, grad_entropy, device):
    """The backward kernel on an odd 13 x 37 x 203 head at temperature 0.7, from the Triton
    forward's lse and entropy, against float64 autograd through the spec over the same logits
    (rounded to the inputs' dtype, as both kernels round them); an ignored row holding NaN gets 0;
    any range of the vocabulary gives bitwise the columns of the whole."""
    N, H, V, inv_temp = 13, 37, 203, 1 / 0.7
    hidden, weight, b, labels = (None if t is None else t.detach() for t in _head(N, H, V, dtype, device, bias=bias))
    hidden[1] = float("nan")  # labels[1] is ignore_index
    out = linear_logprobs.out_dtype(dtype)
    _, entropy, lse, _ = linear_logprobs.triton_forward(hidden, weight, b, labels, inv_temp, -100, True, False)
    g = torch.Generator().manual_seed(4)
    grad_logp = torch.randn(N, generator=g, dtype=F64).to(device=device, dtype=out)
    grad_h = torch.randn(N, generator=g, dtype=F64).to(device=device, dtype=out) if grad_entropy else None

    def dlogits(first=0, entries=V):
        part = slice(first, first + entries)
        return linear_logprobs.triton_tile_dlogits(hidden, weight[part], None if b is None else b[part], first, V,
                                                   labels, lse, entropy, grad_logp, grad_h, inv_temp, -100, out)

    whole = dlogits()
    clean = torch.where(labels.unsqueeze(-1) != -100, hidden.double(), 0.0)
    z = torch.nn.functional.linear(clean, weight.double(), None if b is None else b.double())
    z = z.to(dtype).double().requires_grad_()
    logp_exact, entropy_exact = R.token_logprobs(z, labels, temperature=0.7, return_entropy=True)
    total = (logp_exact * grad_logp.double()).sum()
    if grad_entropy:
        total = total + (entropy_exact * grad_h.double()).sum()
    (exact,) = torch.autograd.grad(total, z)
    # Float64 is exact to rounding; float32 and bf16 take their logits' sums in float32, which
    # moves a bf16 logit by one unit now and then.
    tolerance = {F64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * exact.abs().max().item()
    torch.testing.assert_close(whole, exact.to(out), rtol=0, atol=tolerance)
    assert (whole[1] == 0).all()
    for first, entries in ((16, 64), (150, 53), (37, 1), (0, 202)):
        assert torch.equal(dlogits(first, entries), whole[:, first:first + entries]), (first, entries)
    # A label outside [0, V) (which the public functions reject before any kernel runs) gives NaN
    # for its row, never a number, and leaves the other rows as they were.
    labels[2] = V
    _, entropy, lse, _ = linear_logprobs.triton_forward(hidden, weight, b, labels, inv_temp, -100, True, False)
    out_of_range = dlogits()
    assert torch.isnan(out_of_range[2]).all()
    rows = [r for r in range(N) if r != 2]
    assert torch.equal(out_of_range[rows], whole[rows])


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_gradients_in_the_forward_equal_the_recomputing_backward(dtype, monkeypatch, small_chunks, backend):
    """Against the path that recomputes the logits in the backward (forced): the same loss and
    metrics bitwise, the same gradients to rounding (bitwise where the backend's row ops are the
    same in both)."""
    hidden, weight, b, labels = _head(None, 16, 300, dtype, "cpu", lead=(3, 30))
    data, mask = _actor_batch((3, 30), 300, dtype, "cpu")
    kw = dict(ref_logp=data["ref_logp"], kl_coef=0.05, entropy_coef=0.01, temperature=0.7, dual_clip=2.0)
    results = []
    for in_forward in (True, False):
        monkeypatch.setattr(linear_logprobs, "_gradients_in_forward", lambda *args: in_forward)
        loss, metrics = pf.fused_linear_ppo_loss(hidden, weight, labels, data["old_logp"], data["advantages"],
                                                 mask, bias=b, **kw)
        results.append((loss, metrics, torch.autograd.grad(loss, (hidden, weight, b))))
    (loss, metrics, grads), (loss_r, metrics_r, grads_r) = results
    if backend == "triton":  # the recomputing forward is the tile kernel, not the row op on the GEMM's logits
        torch.testing.assert_close(loss, loss_r)
        for got, exp in zip(grads, grads_r):
            torch.testing.assert_close(got, exp)
        return
    assert torch.equal(loss, loss_r)
    assert all(torch.equal(metrics[name], metrics_r[name]) for name in metrics_r)
    for got, exp in zip(grads, grads_r):
        assert torch.equal(got, exp)


def test_backward_twice_with_the_graph_kept_and_accumulated_grads():
    """The gradients are scaled in place and handed over only when the graph is not kept: a
    ``retain_graph=True`` backward leaves them for the next one, and ``.grad`` accumulates."""
    hidden, weight, b, labels = _head(None, 8, 77, F64, "cpu", lead=(3, 10))
    data, mask = _actor_batch((3, 10), 77, F64, "cpu")
    kw = dict(entropy_coef=0.1, ref_logp=data["ref_logp"], kl_coef=0.1)
    loss, _ = pf.fused_linear_ppo_loss(hidden, weight, labels, data["old_logp"], data["advantages"], mask, bias=b,
                                       **kw)
    loss_r, _ = R.fused_linear_ppo_loss(hidden, weight, labels, data["old_logp"], data["advantages"], mask, bias=b,
                                        **kw)
    want = torch.autograd.grad(loss_r, (hidden, weight, b))
    first = torch.autograd.grad(2.0 * loss, (hidden, weight, b), retain_graph=True)
    second = torch.autograd.grad(loss * 0.5, (hidden, weight, b), retain_graph=True)
    (loss + loss ** 2).backward()
    for f, s, w, acc in zip(first, second, want, (hidden.grad, weight.grad, b.grad)):
        torch.testing.assert_close(f, 2.0 * w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s, 0.5 * w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(acc, (1 + 2 * loss_r.detach()) * w, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_double_backward_through_the_loss_is_an_error_not_a_zero():
    """create_graph=True gives the right gradients, which then refuse a second backward (a
    constant there would make a gradient penalty silently 0)."""
    hidden, weight, b, labels = _head(None, 8, 77, F64, "cpu", lead=(2, 5))
    zeros = torch.zeros(2, 5, dtype=F64)
    loss, _ = pf.fused_linear_ppo_loss(hidden, weight, labels, zeros, zeros + 1, zeros == 0, bias=b)
    loss_r, _ = R.fused_linear_ppo_loss(hidden, weight, labels, zeros, zeros + 1, zeros == 0, bias=b)
    dh, dw = torch.autograd.grad(loss * 2, (hidden, weight), create_graph=True)
    dh_r, dw_r = torch.autograd.grad(loss_r * 2, (hidden, weight))
    torch.testing.assert_close(dh, dh_r, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dw, dw_r, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(dh.square().sum(), weight)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        dw.sum().backward()


def test_a_tokens_loss_gradient_does_not_depend_on_the_batch(small_chunks, backend):
    """Bitwise, with the token-sum aggregation (whose weights do not depend on the batch): the
    row ops see the chunk's tokens only, the GEMMs the padded chunk, alone as in any batch."""
    hidden, weight, b, labels = _head(100, 64, 500, torch.float32, "cpu", bias=True)
    data, mask = _actor_batch((100,), 500, torch.float32, "cpu")
    kw = dict(entropy_coef=0.01, agg="token-sum", temperature=0.9)

    def grad_of(rows):
        h = hidden.detach()[rows].requires_grad_()
        loss, _ = pf.fused_linear_ppo_loss(h, weight, labels[rows], data["old_logp"][rows], data["advantages"][rows],
                                           mask[rows], bias=b, **kw)
        return torch.autograd.grad(loss, h)[0]

    everything = grad_of(list(range(100)))
    for rows in ([0], [5, 6, 7], list(range(60, 100)), [99, 3, 40]):
        assert torch.equal(grad_of(rows), everything[rows])


@pytest.mark.parametrize("loss_type, params", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_token_local_objectives_read_their_own_token_only(loss_type, params):
    """An objective that ``objectives.token_local`` admits (the fused loss then computes its
    gradient chunk by chunk) gives every other token the same term and the same gradient when one
    token's log-prob moves."""
    opts = LossOptions(loss_type=loss_type, loss_params=params)
    if not objectives.token_local(opts.loss_type, opts.loss_params):
        pytest.skip("not token-local: the fused loss recomputes in the backward")
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(3, 6, generator=g, dtype=F64) * 3
    old = logp + 0.4 * torch.randn(3, 6, generator=g, dtype=F64)
    adv = torch.randn(3, 6, generator=g, dtype=F64)
    mask = torch.ones(3, 6, dtype=torch.bool)

    def terms(lp):
        lp = lp.clone().requires_grad_()
        pg = objectives.policy_terms(lp, old, adv, mask, opts).pg
        return pg.detach(), torch.autograd.grad(pg.sum(), lp)[0]

    base, base_grad = terms(logp)
    for moved in ((0, 0), (1, 3), (2, 5)):
        shifted = logp.clone()
        shifted[moved] += 0.7
        pg, grad = terms(shifted)
        others = torch.ones_like(mask)
        others[moved] = False
        assert torch.equal(pg[others], base[others]) and torch.equal(grad[others], base_grad[others]), moved


def _largest_allocation(call) -> int:
    """The largest single buffer (bytes) torch allocates on the CPU during ``call()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    return max(event.cpu_memory_usage for event in prof.events())


@pytest.mark.parametrize("backend_name", ["default", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_go_vocabulary_outer_with_no_weight_sized_float32_buffer(monkeypatch, dtype, backend_name,
                                                                                device):
    """Fewer tokens than vocabulary entries: the backward sums the weight's gradient per chunk of the
    vocabulary (13 chunks of 16 entries, the last of 11) over padded tiles of 16 tokens, and never
    allocates a float32 buffer of the weight's size, which the token-outer order does; the
    gradients within twice eager's error, NaN in ignored rows reaching nothing, and a token's hidden
    gradient bitwise the same alone as in the batch. On the Triton backend each tile's dlogits
    come from its kernel (the interpreter copies the kernel's arguments, so the allocation bound is
    checked on the default backend only)."""
    if backend_name == "triton":
        monkeypatch.setenv("PPO_FAST_BACKEND", "triton")
    else:
        device = "cpu"
    N, H, V = 39, 24, 203
    monkeypatch.setattr(linear_logprobs, "TILE_BYTES", 16 * H * 4)
    assert linear_logprobs.vocabulary_tile(V, H) == (16, 16)
    hidden, weight, b, labels = _head(N, H, V, dtype, device)
    with torch.no_grad():
        hidden[1] = float("nan")  # labels[1] is ignore_index
    g = torch.Generator().manual_seed(3)
    upstream = torch.randn(N, generator=g, dtype=F64)

    def objective(h, w, bb, fn=pf.fused_linear_token_logprobs):
        logp, entropy = fn(h, w, labels, bias=bb, return_entropy=True, temperature=0.8)
        return (logp * upstream.to(logp)).sum() + 0.3 * entropy.sum()

    def grads(h, w, bb, *, fn=pf.fused_linear_token_logprobs):
        return torch.autograd.grad(objective(h, w, bb, fn), (h, w, bb))

    def largest_in_backward():
        loss = objective(hidden, weight, b)
        return _largest_allocation(lambda: torch.autograd.grad(loss, (hidden, weight, b)))

    calls = []
    outer = linear_logprobs._backward_vocabulary_outer
    monkeypatch.setattr(linear_logprobs, "_backward_vocabulary_outer", lambda *a: calls.append(1) or outer(*a))
    if backend_name == "default":
        assert largest_in_backward() < V * H * 4
    fused = grads(hidden, weight, b)
    assert calls
    clean = hidden.detach().clone()
    clean[1] = 0
    with monkeypatch.context() as patch:  # the oracles on the reference backend, not the one under test
        patch.setenv("PPO_FAST_BACKEND", "reference")
        exact = grads(*(t.detach().double().requires_grad_() for t in (clean, weight, b)))
        eager = grads(clean.detach().requires_grad_(), weight, b,
                      fn=lambda h, w, lab, bias, **k: pf.token_logprobs(torch.nn.functional.linear(h, w, bias), lab,
                                                                        **k))
    for name, got, eag, ex in zip(("hidden", "weight", "bias"), fused, eager, exact):
        assert got.dtype == dtype and not torch.isnan(got).any(), name
        rounding = torch.finfo(dtype).eps * ex.abs().max().item()
        assert max_err(got, ex) <= 2 * max_err(eag, ex) + rounding, name
    for rows in ([5], [5, 0, 20], list(range(N))[::-1]):
        h = hidden[rows].detach().requires_grad_()
        logp, entropy = pf.fused_linear_token_logprobs(h, weight, labels[rows], bias=b, return_entropy=True,
                                                       temperature=0.8)
        (dh,) = torch.autograd.grad((logp * upstream[rows].to(logp)).sum() + 0.3 * entropy.sum(), h)
        assert torch.equal(dh[rows.index(5)], fused[0][5]), rows

    if backend_name == "default":
        monkeypatch.setattr(linear_logprobs, "vocabulary_outer", lambda *args: False)
        assert largest_in_backward() >= V * H * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_float32_accumulator_rounds_into_its_own_storage_bitwise(dtype):
    """Block by block (7 rows of 3 at a time, the first block overlapping its own bytes): the same
    bits as a rounding into a fresh tensor, and no second buffer."""
    acc = torch.randn(7, 33, dtype=torch.float64).mul_(1e3).float()
    expected = acc.to(dtype)
    storage = acc.untyped_storage().data_ptr()
    rounded = linear_logprobs._rounded_in_place(acc, dtype, block_bytes=3 * 33 * 4)
    assert torch.equal(rounded, expected) and rounded.is_contiguous()
    assert rounded.untyped_storage().data_ptr() == storage
