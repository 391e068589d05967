"""Extra memory of the fused head's PPO loss with 16-bit weights, forward and backward: a model of
the allocations of each schedule, checked against a measurement on the CPU, and the model's
figure for the GPU shape of issue 21 (8192 × 4096 × 151 936 bf16).

    python benches/linear_head_memory.py --out benches/results/linear_head_memory_cpu.md
    python benches/linear_head_memory.py --smoke

Schedules (``pf.fused_linear_ppo_loss``, gradients of hidden and weight):

- ``token-outer``: chunks of tokens, the gradients computed in the forward (three GEMMs per
  chunk); the weight's gradient sums over the chunks in a float32 ``V × H`` accumulator. What
  16-bit weights took before the vocabulary-outer backward, forced here.
- ``vocabulary-outer``: the forward keeps each token's log-sum-exp and entropy; the backward goes
  through the vocabulary in chunks, each with its float32 ``[entries, H]`` accumulator, over tiles
  of tokens; dhidden sums over the vocabulary chunks in a float32 ``N × H`` accumulator (four
  GEMMs per tile). What 16-bit weights take when there are fewer tokens than vocabulary entries.

"Extra" is the peak beyond the inputs and the returned gradients (as in benches/linear_head.py):
each schedule runs in a child process (glibc's mmap threshold fixed at 1 MiB), which resets the
resident-set high-water mark (``/proc/self/clear_refs``) after a first call and reads ``VmHWM``
after a second one. The model is an upper bound: the sum of every buffer the schedule can
hold at once beyond its inputs and outputs (its terms are listed), under 1 MiB left out. The
measurement can fall below it where a returned gradient is made after the peak (the token-outer
order rounds the weight's gradient after its last chunk) or a term is smaller at the peak (the
last vocabulary chunk is a partial one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from floors import process_status_bytes  # noqa: E402
from record import publish  # noqa: E402

SHAPES = {"cpu": (4096, 512, 131072), "smoke": (256, 64, 4000), "gpu": (8192, 4096, 151936)}
SCHEDULES = ("token-outer", "vocabulary-outer")
MiB = 2**20


def model(schedule: str, N: int, H: int, V: int, itemsize: int, device_type: str) -> dict[str, int]:
    """An upper bound on the extra bytes, by term: every buffer the schedule can hold at once
    beyond its inputs and the gradients it returns (16-bit weights, gradients of hidden and
    weight, an entropy bonus; buffers under 1 MiB left out)."""
    from ppo_fast.ops.linear_logprobs import linear_chunk_tokens, vocabulary_tile

    if schedule == "token-outer":
        chunk = linear_chunk_tokens(V, torch.bfloat16)
        terms = {
            "dweight accumulator, float32 V × H": 4 * V * H,
            "a chunk's logits (the row ops write dlogits over them), 16-bit": itemsize * chunk * V,
        }
        if device_type == "cpu":
            terms["dlogitsᵀ and the chunk's hidden states cast to float32 for the CPU's GEMM"] = 4 * chunk * (V + H)
        else:
            terms["a chunk's float32 [chunk, H] product"] = 4 * chunk * H
        return terms
    tokens, entries = vocabulary_tile(V, H)
    terms = {
        "dhidden accumulator, float32 N × H, beyond the 16-bit gradient rounded into its storage": 2 * N * H,
        "a vocabulary chunk's dweight accumulator, float32": 4 * entries * H,
        "a tile's logits, 16-bit, and its two float32 buffers (dlogits)": (itemsize + 8) * tokens * entries,
        "a tile's hidden states (masked copy), 16-bit": itemsize * tokens * H,
    }
    if device_type == "cpu":
        terms["the vocabulary chunk and the tile's hidden states cast to float32 for the CPU's GEMM, and "
              "the tile's float32 [tokens, H] product"] = 4 * (entries + 2 * tokens) * H
    else:
        terms["a tile's dlogits in the weight's dtype and its float32 [tokens, H] product"] = (
            itemsize * tokens * entries + 4 * tokens * H)
    return terms


def _inputs(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    old_logp = torch.randn(N, generator=g) - 5
    advantages = torch.randn(N, generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    return hidden, weight, labels, old_logp, advantages, mask


def child(schedule: str, N: int, H: int, V: int) -> dict:
    """In this process: the schedule's call twice, the second one's peak resident bytes beyond
    those before it, less the gradients it returns."""
    import ppo_fast as pf
    from ppo_fast.ops import linear_logprobs

    if schedule == "token-outer":
        linear_logprobs.vocabulary_outer = lambda *args: False
    elif not linear_logprobs.vocabulary_outer(N, torch.empty(V, 1, dtype=torch.bfloat16), True):
        raise SystemExit(f"{N} tokens over a vocabulary of {V} take the token-outer order")
    hidden, weight, labels, old_logp, advantages, mask = _inputs(N, H, V, torch.bfloat16)

    def call():
        loss, _ = pf.fused_linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, entropy_coef=0.01)
        return torch.autograd.grad(loss, (hidden, weight))

    call()
    Path("/proc/self/clear_refs").write_text("5")
    before = process_status_bytes("VmRSS")
    grads = call()
    peak = process_status_bytes("VmHWM") - before
    return {"peak_extra": peak - sum(g.numel() * g.element_size() for g in grads)}


def measure(schedule: str, shape) -> int:
    # A fixed 1 MiB mmap threshold maps and unmaps every large block, so the resident set tracks
    # what is live (glibc would otherwise keep the first call's freed blocks for the second).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MiB)}
    proc = subprocess.run([sys.executable, __file__, "--child", schedule, "--dims", *map(str, shape)],
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{schedule}: the child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])["peak_extra"]


def render(doc: dict) -> list[str]:
    N, H, V = doc["shape"]
    logits = 2 * N * V
    lines = ["# Fused head, 16-bit weights: extra memory of the PPO loss's forward and backward", "",
             f"CPU shape {N} × {H} × {V} bf16 (tokens × hidden × vocabulary); the bf16 logits would take "
             f"{logits / MiB:,.0f} MiB. Extra: the peak beyond the inputs and the returned gradients.", "",
             "| schedule | measured MiB | model (bound) MiB | measured / bound | measured, share of the logits |",
             "| --- | --- | --- | --- | --- |"]
    for row in doc["rows"]:
        lines.append(f"| {row['schedule']} | {row['measured'] / MiB:,.1f} | {row['model'] / MiB:,.1f} | "
                     f"{row['measured'] / row['model']:.2f} | {row['measured'] / logits:.1%} |")
    lines += ["", "Model terms (MiB):", ""]
    for row in doc["rows"]:
        lines.append(f"- {row['schedule']}: " + "; ".join(f"{name} {b / MiB:,.1f}" for name, b in row["terms"].items()))
    gN, gH, gV = SHAPES["gpu"]
    glogits = 2 * gN * gV
    lines += ["", f"GPU shape {gN} × {gH} × {gV} bf16, from the model (CUDA terms; no GPU measured it): "
              f"the bf16 logits would take {glogits / MiB:,.0f} MiB.", "",
              "| schedule | model (bound) MiB | share of the logits |", "| --- | --- | --- |"]
    for row in doc["gpu"]:
        lines.append(f"| {row['schedule']} | {row['model'] / MiB:,.1f} | {row['model'] / glogits:.1%} |")
    lines += [""] + [f"- {row['schedule']}: " + "; ".join(f"{name} {b / MiB:,.1f}" for name, b in row["terms"].items())
                     for row in doc["gpu"]]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="results file (.md, with .json beside it)")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, to check the script runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dims", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, *args.dims)))
        return 0
    shape = SHAPES["smoke" if args.smoke else "cpu"]
    rows = []
    for schedule in SCHEDULES:
        terms = model(schedule, *shape, 2, "cpu")
        rows.append(dict(schedule=schedule, measured=measure(schedule, shape), model=sum(terms.values()),
                         terms=terms))
    gpu = []
    for schedule in SCHEDULES:
        terms = model(schedule, *SHAPES["gpu"], 2, "cuda")
        gpu.append(dict(schedule=schedule, model=sum(terms.values()), terms=terms))
    publish(args.out, {"shape": shape, "rows": rows, "gpu": gpu}, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
