"""The native CPU kernels against eager PyTorch and the reference backend, side by side in one run.

    python benches/bench_native.py --out benches/results/native_cpu.md

token_logprobs forward+backward on fp32 logits [4096, 32000] (eager: log_softmax + gather and its
autograd backward), and GAE on [512, 1024] (the Python loop over T, the spec). Median of
--repeats timed calls after one warm-up, on fresh random inputs (never zeros); the floor is the
bytes that must move (read the logits twice, write dlogits once) over the measured copy bandwidth.
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import ppo_fast as pf
from ppo_fast import reference as spec
from ppo_fast.backends import native, reference


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(numel: int) -> float:
    src, dst = torch.randn(numel), torch.empty(numel)
    seconds = median_seconds(lambda: dst.copy_(src), 5)
    return 2 * 4 * numel / seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    N, V = args.tokens, args.vocab
    torch.manual_seed(0)
    logits = torch.randn(N, V) * 3
    labels = torch.randint(0, V, (N,))
    grad = torch.randn(N)

    def eager():
        z = logits.detach().requires_grad_()
        logp = torch.log_softmax(z, -1).gather(-1, labels[:, None]).squeeze(-1)
        torch.autograd.backward(logp, grad)

    def backend(module):
        def run():
            logp, entropy, lse = module.token_logprobs_forward(logits, labels, 1.0, -100, False)
            dlogits = torch.empty_like(logits)
            module.token_logprobs_backward(dlogits, logits, labels, lse, entropy, grad, None, 1.0, -100)
        return run

    def public():
        z = logits.detach().requires_grad_()
        torch.autograd.backward(pf.token_logprobs(z, labels), grad)

    def inplace_seconds() -> float:
        """inplace_backward writes dlogits over the logits (a caller's buffer it no longer needs):
        no fresh [N, V] buffer to page in. The logits are restored outside the timing."""
        spare, times = torch.empty_like(logits), []
        for _ in range(args.repeats + 1):
            spare.copy_(logits)
            z = spare.detach().requires_grad_()
            start = time.perf_counter()
            torch.autograd.backward(pf.token_logprobs(z, labels, inplace_backward=True), grad)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    rows = {"eager (log_softmax + gather)": eager, "ppo_fast reference backend": backend(reference),
            "ppo_fast native backend": backend(native), "pf.token_logprobs (native, autograd)": public}
    times = {name: median_seconds(fn, args.repeats) for name, fn in rows.items()}
    times["pf.token_logprobs (native, inplace_backward)"] = inplace_seconds()
    bandwidth = copy_bandwidth(N * V)
    floor = 3 * 4 * N * V / bandwidth

    B, T = 512, 1024
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.rand(B, T) > 0.1
    loop = median_seconds(lambda: spec.gae(rewards, values, mask), 3)
    ours = median_seconds(lambda: pf.gae(rewards, values, mask), args.repeats)

    lines = [
        "# Native CPU kernels against eager PyTorch (side by side, one run)",
        "",
        f"Measured with `python benches/bench_native.py` on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}. Median of "
        f"{args.repeats} calls after a warm-up. Copy bandwidth {bandwidth / 1e9:.1f} GB/s; the floor of the "
        f"log-prob forward+backward (read the logits twice, write dlogits once) is {1e3 * floor:.0f} ms.",
        "",
        f"token_logprobs forward+backward, fp32 logits [{N}, {V}]:",
        "",
        "| provider | median ms | vs eager | × floor |",
        "| --- | --- | --- | --- |",
    ]
    base = times["eager (log_softmax + gather)"]
    for name, seconds in times.items():
        lines.append(f"| {name} | {1e3 * seconds:.0f} | {base / seconds:.2f} | {seconds / floor:.1f} |")
    lines += ["", f"GAE [{B}, {T}] fp32: Python loop over T {1e3 * loop:.0f} ms, pf.gae (native) "
                  f"{1e3 * ours:.2f} ms: {loop / ours:.0f}x the loop."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
