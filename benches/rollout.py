"""Rollouts with the hybrid engine under DeepSpeed against plain ``generate``, timed.

    deepspeed --num_gpus 2 benches/rollout.py --zero-stage 3 --compare
    python benches/rollout.py --preset tiny --compare                     (one process)
    NUM_RANKS=2 scripts/launch_cpu.sh benches/rollout.py --compare        (CPU ranks)

Builds the policy (a Hugging Face causal LM from ``--model DIR``, or a Llama-style preset built
from a config, no download), wraps it in a DeepSpeed engine, generates from random prompts with
:class:`ppo_fast.HybridEngine` and, with ``--compare``, with plain ``generate`` on the same ZeRO
engine, same prompts, greedy. Rank 0 prints a table (tokens/s, speedup, the matmul floor) and
writes it to ``--out`` as markdown, with its data (every timed rollout) as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from floors import Timer, copy_bandwidth, matmul_rate, sync
from record import publish, summary

PRESETS = {
    # name: (vocab, hidden, layers, heads, kv_heads, intermediate)
    "tiny": (512, 64, 2, 4, 2, 128),
    "50m": (32000, 512, 6, 8, 4, 1536),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", help="local Hugging Face model directory (default: a preset)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="50m",
                        help="Llama-style model built from a config when --model is not given")
    parser.add_argument("--ds-config", help="DeepSpeed config JSON (default: built-in, see scripts/)")
    parser.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument("--partition-all", action=argparse.BooleanOptionalAction, default=True,
                        help="stage3_param_persistence_threshold 0: every parameter is partitioned")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per rank")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--decode", choices=["auto", "static", "hf"], default="auto")
    parser.add_argument("--max-gathered-bytes", type=int, default=None)
    parser.add_argument("--compare", action="store_true",
                        help="also time plain generate on the ZeRO engine (the baseline)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rollouts per method")
    parser.add_argument("--out", help="write the results table (markdown) here (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ppo_fast.hybrid import pick_attn_implementation

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = pick_attn_implementation(dtype, device)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=attn)
    vocab, hidden, layers, heads, kv_heads, inter = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=inter, max_position_embeddings=2048,
                         eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    return LlamaForCausalLM(config).to(dtype)


def ds_config(args) -> dict:
    from ppo_fast.distributed import default_ds_config

    if args.ds_config:
        with open(args.ds_config) as f:
            config = json.load(f)
    else:
        config = default_ds_config(stage=args.zero_stage, micro_batch_size=args.batch_size)
    config.setdefault("train_micro_batch_size_per_gpu", args.batch_size)
    if args.partition_all and config.get("zero_optimization", {}).get("stage") == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def weight_read_bytes(model, new_tokens) -> float:
    """Each forward reads every matmul weight once: prefill once, then once per decode step."""
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not getattr(model.config, "tie_word_embeddings", False):
        weights -= embedding.numel() * embedding.element_size()
    return weights * (1 + new_tokens)


def forward_flops(model, batch, prompt_len, new_tokens) -> float:
    """Matmul FLOPs of prefill plus decode: 2·params per token (input embedding excluded) plus
    attention (4·layers·hidden·context per token)."""
    config = model.config
    embedding = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters()) - embedding
    if getattr(config, "tie_word_embeddings", False):
        params += embedding
    tokens = batch * (prompt_len + new_tokens)
    mean_context = prompt_len + new_tokens / 2
    attention = 4 * config.num_hidden_layers * config.hidden_size * mean_context
    return tokens * (2 * params + attention)


def run(args) -> dict:
    import deepspeed

    from ppo_fast.distributed import init_distributed
    from ppo_fast.hybrid import HybridEngine

    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    flops = forward_flops(model, args.batch_size, args.prompt_len, args.max_new_tokens)
    weight_bytes = weight_read_bytes(model, args.max_new_tokens)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(args),
                                      model_parameters=model.parameters())
    device = next(engine.module.parameters()).device
    generator = torch.Generator().manual_seed(args.seed + rank)
    vocab = engine.module.config.vocab_size
    prompts = torch.randint(3, vocab, (args.batch_size, args.prompt_len), generator=generator).to(device)
    mask = torch.ones_like(prompts)
    hybrid = HybridEngine(engine, decode=args.decode, max_gathered_bytes=args.max_gathered_bytes,
                          max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=[])

    def plain():
        engine.module.eval()
        with torch.no_grad():
            out = engine.module.generate(input_ids=prompts, attention_mask=mask, do_sample=False,
                                         max_new_tokens=args.max_new_tokens,
                                         min_new_tokens=args.max_new_tokens, pad_token_id=0,
                                         synced_gpus=engine.zero_optimization_stage() == 3)
        engine.module.train()
        return out

    def timed(fn):
        torch.distributed.barrier()
        start = time.perf_counter()
        out = fn()
        sync(device)
        torch.distributed.barrier()
        return time.perf_counter() - start, out

    hybrid.generate(prompts[:, :4], attention_mask=mask[:, :4], max_new_tokens=4)  # warm-up
    samples = {"hybrid": [timed(lambda: hybrid.generate(prompts, attention_mask=mask))[0]
                          for _ in range(args.repeats)]}
    results = {"hybrid": min(samples["hybrid"])}
    last = hybrid.generate(prompts, attention_mask=mask)
    if args.compare:
        plain_runs = [timed(plain) for _ in range(args.repeats)]
        samples["plain"] = [seconds for seconds, _ in plain_runs]
        plain_seconds, plain_out = min(plain_runs, key=lambda r: r[0])
        results["plain"] = plain_seconds
        results["same_tokens"] = plain_out.tolist() == last.sequences.tolist()
        # Gathering once but decoding with HF generate separates the two sources of speed.
        gather_only = HybridEngine(engine, decode="hf", max_gathered_bytes=args.max_gathered_bytes,
                                   max_new_tokens=args.max_new_tokens, do_sample=False,
                                   eos_token_id=[])
        samples["gather_only"] = [timed(lambda: gather_only.generate(prompts, attention_mask=mask))[0]
                                  for _ in range(args.repeats)]
        results["gather_only"] = min(samples["gather_only"])
    timer = Timer(device)
    floor = flops / matmul_rate(device, timer)
    bytes_floor = weight_bytes / copy_bandwidth(device, timer, 256 * 2**20)
    new_tokens = args.batch_size * args.max_new_tokens
    report = {
        "device": device.type, "seconds": {name: summary(times) for name, times in samples.items()},
        "world_size": world, "zero_stage": engine.zero_optimization_stage(), "params": n_params,
        "batch_per_rank": args.batch_size, "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens, "decode": last.metrics["decode"],
        "gathered": last.metrics["gathered"], "gather_seconds": last.metrics["gather_seconds"],
        "hybrid_seconds": results["hybrid"], "hybrid_tokens_per_s": new_tokens / results["hybrid"],
        "floor_seconds": floor, "hybrid_over_floor": results["hybrid"] / floor,
        "bytes_floor_seconds": bytes_floor,
    }
    if args.compare:
        report.update(plain_seconds=results["plain"], gather_only_seconds=results["gather_only"],
                      plain_tokens_per_s=new_tokens / results["plain"],
                      speedup=results["plain"] / results["hybrid"],
                      same_tokens=results["same_tokens"])
    if rank == 0:
        publish(args.out, {"rollout": report}, format_table)
    return report


def format_table(doc: dict) -> list[str]:
    s = doc["rollout"]
    lines = [
        f"# Rollout: HybridEngine vs plain generate, ZeRO-{s['zero_stage']}, {s['world_size']} "
        f"rank(s) on {s['device']}",
        "",
        f"Model: {s['params'] / 1e6:.1f}M parameters; {s['batch_per_rank']} prompts of "
        f"{s['prompt_len']} tokens per rank, {s['max_new_tokens']} new tokens each, greedy.",
        f"Decode path: {s['decode']}; parameters gathered: {s['gathered']} "
        f"({s['gather_seconds'] * 1e3:.1f} ms). Seconds: the best of the timed rollouts (all of them, with "
        "their median and 20th/80th percentiles, in the JSON data).",
        "",
        "| method | seconds | tokens/s per rank | vs plain | vs matmul floor |",
        "| --- | --- | --- | --- | --- |",
    ]
    if "plain_seconds" in s:
        lines.append(f"| plain `generate` on the ZeRO engine | {s['plain_seconds']:.3f} | "
                     f"{s['plain_tokens_per_s']:.1f} | 1.00x | "
                     f"{s['plain_seconds'] / s['floor_seconds']:.2f}x |")
    if "gather_only_seconds" in s:
        g = s["gather_only_seconds"]
        lines.append(f"| HybridEngine gather + HF `generate` decode | {g:.3f} | "
                     f"{s['batch_per_rank'] * s['max_new_tokens'] / g:.1f} | "
                     f"{s['plain_seconds'] / g:.2f}x | {g / s['floor_seconds']:.2f}x |")
    speed = f"{s['speedup']:.2f}x" if "speedup" in s else "-"
    lines.append(f"| HybridEngine (static-cache decode) | {s['hybrid_seconds']:.3f} | {s['hybrid_tokens_per_s']:.1f} | "
                 f"{speed} | {s['hybrid_over_floor']:.2f}x |")
    lines.append(f"| matmul floor (forward FLOPs / measured matmul rate) | {s['floor_seconds']:.3f} "
                 f"| | | 1.00x |")
    lines.append(f"| weight-read floor (weights read once per forward / measured copy bandwidth) | "
                 f"{s['bytes_floor_seconds']:.3f} | | | {s['bytes_floor_seconds'] / s['floor_seconds']:.2f}x |")
    if "same_tokens" in s:
        lines.append("")
        lines.append(f"Same tokens as plain generate: {s['same_tokens']}.")
    return lines


if __name__ == "__main__":
    from ppo_fast.distributed import shutdown_distributed

    run(parse_args())
    shutdown_distributed()
