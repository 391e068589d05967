"""The native CPU kernels (csrc/) against the reference ops, the spec: float64 on fresh random
inputs, odd shapes, every option, gradients; garbage in ignored rows; batch invariance over
thread counts and batches."""

import os

import pytest
import torch

import ppo_fast as pf
from ppo_fast import dispatch, native
from ppo_fast.ops import gae as gae_ops
from ppo_fast.ops import ppo_loss as ppo_ops
from ppo_fast.ops import token_logprobs as row_ops

if os.environ.get("PPO_FAST_NATIVE") == "0":
    pytest.skip("native kernels switched off (PPO_FAST_NATIVE=0)", allow_module_level=True)

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
SHAPES = [(1, 1), (1, 7), (37, 1271), (3, 5, 301), (2, 4, 4099)]


def _inputs(shape, dtype, seed, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if labels.numel() > 2:
        labels.view(-1)[1] = ignore_index
        logits.view(-1, shape[-1])[1] = float("nan")  # an ignored row holds garbage
    return logits, labels


def test_the_native_kernels_build_and_serve_the_cpu():
    assert native.unavailable() is None
    assert dispatch.choose("token_logprobs", "cpu") == "native"
    assert dispatch.choose("gae", "cpu") == "native"
    assert dispatch.choose("ppo_loss", "cpu") == "native"
    assert dispatch.choose("linear_logprobs", "cpu") == "native"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_and_backward_match_the_reference(shape, dtype, temperature):
    logits, labels = _inputs(shape, dtype, seed=hash((shape, str(dtype))) % 1000)
    inv_temp = 1.0 / temperature
    ours = row_ops.native_forward(logits, labels, inv_temp, -100, True, True)
    spec = row_ops.reference_forward(logits, labels, inv_temp, -100, True, True)
    tol = TOLERANCE[dtype]
    for name, a, b in zip(("logp", "entropy", "lse", "sum_pi_squared"), ours, spec):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
    g = torch.Generator().manual_seed(3)
    grad_logp = torch.randn(shape[:-1], generator=g, dtype=ours[0].dtype)
    for grad_entropy in (None, torch.randn(shape[:-1], generator=g, dtype=ours[0].dtype)):
        got, want = torch.full_like(logits, 7.0), torch.empty_like(logits)
        row_ops.native_backward(got, logits, labels, ours[2], ours[1], grad_logp, grad_entropy, inv_temp, -100)
        row_ops.reference_backward(want, logits, labels, spec[2], spec[1], grad_logp, grad_entropy, inv_temp, -100)
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=max(tol, 1e-2 * (dtype not in (
            torch.float64, torch.float32))))


PPO_CASES = [
    dict(),
    dict(dual_clip=3.0),
    dict(kl_estimator="k1", kl_coef=0.1),
    dict(kl_estimator="abs", kl_coef=0.1, entropy_coef=0.01),
    dict(kl_estimator="k2", kl_coef=0.2, dual_clip=2.0, rollout=True),
    dict(kl_estimator="k3", kl_coef=0.05, entropy_coef=0.02, clip_high=0.28),
    dict(kl_estimator="k1+", kl_coef=0.1, rollout=True, tis_cap=1.5),
    dict(kl_estimator="k3+", kl_coef=0.1, entropy_coef=0.03, dual_clip=3.0, rollout=True),
    dict(kl_estimator="k3", kl_coef=0.0),
]


@pytest.mark.parametrize("case", PPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("shape,dtype", [((37, 1271), torch.float64), ((3, 5, 301), torch.float32),
                                         ((2, 4, 4099), torch.bfloat16), ((1, 7), torch.float16)])
def test_the_fused_ppo_terms_match_the_reference(case, shape, dtype):
    """Every per-token output, the log ratio pushed past the ±20 clamp and the k3 value past ±10
    on some tokens; an ignored row holds NaN."""
    case = dict(case)
    logits, labels = _inputs(shape, dtype, seed=len(case) + shape[-1])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(9)
    logp = row_ops.reference_forward(logits, labels, 0.8, -100, False)[0]
    old = logp + torch.randn(labels.shape, generator=g, dtype=acc)
    ref = logp + 3 * torch.randn(labels.shape, generator=g, dtype=acc)
    old.view(-1)[0] -= 25
    ref.view(-1)[-1] += 25
    rollout = old + 0.5 * torch.randn(labels.shape, generator=g, dtype=acc) if case.pop("rollout", False) else None
    adv = torch.randn(labels.shape, generator=g, dtype=acc)
    kl_estimator = case.pop("kl_estimator", "k3")
    args = dict(clip_low=0.2, clip_high=0.2, dual_clip=None, tis_cap=2.0, kl_coef=0.0, entropy_coef=0.0)
    args.update(case)
    coefficients = ppo_ops.LossCoefficients(1 / 0.8, args["clip_low"], args["clip_high"], args["dual_clip"] or 0.0,
                                            args["tis_cap"], args["kl_coef"], args["entropy_coef"])
    call = (logits, labels, old, adv, ref if "kl_coef" in case else None, rollout, coefficients, -100, kl_estimator)
    ours, spec = ppo_ops.native_forward(*call), ppo_ops.reference_forward(*call)
    tol = TOLERANCE[dtype]
    for name, a, b in zip(ppo_ops.PPO_OUTPUTS, ours, spec):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


def test_an_out_of_range_label_gives_nan_not_a_wild_read():
    """The label range is checked on the host except under torch.compile; the kernels then give NaN
    for such a row (as the Triton ones) and never read outside it."""
    logits = torch.randn(3, 40)
    labels = torch.tensor([5, 40, -100])
    logp, entropy, lse = row_ops.native_forward(logits, labels, 1.0, -100, True)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and torch.isnan(lse[1]) and logp[2] == 0
    dlogits = torch.zeros_like(logits)
    row_ops.native_backward(dlogits, logits, labels, lse, entropy, torch.ones(3), None, 1.0, -100)
    assert torch.isfinite(dlogits[0]).all() and torch.isnan(dlogits[1]).all() and (dlogits[2] == 0).all()


def test_rows_apart_tells_views_whose_rows_share_memory():
    from ppo_fast.ops.token_logprobs import rows_apart

    x = torch.randn(4, 9, 13)
    assert rows_apart(x) and rows_apart(x[:, :-1]) and rows_apart(x.transpose(0, 1)) and rows_apart(x[:, ::2])
    assert not rows_apart(x[:1].expand(3, 9, 13))
    assert not rows_apart(torch.randn(6, 13).as_strided((5, 13), (5, 1)))


def test_gae_refuses_cu_seqlens_outside_the_tokens():
    """Checked in the kernel too: under torch.compile the public check is skipped."""
    rewards = values = torch.randn(10)
    mask = torch.ones(10, dtype=torch.bool)
    for cu in ([0, 12], [0, 50_000_000], [1, 10], [0, 7, 3, 10], []):
        with pytest.raises(RuntimeError, match="cu_seqlens must"):
            gae_ops.native_forward(rewards, values, mask, torch.tensor(cu, dtype=torch.long), 1.0, 0.95)


@pytest.mark.slow
def test_compiled_before_any_eager_call_builds_at_run_time(tmp_path):
    """torch.compile(fullgraph=True) as a fresh process's first call: the trace cannot follow a
    build, so it only records the op; the first run builds (here into an empty cache)."""
    import subprocess
    import sys

    code = ("import torch, ppo_fast as pf\n"
            "f = torch.compile(lambda x, y: pf.token_logprobs(x, y), fullgraph=True)\n"
            "x, y = torch.randn(4, 7, dtype=torch.float64), torch.tensor([0, 1, 2, 3])\n"
            "torch.testing.assert_close(f(x, y), torch.log_softmax(x, -1).gather(-1, y[:, None])[:, 0])\n"
            "from ppo_fast import dispatch; print(dispatch.choose('token_logprobs', 'cpu'))\n")
    env = {**os.environ, "PPO_FAST_NATIVE_DIR": str(tmp_path / "cache")}
    env.pop("PPO_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "native"


def test_a_large_gradient_on_huge_pages_is_an_ordinary_tensor(monkeypatch):
    """Buffers of 16 MiB and more come from the 2 MiB-page allocator: the gradient must still be a
    tensor autograd can accumulate into and free."""
    logits, labels = _inputs((1100, 4099), torch.float32, seed=12)
    results = []
    for backend in ("native", "reference"):
        monkeypatch.setenv("PPO_FAST_BACKEND", backend)
        x = logits.clone().requires_grad_()
        pf.token_logprobs(x, labels).nan_to_num().sum().backward()
        pf.token_logprobs(x, labels).nan_to_num().sum().backward()  # accumulates into x.grad
        results.append(x.grad)
    assert results[0].is_contiguous() and results[0].shape == logits.shape
    torch.testing.assert_close(results[0], results[1], rtol=2e-5, atol=2e-5)
    kept = row_ops.NATIVE.empty_dlogits(logits)
    assert kept.untyped_storage().nbytes() >= logits.numel() * 4
    address = kept.data_ptr()
    del kept  # kept for the next gradient that fits ...
    assert row_ops.NATIVE.empty_dlogits(logits[:-7]).data_ptr() == address
    assert row_ops.NATIVE.empty_dlogits(logits[:100]).shape == (100, 4099)  # ... not taken by a much smaller one
    native.release_cache()


def test_a_shifted_view_and_the_gradient_in_place():
    g = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(4, 9, 513, generator=g), torch.randint(0, 513, (4, 9), generator=g)
    view = logits[:, :-1]
    lab = labels[:, 1:].contiguous()
    ours = row_ops.native_forward(view, lab, 1.0, -100, True)
    spec = row_ops.reference_forward(view, lab, 1.0, -100, True)
    torch.testing.assert_close(ours[0], spec[0], rtol=2e-5, atol=2e-5)
    want = torch.empty_like(view)
    grad = torch.randn(lab.shape)
    row_ops.reference_backward(want, view, lab, spec[2], spec[1], grad, None, 1.0, -100)
    assert row_ops.NATIVE.writes_in_place(view)
    row_ops.native_backward(view, view, lab, ours[2], ours[1], grad, None, 1.0, -100)
    torch.testing.assert_close(view, want, rtol=2e-5, atol=2e-5)


def test_a_banned_label_gives_minus_infinity_and_finite_entropy():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([1])
    ours = row_ops.native_forward(logits, labels, 1.0, -100, True)
    spec = row_ops.reference_forward(logits, labels, 1.0, -100, True)
    assert ours[0].item() == float("-inf") and torch.isfinite(ours[1]).all()
    torch.testing.assert_close(ours[1], spec[1])
    torch.testing.assert_close(ours[2], spec[2])


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_is_the_same_alone_in_any_batch_and_any_thread_count(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits, labels = _inputs((64, 3001), torch.float32, seed=11)
        whole = row_ops.native_forward(logits, labels, 1.0, -100, True)
        order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
        shuffled = row_ops.native_forward(logits[order], labels[order], 1.0, -100, True)
        alone = row_ops.native_forward(logits[5:6], labels[5:6], 1.0, -100, True)
        for w, s, a in zip(whole, shuffled, alone):
            assert torch.equal(w[order], s) and torch.equal(w[5:6], a)
    finally:
        torch.set_num_threads(previous)
    torch.set_num_threads(3 - threads)
    try:
        again = row_ops.native_forward(logits, labels, 1.0, -100, True)
        assert all(torch.equal(a, b) for a, b in zip(again, whole))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gae_padded_and_packed_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([1, 17, 5, 64, 3])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(cu[-1])
    rewards = torch.randn(total, generator=g, dtype=dtype)
    values = torch.randn(total, generator=g, dtype=dtype)
    mask = torch.rand(total, generator=g) > 0.25
    rewards[~mask] = float("nan")  # never read
    values[~mask] = float("inf")
    ours = gae_ops.native_forward(rewards, values, mask, cu, 0.99, 0.9)
    spec = gae_ops.reference_forward(rewards, values, mask, cu, 0.99, 0.9)
    for a, b in zip(ours, spec):
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-6)
    adv, ret = pf.gae(torch.randn(4, 33, dtype=dtype), torch.randn(4, 33, dtype=dtype),
                      torch.ones(4, 33, dtype=torch.bool), whiten=False)
    assert torch.isfinite(adv).all() and adv.dtype == dtype


def test_the_public_functions_give_the_references_gradients(monkeypatch):
    logits, labels = _inputs((6, 11, 257), torch.float64, seed=7)
    x = logits.clone().requires_grad_()
    logp, ent = pf.token_logprobs(x, labels, return_entropy=True, temperature=0.8)
    (logp.nan_to_num().sum() + 0.3 * ent.sum()).backward()
    monkeypatch.setenv("PPO_FAST_BACKEND", "reference")
    y = logits.clone().requires_grad_()
    logp_r, ent_r = pf.token_logprobs(y, labels, return_entropy=True, temperature=0.8)
    (logp_r.nan_to_num().sum() + 0.3 * ent_r.sum()).backward()
    torch.testing.assert_close(logp, logp_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)


def test_switched_off_it_says_why():
    import subprocess
    import sys

    code = "from ppo_fast import dispatch; print(dispatch.reasons('cpu')['native'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PPO_FAST_NATIVE": "0"},
                         capture_output=True, text=True, check=True)
    assert "switched off by PPO_FAST_NATIVE=0" in out.stdout


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_fused_linear_head_on_the_native_row_kernel(dtype, monkeypatch):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(45, 24, generator=g, dtype=dtype)
    weight = torch.randn(1031, 24, generator=g, dtype=dtype)
    labels = torch.randint(0, 1031, (45,), generator=g)
    labels[3] = -100
    assert dispatch.choose("linear_logprobs", "cpu") == "native"
    results = []
    for backend in ("native", "reference"):
        monkeypatch.setenv("PPO_FAST_BACKEND", backend)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = pf.fused_linear_token_logprobs(h, w, labels, return_entropy=True)
        (logp.sum() + 0.5 * ent.sum()).backward()
        results.append((logp, ent, h.grad, w.grad))
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_without_a_compiler_import_works_warns_once_and_runs_the_reference(tmp_path):
    import subprocess
    import sys

    code = ("import warnings, torch, ppo_fast as pf\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    a = pf.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]))\n"
            "    b = pf.gae(torch.randn(2, 3), torch.randn(2, 3), whiten=False)\n"
            "print(sum('could not be built' in str(w.message) for w in seen))\n"
            "from ppo_fast import dispatch; print(dispatch.choose('token_logprobs', 'cpu'))\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "PPO_FAST_NATIVE_DIR": str(tmp_path / "cache")}
    env.pop("PPO_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "reference"], out.stdout + out.stderr[-2000:]
