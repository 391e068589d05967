"""One-shot GPU benchmark of ppo_fast against its baselines, with floors, goals and checks.

    python3 benches/gpu_bench.py --out "$OUT"          # on an H100/H200: the issue's shapes
    python3 benches/gpu_bench.py --smoke --out /tmp/x  # on a CPU: tiny shapes, host timer

Order: copy bandwidth (the ceiling every floor divides by), then per op a correctness check of
every provider against float64, then timings (median of triton.testing.do_bench, rotating input
sets so nothing sits in L2), then the issue's goals, then batch invariance. Writes
``gpu_results.json`` (the data, with the median and 20th/80th percentile of every timing) and
``gpu_results.md`` (rendered from it) under --out and prints the markdown last. Needs only torch
and triton APIs that exist in torch 2.4+ / triton 3.0+.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
from pathlib import Path

import torch

import bench_providers as bp
import ppo_fast
from bench_providers import ForcedBackend, Unavailable
from floors import Timer, copy_bandwidth, l2_bytes, peak_extra_bytes, sync
from record import publish

# Tolerances on ‖out − ref‖ / ‖ref‖ against float64 (see the device METHOD notes): float32
# accumulation lands far under 1e-4; a gradient stored in bf16 carries its rounding, ~4e-3.
FORWARD_TOL = 1e-4
GRAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
CHECK_ROWS = 512  # rows compared against float64 (the full batch in float64 would be 10 GB)
MIN_INPUT_SETS = 3


def n_input_sets(set_bytes: int, device) -> int:
    """Enough sets that a full rotation moves at least 4× the L2 through memory."""
    return max(MIN_INPUT_SETS, math.ceil(4 * l2_bytes(device) / max(set_bytes, 1)))


# --------------------------------------------------------------------------------------------
# Per-op descriptions: providers, inputs, float64 reference, bytes
# --------------------------------------------------------------------------------------------


class Op:
    def __init__(self, name, providers, floor_bytes, check, grad_output=False):
        self.name = name
        self.providers = providers  # name -> factory(inputs) -> run
        self.floor_bytes = floor_bytes  # inputs -> minimum bytes moved
        self.check = check  # (output, inputs, rows) -> relative error vs float64
        self.grad_output = grad_output


def check_logp(out, inp, rows):
    rows = rows[rows < out.numel()]  # Liger's layout scores N - 1 rows
    return bp.relative_error(out[rows], bp.reference_logp64(inp, rows))


def check_logprobs_grad(out, inp, rows):
    return bp.relative_error(out[rows], bp.reference_logprobs_grad64(inp, rows))


def check_ppo_grad(out, inp, rows):
    return bp.relative_error(out[rows], bp.reference_ppo_grad64(inp, rows))


def check_gae(out, inp, rows):
    adv, ret = out
    ref_adv, ref_ret = bp.reference_gae64(inp)
    return max(bp.relative_error(adv, ref_adv), bp.relative_error(ret, ref_ret))


OPS = [
    Op("token_logprobs fwd", bp.logprobs_fwd_providers(), bp.logprobs_fwd_bytes, check_logp),
    Op("token_logprobs fwd+bwd", bp.logprobs_fwd_bwd_providers(), bp.logits_fwd_bwd_bytes,
       check_logprobs_grad, grad_output=True),
    Op("ppo_loss fwd+bwd", bp.ppo_loss_providers(), bp.logits_fwd_bwd_bytes, check_ppo_grad,
       grad_output=True),
    Op("gae", bp.gae_providers(), bp.gae_bytes, check_gae),
]


def provider_context(provider: str, device):
    """ppo_fast must be the Triton path: forced, so a silent fallback fails loudly. On a CPU that
    takes Triton's interpreter (TRITON_INTERPRET=1, as gpu.sh --smoke sets); without it the
    public functions run their reference backend."""
    triton_here = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if provider == "ppo_fast" and triton_here:
        return ForcedBackend("triton")
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_op(op: Op, shapes, device, timer, copy_bw, log):
    is_gae = op.name == "gae"
    make_inputs = bp.make_gae_inputs if is_gae else bp.make_logits_inputs
    first = make_inputs(shapes, device, 0)
    set_bytes = op.floor_bytes(first)
    sets = [first] + [make_inputs(shapes, device, seed) for seed in
                      range(1, n_input_sets(set_bytes, device))]
    # The correctness inputs mask a tenth of the tokens out, so skipped rows are checked too.
    check_inputs = first if is_gae else bp.make_logits_inputs(shapes, device, 100, mask_keep=0.9)
    n_rows = check_inputs.labels.numel() if not is_gae else 0
    gen = torch.Generator(device="cpu").manual_seed(1)
    rows = torch.randperm(n_rows, generator=gen)[:CHECK_ROWS].sort().values.to(device) \
        if n_rows else None
    floor_ms = op.floor_bytes(first) / copy_bw * 1e3
    tol = GRAD_TOL[shapes.logits_dtype] if op.grad_output else FORWARD_TOL

    results = {}
    for provider, make in op.providers.items():
        row = dict(provider=provider, error=None, ok=None, ms=None, ms_p20=None, ms_p80=None, peak=None, note="")
        results[provider] = row
        try:
            with provider_context(provider, device):
                out = make(check_inputs)()
                sync(device)
                row["error"] = op.check(out, check_inputs, rows)
                row["ok"] = row["error"] <= tol  # NaN compares False: NaN fails
                del out
                runs = [make(inp) for inp in sets]
                row["peak"] = peak_extra_bytes(runs[0], device)
                rotation = itertools.cycle(runs)
                stats = timer.measure(lambda rotation=rotation: next(rotation)())
                row.update(ms=stats["median"], ms_p20=stats["p20"], ms_p80=stats["p80"])
                del runs
        except Unavailable as exc:
            row["note"] = f"skipped: {exc}"
        except Exception as exc:  # one broken provider must not hide the others' numbers
            row["note"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"  {op.name:24s} {provider:10s} err={row['error']} ms={row['ms']} {row['note']}")
    return dict(name=op.name, results=results, floor_ms=floor_ms, bytes=op.floor_bytes(first),
                logits_bytes=None if is_gae else bp.logits_bytes(first), tol=tol,
                n_sets=len(sets))


def batch_invariance(shapes, device):
    """ppo_fast log-probs of 7 rows: alone, inside the full batch, and in a permuted batch."""
    inp = bp.make_logits_inputs(shapes, device, 7)
    n = inp.labels.numel()
    gen = torch.Generator(device="cpu").manual_seed(7)
    pick = torch.randperm(n, generator=gen)[:7].to(device)
    perm = torch.randperm(n, generator=gen).to(device)
    with provider_context("ppo_fast", device), torch.no_grad():
        full = ppo_fast.token_logprobs(inp.logits, inp.labels)
        small = ppo_fast.token_logprobs(inp.logits[pick], inp.labels[pick])
        permuted = ppo_fast.token_logprobs(inp.logits[perm], inp.labels[perm])
    return dict(
        batch_vs_7=bool(torch.equal(full[pick], small)),
        batch_vs_permuted=bool(torch.equal(full[perm], permuted)),
    )


# --------------------------------------------------------------------------------------------
# Goals and report
# --------------------------------------------------------------------------------------------


def verdict(ok):
    return "SKIP" if ok is None else ("PASS" if ok else "FAIL")


def goals(by_op, invariance, shapes):
    """(goal, measured, verdict) rows for the issue's targets."""
    def ms(op, provider):
        return by_op[op]["results"][provider]["ms"]

    rows = []
    fwd = by_op["token_logprobs fwd"]
    t_fast, t_eager = ms("token_logprobs fwd", "ppo_fast"), ms("token_logprobs fwd", "eager")
    if t_fast:
        fraction = fwd["floor_ms"] / t_fast
        rows.append(("token_logprobs fwd ≥ 85% of copy bandwidth (one read of the logits)",
                     f"{fraction:.0%}", verdict(fraction >= 0.85)))
    else:
        rows.append(("token_logprobs fwd ≥ 85% of copy bandwidth", "no timing", "FAIL"))
    speedup = t_eager / t_fast if t_fast and t_eager else None
    rows.append(("token_logprobs fwd ≥ 10× eager (log_softmax + gather)",
                 f"{speedup:.1f}×" if speedup else "n/a",
                 verdict(None if speedup is None else speedup >= 10)))

    ppo = by_op["ppo_loss fwd+bwd"]
    t_fast, t_liger = ms("ppo_loss fwd+bwd", "ppo_fast"), ms("ppo_loss fwd+bwd", "liger")
    if t_fast:
        rows.append(("ppo_loss fwd+bwd within 1.3× of floor (2 reads + 1 write of logits)",
                     f"{t_fast / ppo['floor_ms']:.2f}× floor",
                     verdict(t_fast <= 1.3 * ppo["floor_ms"])))
    else:
        rows.append(("ppo_loss fwd+bwd within 1.3× of floor", "no timing", "FAIL"))
    rows.append(("ppo_loss fwd+bwd faster than Liger's GRPO loss",
                 f"{t_liger / t_fast:.2f}× Liger's speed" if t_fast and t_liger
                 else ppo["results"]["liger"]["note"] or "n/a",
                 verdict(None if not (t_fast and t_liger) else t_fast < t_liger)))
    peak = ppo["results"]["ppo_fast"]["peak"]
    # One dlogits buffer, plus the per-token float32 vectors (a few dozen [N] tensors).
    n_tokens = shapes.tokens
    budget = ppo["logits_bytes"] + 64 * 4 * n_tokens
    rows.append(("ppo_loss peak extra memory ≤ one dlogits buffer",
                 "n/a (CPU)" if peak is None else
                 f"{peak / 2**20:.0f} MiB vs {ppo['logits_bytes'] / 2**20:.0f} MiB",
                 verdict(None if peak is None else peak <= budget)))

    t_fast, t_loop = ms("gae", "ppo_fast"), ms("gae", "eager")
    speedup = t_loop / t_fast if t_fast and t_loop else None
    rows.append((f"gae [{shapes.gae_batch}, {shapes.gae_len}] ≥ 500× the Python loop over T",
                 f"{speedup:.0f}×" if speedup else "n/a",
                 verdict(None if speedup is None else speedup >= 500)))
    for name, ok in invariance.items():
        rows.append((f"batch invariance, bitwise: {name.replace('_', ' ')}", str(ok), verdict(ok)))
    for op in by_op.values():
        for provider, r in op["results"].items():
            if r["ok"] is False:
                rows.append((f"correctness {op['name']} / {provider}",
                             f"rel err {r['error']:.2e} > {op['tol']:.0e}", "FAIL"))
    return rows


def fmt_bytes(n):
    return "" if n is None else f"{n / 2**20:,.0f}"


def report(doc: dict) -> list[str]:
    shapes = doc["shapes"]
    lines = [
        "# ppo_fast GPU benchmark",
        "",
        f"Device: {doc['device']}. {doc['versions']}.",
        f"Shapes: logits [{shapes['tokens']}, {shapes['vocab']}] {shapes['logits_dtype']} "
        f"({shapes['n_seqs']} sequences × {shapes['seq_len']}); gae [{shapes['gae_batch']}, "
        f"{shapes['gae_len']}] float32. Random inputs, median time (20th-80th percentile in the JSON data), "
        "input sets rotated.",
        f"Copy bandwidth (device-to-device, read + write counted): {doc['copy_bandwidth'] / 1e9:,.0f} GB/s.",
        "",
        "| op | provider | rel err vs fp64 | median ms | × floor | GB/s (min bytes) "
        "| speed-up vs eager | peak extra MiB | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in doc["ops"].values():
        t_eager = entry["results"].get("eager", {}).get("ms")
        for provider, r in entry["results"].items():
            t = r["ms"]
            lines.append("| " + " | ".join([
                entry["name"], provider,
                "" if r["error"] is None else f"{r['error']:.1e}",
                "" if t is None else f"{t:.3f}",
                "" if t is None else f"{t / entry['floor_ms']:.2f}",
                "" if t is None else f"{entry['bytes'] / (t * 1e-3) / 1e9:,.0f}",
                "" if t is None or not t_eager else f"{t_eager / t:.1f}×",
                fmt_bytes(r["peak"]), r["note"].replace("|", "/"),
            ]) + " |")
        lines.append(f"| {entry['name']} | *floor* | | {entry['floor_ms']:.3f} | 1.00 | | | | "
                     f"{entry['bytes'] / 2**20:,.0f} MiB / copy bandwidth; "
                     f"{entry['n_sets']} input sets |")
    lines += ["", "## Goals", "", "| goal | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {g} | {m} | {v} |" for g, m, v in doc["goals"]]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benches/results", help="folder for gpu_results.md")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU with a host timer: checks the script runs")
    args = parser.parse_args(argv)

    if args.smoke:
        device, shapes = torch.device("cpu"), bp.SMOKE_SHAPES
        backend = "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "reference"
        device_name = f"CPU (smoke run: tiny shapes, host timer, {backend} backend)"
        copy_bytes = 64 * 2**20
    else:
        if not torch.cuda.is_available():
            print("No CUDA device: run with --smoke for a CPU check of this script.")
            return 2
        device, shapes = torch.device("cuda"), bp.CUDA_SHAPES
        device_name = torch.cuda.get_device_name(device)
        copy_bytes = 2 * 2**30
    import triton

    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    timer = Timer(device)

    def log(msg):
        print(msg, flush=True)

    log(f"{device_name}; {versions}")
    copy_bw = copy_bandwidth(device, timer, copy_bytes)
    log(f"copy bandwidth {copy_bw / 1e9:,.0f} GB/s")
    by_op = {}
    for op in OPS:
        by_op[op.name] = run_op(op, shapes, device, timer, copy_bw, log)
    invariance = batch_invariance(shapes, device)
    goal_rows = goals(by_op, invariance, shapes)
    shape_data = dict(tokens=shapes.tokens, vocab=shapes.vocab, logits_dtype=str(shapes.logits_dtype)[6:],
                      n_seqs=shapes.n_seqs, seq_len=shapes.seq_len, gae_batch=shapes.gae_batch,
                      gae_len=shapes.gae_len)
    publish(Path(args.out) / "gpu_results.md", dict(device=device_name, versions=versions, shapes=shape_data,
                                                    copy_bandwidth=copy_bw, ops=by_op, invariance=invariance,
                                                    goals=goal_rows), report)
    return GOAL_FAILED if any(v == "FAIL" for _, _, v in goal_rows) else 0


GOAL_FAILED = 3
"""The exit status when every op ran but a goal failed; a crash exits 1, so gpu.sh tells them apart."""


if __name__ == "__main__":
    sys.exit(main())
