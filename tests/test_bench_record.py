"""The benches' results writer: percentiles, provenance, and markdown rendered from the data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))

import record  # noqa: E402


def test_summary_gives_median_and_20th_80th_percentiles_against_torch_quantile():
    samples = torch.rand(37, dtype=torch.float64) * 10
    got = record.summary(samples.tolist())
    want = torch.quantile(samples, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    assert [got["median"], got["p20"], got["p80"]] == pytest.approx(want, rel=1e-12)
    assert got["n"] == 37


def test_summary_of_one_sample_and_of_none():
    assert record.summary([2.5]) == {"median": 2.5, "p20": 2.5, "p80": 2.5, "n": 1}
    with pytest.raises(ValueError, match="at least one sample"):
        record.summary([])


def test_publish_writes_the_data_and_renders_the_markdown_from_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PPO_FAST_BENCH_COMMIT", "0123456789abcdef")
    seen = []

    def render(doc):
        seen.append(doc)
        return ["# Title", "", f"| x | {record.fmt(doc['t'])} |"]

    text = record.publish(tmp_path / "r.md", {"t": record.summary([1.0, 2.0, 3.0])}, render)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert seen == [doc]  # the renderer saw exactly what the JSON holds
    meta = doc["metadata"]
    assert meta["commit"] == "0123456789abcdef"
    assert meta["machine"]["cores"] and meta["versions"]["python"] and meta["versions"]["torch"]
    assert meta["command"].split()[0] in ("python", Path(sys.argv[0]).name)
    assert (tmp_path / "r.md").read_text() == text
    lines = text.splitlines()
    assert lines[0] == "# Title" and lines[2].startswith("Commit `0123456789abcdef`, ")
    assert "| x | 2.0 (1.4-2.6) |" in lines


def test_the_linear_head_benchs_forced_providers_take_the_path_they_name():
    """Each provider of benches/linear_head.py that forces a path reaches it: the recomputing path
    runs four GEMMs per chunk where the fused one runs three, and for 16-bit weights with fewer
    tokens than vocabulary entries the token-outer order runs three where the vocabulary-outer
    default runs four (a patch on a name the library no longer reads would measure the default)."""
    import linear_head

    def gemm_work(provider, dtype):
        inputs = linear_head.make_inputs(64, 16, 1000, dtype, "cpu")
        return linear_head.gemm_flops(linear_head.make_run(provider, inputs))

    assert 3 * gemm_work("fused, recompute", torch.float32) == 4 * gemm_work("fused", torch.float32)
    assert 3 * gemm_work("fused", torch.bfloat16) == 4 * gemm_work("fused, token-outer", torch.bfloat16)


def test_the_linear_head_benchs_trl_provider_computes_the_same_loss_and_gradients():
    """TRL's head provider takes the same clipped, entropy-regularised token-mean loss as ours, so
    the benchmark compares equal work: the gradients of hidden and weight agree with the fused
    head's to float32 rounding."""
    pytest.importorskip("trl")
    import linear_head

    inputs = linear_head.make_inputs(64, 16, 1000, torch.float32, "cpu")
    ours = linear_head.make_run("fused", inputs)()
    theirs = linear_head.make_run("trl", inputs)()
    for got, want in zip(theirs, ours):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_linear_head_benchs_full_kl_providers_compute_the_same_gradients(monkeypatch):
    """With ``--full-kl`` every provider but the k3 one takes the same loss, the full KL to the
    reference head included (the gradients agree to float32 rounding, and differ from the k3
    provider's), the ``KL in PyTorch`` ones run the op's PyTorch implementation where the others
    run its native kernels, and for bfloat16 heads ``fused, KL by GEMMs`` reaches the KL's GEMM path where the
    fused one runs Triton's kernels (forced here, under the interpreter): both heads' logits by
    GEMMs in the forward (over half the head's chunk of 1024 tokens) and again in the backward
    (over the vocabulary-outer order's token tiles), where Triton's kernels take none."""
    import linear_head

    from ppo_fast.ops import full_kl

    in_pytorch = ("fused, KL in PyTorch", "logits + pf.ppo_loss, KL in PyTorch")
    calls, reference = [], full_kl.REFERENCE
    counted = full_kl.KLOps(lambda *args: calls.append(1) or reference.forward(*args), reference.backward)
    monkeypatch.setattr(full_kl, "REFERENCE", counted)
    inputs = linear_head.make_inputs(40, 16, 300, torch.float32, "cpu", full_kl=True)
    grads = {provider: linear_head.make_run(provider, inputs)()
             for provider in ("fused", "fused, recompute", "logits + pf.ppo_loss", "eager", "fused, k3 KL")}
    assert not calls
    for provider in in_pytorch:
        grads[provider] = linear_head.make_run(provider, inputs)()
        assert calls, f"{provider} did not run the op's PyTorch implementation"
        calls.clear()
    for provider in ("fused, recompute", "logits + pf.ppo_loss", "eager", *in_pytorch):
        for got, want in zip(grads[provider], grads["fused"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=provider)
    assert not torch.allclose(grads["fused, k3 KL"][0], grads["fused"][0], rtol=1e-4, atol=1e-6)
    from ppo_fast.ops.linear_logprobs import vocabulary_tile

    monkeypatch.setenv("PPO_FAST_BACKEND", "triton")
    inputs = linear_head.make_inputs(40, 16, 300, torch.bfloat16, "cpu", full_kl=True)
    work = {provider: linear_head.gemm_flops(linear_head.make_run(provider, inputs))
            for provider in ("fused", "fused, KL by GEMMs")}
    gemm = lambda rows: 2 * rows * 16 * 300  # noqa: E731
    assert work["fused, KL by GEMMs"] - work["fused"] == 2 * gemm(1024 // 2) + 2 * gemm(vocabulary_tile(300, 16)[0])
