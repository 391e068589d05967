"""Run by tests/test_hybrid.py under the real launcher: ``deepspeed --num_gpus 2 hybrid_worker.py``.

Each rank checks the hybrid engine against the unwrapped model with the full weights and writes
its findings to ``<out>/rank<r>.json`` for the test to assert on.
"""

import argparse
import copy
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ppo_fast as pf
from ppo_fast.distributed import init_distributed, shutdown_distributed

EOS_IDS = [5, 17, 29, 41, 53, 65, 77, 89]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def ds_config(stage):
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }


def prompts(rank, batch=3, length=7):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(3, 97, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):  # left padding of a different width per row
        mask[row, : row + rank] = 0
    return ids.masked_fill(mask == 0, 0), mask


def train_batch(rank):
    g = torch.Generator().manual_seed(200 + rank)
    ids = torch.randint(3, 97, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def partitioned(engine):
    """Sizes of the local parameter tensors: 0 for every ZeRO-3 partitioned parameter."""
    return sum(p.data.numel() for p in engine.module.parameters())


def train_step(engine, rank):
    engine.train()
    loss = engine(**train_batch(rank)).loss
    engine.backward(loss)
    from deepspeed.utils import safe_get_full_grad

    grads = [safe_get_full_grad(p).clone() for p in engine.module.parameters()]
    engine.step()
    return loss.item(), grads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    import deepspeed

    rank = torch.distributed.get_rank()
    result = {"rank": rank, "stage": args.stage}

    model = tiny_llama()
    full = copy.deepcopy(model).eval()
    model.gradient_checkpointing_enable()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(args.stage),
                                      model_parameters=model.parameters())
    hybrid = pf.HybridEngine(engine, max_new_tokens=12)
    ids, mask = prompts(rank)
    size_before = partitioned(engine)

    # Greedy generation equals the unwrapped full-weight model, token for token.
    expected = full.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=EOS_IDS)
    engine.train()
    out = hybrid.generate(ids, attention_mask=mask, eos_token_id=EOS_IDS)
    result["static_equal"] = out.sequences.tolist() == expected.tolist()
    result["static_metrics"] = {k: v for k, v in out.metrics.items() if k != "peak_memory_bytes"}
    out_hf = pf.HybridEngine(engine, decode="hf", max_new_tokens=12).generate(
        ids, attention_mask=mask, eos_token_id=EOS_IDS)
    result["hf_equal"] = out_hf.sequences.tolist() == expected.tolist()
    result["hf_decode"] = out_hf.metrics["decode"]
    result["restored_training"] = engine.module.training
    result["checkpointing_restored"] = engine.module.is_gradient_checkpointing
    result["completion_mask_ok"] = bool(
        (out.completion_mask[:, : out.prompt_length] == 0).all()
        and (out.attention_mask[:, : out.prompt_length] == mask).all())
    result["size_before"], result["size_after"] = size_before, partitioned(engine)
    full_size = sum(p.numel() for p in full.parameters())
    with hybrid.inference_mode():
        # Gathered once for the whole rollout: every weight is resident between calls too.
        first = hybrid.generate(ids, attention_mask=mask, eos_token_id=EOS_IDS)
        result["resident_inside"] = partitioned(engine) == full_size
        second = hybrid.generate(ids, attention_mask=mask, eos_token_id=EOS_IDS)
        result["eval_inside"] = not engine.module.training
    result["repeat_equal"] = first.sequences.tolist() == second.sequences.tolist() == expected.tolist()
    result["size_after_context"] = partitioned(engine)

    if args.stage == 3:
        # Bucketed: at most one decoder block resident; the rest streamed block by block.
        total = sum(p.ds_numel * p.element_size() for p in engine.module.parameters())
        small = pf.HybridEngine(engine, max_gathered_bytes=int(total * 0.6), max_new_tokens=12)
        ids_b, mask_b = prompts(rank, batch=2 + rank)  # ranks differ in batch and finish times
        expected_b = full.generate(input_ids=ids_b, attention_mask=mask_b, max_new_tokens=12,
                                   do_sample=False, pad_token_id=0, eos_token_id=EOS_IDS)
        out_b = small.generate(ids_b, attention_mask=mask_b, eos_token_id=EOS_IDS)
        result["bucket_equal"] = out_b.sequences.tolist() == expected_b.tolist()
        result["bucket_mode"] = out_b.metrics["gathered"]
        result["size_after_bucket"] = partitioned(engine)
        with small.inference_mode():
            result["bucket_resident_fraction"] = partitioned(engine) / full_size

        # An exception inside generation restores training mode and releases the weights.
        boom = engine.module.model.layers[1].register_forward_hook(
            lambda *a: (_ for _ in ()).throw(RuntimeError("injected failure")))
        try:
            hybrid.generate(ids, attention_mask=mask)
            result["raised"] = False
        except RuntimeError as exc:
            result["raised"] = "injected failure" in str(exc)
        boom.remove()
        result["training_after_error"] = engine.module.training
        result["size_after_error"] = partitioned(engine)

    # The training step after generation matches a fresh engine that never generated.
    loss_after, grads_after = train_step(engine, rank)
    fresh_model = tiny_llama()
    fresh_model.gradient_checkpointing_enable()
    fresh, *_ = deepspeed.initialize(model=fresh_model, config=ds_config(args.stage),
                                     model_parameters=fresh_model.parameters())
    loss_fresh, grads_fresh = train_step(fresh, rank)
    result["loss_after_generate"], result["loss_fresh"] = loss_after, loss_fresh
    result["max_grad_diff"] = max((a - b).abs().max().item() for a, b in zip(grads_after, grads_fresh))

    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
