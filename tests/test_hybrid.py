"""HybridEngine: two CPU ranks through the real ``deepspeed`` launcher (ZeRO-2 and ZeRO-3, a tiny
Llama built from a config), plus single-process checks of bad input."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")

import ppo_fast as pf  # noqa: E402

from helpers import DEEPSPEED_LAUNCHER, subprocess_env  # noqa: E402

HERE = Path(__file__).parent


def _launch(stage, tmp_path):
    # CPU ranks (gloo) on any machine, also where a GPU is visible.
    env = subprocess_env(OMP_NUM_THREADS="1")
    port = 29500 + stage + os.getpid() % 1000
    proc = subprocess.run(
        [*DEEPSPEED_LAUNCHER, "--num_gpus", "2", "--master_port", str(port),
         str(HERE / "hybrid_worker.py"), "--stage", str(stage), "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # DeepSpeed's CPU all-reduce segments are unlinked by ppo_fast.distributed, not left in RAM.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_hybrid_engine_under_deepspeed_two_ranks(stage, tmp_path):
    for r in _launch(stage, tmp_path):
        where = f"rank {r['rank']}, ZeRO-{stage}"
        assert r["static_equal"], f"static-cache greedy decode differs from the full model ({where})"
        assert r["hf_equal"] and r["hf_decode"] == "hf", where
        assert r["static_metrics"]["decode"] == "static", where
        assert r["repeat_equal"] and r["eval_inside"] and r["resident_inside"], where
        assert r["restored_training"] and r["checkpointing_restored"], where
        assert r["completion_mask_ok"], where
        assert r["size_before"] == r["size_after"] == r["size_after_context"], where
        assert r["loss_after_generate"] == r["loss_fresh"] and r["max_grad_diff"] == 0, where
        if stage == 3:
            assert r["size_before"] == 0, "parameters were not partitioned to begin with"
            assert r["static_metrics"]["gathered"] == "all"
            assert r["bucket_equal"] and r["bucket_mode"] == "buckets", where
            assert 0 < r["bucket_resident_fraction"] < 1, where
            assert r["size_after_bucket"] == 0, where
            assert r["raised"] and r["training_after_error"] and r["size_after_error"] == 0, where


def _tiny(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         eos_token_id=2, pad_token_id=0, **overrides)
    return LlamaForCausalLM(config)


def test_single_process_generate_matches_hf_generate_and_restores_mode():
    model = _tiny()
    hybrid = pf.HybridEngine(model, max_new_tokens=6)
    ids = torch.randint(3, 50, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    ids = ids.masked_fill(mask == 0, 0)
    model.train()
    out = hybrid.generate(ids, attention_mask=mask)
    model.eval()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0, eos_token_id=2)
    assert out.sequences.tolist() == expected.tolist()
    assert out.metrics["decode"] == "static" and out.metrics["tokens_per_second"] > 0
    assert out.completions.shape[1] == out.sequences.shape[1] - 5


def test_sampling_respects_top_k():
    model = _tiny()
    hybrid = pf.HybridEngine(model, max_new_tokens=8)
    ids = torch.randint(3, 50, (16, 4))
    torch.manual_seed(0)
    out = hybrid.generate(ids, do_sample=True, top_k=1, temperature=0.7, eos_token_id=[])
    greedy = hybrid.generate(ids, do_sample=False, eos_token_id=[])
    assert out.sequences.tolist() == greedy.sequences.tolist()
    sampled = hybrid.generate(ids, do_sample=True, top_p=0.9, temperature=1.5, eos_token_id=[])
    assert sampled.sequences.shape == (16, 12)


@pytest.mark.parametrize("decode", ["static", "hf"])
@pytest.mark.parametrize("sampling", [dict(do_sample=False, temperature=1.0),
                                      dict(do_sample=True, temperature=0.7, top_k=3)])
def test_rollout_logprobs_are_the_sampled_tokens_logprobs_under_the_full_distribution(decode, sampling):
    from ppo_fast.sequences import position_ids

    model = _tiny()
    hybrid = pf.HybridEngine(model, max_new_tokens=7, decode=decode)
    ids = torch.randint(3, 50, (3, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    ids = ids.masked_fill(mask == 0, 0)
    torch.manual_seed(1)
    out = hybrid.generate(ids, attention_mask=mask, eos_token_id=[2, 7], **sampling)
    assert out.metrics["decode"] == decode
    N = out.completions.shape[1]
    assert out.logprobs.shape == (3, N) and out.logprobs.dtype == torch.float32

    with torch.no_grad():
        logits = model(out.sequences, attention_mask=out.attention_mask,
                       position_ids=position_ids(out.attention_mask)).logits[:, 4:-1]
    expected = torch.log_softmax(logits.double() / sampling["temperature"], -1).gather(
        -1, out.completions[..., None]).squeeze(-1)
    generated = out.completion_mask[:, 5:].bool()
    # top-k only restricts where sampling looks; the log-prob is the full distribution's (< 0).
    assert bool((out.logprobs[generated] < 0).all())
    torch.testing.assert_close(out.logprobs[generated].double(), expected[generated], atol=1e-5, rtol=0)
    assert (~generated).any(), "no completion ended before max_new_tokens: pick other EOS tokens"
    assert bool((out.logprobs[~generated] == 0).all())


@pytest.mark.parametrize("decode", ["static", "hf"])
def test_rollout_logprobs_equal_the_trainers_bit_for_bit_under_batch_invariant(decode):
    """The rollout decodes token by token against a KV cache, a batch of 5 with left padding; the
    trainer scores the finished sequences all at once, in micro-batches of 2 (rows 0-1, 2-3, 4).
    Off, the numbers differ (so this can fail); under the mode, not by one bit."""
    from ppo_fast.sequences import position_ids

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2, pad_token_id=0))
    ids = torch.randint(3, 300, (5, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[3, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)

    def rollout_and_trainer_logprobs():
        hybrid = pf.HybridEngine(model, max_new_tokens=10, decode=decode)
        torch.manual_seed(3)
        out = hybrid.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, eos_token_id=[])
        assert out.metrics["decode"] == decode
        with torch.no_grad():
            trainer = torch.cat([
                pf.token_logprobs(model(seqs, attention_mask=attn, position_ids=position_ids(attn)).logits[:, 6:-1],
                                  seqs[:, 7:], temperature=0.8)
                for seqs, attn in zip(out.sequences.split(2), out.attention_mask.split(2))])
        return out.logprobs, trainer

    rollout, trainer = rollout_and_trainer_logprobs()
    assert not torch.equal(rollout, trainer)
    torch.testing.assert_close(rollout, trainer, atol=1e-4, rtol=0)
    with pf.batch_invariant():
        rollout, trainer = rollout_and_trainer_logprobs()
    assert torch.equal(rollout, trainer)


def test_completion_mask_stops_after_eos():
    from ppo_fast.sequences import completion_mask

    mask = completion_mask(torch.tensor([[4, 2, 7, 2], [4, 5, 6, 7]]), [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert completion_mask(torch.tensor([[4, 2, 7]]), []).tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_beams=4), "unsupported generation keyword"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(top_p=1.5), "top_p must be"),
    (dict(max_new_tokens=40), "exceeds the model's context of 32"),
])
def test_bad_generation_arguments(kwargs, match):
    hybrid = pf.HybridEngine(_tiny())
    with pytest.raises(ValueError, match=match):
        hybrid.generate(torch.randint(3, 50, (1, 4)), **kwargs)


def test_right_padded_prompts_are_rejected():
    hybrid = pf.HybridEngine(_tiny())
    with pytest.raises(ValueError, match="left-padded"):
        hybrid.generate(torch.randint(3, 50, (1, 4)), attention_mask=torch.tensor([[1, 1, 1, 0]]))


def test_non_causal_models_are_rejected():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32,
                                             num_layers=1, num_heads=2))
    with pytest.raises(TypeError, match="encoder-decoder"):
        pf.HybridEngine(t5)
    with pytest.raises(TypeError, match="causal LM"):
        pf.HybridEngine(torch.nn.Linear(3, 3))


def test_lora_adapters_are_merged_for_generation_and_restored_bit_for_bit():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    # float64, so merged and unmerged decoding agree on every greedy argmax.
    model = peft.get_peft_model(_tiny().double(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 50, (3, 6))
    model.eval()
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              do_sample=False, pad_token_id=0, eos_token_id=2)
    model.train()
    hybrid = pf.HybridEngine(model, max_new_tokens=8)
    with hybrid.inference_mode():
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(layer.merged_adapters for layer in layers)
        out = hybrid.generate(ids)
    assert out.sequences.tolist() == expected.tolist()
    assert out.metrics["decode"] == "static"
    assert not any(layer.merged_adapters for layer in layers) and model.training
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    unmerged = pf.HybridEngine(model, merge_lora=False, max_new_tokens=8).generate(ids)
    assert unmerged.sequences.tolist() == expected.tolist()


@pytest.mark.parametrize("flash_attn_installed", [False, True])
def test_pick_attn_implementation_uses_flash_attn_only_where_it_can_run(flash_attn_installed,
                                                                         monkeypatch):
    import importlib.util

    from ppo_fast.hybrid import pick_attn_implementation

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "flash_attn":
            return object() if flash_attn_installed else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    flash = "flash_attention_2" if flash_attn_installed else "sdpa"
    assert pick_attn_implementation(torch.bfloat16, "cuda") == flash
    assert pick_attn_implementation(torch.float16, torch.device("cuda", 0)) == flash
    assert pick_attn_implementation(torch.float32, "cuda") == "sdpa"
    assert pick_attn_implementation(torch.bfloat16, "cpu") == "sdpa"
    assert pick_attn_implementation(torch.float32, "cpu") == "sdpa"
