"""The native CPU kernels against eager PyTorch and the reference backend, side by side in one run.

    python benches/bench_native.py --out benches/results/native_cpu.md

* token_logprobs forward+backward, fp32 logits [4096, 32000]: eager (log_softmax + gather and its
  autograd backward), the reference backend, the native backend; the floor is the bytes that must
  move (read the logits twice, write dlogits once) over the measured copy bandwidth. Peak extra
  memory is the resident-set high-water mark above the inputs, one fresh process per provider.
* the PPO actor loss forward+backward on the same shape (KL k3, entropy bonus, dual clip,
  token-mean): the eager composite (log_softmax, gather, entropy, the clipped surrogate, k3, mean)
  against pf.ppo_loss on each backend.
* the same loss with the full KL to a reference's fp32 logits of the same shape
  (``kl_estimator="full"``): the eager composite, the KL computed apart from the rest (the loss
  without KL on its fused kernel, the full-KL op's KL alone, autograd summing the two
  gradients: how pf.ppo_loss computed it until the op gave the log-prob and entropy too), and
  pf.ppo_loss on each backend. Its floor reads both models' logits twice and writes dlogits once.
* GAE on [512, 1024]: the Python loop over T (the spec) against pf.gae.
* the embedded default's training tokens/s (``ppo-fast train``) with the native kernels switched
  off (PPO_FAST_NATIVE=0) and on, runs alternating.

Timings are medians of --repeats calls after one warm-up, on fresh random inputs (never zeros),
fresh gradient buffers every call (as in training).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import ppo_fast as pf
from ppo_fast import native
from ppo_fast import spec
from ppo_fast.ops.full_kl import full_kl_op

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_providers import ForcedBackend  # noqa: E402
from bench_trainer import train_run  # noqa: E402
from floors import Timer, copy_bandwidth, process_status_bytes  # noqa: E402
from record import fmt, publish, summary  # noqa: E402

KL_COEF, ENTROPY_COEF, CLIP, DUAL_CLIP = 0.05, 0.01, 0.2, 3.0


def inputs(N: int, V: int, with_reference: bool = True):
    torch.manual_seed(0)
    logits = torch.randn(N, V).mul_(3)
    ref_logits = logits + torch.randn(N, V) if with_reference else None
    labels = torch.randint(0, V, (N,))
    with torch.no_grad():  # in chunks: no [N, V] temporary before the peak-memory measurement
        logp = torch.cat([torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
                          for z, y in zip(logits.split(256), labels.split(256))])
    return dict(logits=logits, labels=labels, grad=torch.randn(N), old=logp + 0.3 * torch.randn(N),
                ref=logp + 0.3 * torch.randn(N), adv=torch.randn(N), mask=torch.rand(N) > 0.1, ref_logits=ref_logits)


def eager_logprobs(x, z):
    logp = torch.log_softmax(z, -1).gather(-1, x["labels"][:, None]).squeeze(-1)
    torch.autograd.backward(logp, x["grad"])


def public_logprobs(x, z):
    torch.autograd.backward(pf.token_logprobs(z, x["labels"]), x["grad"])


def eager_ppo(x, z):
    """The PPO actor loss as verl or TRL write it in eager PyTorch."""
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, x["labels"][:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = (logp - x["old"]).clamp(-20, 20).exp()
    adv = x["adv"]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * DUAL_CLIP), pg)
    k = (x["ref"] - logp).clamp(-20, 20)
    kl = (k.exp() - k - 1).clamp(-10, 10)
    mask = x["mask"].float()
    loss = ((pg + KL_COEF * kl - ENTROPY_COEF * entropy) * mask).sum() / mask.sum()
    loss.backward()


def public_ppo(x, z):
    loss, _ = pf.ppo_loss(z, x["labels"], x["old"], x["adv"], x["mask"], ref_logp=x["ref"], kl_coef=KL_COEF,
                          kl_estimator="k3", entropy_coef=ENTROPY_COEF, clip_low=CLIP, clip_high=CLIP,
                          dual_clip=DUAL_CLIP, agg="token-mean")
    loss.backward()


def eager_ppo_full_kl(x, z):
    """The full-KL loss in eager PyTorch: both models' log-softmax over the vocabulary."""
    logp_all = torch.log_softmax(z, -1)
    ref_all = torch.log_softmax(x["ref_logits"], -1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, x["labels"][:, None]).squeeze(-1)
    entropy = -(p * logp_all).sum(-1)
    kl = (p * (logp_all - ref_all)).sum(-1)
    ratio = (logp - x["old"]).clamp(-20, 20).exp()
    adv = x["adv"]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * DUAL_CLIP), pg)
    mask = x["mask"].float()
    loss = ((pg + KL_COEF * kl - ENTROPY_COEF * entropy) * mask).sum() / mask.sum()
    loss.backward()


def kl_apart_ppo_full_kl(x, z):
    """The loss without KL on its fused kernel plus the full-KL op's KL alone: two passes over the
    policy's logits forward, two backward writing a gradient each, and autograd's sum of the two."""
    loss, _ = pf.ppo_loss(z, x["labels"], x["old"], x["adv"], x["mask"], entropy_coef=ENTROPY_COEF, clip_low=CLIP,
                          clip_high=CLIP, dual_clip=DUAL_CLIP, agg="token-mean")
    labels = x["labels"].masked_fill(~x["mask"], -100)
    kl = full_kl_op(z, x["ref_logits"], labels, 1.0, -100)[0]
    (loss + KL_COEF * kl.sum() / x["mask"].sum()).backward()


def public_ppo_full_kl(x, z):
    loss, _ = pf.ppo_loss(z, x["labels"], x["old"], x["adv"], x["mask"], ref_logits=x["ref_logits"],
                          kl_coef=KL_COEF, kl_estimator="full", entropy_coef=ENTROPY_COEF, clip_low=CLIP,
                          clip_high=CLIP, dual_clip=DUAL_CLIP, agg="token-mean")
    loss.backward()


PROVIDERS = {
    "logprobs": {"eager (log_softmax + gather)": (eager_logprobs, None),
                 "pf.token_logprobs, reference backend": (public_logprobs, "reference"),
                 "pf.token_logprobs, native backend": (public_logprobs, "native")},
    "ppo": {"eager composite": (eager_ppo, None),
            "pf.ppo_loss, reference backend": (public_ppo, "reference"),
            "pf.ppo_loss, native backend": (public_ppo, "native")},
    "ppo_full_kl": {"eager composite": (eager_ppo_full_kl, None),
                    "the KL apart, native backend": (kl_apart_ppo_full_kl, "native"),
                    "pf.ppo_loss, reference backend": (public_ppo_full_kl, "reference"),
                    "pf.ppo_loss, native backend": (public_ppo_full_kl, "native")},
}
PASSES = {"logprobs": 3, "ppo": 3, "ppo_full_kl": 5}
"""[N, V] fp32 passes a forward+backward must make: read the logits (and the reference's) once
each way, write dlogits once."""


def forced(backend: str | None):
    return ForcedBackend(backend) if backend else contextlib.nullcontext()


def timed(op: str, name: str, x, repeats: int) -> dict:
    """Milliseconds of one forward+backward: median and 20th/80th percentiles."""
    fn, backend = PROVIDERS[op][name]
    with forced(backend):
        return Timer("cpu", repeats).measure(lambda: fn(x, x["logits"].detach().requires_grad_()))


def peak_extra_child(op: str, name: str, N: int, V: int) -> None:
    """In a fresh process: the resident high-water mark of one forward+backward above the inputs
    (the mark is reset first by writing 5 to /proc/self/clear_refs)."""
    x = inputs(N, V, with_reference=op == "ppo_full_kl")
    z = x["logits"].detach().requires_grad_()
    fn, backend = PROVIDERS[op][name]
    with forced(backend):
        small = inputs(8, 64)
        fn(small, small["logits"].detach().requires_grad_())  # loads what a first call loads
        Path("/proc/self/clear_refs").write_text("5")
        before = process_status_bytes("VmRSS")
        fn(x, z)
    print(json.dumps(process_status_bytes("VmHWM") - before))


def peak_extra(op: str, name: str, N: int, V: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--peak-child", op, name, "--tokens", str(N), "--vocab", str(V)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def trainer_tokens_per_second(pairs: int):
    """Training tokens/s of the embedded default, reference (native off) and native, alternating."""
    rates = {"reference": [], "native": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            for label, switch in (("reference", "0"), ("native", "1")):
                os.environ["PPO_FAST_NATIVE"] = switch
                try:
                    summary, _ = train_run(Path(tmp), f"{label}{i}", ["--seed", str(i)])
                finally:
                    os.environ.pop("PPO_FAST_NATIVE")
                rates[label].append(summary["tokens_per_second_train"])
    return rates


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trainer-pairs", type=int, default=2)
    parser.add_argument("--ops", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--peak-child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    N, V = args.tokens, args.vocab
    if args.peak_child:
        peak_extra_child(*args.peak_child, N, V)
        return
    native.load()
    B, T = 512, 1024  # measured first, before any [N, V] buffer has been through the allocator
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.rand(B, T) > 0.1
    # Alternating rounds (one loop, then 20 calls of ours), so both see the same machine.
    loops, ours = [], []
    for _ in range(7):
        loops.append(Timer("cpu", 1)(lambda: spec.gae(rewards, values, mask)))
        ours.append(Timer("cpu", 20)(lambda: pf.gae(rewards, values, mask, whiten=False)))
    data = {"tokens": N, "vocab": V, "repeats": args.repeats, "gae": {
        "shape": [B, T], "loop_ms": summary(loops), "native_ms": summary(ours),
        "ratio": summary(a / b for a, b in zip(loops, ours))}}

    x = inputs(N, V, with_reference="ppo_full_kl" in args.ops)
    bandwidth = copy_bandwidth("cpu", Timer("cpu"), 4 * N * V)
    data.update(copy_bandwidth_GBps=bandwidth / 1e9, floor_ms=1e3 * 3 * 4 * N * V / bandwidth, ops={})
    for op in args.ops:
        data["ops"][op] = [{"provider": name, "ms": timed(op, name, x, args.repeats),
                            "peak_extra_bytes": peak_extra(op, name, N, V)} for name in PROVIDERS[op]]
    if args.trainer_pairs:
        data["trainer_tokens_per_s"] = trainer_tokens_per_second(args.trainer_pairs)
    publish(args.out, data, render)


def render(doc: dict) -> list[str]:
    N, V, floor = doc["tokens"], doc["vocab"], doc["floor_ms"]
    lines = [
        "# Native CPU kernels against eager PyTorch (side by side, one run)",
        "",
        f"Median (20th-80th percentile) of {doc['repeats']} calls after a warm-up, a fresh gradient buffer each "
        f"call. Copy bandwidth {doc['copy_bandwidth_GBps']:.1f} GB/s: the floor of a log-prob forward+backward "
        f"(read the logits twice, write dlogits once) is {floor:.0f} ms. Peak extra memory: resident high-water "
        f"mark of one forward+backward above the inputs, a fresh process each; dlogits alone is "
        f"{4 * N * V / 2**20:.0f} MiB.",
    ]
    titles = {"logprobs": f"token_logprobs forward+backward, fp32 logits [{N}, {V}]",
              "ppo": f"PPO actor loss forward+backward, fp32 logits [{N}, {V}] (KL k3 {KL_COEF}, entropy "
                     f"{ENTROPY_COEF}, clip {CLIP}, dual clip {DUAL_CLIP}, token-mean)",
              "ppo_full_kl": f"PPO actor loss with the full KL forward+backward, fp32 logits and reference logits "
                             f"[{N}, {V}] (full KL {KL_COEF}, entropy {ENTROPY_COEF}, clip {CLIP}, dual clip "
                             f"{DUAL_CLIP}, token-mean)"}
    for op, rows in doc["ops"].items():
        base = rows[0]["ms"]["median"]
        # Older results files have one floor, of 3 passes, for every op.
        op_floor = floor * PASSES.get(op, 3) / 3
        lines += ["", f"{titles[op]}; floor {op_floor:.0f} ms ({PASSES.get(op, 3)} passes over [N, V]):", "",
                  "| provider | median ms (p20-p80) | × eager speed | × floor | peak extra MiB |",
                  "| --- | --- | --- | --- | --- |"]
        for r in rows:
            ms = r["ms"]["median"]
            lines.append(f"| {r['provider']} | {fmt(r['ms'], digits=0)} | {base / ms:.2f} | {ms / op_floor:.1f} | "
                         f"{r['peak_extra_bytes'] / 2**20:.0f} |")
    gae = doc["gae"]
    lines += ["", f"GAE [{gae['shape'][0]}, {gae['shape'][1]}] fp32: Python loop over T "
                  f"{fmt(gae['loop_ms'])} ms, pf.gae (native) {fmt(gae['native_ms'], digits=2)} ms: "
                  f"{gae['loop_ms']['median'] / gae['native_ms']['median']:.0f}x the loop (medians of "
                  f"{gae['ratio']['n']} alternating rounds; ratio per round {fmt(gae['ratio'], digits=0)}x)."]
    if "trainer_tokens_per_s" in doc:
        rates = doc["trainer_tokens_per_s"]
        ref, nat = summary(rates["reference"])["median"], summary(rates["native"])["median"]
        lines += ["", f"Embedded default (`ppo-fast train`, seeds 0..{len(rates['native']) - 1}, runs alternating): "
                      f"median training tokens/s {ref:.0f} with the native kernels off (PPO_FAST_NATIVE=0; runs "
                      f"{', '.join(f'{r:.0f}' for r in rates['reference'])}), {nat:.0f} on (runs "
                      f"{', '.join(f'{r:.0f}' for r in rates['native'])}): {nat / ref:.2f}x."]
    return lines


if __name__ == "__main__":
    main()
