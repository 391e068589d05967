"""The CUDA side of ppo_fast.batch_invariant(): the Triton kernels (kernels/batch_invariant.py),
bitwise invariant (torch.equal) op by op and in a whole Hugging Face model, and right against
float64. On the CPU Triton's interpreter runs them in place of torch's CPU kernels; with
PPO_FAST_TEST_DEVICE=cuda (benches/gpu.sh) the same tests run on the GPU, the mode as users get it.
The compile check (tests/test_compile_check.py) holds that a row alone and a batch compile to the
same machine code."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import ppo_fast as pf

from conftest import DEVICE
from test_batch_invariant import _model, _rows_alone_and_shuffled, _variants, _weight, _mismatch

pytest.importorskip("triton")
modes = importlib.import_module("ppo_fast.batch_invariant")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def triton_on_the_cpu(monkeypatch):
    """The mode with CUDA's kernels: on the CPU, Triton interpreted, registered for CPU tensors."""
    if DEVICE == "cpu":
        monkeypatch.setitem(modes.OPS, "CPU", modes.OPS["CUDA"])
        monkeypatch.setitem(modes.ATTENTION_KERNELS, "cpu", modes.ATTENTION_KERNELS["cuda"])
        monkeypatch.setattr(modes, "kernels_missing", lambda: {})
    return pf.batch_invariant


OPS = {
    "linear": lambda w, b: (lambda x: F.linear(x, w)),
    "linear+bias": lambda w, b: (lambda x: F.linear(x, w, b)),
    "addmm alpha beta": lambda w, b: (lambda x: torch.addmm(b, x, w.t(), beta=0.5, alpha=-2.0)),
    "matmul 3-D": lambda w, b: (lambda x: x[:, None, :] @ w.t()[None]),
    "bmm": lambda w, b: (lambda x: torch.bmm(x.view(x.shape[0], 5, -1), w[:, : x.shape[1] // 5].t()[None].expand(
        x.shape[0], -1, -1))),
    "rms mean": lambda w, b: (lambda x: x.float().pow(2).mean(-1, keepdim=True)),
    "sum": lambda w, b: (lambda x: x.sum(-1)),
    "sum of two dims": lambda w, b: (lambda x: x.view(x.shape[0], 5, -1).sum((0, 2))),
}


@pytest.mark.parametrize("dtype", DTYPES[:2] + [pytest.param(DTYPES[2], marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_each_op_gives_a_row_the_same_bits_in_every_batch(name, dtype, triton_on_the_cpu):
    k, n = 70, 45  # neither a multiple of any block
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    op = OPS[name](_weight(n, k, dtype).to(DEVICE), b.to(dtype))
    with triton_on_the_cpu():
        if name != "sum of two dims":  # it sums over the rows: no row to compare
            assert _rows_alone_and_shuffled(op, x) == []
        got = op(x)
    expected = OPS[name](_weight(n, k, torch.float64).to(DEVICE), b.double())(x.double())
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), expected.double(), rtol=tolerance, atol=tolerance * 8)
    assert got.dtype == op(x).dtype


def test_the_out_and_in_place_gemms_run_the_triton_kernels_too(triton_on_the_cpu):
    """CUDA's table carries mm.out, addmm.out, addmm_ and bmm.out like the CPU's: each keeps a row's
    bits in every batch and gives the functional op's bits."""
    k, n = 70, 45
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    w = _weight(n, k, torch.float32).to(DEVICE)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    into = {"mm.out": lambda r: torch.mm(r, w.t(), out=torch.empty(0, device=DEVICE)),
            "addmm.out": lambda r: torch.addmm(bias, r, w.t(), beta=0.5, alpha=2.0, out=torch.empty(0, device=DEVICE)),
            "addmm_": lambda r: bias.expand(r.shape[0], -1).clone().addmm_(r, w.t(), beta=0.5, alpha=2.0),
            "bmm.out": lambda r: torch.bmm(r[None], w.t()[None], out=torch.empty(0, device=DEVICE))[0]}
    functional = {"mm.out": lambda r: r @ w.t(), "bmm.out": lambda r: torch.bmm(r[None], w.t()[None])[0],
                  "addmm.out": lambda r: torch.addmm(bias, r, w.t(), beta=0.5, alpha=2.0)}
    functional["addmm_"] = functional["addmm.out"]
    with triton_on_the_cpu():
        for name, call in into.items():
            full = call(x)
            assert all(torch.equal(call(x[:b]), full[:b]) for b in (1, 4, 7)), name
            assert torch.equal(full, functional[name](x)), name


def test_float64_integers_and_booleans_keep_torch_semantics(triton_on_the_cpu):
    x = torch.randn(5, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    w = torch.randn(33, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    counts = torch.arange(12, device=DEVICE).view(3, 4)
    flags = counts % 3 == 0
    with triton_on_the_cpu():
        product, total = x @ w, x.sum(1)
        integer_sum, bool_sum = counts.sum(1), flags.sum(-1)
        with pytest.raises(RuntimeError, match="Got: torch.int64"):
            counts.mean(1)
    torch.testing.assert_close(product, x @ w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, x.sum(1), rtol=1e-12, atol=1e-12)
    assert integer_sum.dtype == bool_sum.dtype == torch.int64
    assert integer_sum.tolist() == [6, 22, 38] and bool_sum.tolist() == flags.sum(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16] + [pytest.param(d, marks=pytest.mark.slow) for d in DTYPES[::2]],
                         ids=str)
def test_attention_matches_float64_and_a_query_decoded_or_shifted_by_padding_keeps_its_bits(dtype):
    g = torch.Generator().manual_seed(9)
    B, H, Hkv, S, D = 3, 6, 2, 37, 24  # 3 query heads per KV head; S spans two key chunks
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(DEVICE, dtype) for h in (H, Hkv, Hkv))
    pad = torch.tensor([0, 5, 36])
    allowed = ((torch.arange(S)[None, :] >= pad[:, None])[:, None, None, :]
               & (torch.arange(S)[None, :] <= torch.arange(S)[:, None])[None, None]).to(DEVICE)
    bias = torch.zeros(B, 1, S, S, device=DEVICE).masked_fill(~allowed, -math.inf)
    kernel = modes.ATTENTION_KERNELS["cuda"]
    out = kernel(q, k, v, bias, D ** -0.5)

    scores = (q.double() @ k.double().repeat_interleave(3, 1).mT) * D ** -0.5
    p = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num()
    expected = (p @ v.double().repeat_interleave(3, 1)).transpose(1, 2)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    assert out[2, :36].abs().max() == 0  # the queries with no valid key

    for t in (0, 17, S - 1):  # decode: one query against the cache up to it
        step = kernel(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], bias[:, :, t:t + 1, :t + 1], D ** -0.5)
        assert torch.equal(step[:, 0], out[:, t]), t
    # The first sequence with three more padding keys in front, masked with the lowest float.
    shifted = [torch.cat([torch.randn(1, t.shape[1], 3, D, generator=g).to(DEVICE, dtype), t[:1]], 2) for t in (q, k, v)]
    allowed_shifted = F.pad(allowed[:1], (3, 0, 3, 0), value=False)
    bias_shifted = torch.zeros(1, 1, S + 3, S + 3, device=DEVICE).masked_fill(~allowed_shifted,
                                                                             torch.finfo(torch.float32).min)
    assert torch.equal(kernel(*shifted, bias_shifted, D ** -0.5)[0, 3:], out[0])
    assert torch.equal(kernel(q[:1], k[:1], v[:1], None, D ** -0.5), out[:1])  # causal without a mask


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)  # the GPU dtype; float32: the ops' tests
def test_a_llama_sequence_has_the_same_logits_alone_in_any_batch_and_decoded(dtype, triton_on_the_cpu):
    model = _model("llama", dtype, hidden=32).to(DEVICE)
    with triton_on_the_cpu():
        seq, alone, variants = _variants(model)
    for name, logits in variants.items():
        assert torch.equal(logits, alone), f"{dtype}: {name} differs: {_mismatch(seq, alone, {name: logits})}"
    with torch.no_grad():
        torch.testing.assert_close(alone.float(), model(seq[None]).logits[0].float(),
                                   **({} if dtype == torch.float32 else dict(rtol=0.1, atol=0.1)))
