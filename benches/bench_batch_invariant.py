"""What batch_invariant() costs: forward and decode tokens/s with the mode off and on, rounds
alternating so both see the same machine. The CPU runs a ~50M-parameter Llama, a GPU a model of
Qwen2-0.5B's shape (random weights either way).

    python benches/bench_batch_invariant.py --out benches/results/batch_invariant_cpu.md
    python benches/bench_batch_invariant.py --device cuda --out benches/results/batch_invariant_gpu.md
    python benches/bench_batch_invariant.py --smoke     # tiny shapes, one round: the script runs

* forward: a left-padded batch of --batch rows × --length tokens, one full forward (no grad),
  position ids from the mask as generation computes them; tokens/s counts the real tokens.
* decode: the same batch's first --prompt tokens as a prompt, then --steps greedy steps against the
  KV cache; tokens/s counts the decoded tokens (batch × steps) over the steps' time.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import transformers

import ppo_fast as pf
from ppo_fast import native
from ppo_fast.sequences import position_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import fmt, publish, summary  # noqa: E402


MODELS = {
    "llama-50m": lambda: transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, tie_word_embeddings=True),
    # Qwen2-0.5B's shape: 14 query heads over 2 KV heads of 64, biased q/k/v projections.
    "qwen2-0.5b": lambda: transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2),
}


def build(name, dtype, device):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(MODELS[name]()).to(device=device, dtype=dtype).eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch(rows, length, vocab, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(rows):  # every other row left-padded by a different amount
        mask[i, : (i % 2) * (3 * i + 1)] = 0
    return ids.to(device), mask.to(device)


@torch.no_grad()
def forward_seconds(model, ids, mask):
    synchronize(ids.device)
    start = time.perf_counter()
    model(ids, attention_mask=mask, position_ids=position_ids(mask))
    synchronize(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model, ids, mask, steps):
    out = model(ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(ids.device)
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = model(token, attention_mask=mask, position_ids=position_ids(mask)[:, -1:], cache=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(ids.device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="default: llama-50m on the CPU, qwen2-0.5b on CUDA")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, batch 2, one round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 bfloat16 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.smoke:
        args.model, args.batch, args.length, args.prompt, args.steps, args.rounds = "tiny", 2, 16, 8, 4, 1
    args.model = args.model or ("qwen2-0.5b" if device.type == "cuda" else "llama-50m")
    args.dtypes = args.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"])
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    ids, mask = batch(args.batch, args.length, MODELS[args.model]().vocab_size, device)
    tokens = int(mask.sum())
    data = {"device": device.type, "model": args.model, "batch": args.batch, "length": args.length,
            "prompt": args.prompt, "steps": args.steps, "rounds": args.rounds, "parameters": None, "runs": {}}
    for name in args.dtypes:
        model = build(args.model, getattr(torch, name), device)
        data["parameters"] = sum(p.numel() for p in model.parameters())
        modes = ["off", "on"]
        if device.type == "cpu" and name == "bfloat16" and pf.batch_invariant_bfloat16_gemm() == "amx":
            modes.append("on, vector GEMM")  # what a CPU without AMX runs: what the tiles buy
        samples = {mode: {"forward": [], "decode": []} for mode in modes}
        for round_ in range(args.rounds + 1):  # round 0 warms every mode up and is dropped
            for mode in modes:
                with setting(mode):
                    f = forward_seconds(model, ids, mask)
                    d = decode_seconds(model, ids[:, : args.prompt], mask[:, : args.prompt], args.steps)
                if round_:
                    samples[mode]["forward"].append(tokens / f)
                    samples[mode]["decode"].append(args.batch * args.steps / d)
        data["runs"][name] = {mode: {what: summary(s) for what, s in kinds.items()} for mode, kinds in samples.items()}
        for mode in modes[1:]:
            data["runs"][name]["slowdown" + mode[2:]] = {
                what: summary(off / on for off, on in zip(samples["off"][what], samples[mode][what]))
                for what in ("forward", "decode")}
        data["runs"][name]["gemm"] = pf.batch_invariant_bfloat16_gemm() if name == "bfloat16" else None
    publish(args.out, data, render)


@contextlib.contextmanager
def setting(mode):
    """The mode off, on, or on with the CPU's bfloat16 GEMM on the vector kernel instead of the
    AMX tiles (switched back after)."""
    if mode == "off":
        yield
        return
    kernels = native.load() if mode == "on, vector GEMM" else None
    if kernels is not None:
        kernels.bi_amx(False)
    pf.enable_batch_invariant()
    try:
        yield
    finally:
        pf.disable_batch_invariant()
        if kernels is not None:
            kernels.bi_amx(True)


def render(doc):
    device, model = doc.get("device", "cpu"), doc.get("model", "llama-50m")
    goal = "≤ 1.2 on a GPU" if device == "cuda" else "≤ 1.3 on the CPU"
    lines = [f"# batch_invariant() on {'a GPU' if device == 'cuda' else 'the CPU'}: {model}, mode off vs on", "",
             f"{model}, {doc['parameters'] / 1e6:.0f}M parameters (random weights), batch {doc['batch']}; forward: "
             f"{doc['length']} tokens a row, left-padded; decode: a {doc['prompt']}-token prompt, then "
             f"{doc['steps']} greedy steps with the KV cache. Medians (20th-80th percentile) of "
             f"{doc['rounds']} alternating rounds. Goal (issue 20): time on ÷ off {goal}.", "",
             "| dtype | forward tokens/s off | on | slowdown (time on ÷ off) | decode tokens/s off | on | slowdown |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in doc["runs"].items():
        for mode in [m for m in run if m.startswith("on")]:
            label = name
            if mode != "on":
                label += f" ({mode[4:]})"
            elif run.get("gemm"):
                label += f" ({'AMX' if run['gemm'] == 'amx' else 'vector'} GEMM)"
            slowdown = run["slowdown" + mode[2:]]
            lines.append(f"| {label} | {fmt(run['off']['forward'], digits=0)} | {fmt(run[mode]['forward'], digits=0)} | "
                         f"{fmt(slowdown['forward'], digits=2)}× | {fmt(run['off']['decode'], digits=0)} | "
                         f"{fmt(run[mode]['decode'], digits=0)} | {fmt(slowdown['decode'], digits=2)}× |")
    return lines


if __name__ == "__main__":
    main()
