"""Shared test helpers."""

import os
import sys
from pathlib import Path

import torch

DEEPSPEED_LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]
"""The ``deepspeed`` launcher, run as the module its console script runs: found wherever pip put
the package, also when its scripts went to a folder off the PATH (``pip install --target``)."""


SAMPLE_BASE = Path(__file__).resolve().parent.parent / "examples" / "sample" / "base"
"""The sample model's directory: config, tokenizer and chat template, no weights."""


def tiny_model_dir(directory, *, reward: bool = False, tokenizer: bool = True) -> str:
    """A model directory of the sample model's config (2 layers, 64 wide: fast to save and load)
    with random weights: a causal LM, or with ``reward`` a sequence classifier with one output;
    with the sample's tokenizer unless ``tokenizer`` is False."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_class = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model_class.from_config(AutoConfig.from_pretrained(SAMPLE_BASE, num_labels=1)).save_pretrained(directory)
    if tokenizer:
        AutoTokenizer.from_pretrained(SAMPLE_BASE).save_pretrained(directory)
    return str(directory)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def subprocess_env(**extra):
    """The environment for a child run: CPU only, unbuffered, and without the rendezvous variables
    an in-process test may have set (a child would reuse the parent's port)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **extra)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PPO_FAST_BACKEND"):
        env.pop(name, None)
    return env


def random_logits(shape, dtype, device, scale=4.0):
    """Normal logits of standard deviation ``scale``, drawn in float64 then cast."""
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def random_labels(lead, V, device, ignore_fraction=0.2):
    """Labels in [0, V), about ``ignore_fraction`` of them -100."""
    labels = torch.randint(0, V, lead, device=device)
    return labels.masked_fill(torch.rand(lead, device=device) < ignore_fraction, -100)


def assert_loss_matches_spec(fn, spec, logits, *args, **kwargs):
    """``fn`` (the public loss) and ``spec`` (its reference) on the same float64 inputs: equal
    losses, gradients (of 2.5·loss) and metrics, and no metric carries a gradient."""
    loss, metrics = fn(logits, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss * 2.5, logits)
    x = logits.detach().requires_grad_()
    loss_r, metrics_r = spec(x, *args, **kwargs)
    (grad_r,) = torch.autograd.grad(loss_r * 2.5, x)
    torch.testing.assert_close(loss, loss_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_r, rtol=1e-9, atol=1e-12)
    assert metrics.keys() == metrics_r.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics_r[name], rtol=1e-10, atol=1e-12, msg=name)
        assert not metrics[name].requires_grad, name


# Every objective with its default parameters first, then variants that reach other branches.
OBJECTIVE_PARAMS = {
    "vanilla": [{}, {"importance_level": "sequence"}],
    "dppo_tv": [{}, {"ratio_cap": 1.5}],
    "dppo_kl": [{}],
    "gspo": [{}, {"token_gradient": False, "max_log_ratio": None}],
    "sapo": [{}, {"tau_pos": 2.0, "tau_neg": 0.5, "importance_level": "sequence", "token_gradient": False}],
    "gpg": [{}],
    "clip_cov": [{"clip_cov_ratio": 0.3, "clip_cov_lb": -5.0, "clip_cov_ub": 5.0}],
    "kl_cov": [{"kl_cov_ratio": 0.3}],
    "geo_mean": [{}],
    "dro": [{"beta": 0.3}],
    "cispo": [{}, {"ratio_min": 0.0, "ratio_max": 1.1}],
    "vespo": [{}, {"k_pos": 1.0, "lambda_neg": 0.5}],
}


def poison_actor_loss(after: int, patch=setattr) -> None:
    """Make the trainer's actor loss NaN from its ``after + 1``-th call on, on either path (the fused
    head's ``completion_ppo_loss`` or ``pf.ppo_loss`` on the logits). ``patch``: how to set the
    attributes (``monkeypatch.setattr`` in a test, to undo them afterwards)."""
    import ppo_fast as pf
    from ppo_fast.trainer import loop

    calls = {"n": 0}

    def poisoned(real):
        def loss_fn(*args, **kwargs):
            loss, metrics = real(*args, **kwargs)
            calls["n"] += 1
            return (loss * float("nan") if calls["n"] > after else loss), metrics
        return loss_fn

    patch(pf, "ppo_loss", poisoned(pf.ppo_loss))
    patch(loop, "completion_ppo_loss", poisoned(loop.completion_ppo_loss))


def gemm_flops(fn) -> int:
    """FLOPs of the GEMMs ``fn()`` runs, read by the profiler (which, unlike a dispatch mode, sees
    inside the custom ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    flops = 0
    for event in prof.events():
        first = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1}.get(event.name)
        if first is not None:
            (m, k), (_, n) = event.input_shapes[first:first + 2]
            flops += 2 * m * k * n
    return flops
