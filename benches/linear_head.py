"""The fused linear head against the logits paths: PPO loss forward+backward from hidden states and
an lm_head weight, time, GEMM work and peak extra memory side by side in one run.

    python benches/linear_head.py --out benches/results        # the issue's shape for the device
    python benches/linear_head.py --smoke                      # tiny shapes (CI)

Providers (each computes the token-mean clipped PPO loss with an entropy bonus and its gradients
with respect to hidden and weight, on the same random inputs, never zeros):

- ``fused``: ``pf.fused_linear_ppo_loss``; the logits are never stored, the gradients are
  computed in the forward while each chunk's logits are live (three GEMMs per chunk).
- ``fused, recompute``: the same function forced onto the path that recomputes the logits in the
  backward (four GEMMs per chunk): what it did before the gradients moved into the forward, and
  what it still does for a sequence-level objective or per-token log-probs.
- ``fused, token-outer``: for 16-bit weights with fewer tokens than vocabulary entries, which
  ``fused`` runs with the vocabulary in the backward's outer loop (no weight-sized float32 buffer,
  four GEMMs per tile), the token-outer order instead (three GEMMs per chunk in the forward, a
  float32 ``V × H`` accumulator): the time the lean order costs. Elsewhere the same as ``fused``.
- ``logits + pf.ppo_loss``: ``F.linear`` then ``pf.ppo_loss`` (the fused log-prob kernel on the
  stored logits).
- ``eager``: ``F.linear`` then ``ppo_fast.spec.ppo_loss`` (log_softmax, gather, entropy).
- ``liger``: Liger's ``LigerFusedLinearGRPOLoss`` (its chunked head), where liger-kernel is
  installed and runs on the device.
- ``trl``: TRL's ``ChunkedLogProbFunction`` (the fused head TRL's trainers use; Triton folds of
  cuBLAS tiles on CUDA, torch ops elsewhere) at the vocabulary chunk TRL's trainers pass it, then
  the same loss on its ``[tokens]`` log-probs and entropy, where trl is installed.
- ``floor: three GEMMs``: the head's three GEMMs alone (logits, dhidden, dweight), chunked as the
  fused head runs them: the time no three-GEMM method can beat here.

With ``--full-kl`` the loss also carries the exact KL over the vocabulary to a reference head of
the same shape (``kl_estimator="full"``, a reference hidden state and weight beside the policy's),
and the providers are the ones that compute it:

- ``fused``, ``fused, recompute``, ``fused, token-outer``: as above, with the reference's head.
  Where the gradients are computed in the forward (``fused`` for float32 weights, ``fused,
  token-outer`` for every weight) the reference's logits join the policy's chunks (one GEMM more
  per chunk) and the full-KL op (``ppo_fast::full_kl``: native C++ on the CPU, Triton row kernels
  on CUDA) runs over the two while both are live. Elsewhere (``fused, recompute``, and ``fused``
  for 16-bit weights with fewer tokens than vocabulary entries) the KL is computed apart: on
  Triton on CUDA for 16-bit heads (two kernels, two GEMMs for its gradient), otherwise as two
  GEMMs per chunk with the op over their logits, forward and backward.
- ``fused, KL by GEMMs``: ``fused`` with the KL computed apart on the GEMM path on CUDA too (the
  same as ``fused`` where the gradients are computed in the forward): what the heads' Triton
  kernels save.
- ``fused, KL in PyTorch``: ``fused, KL by GEMMs`` with the op's PyTorch implementation (its
  reference backend) over the logits: what the op's kernels save (on the CPU only).
- ``fused, k3 KL``: ``fused`` with the k3 estimator on given reference log-probs instead: the cost
  of the loss without the full KL (the reference's log-probs come from a scoring pass not timed
  here).
- ``logits + pf.ppo_loss``: both heads' logits stored (the reference's under no_grad), then
  ``pf.ppo_loss(..., ref_logits=...)``; ``, KL in PyTorch``: its full KL on the op's reference
  backend (on the CPU only).
- ``floor: three GEMMs``: as above; the reference's head adds one more GEMM to any method.

On a CPU the providers take turns, one call each per round, so a load that comes and goes on a
shared machine falls on all of them alike; the ratio to the logits path is the median of each
round's ratio. "GEMM work" is the FLOPs of the matmuls one call runs (read by the profiler, inside
the custom ops too), in units of one logits GEMM, 2·N·H·V.

"Extra memory" is the peak beyond the inputs and the gradients of hidden and weight. On CUDA it
comes from the allocator's peak; on a CPU each provider runs in a child process, which resets the
kernel's resident-set high-water mark (``/proc/self/clear_refs``) before a second call and reads
``VmHWM`` after it. On a GPU the table also gives the time of the head's three GEMMs
(6·N·H·V FLOPs at the bf16 matmul rate measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from floors import Timer, matmul_rate, peak_extra_bytes, process_status_bytes, sync  # noqa: E402
from record import fmt, publish, summary  # noqa: E402

SHAPES = {  # (tokens, hidden, vocab, dtype)
    "cpu": (8192, 256, 32000, torch.float32),
    "cuda": (8192, 4096, 151936, torch.bfloat16),
    "smoke": (64, 16, 1000, torch.float32),
}
PROVIDERS = ("fused", "fused, recompute", "fused, token-outer", "logits + pf.ppo_loss", "eager", "liger", "trl",
             "floor: three GEMMs")
FULL_KL_PROVIDERS = ("fused", "fused, recompute", "fused, token-outer", "fused, KL by GEMMs", "fused, KL in PyTorch",
                     "fused, k3 KL", "logits + pf.ppo_loss", "logits + pf.ppo_loss, KL in PyTorch",
                     "floor: three GEMMs")
"""The spec's eager loss is not among them: it is the tests' oracle, not a path anyone trains
with."""
KL_COEF = 0.05
BASELINE = "logits + pf.ppo_loss"
TRL_VOCABULARY_CHUNK = 32768
"""The vocabulary chunk TRL 1.16's trainers pass its fused head, where its trainer module is not importable."""
ENTROPY_COEF = 0.01
GOALS = {"cpu": (1.05, 0.10)}
"""Per device: the fused head's time over the logits path's, and its extra memory over the logits'
size, at most (issue 21)."""


class Unavailable(Exception):
    pass


def make_inputs(N, H, V, dtype, device, seed=0, full_kl=False):
    """``(hidden, weight, labels, old, adv, mask)``, and with ``full_kl`` a reference head of the
    same shape, ``ref_hidden`` and ``ref_weight``, after them."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    old = (-torch.rand(N, generator=g) * 8).to(device)
    adv = torch.randn(N, generator=g).to(device)
    mask = (torch.rand(N, generator=g) > 0.05).to(device)
    if not full_kl:
        return hidden, weight, labels, old, adv, mask
    ref_hidden = (hidden.detach() + 0.3 * torch.randn(N, H, generator=g).to(device, dtype))
    ref_weight = (weight.detach() + 0.3 * torch.randn(V, H, generator=g).to(device, dtype) / H ** 0.5)
    return hidden, weight, labels, old, adv, mask, ref_hidden, ref_weight


def make_run(provider, inputs):
    """A function doing one forward+backward; returns the gradients of hidden and weight. Inputs
    with a reference head (``make_inputs(..., full_kl=True)``) add its full KL to the loss."""
    import ppo_fast as pf
    from ppo_fast import spec as reference
    from ppo_fast.ops import full_kl, linear_logprobs

    hidden, weight, labels, old, adv, mask, *ref_head = inputs
    options = dict(clip_low=0.2, clip_high=0.28, entropy_coef=ENTROPY_COEF)
    logits_options = options
    if ref_head:
        ref_hidden, ref_weight = ref_head
        logits_options = dict(options, kl_estimator="full", kl_coef=KL_COEF)
        if provider == "fused, k3 KL":
            provider = "fused"
            with torch.no_grad():
                ref_logp = pf.fused_linear_token_logprobs(ref_hidden, ref_weight, labels)
            options = dict(options, kl_estimator="k3", kl_coef=KL_COEF, ref_logp=ref_logp)
        else:
            options = dict(logits_options, ref_hidden=ref_hidden, ref_weight=ref_weight)
        by_gemms = [(linear_logprobs, "_heads_on_triton", False)]
        in_pytorch = [(full_kl, "kl_ops_for", full_kl.REFERENCE)]
        if provider.endswith("KL in PyTorch") and hidden.is_cuda:
            # benches/gpu.sh's 8 minutes: on a GPU the question is the Triton kernels against
            # their GEMM path, which the other providers answer.
            raise Unavailable("the op's PyTorch implementation is timed on the CPU only")
        if provider == "fused, KL by GEMMs":
            return _forced(by_gemms, hidden, weight, labels, old, adv, mask, options)
        if provider == "fused, KL in PyTorch":
            return _forced(by_gemms + in_pytorch, hidden, weight, labels, old, adv, mask, options)
        if provider == "logits + pf.ppo_loss, KL in PyTorch":
            return _forced(in_pytorch, hidden, weight, labels, old, adv, mask, logits_options,
                           logits_of=ref_head)

    def forced(name, value):
        return _forced([(linear_logprobs, name, value)], hidden, weight, labels, old, adv, mask, options)

    def ref_logits():
        """The reference's logits as a user of the logits path has them: stored, no graph."""
        if not ref_head:
            return {}
        with torch.no_grad():
            return dict(ref_logits=torch.nn.functional.linear(ref_hidden, ref_weight))

    if provider == "fused":
        def loss():
            return pf.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, **options)[0]
    elif provider == "fused, recompute":
        return forced("_gradients_in_forward", False)
    elif provider == "fused, token-outer":
        return forced("vocabulary_outer", False)
    elif provider == "logits + pf.ppo_loss":
        def loss():
            return pf.ppo_loss(torch.nn.functional.linear(hidden, weight), labels, old, adv, mask, **ref_logits(),
                               **logits_options)[0]
    elif provider == "eager":
        def loss():
            return reference.ppo_loss(torch.nn.functional.linear(hidden, weight), labels, old, adv, mask,
                                      **ref_logits(), **logits_options)[0]
    elif provider == "liger":
        loss = _liger_loss(inputs)
    elif provider == "trl":
        loss = _trl_loss(inputs, options)
    elif provider == "floor: three GEMMs":
        return _three_gemms(hidden.detach(), weight.detach())
    else:
        raise ValueError(f"unknown provider {provider!r}")

    def run():
        return torch.autograd.grad(loss(), (hidden, weight))

    return run


def _forced(patches, hidden, weight, labels, old, adv, mask, options, logits_of=None):
    """The fused loss, or with ``logits_of`` (the reference's hidden states and weight) the logits
    path, with each ``(module, name, value)`` of ``patches`` answering ``value`` during the call
    (the backward runs inside it too: the gradients are taken within the patches)."""
    import ppo_fast as pf

    def loss():
        if logits_of is None:
            return pf.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, **options)[0]
        with torch.no_grad():
            ref_logits = torch.nn.functional.linear(*logits_of)
        return pf.ppo_loss(torch.nn.functional.linear(hidden, weight), labels, old, adv, mask, ref_logits=ref_logits,
                           **options)[0]

    def loss_and_grads():
        saved = [getattr(module, name) for module, name, _ in patches]
        for module, name, value in patches:
            setattr(module, name, lambda *args, value=value: value)
        try:
            return torch.autograd.grad(loss(), (hidden, weight))
        finally:
            for (module, name, _), original in zip(patches, saved):
                setattr(module, name, original)
    return loss_and_grads


def _three_gemms(hidden, weight):
    """The fused head's GEMMs alone, on its chunks and its one logits buffer: logits, then dhidden
    and dweight from them (standing in for dlogits); returns dhidden and dweight."""
    from ppo_fast.ops.linear_logprobs import linear_chunk_tokens

    chunk = linear_chunk_tokens(weight.shape[0], hidden.dtype)

    def run():
        dhidden = torch.empty_like(hidden)
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        logits = hidden.new_empty(chunk, weight.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            torch.mm(h, weight.t(), out=logits[:h.shape[0]])
            dhidden[start:start + chunk] = logits[:h.shape[0]] @ weight
            dweight.addmm_(logits[:h.shape[0]].t().float(), h.float())
        return dhidden, dweight.to(weight.dtype)

    return run


def gemm_flops(run) -> int:
    """FLOPs of the matmuls one call of ``run`` makes, as the profiler records them (it sees the
    aten calls inside custom ops too)."""
    first_matrix = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1, "aten::bmm": 0, "aten::baddbmm": 1}
    # With shapes the profiler also records "concrete inputs" (torch 2.13, a private switch), and
    # the tensors it keeps for them held 4 GiB over one full-KL call at 2048 tokens and ran the
    # CPU machine's 24 GiB out at 8192: the count needs only the shapes.
    concrete = getattr(torch._C._profiler, "_set_record_concrete_inputs_enabled_val", lambda enabled: None)
    concrete(False)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            run()
    finally:
        concrete(True)
    flops = 0
    for event in prof.events():
        first = first_matrix.get(event.name)
        if first is not None:
            a, b = event.input_shapes[first:first + 2]
            flops += 2 * a[-2] * a[-1] * b[-1] * (a[0] if len(a) == 3 else 1)
    return flops


def _runs_here(loss, hidden, name):
    """``loss`` once it has run forward and backward here, else :class:`Unavailable` saying why."""
    try:
        torch.autograd.grad(loss(), (hidden,))
    except Exception as exc:  # noqa: BLE001 -- any failure means this provider cannot run here
        raise Unavailable(f"{name} failed here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return loss


def _liger_loss(inputs):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel is not installed ({exc})") from None
    hidden, weight, labels, old, adv, mask = inputs
    # One sequence per row of [1, N]: Liger's loss is over [B, T] with a per-sequence advantage;
    # per-token advantages are what PPO has, so the sequence is the whole batch and the advantage
    # its mean (the work per token, the quantity timed here, is the same).
    module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                      epsilon_low=0.2, epsilon_high=0.28, compiled=False)

    def loss():
        out = module(hidden[None], weight, labels[None], mask[None].long(), adv.mean()[None],
                     old_per_token_logps=old[None])
        return out[0] if isinstance(out, tuple) else out

    return _runs_here(loss, hidden, "Liger's loss")


def _trl_loss(inputs, options):
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as exc:
        raise Unavailable(f"trl's fused head is not installed ({exc})") from None
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as vocabulary_chunk
    except ImportError:  # TRL's trainer needs accelerate and datasets, which its head does not
        vocabulary_chunk = TRL_VOCABULARY_CHUNK
    hidden, weight, labels, old, adv, mask = inputs
    low, high = 1 - options["clip_low"], 1 + options["clip_high"]

    def loss():
        logp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0,
                                                         vocabulary_chunk, None, 1.0, ("entropy",))
        ratio = torch.exp(logp - old)
        token = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high)) - options["entropy_coef"] * entropy
        return torch.where(mask, token, 0.0).sum() / mask.sum()

    return _runs_here(loss, hidden, "TRL's head")


def cpu_peak_extra(provider, shape, full_kl) -> int:
    """Run in a child: peak resident bytes during the second call beyond those before it, less the
    gradients of hidden and weight (outputs the caller keeps)."""
    N, H, V, dtype = SHAPES[shape]
    inputs = make_inputs(N, H, V, dtype, "cpu", full_kl=full_kl)
    run = make_run(provider, inputs)
    run()
    Path("/proc/self/clear_refs").write_text("5")
    before = process_status_bytes("VmRSS")
    grads = run()
    peak = process_status_bytes("VmHWM") - before
    return peak - sum(g.numel() * g.element_size() for g in grads)


def peak_extra(provider, shape, device, inputs, run, full_kl) -> int | None:
    if device.type == "cuda":
        grads_bytes = sum(t.numel() * t.element_size() for t in inputs[:2])
        return peak_extra_bytes(run, device) - grads_bytes
    # glibc keeps freed blocks below its (self-raising) mmap threshold for reuse, so a buffer the
    # first call freed would serve the second without showing in its peak: with a fixed 1 MiB
    # threshold every large block is mapped and unmapped, and the resident set tracks what is live.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, __file__, "--memory-of", provider, "--shape", shape,
                           "--threads", str(torch.get_num_threads())] + (["--full-kl"] if full_kl else []),
                          capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.splitlines()[-1])["peak_extra"]


def measure(shape: str, device, repeats: int, full_kl: bool = False) -> list[dict]:
    N, H, V, dtype = SHAPES[shape]
    providers = FULL_KL_PROVIDERS if full_kl else PROVIDERS
    runs, rows = {}, {}
    for provider in providers:
        inputs = make_inputs(N, H, V, dtype, device, full_kl=full_kl)
        try:
            runs[provider] = (inputs, make_run(provider, inputs))
        except Unavailable as exc:
            rows[provider] = dict(provider=provider, skipped=str(exc))
    samples = _interleaved_ms(runs, device, repeats) if device.type == "cpu" else {
        provider: Timer(device).measure(run) for provider, (_, run) in runs.items()}
    for provider, (inputs, run) in runs.items():
        row = dict(provider=provider, gemm_flops=gemm_flops(run),
                   peak_extra=peak_extra(provider, shape, device, inputs, run, full_kl))
        if device.type == "cpu":
            baseline = samples[BASELINE]
            row.update(ms=summary(samples[provider]), samples_ms=samples[provider],
                       vs_baseline=summary([t / b for t, b in zip(samples[provider], baseline)]))
        else:
            row.update(ms=samples[provider], vs_baseline=None)
        rows[provider] = row
    return [rows[provider] for provider in providers]


def _interleaved_ms(runs, device, repeats) -> dict[str, list[float]]:
    """Milliseconds per call, ``repeats`` rounds after one warm-up round, each provider once per
    round, in turn."""
    samples = {provider: [] for provider in runs}
    for round_ in range(repeats + 1):
        for provider, (_, run) in runs.items():
            start = time.perf_counter()
            run()
            sync(device)
            if round_:
                samples[provider].append((time.perf_counter() - start) * 1e3)
    return samples


def render(doc: dict) -> list[str]:
    N, H, V = doc["tokens"], doc["hidden"], doc["vocab"]
    logits_bytes = N * V * doc["element_size"]
    unit = 2 * N * H * V
    rows = doc["rows"]
    base = next(r for r in rows if r["provider"] == BASELINE)["ms"]["median"]
    cpu = rows[0].get("samples_ms") is not None
    how = (f"Median (20th-80th percentile) of {doc['repeats']} rounds after one warm-up round; in each round every "
           "provider runs once, in turn (the machine may be shared: the load falls on all alike). The ratio to "
           "the logits path is the median of the rounds' ratios." if cpu else
           "Median (20th-80th percentile) from triton.testing.do_bench.")
    title = "with the full KL to a reference head, " if doc.get("full_kl") else ""
    lines = [f"# Fused linear head vs the logits paths{', full KL' if doc.get('full_kl') else ''}", "", how, "",
             f"Fused linear head, PPO loss {title}forward+backward, {N} tokens × H {H} × V {V}, {doc['dtype']}, on "
             f"{doc['device']}. The logits alone: {logits_bytes / 2**20:,.0f} MiB. GEMM work in units of one "
             f"logits GEMM (2·N·H·V = {unit / 1e9:.1f} GFLOP), the matmuls one call makes.", ""]
    if "gemms_ms" in doc:
        lines += [f"Three GEMMs of the head at the measured bf16 matmul rate ({doc['matmul_TFLOPs']:.0f} TFLOP/s): "
                  f"{doc['gemms_ms']:.2f} ms.", ""]
    lines += [f"| provider | median ms (p20-p80) | time vs {BASELINE} | GEMM work | peak extra MiB "
              "| extra / logits size |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['provider']} | skipped: {r['skipped']} | | | | |")
            continue
        ratio = (fmt(r["vs_baseline"], digits=2) if r.get("vs_baseline") else f"{r['ms']['median'] / base:.2f}")
        lines.append(f"| {r['provider']} | {fmt(r['ms'])} | {ratio} | {r['gemm_flops'] / unit:.2f} | "
                     f"{r['peak_extra'] / 2**20:,.0f} | {r['peak_extra'] / logits_bytes:.0%} |")
    goal = doc.get("goal")
    if goal:
        fused = next(r for r in rows if r["provider"] == "fused")
        ratio = fused["vs_baseline"]["median"] if fused.get("vs_baseline") else fused["ms"]["median"] / base
        extra = fused["peak_extra"] / logits_bytes
        met = ratio <= goal["time"] and extra <= goal["memory"]
        lines += ["", f"Goal (issue 21): the fused head in at most {goal['time']:.2f}× the logits path's time with "
                  f"extra memory at most {goal['memory']:.0%} of the logits: {ratio:.2f}× and {extra:.0%}, "
                  f"{'met' if met else 'NOT met'}."]
    return lines


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    parser.add_argument("--out", help="write linear_head_<device>.md and .json into this folder")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (CPU)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--full-kl", action="store_true",
                        help="the loss with the full KL to a reference head (linear_head_full_kl_<device>.md)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_extra": cpu_peak_extra(args.memory_of, args.shape, args.full_kl)}))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = "smoke" if args.smoke else device.type
    N, H, V, dtype = SHAPES[shape]
    data = dict(tokens=N, hidden=H, vocab=V, dtype=str(dtype).removeprefix("torch."),
                element_size=torch.empty((), dtype=dtype).element_size(), device=device_name(device),
                repeats=args.repeats, full_kl=args.full_kl, rows=measure(shape, device, args.repeats, args.full_kl))
    if not args.smoke and device.type in GOALS and not args.full_kl:
        data["goal"] = dict(zip(("time", "memory"), GOALS[device.type]))
    if device.type == "cuda":
        rate = matmul_rate(device, Timer(device), 8192)
        data.update(matmul_TFLOPs=rate / 1e12, gemms_ms=6 * N * H * V / rate * 1e3)
    name = (f"linear_head_{'full_kl_' if args.full_kl else ''}{'smoke' if args.smoke else device.type}"
            f"{f'_{args.threads}thread' if args.threads else ''}")
    out = Path(args.out) / f"{name}.md" if args.out else None
    publish(out, data, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
