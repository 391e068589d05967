"""The fused head inside Hugging Face causal LMs: the probe accepts a plain head and names what it
refuses; completion log-probs, the PPO loss and every parameter's gradient equal the logits path;
the trainer gives the same run with the fused head on and off."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import ppo_fast as pf  # noqa: E402
from ppo_fast.head import (completion_head_inputs, completion_logprobs, completion_ppo_loss,  # noqa: E402
                           fused_head_unsupported)
from ppo_fast.sequences import completion_logits  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _llama(tie=False, dtype=torch.float64):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tie)).to(dtype)


def _batch(B=3, P=4, N=6, vocab=97):
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, vocab, (B, P + N), generator=g)
    attn = torch.ones_like(seqs)
    attn[0, :2] = 0  # left padding
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    old = -torch.rand(B, N, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(B, N, generator=g, dtype=torch.float64)
    return seqs, attn, P, mask, old, adv


@pytest.mark.parametrize("tie", [False, True])
def test_probe_accepts_a_plain_head(tie):
    seqs, attn, *_ = _batch()
    assert fused_head_unsupported(_llama(tie), seqs, attn) is None


def test_probe_names_a_soft_capped_head():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=5.0))
    seqs, attn, *_ = _batch()
    reason = fused_head_unsupported(model, seqs, attn)
    assert reason is not None and "soft-cap" in reason
    model.config.final_logit_softcapping = None
    assert fused_head_unsupported(model, seqs, attn) is None


def test_probe_names_a_model_without_a_linear_head():
    model = _llama()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    seqs, attn, *_ = _batch()
    assert "nn.Linear" in fused_head_unsupported(model, seqs, attn)


@pytest.mark.parametrize("tie", [False, True])
def test_log_probs_loss_and_every_gradient_equal_the_logits_path(tie):
    model = _llama(tie)
    seqs, attn, P, mask, old, adv = _batch()
    with torch.no_grad():
        logp = completion_logprobs(model, seqs, attn, P, temperature=0.7)
        want = pf.token_logprobs(completion_logits(model, seqs, attn, P), seqs[:, P:], temperature=0.7)
    torch.testing.assert_close(logp, want, rtol=1e-12, atol=1e-12)

    options = dict(clip_low=0.2, clip_high=0.28, entropy_coef=0.01, temperature=0.7, loss_type="gspo")
    loss, metrics = completion_ppo_loss(model, seqs, attn, P, old, adv, mask, **options)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    loss_r, metrics_r = pf.ppo_loss(completion_logits(model, seqs, attn, P), seqs[:, P:], old, adv, mask, **options)
    grads_r = torch.autograd.grad(loss_r, list(model.parameters()))
    torch.testing.assert_close(loss, loss_r, rtol=1e-11, atol=1e-12)
    assert metrics.keys() == metrics_r.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics_r[name], rtol=1e-10, atol=1e-12, msg=name)
    for (name, _), got, exp in zip(model.named_parameters(), grads, grads_r):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("tie", [False, True])
def test_the_full_kl_to_a_reference_head_equals_the_logits_path(tie):
    """A reference model's head inputs (its hidden states and a copy of its head, no graph) give its
    completion logits, and the actor's loss with the full KL to them equals the logits
    path's with the reference's logits, loss, metrics and every gradient."""
    model, reference = _llama(tie), _llama(tie)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    seqs, attn, P, mask, old, adv = _batch()
    ref_hidden, ref_weight, ref_bias = completion_head_inputs(reference, seqs, attn, P)
    assert not ref_hidden.requires_grad and ref_weight.data_ptr() != reference.lm_head.weight.data_ptr()
    with torch.no_grad():
        ref_logits = completion_logits(reference, seqs, attn, P)
    # To rounding: the model's head multiplies one more position (logits_to_keep), another GEMM shape.
    torch.testing.assert_close(torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias), ref_logits, rtol=1e-12,
                               atol=1e-12)

    options = dict(clip_low=0.2, entropy_coef=0.01, temperature=0.7, kl_estimator="full", kl_coef=0.3)
    loss, metrics = completion_ppo_loss(model, seqs, attn, P, old, adv, mask, ref_hidden=ref_hidden,
                                        ref_weight=ref_weight, ref_bias=ref_bias, **options)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    loss_r, metrics_r = pf.ppo_loss(completion_logits(model, seqs, attn, P), seqs[:, P:], old, adv, mask,
                                    ref_logits=ref_logits, **options)
    grads_r = torch.autograd.grad(loss_r, list(model.parameters()))
    torch.testing.assert_close(loss, loss_r, rtol=1e-11, atol=1e-12)
    assert metrics["kl"] > 0.01
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics_r[name], rtol=1e-10, atol=1e-12, msg=name)
    for (name, _), got, exp in zip(model.named_parameters(), grads, grads_r):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12, msg=name)


def test_the_reference_heads_inputs_are_what_its_head_receives_when_the_model_upcasts_its_logits():
    """A model that returns its logits in float32 (older Hugging Face Llamas did) gives its head's
    bfloat16 inputs, which the full KL takes beside its bfloat16 head."""

    class Upcasting(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits.float()
            return out

    torch.manual_seed(0)
    model, reference = (Upcasting(LlamaConfig(**SMALL)).to(torch.bfloat16) for _ in range(2))
    seqs, attn, P, mask, old, adv = _batch()
    assert fused_head_unsupported(reference, seqs, attn) is None
    ref_hidden, ref_weight, ref_bias = completion_head_inputs(reference, seqs, attn, P)
    assert ref_hidden.dtype == ref_weight.dtype == torch.bfloat16 and ref_bias is None
    loss, metrics = completion_ppo_loss(model, seqs, attn, P, old.float(), adv.float(), mask, ref_hidden=ref_hidden,
                                        ref_weight=ref_weight, kl_estimator="full", kl_coef=0.1)
    assert torch.isfinite(loss) and metrics["kl"] > 0


def test_the_head_is_restored_after_an_error():
    model = _llama()
    seqs, attn, P, mask, old, adv = _batch()
    with pytest.raises(ValueError, match="old_logp"):
        completion_ppo_loss(model, seqs, attn, P, old[:, :-1], adv, mask)
    assert "forward" not in vars(model.lm_head)
    with torch.no_grad():
        assert model(input_ids=seqs).logits.shape == (3, 10, 97)


def test_a_transformed_or_wrapped_head_is_refused_not_silently_wrong():
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=5.0))
    seqs, attn, P, mask, old, adv = _batch()
    with pytest.raises(ValueError, match="transforms its head's output"):
        completion_logprobs(gemma, seqs, attn, P)
    with pytest.raises(ValueError, match="transforms its head's output"):
        completion_ppo_loss(gemma, seqs, attn, P, old.float(), adv.float(), mask)

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = _llama()
    model.lm_head = ScaledHead(32, 97, bias=False, dtype=torch.float64)
    assert "ScaledHead with its own forward" in fused_head_unsupported(model, seqs, attn)
    with pytest.raises(ValueError, match="own forward"):
        completion_logprobs(model, seqs, attn, P)

    model = _llama()
    wrapped = model.lm_head.forward
    model.lm_head.forward = lambda x: wrapped(x)  # as accelerate's hooks install themselves
    assert "wrapped" in fused_head_unsupported(model, seqs, attn)
    with pytest.raises(ValueError, match="wrapped"):
        completion_logprobs(model, seqs, attn, P)
    assert "forward" in vars(model.lm_head)


@pytest.mark.parametrize("prompt_len", [0, -1, 11, 4.0, True])
def test_bad_prompt_length_is_named(prompt_len):
    seqs, attn, *_ = _batch()
    with pytest.raises(ValueError, match="prompt_len"):
        completion_logprobs(_llama(), seqs, attn, prompt_len)
    with pytest.raises(ValueError, match="attention_mask"):
        completion_logprobs(_llama(), seqs, None, 4)
