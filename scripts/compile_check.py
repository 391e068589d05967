"""Compile every Triton kernel configuration for real GPUs, on a machine without one.

    python scripts/compile_check.py                       # sm_80 and sm_90, table on stdout
    python scripts/compile_check.py --check --out FILE.md # fail on any problem, write the table

Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run the kernels on a CPU) accepts
code the GPU compiler rejects. This module compiles instead: each case is a launch plan made by
the launchers' own ``plan_*`` functions from CPU tensors of the dtypes, shapes and strides a
launch would see, specialised the way Triton's JIT specialises a call (its own
``native_specialize_impl``), and built by ``triton.compile`` down to a cubin with the ``ptxas``
and ``cuobjdump`` that ship inside the triton wheel. The cases cover every dtype and every value
of every constexpr at least once, every block size of the log-prob forward (with and without
Σ p²) and of GAE, and an aligned (V = 151 936) and an unaligned (V = 50 257) vocabulary.

``--check`` fails on a compile error, on any spill (local memory or stack), on a logits-reading
kernel whose aligned case does not load the logits 128 bits at a time, and on a batch whose rows would run
different machine code than one of its rows alone (what bitwise batch invariance rests on).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules:
    # This module compiles; under the interpreter @triton.jit would give it nothing to compile.
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

from ppo_fast.kernels import batch_invariant  # noqa: E402
from ppo_fast.kernels import full_kl  # noqa: E402
from ppo_fast.kernels import gae  # noqa: E402
from ppo_fast.kernels import linear_logprobs as linear  # noqa: E402
from ppo_fast.kernels import logprobs  # noqa: E402
from ppo_fast.kernels import ppo_loss  # noqa: E402
from ppo_fast.kernels.launch import ENABLE_FP_FUSION, Launch, accumulator  # noqa: E402

ALIGNED_V = 151936  # Qwen's vocabulary: a multiple of 16
UNALIGNED_V = 50257  # GPT-2's: odd
ACC = {torch.float64: tl.float64}
LOGITS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass
class Case:
    kernel: str
    config: str
    plan: Launch
    aligned: bool = False
    """Rows start 16-byte aligned: the logits should be read with 128-bit loads."""


def _acc(dtype):
    return ACC.get(dtype, tl.float32)


def _out(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _logits(n_rows: int, V: int, dtype) -> torch.Tensor:
    return torch.empty(n_rows, V, dtype=dtype)


def logprobs_fwd_plan(logits, with_entropy, labels=None, sum_pi_squared=False) -> Launch:
    n = logits.shape[0]
    out = torch.empty(n, dtype=_out(logits.dtype))
    labels = torch.zeros(n, dtype=torch.int64) if labels is None else labels
    rows, layout = logprobs.row_layout(logits)
    return logprobs.plan_logprobs_fwd(rows, layout, labels, out, out, out,
                                      torch.ones(1, dtype=_out(logits.dtype)), -100, with_entropy,
                                      _acc(logits.dtype), out if sum_pi_squared else None)


def logprobs_bwd_plan(logits, with_entropy, labels=None) -> Launch:
    n = logits.shape[0]
    vec = torch.empty(n, dtype=_out(logits.dtype))
    labels = torch.zeros(n, dtype=torch.int64) if labels is None else labels
    rows, layout = logprobs.row_layout(logits)
    dlogits = torch.empty_like(logits)
    return logprobs.plan_logprobs_bwd(rows, layout, dlogits, logprobs.row_layout(dlogits)[1],
                                      labels, vec, vec, vec, vec if with_entropy else None,
                                      torch.ones(1, dtype=_out(logits.dtype)), -100,
                                      _acc(logits.dtype))


def full_kl_rows_fwd_plan(logits, ref_logits=None, labels=None) -> Launch:
    ref_logits = torch.empty_like(logits) if ref_logits is None else ref_logits
    out = torch.empty(logits.shape[:-1], dtype=_out(logits.dtype)).view(-1)
    labels = torch.zeros(out.numel(), dtype=torch.int64) if labels is None else labels
    rows, layout = logprobs.row_layout(logits)
    ref_rows, ref_layout = logprobs.row_layout(ref_logits)
    return full_kl.plan_full_kl_fwd(rows, layout, ref_rows, ref_layout, labels, out, out, out, out, out,
                                    torch.ones(1, dtype=_out(logits.dtype)), -100, _acc(logits.dtype))


def full_kl_rows_bwd_plan(logits, ref_logits=None, labels=None, dlogits_dtype=None) -> Launch:
    ref_logits = torch.empty_like(logits) if ref_logits is None else ref_logits
    vec = torch.empty(logits.shape[:-1], dtype=_out(logits.dtype)).view(-1)
    labels = torch.zeros(vec.numel(), dtype=torch.int64) if labels is None else labels
    rows, layout = logprobs.row_layout(logits)
    ref_rows, ref_layout = logprobs.row_layout(ref_logits)
    dlogits = torch.empty(logits.shape, dtype=dlogits_dtype or logits.dtype)
    return full_kl.plan_full_kl_bwd(rows, layout, ref_rows, ref_layout, dlogits, logprobs.row_layout(dlogits)[1],
                                    labels, vec, vec, vec, vec, vec, vec, vec, torch.ones(1, dtype=_out(logits.dtype)),
                                    -100, _acc(logits.dtype))


def ppo_fwd_plan(logits, kl_mode="k3", dual_clip=True, tis=True, labels=None) -> Launch:
    n = logits.shape[0]
    vec = torch.empty(n, dtype=_out(logits.dtype))
    labels = torch.zeros(n, dtype=torch.int64) if labels is None else labels
    outputs = {name: vec for name in ("token_loss", "dloss_dlogp", "logp", "entropy", "lse",
                                      "pg", "kl", "log_ratio")}
    outputs["flags"] = torch.empty(n, dtype=torch.int8)
    rows, layout = logprobs.row_layout(logits)
    return ppo_loss.plan_ppo_fwd(
        rows, layout, labels, vec, vec, vec if kl_mode else None, vec if tis else None, outputs,
        torch.ones(len(ppo_loss.SCALARS), dtype=_out(logits.dtype)), ignore_index=-100,
        has_dual_clip=dual_clip, kl_mode=kl_mode, acc=_acc(logits.dtype))


def linear_fwd_plan(n_rows: int, H: int, V: int, dtype, bias=True, entropy=True, hidden=None,
                    sum_pi_squared=False) -> Launch:
    hidden = torch.empty(n_rows, H, dtype=dtype) if hidden is None else hidden
    weight = torch.empty(V, H, dtype=dtype)
    n = hidden.shape[0]
    vec = torch.empty(n, dtype=_out(dtype))
    return linear.plan_linear_logprobs_fwd(
        hidden, weight, torch.empty(V, dtype=dtype) if bias else None, torch.zeros(n, dtype=torch.int64),
        vec, vec, vec, torch.ones(1, dtype=_out(dtype)), -100, entropy, _acc(dtype),
        vec if sum_pi_squared else None)


def linear_dlogits_plan(n_rows: int, H: int, V: int, dtype, bias=True, grad_entropy=True, first=0,
                        entries=None, hidden=None) -> Launch:
    """The backward kernel over the entries ``first`` to ``first + entries − 1`` (all by default) of a
    ``[V, H]`` head."""
    hidden = torch.empty(n_rows, H, dtype=dtype) if hidden is None else hidden
    entries = V - first if entries is None else entries
    weight = torch.empty(V, H, dtype=dtype)[first:first + entries]
    n = hidden.shape[0]
    vec = torch.empty(n, dtype=_out(dtype))
    return linear.plan_linear_logprobs_dlogits(
        hidden, weight, torch.empty(V, dtype=dtype)[first:first + entries] if bias else None, first, V,
        torch.zeros(n, dtype=torch.int64), vec, vec, vec, vec if grad_entropy else None,
        torch.ones(1, dtype=_out(dtype)), -100, torch.empty(n, entries, dtype=dtype), _acc(dtype))


def full_kl_fwd_plan(n_rows: int, H: int, H_ref: int, V: int, dtype, bias=True, hidden=None) -> Launch:
    """The full KL between a ``[V, H]`` policy head and a ``[V, H_ref]`` reference head; ``bias``
    for both or neither."""
    hidden = torch.empty(n_rows, H, dtype=dtype) if hidden is None else hidden
    n = hidden.shape[0]
    vec = torch.empty(n, dtype=_out(dtype))
    bias_of = lambda: torch.empty(V, dtype=dtype) if bias else None  # noqa: E731
    return linear.plan_linear_full_kl_fwd(
        hidden, torch.empty(V, H, dtype=dtype), bias_of(), torch.empty(n, H_ref, dtype=dtype),
        torch.empty(V, H_ref, dtype=dtype), bias_of(), torch.zeros(n, dtype=torch.int64), vec, vec, vec,
        torch.ones(1, dtype=_out(dtype)), -100, _acc(dtype))


def full_kl_dlogits_plan(n_rows: int, H: int, H_ref: int, V: int, dtype, bias=True, first=0, entries=None,
                         hidden=None) -> Launch:
    """Its backward over the entries ``first`` to ``first + entries − 1`` (all by default)."""
    hidden = torch.empty(n_rows, H, dtype=dtype) if hidden is None else hidden
    entries = V - first if entries is None else entries
    part = slice(first, first + entries)
    n = hidden.shape[0]
    vec = torch.empty(n, dtype=_out(dtype))
    bias_of = lambda: torch.empty(V, dtype=dtype)[part] if bias else None  # noqa: E731
    return linear.plan_linear_full_kl_dlogits(
        hidden, torch.empty(V, H, dtype=dtype)[part], bias_of(), torch.empty(n, H_ref, dtype=dtype),
        torch.empty(V, H_ref, dtype=dtype)[part], bias_of(), V, torch.zeros(n, dtype=torch.int64), vec, vec, vec,
        vec, torch.ones(1, dtype=_out(dtype)), -100, torch.empty(n, entries, dtype=dtype), _acc(dtype))


def gae_plan(max_len: int, dtype=torch.float32) -> Launch:
    total = 4 * max_len
    vec = torch.empty(total, dtype=dtype)
    cu = torch.arange(5, dtype=torch.int64) * max_len
    return gae.plan_gae(vec, vec, torch.empty(total, dtype=torch.int8), cu, vec, vec,
                        torch.ones(2, dtype=dtype), max_len, _acc(dtype))


def matmul_plan(a, n: int, bias: bool) -> Launch:
    """``a`` [M, K] times a [K, n] weight (a transposed [n, K] one, as F.linear passes it)."""
    M, K = a.shape
    weight = torch.empty(n, K, dtype=a.dtype).t()
    c = torch.empty(1, M, n, dtype=a.dtype)
    bias_view = torch.empty(n, dtype=a.dtype).expand(1, M, n) if bias else None
    return batch_invariant.plan_matmul(a.unsqueeze(0), weight.unsqueeze(0), c, bias_view, 1.0, 1.0, _acc(a.dtype))


def row_reduce_plan(rows: torch.Tensor, mean: bool) -> Launch:
    out = torch.empty(rows.shape[0], dtype=torch.int64 if not rows.dtype.is_floating_point else rows.dtype)
    return batch_invariant.plan_row_reduce(rows, out, mean, accumulator(rows.dtype))


def attention_plan(q, k, bias: bool) -> Launch:
    """Attention of ``q`` [B, H, T, D] over ``k`` (and a ``v`` like it) [B, Hkv, S, D]."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty(B, T, H, D, dtype=q.dtype)
    mask = torch.empty(B, 1, T, S).expand(B, H, T, S) if bias else None
    bounds = torch.empty(B, Hkv, T, 2, dtype=torch.int64) if bias else None
    return batch_invariant.plan_attention(q, k, torch.empty_like(k), out, mask, bounds, D ** -0.5, -1e38)


def cases() -> list[Case]:
    out = []
    for dtype in LOGITS_DTYPES:
        for V in (ALIGNED_V, UNALIGNED_V):
            aligned = V == ALIGNED_V
            for entropy in (False, True):
                config = f"{_short(dtype)} V={V} entropy={entropy}"
                out.append(Case("logprobs fwd", config,
                                logprobs_fwd_plan(_logits(2, V, dtype), entropy), aligned))
                out.append(Case("logprobs bwd", config,
                                logprobs_bwd_plan(_logits(2, V, dtype), entropy), aligned))
                out.append(Case("logprobs fwd", f"{config} sum_pi_squared=True",
                                logprobs_fwd_plan(_logits(2, V, dtype), entropy,
                                                  sum_pi_squared=True), aligned))
            out.append(Case("ppo fwd", f"{_short(dtype)} V={V} k3 dual-clip tis",
                            ppo_fwd_plan(_logits(2, V, dtype)), aligned))
    for mode in ppo_loss.KL_MODES:
        for dual_clip, tis in ((False, False), (True, True)):
            config = f"bfloat16 V={ALIGNED_V} kl={mode} dual-clip={dual_clip} tis={tis}"
            out.append(Case("ppo fwd", config,
                            ppo_fwd_plan(_logits(2, ALIGNED_V, torch.bfloat16), mode, dual_clip,
                                         tis), True))
    # Every block size the log-prob launchers can pick (BLOCK_V = next power of 2 of V, capped).
    for power in range(14):
        V = 2 ** power
        out.append(Case("logprobs fwd", f"bfloat16 V={V} entropy=True",
                        logprobs_fwd_plan(_logits(2, V, torch.bfloat16), True), V >= 8))
        out.append(Case("logprobs fwd", f"bfloat16 V={V} entropy=True sum_pi_squared=True",
                        logprobs_fwd_plan(_logits(2, V, torch.bfloat16), True,
                                          sum_pi_squared=True), V >= 8))
    # The fused linear head: a 4096-wide Qwen head (16-byte rows), an odd one, a tiny one.
    for dtype in LOGITS_DTYPES:
        for H, V, extras in ((4096, ALIGNED_V, True), (4097, UNALIGNED_V, False)):
            out.append(Case("linear fwd", f"{_short(dtype)} H={H} V={V} bias={extras} entropy={extras}",
                            linear_fwd_plan(2, H, V, dtype, extras, extras)))
    out.append(Case("linear fwd", "bfloat16 H=100 V=7 bias=True entropy=True",
                    linear_fwd_plan(2, 100, 7, torch.bfloat16)))
    for dtype in (torch.bfloat16, torch.float32):
        out.append(Case("linear fwd", f"{_short(dtype)} H=4096 V={ALIGNED_V} bias=True entropy=True sum_pi_squared=True",
                        linear_fwd_plan(2, 4096, ALIGNED_V, dtype, sum_pi_squared=True)))
    # Its backward: the same heads, with and without the entropy's gradient, and a range of the
    # vocabulary as the vocabulary-outer order hands it (dlogits in float32 there on the CPU only).
    for dtype in LOGITS_DTYPES:
        for H, V, extras in ((4096, ALIGNED_V, True), (4097, UNALIGNED_V, False)):
            out.append(Case("linear dlogits",
                            f"{_short(dtype)} H={H} V={V} bias={extras} grad_entropy={extras}",
                            linear_dlogits_plan(2, H, V, dtype, extras, extras)))
    out.append(Case("linear dlogits", "bfloat16 H=100 V=7 bias=True grad_entropy=True",
                    linear_dlogits_plan(2, 100, 7, torch.bfloat16)))
    out.append(Case("linear dlogits", f"bfloat16 H=4096 V={ALIGNED_V} entries 4096-8191 bias=True grad_entropy=True",
                    linear_dlogits_plan(2, 4096, ALIGNED_V, torch.bfloat16, first=4096, entries=4096)))
    # The full KL between two 16-bit heads (the dtypes it serves): the policy's and a reference of
    # the same shape, or a smaller reference (a 2048-wide head beside a 4096-wide policy), and a
    # range of the vocabulary.
    for dtype in (torch.bfloat16, torch.float16):
        for H, H_ref, V, bias in ((4096, 4096, ALIGNED_V, True), (4097, 2048, UNALIGNED_V, False)):
            config = f"{_short(dtype)} H={H} H_ref={H_ref} V={V} bias={bias}"
            out.append(Case("full kl fwd", config, full_kl_fwd_plan(2, H, H_ref, V, dtype, bias)))
            out.append(Case("full kl dlogits", config, full_kl_dlogits_plan(2, H, H_ref, V, dtype, bias)))
    out.append(Case("full kl dlogits", f"bfloat16 H=4096 H_ref=4096 V={ALIGNED_V} entries 4096-8191 bias=True",
                    full_kl_dlogits_plan(2, 4096, 4096, ALIGNED_V, torch.bfloat16, first=4096, entries=4096)))
    # The full KL from two rows of logits: every dtype, a float32 reference beside 16-bit logits,
    # float32 gradients of 16-bit logits (the heads' GEMM path on the CPU), and small vocabularies.
    for dtype in LOGITS_DTYPES:
        for V in (ALIGNED_V, UNALIGNED_V):
            config = f"{_short(dtype)} V={V}"
            out.append(Case("full kl rows fwd", config, full_kl_rows_fwd_plan(_logits(2, V, dtype)), V == ALIGNED_V))
            out.append(Case("full kl rows bwd", config, full_kl_rows_bwd_plan(_logits(2, V, dtype)), V == ALIGNED_V))
    mixed = (_logits(2, ALIGNED_V, torch.bfloat16), _logits(2, ALIGNED_V, torch.float32))
    out.append(Case("full kl rows fwd", f"bfloat16 V={ALIGNED_V} ref float32", full_kl_rows_fwd_plan(*mixed), True))
    out.append(Case("full kl rows bwd", f"bfloat16 V={ALIGNED_V} ref float32 dlogits float32",
                    full_kl_rows_bwd_plan(*mixed, dlogits_dtype=torch.float32), True))
    for V in (1, 7, 100, 1000, 4095):
        out.append(Case("full kl rows fwd", f"bfloat16 V={V}", full_kl_rows_fwd_plan(_logits(2, V, torch.bfloat16))))
        out.append(Case("full kl rows bwd", f"bfloat16 V={V}", full_kl_rows_bwd_plan(_logits(2, V, torch.bfloat16))))
    for power in range(11):
        out.append(Case("gae", f"float32 max_len={2 ** power}", gae_plan(2 ** power)))
    out.append(Case("gae", "float64 max_len=1024", gae_plan(1024, torch.float64)))
    # The batch-invariant mode's CUDA kernels, at the shapes of a Qwen2-0.5B (H 896, MLP 4864, 14
    # heads over 2 KV heads of 64) and of a model without grouped heads (head dim 128).
    for dtype in LOGITS_DTYPES:
        for bias in (False, True):
            out.append(Case("bi matmul", f"{_short(dtype)} K=896 N=4864 bias={bias}",
                            matmul_plan(torch.empty(7, 896, dtype=dtype), 4864, bias)))
        for mean in (False, True):
            out.append(Case("bi row reduce", f"{_short(dtype)} length=896 mean={mean}",
                            row_reduce_plan(torch.empty(7, 896, dtype=dtype), mean)))
    out.append(Case("bi row reduce", "int64 length=896 sum",
                    row_reduce_plan(torch.empty(7, 896, dtype=torch.int64), False)))
    for dtype in LOGITS_DTYPES[:3]:
        for H, Hkv, D in ((14, 2, 64), (8, 8, 128)):
            for bias in (False, True):
                out.append(Case("bi attention", f"{_short(dtype)} heads={H}/{Hkv} D={D} mask={bias}",
                                attention_plan(torch.empty(2, H, 5, D, dtype=dtype),
                                               torch.empty(2, Hkv, 9, D, dtype=dtype), bias)))
    return out


def specialization(plan: Launch):
    """(signature, constexprs, attrs) as Triton's JIT derives them for this call."""
    fn: JITFunction = plan.kernel
    values = list(plan.args) + [plan.constexprs[p.name] for p in fn.params[len(plan.args):]]
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, value) in enumerate(zip(fn.params, values)):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
            continue
        kind, key = native_specialize_impl(CUDABackend, value, param.is_const,
                                           not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = key
        elif key:
            attrs[(index,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    function_line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", function_line)}


_ELEMENT_BITS = {"bf16": 16, "f16": 16, "f32": 32, "f64": 64, "i1": 8, "i8": 8, "i32": 32,
                 "i64": 64}


def block_load_bits(ttgir: str) -> int:
    """Bits each thread loads per instruction from the row (or sequence) blocks: the narrowest
    over the kernel's block loads. Triton's coalescing pass sets a load's ``sizePerThread`` to
    the elements it can fetch at once, which the backend turns into one load of up to 128 bits."""
    per_thread = {name: int(first) for name, first in re.findall(
        r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[(\d+)", ttgir, re.M)}
    widths = [min(per_thread[layout] * _ELEMENT_BITS[element], 128)
              for element, layout in re.findall(
                  r"= tt\.load [^\n]*: tensor<\d+x!tt\.ptr<(\w+)>, (#\w+)>", ttgir)]
    return min(widths, default=0)


def vector_loads_possible(plan: Launch) -> bool:
    """A block spread over the threads gives each at least 16 bytes to load."""
    block, size = plan.constexprs["BLOCK_V"], plan.args[0].element_size()
    return block * size >= plan.num_warps * 32 * 16


def compile_case(case: Case, arch: int) -> dict:
    signature, constexprs, attrs = specialization(case.plan)
    options = {"num_warps": case.plan.num_warps, "enable_fp_fusion": ENABLE_FP_FUSION}
    if hasattr(case.plan, "num_stages"):
        options["num_stages"] = case.plan.num_stages
    compiled = triton.compile(
        ASTSource(case.plan.kernel, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32), options=options)
    usage = resource_usage(compiled.asm["cubin"])
    return dict(registers=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"],
                shared=usage["SHARED"], load_bits=block_load_bits(compiled.asm["ttgir"]),
                warps=case.plan.num_warps)


@functools.cache
def _cases() -> list[Case]:
    return cases()


def _compile_job(job: tuple[int, int]) -> dict | str:
    index, arch = job
    try:
        return compile_case(_cases()[index], arch)
    except Exception as exc:  # a compile error is a finding to report, not a crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def batch_invariance_problems() -> list[str]:
    """A row alone and the same row inside a batch (plain, shifted [B, T, V], permuted) must get
    the same specialisation, hence the same machine code."""
    problems = []
    for V in (ALIGNED_V, UNALIGNED_V):
        batch = torch.empty(3, 5, V, dtype=torch.bfloat16)
        labels = torch.zeros(3, 5, dtype=torch.int64)
        shifted = batch[:, :-1]
        for name, make in (("logprobs fwd", lambda x, y: logprobs_fwd_plan(x, True, y)),
                           ("logprobs fwd sum_pi_squared",
                            lambda x, y: logprobs_fwd_plan(x, True, y, sum_pi_squared=True)),
                           ("logprobs bwd", lambda x, y: logprobs_bwd_plan(x, True, y)),
                           ("ppo fwd", lambda x, y: ppo_fwd_plan(x, labels=y)),
                           ("full kl rows fwd", lambda x, y: full_kl_rows_fwd_plan(x, x, y)),
                           ("full kl rows bwd", lambda x, y: full_kl_rows_bwd_plan(x, x, y))):
            flat = batch.view(-1, V)
            variants = {
                "batch": make(flat, labels.view(-1)),
                "row alone": make(flat[7:8], labels.view(-1)[7:8]),
                "row copied": make(flat[7:8].clone(), labels.view(-1)[7:8].clone()),
                "shifted batch": make(shifted, labels[:, :-1].reshape(-1)),
                "permuted batch": make(flat[torch.randperm(15)], labels.view(-1)),
            }
            problems += _differing(f"{name} V={V}", variants)
    hidden = torch.empty(15, 4096, dtype=torch.bfloat16)
    problems += _differing("linear fwd", {
        "batch": linear_fwd_plan(15, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden),
        "row alone": linear_fwd_plan(1, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden[7:8]),
        "row copied": linear_fwd_plan(1, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden[7:8].clone()),
        "permuted batch": linear_fwd_plan(15, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden[torch.randperm(15)]),
    })
    # The backward need not be batch-invariant, but its logits must be the forward's, whatever
    # the range of the vocabulary it is handed.
    problems += _differing("linear dlogits", {
        "batch": linear_dlogits_plan(15, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden),
        "row alone": linear_dlogits_plan(1, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden[7:8]),
        "vocabulary range": linear_dlogits_plan(15, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden, first=4096,
                                                entries=1001),
    })
    problems += _differing("full kl fwd", {
        "batch": full_kl_fwd_plan(15, 4096, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden),
        "row alone": full_kl_fwd_plan(1, 4096, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden[7:8]),
        "row copied": full_kl_fwd_plan(1, 4096, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden[7:8].clone()),
        "permuted batch": full_kl_fwd_plan(15, 4096, 4096, ALIGNED_V, torch.bfloat16,
                                           hidden=hidden[torch.randperm(15)]),
    })
    problems += _differing("full kl dlogits", {
        "batch": full_kl_dlogits_plan(15, 4096, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden),
        "vocabulary range": full_kl_dlogits_plan(15, 4096, 4096, ALIGNED_V, torch.bfloat16, hidden=hidden,
                                                 first=4096, entries=1001),
    })
    weight_input = torch.empty(15, 896, dtype=torch.bfloat16)
    for bias in (False, True):
        problems += _differing(f"bi matmul bias={bias}", {
            "batch": matmul_plan(weight_input, 4864, bias),
            "row alone": matmul_plan(weight_input[7:8], 4864, bias),
            "row copied": matmul_plan(weight_input[7:8].clone(), 4864, bias),
            "permuted batch": matmul_plan(weight_input[torch.randperm(15)], 4864, bias),
        })
    sums = torch.empty(15, 896, dtype=torch.float32)
    problems += _differing("bi row reduce", {
        "batch": row_reduce_plan(sums, True), "row alone": row_reduce_plan(sums[7:8], True),
        "row copied": row_reduce_plan(sums[7:8].clone(), True)})
    for bias in (False, True):
        problems += _differing(f"bi attention mask={bias}", {
            "batch": attention_plan(torch.empty(4, 14, 33, 64, dtype=torch.bfloat16),
                                    torch.empty(4, 2, 33, 64, dtype=torch.bfloat16), bias),
            "row alone": attention_plan(torch.empty(1, 14, 33, 64, dtype=torch.bfloat16),
                                        torch.empty(1, 2, 33, 64, dtype=torch.bfloat16), bias),
            "decoded": attention_plan(torch.empty(1, 14, 1, 64, dtype=torch.bfloat16),
                                      torch.empty(1, 2, 40, 64, dtype=torch.bfloat16), bias),
        })
    return problems


def _differing(name: str, variants: dict) -> list[str]:
    keys = {label: repr(specialization(plan)) for label, plan in variants.items()}
    return [f"{name}: '{label}' compiles differently from 'batch'" for label, key in keys.items()
            if key != keys["batch"]]


def provenance() -> str:
    """Commit, date, command, machine and versions of this check, as every results file records
    them (benches/record.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
    import record

    meta = record.metadata()
    versions = ", ".join(f"{name} {version}" for name, version in meta["versions"].items() if version)
    return (f"Commit `{meta['commit']}`, {meta['date']}: `{meta['command']}` on {meta['machine']['cpu']} "
            f"({meta['machine']['cores']} cores; compiled for sm_80 and sm_90 without a GPU); {versions}.")


def report(results: list[tuple[Case, int, dict | str]], triton_version: str) -> str:
    lines = [
        f"# Triton kernels compiled for real GPUs (triton {triton_version}, no GPU needed)",
        "",
        provenance(),
        "",
        "`python scripts/compile_check.py --check --out <this file>`. Registers, stack and "
        "local memory (spills) and shared memory per thread block from `cuobjdump "
        "--dump-resource-usage` on the cubin; load width: bits per thread per load instruction "
        "of the row blocks (the logits; GAE: its sequence blocks), from the layout Triton "
        "chose (TTGIR).",
        "",
        "| kernel | configuration | arch | warps | registers | spill (stack + local bytes) "
        "| shared bytes | load width (bits) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, arch, result in results:
        if isinstance(result, str):
            lines.append(f"| {case.kernel} | {case.config} | sm_{arch} | | | compile error: "
                         f"{result} | | |")
            continue
        lines.append(f"| {case.kernel} | {case.config} | sm_{arch} | {result['warps']} | "
                     f"{result['registers']} | {result['stack'] + result['local']} | "
                     f"{result['shared']} | {result['load_bits']} |")
    return "\n".join(lines) + "\n"


def problems_of(case: Case, arch: int, result: dict | str) -> list[str]:
    where = f"{case.kernel} [{case.config}] sm_{arch}"
    if isinstance(result, str):
        return [f"{where}: compile error: {result}"]
    problems = []
    if result["stack"] or result["local"]:
        problems.append(f"{where}: spills ({result['stack']} B stack, {result['local']} B local)")
    if case.aligned and vector_loads_possible(case.plan) and result["load_bits"] < 128:
        problems.append(f"{where}: the logits are loaded {result['load_bits']} bits at a time, "
                        "not 128")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability as an integer (80, 90); default: 80 and 90")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--check", action="store_true", help="exit 1 on any problem")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="compiles run at once (default: one per core this process may use)")
    args = parser.parse_args(argv)
    if not isinstance(gae._gae_kernel, JITFunction):
        parser.error("the kernels were loaded by Triton's interpreter: run without TRITON_INTERPRET=1")
    jobs = [(index, arch) for arch in args.arch or (80, 90) for index in range(len(_cases()))]
    # Compiling is CPU-bound and single-threaded (about 90 s serially on one core): one worker
    # per core. Spawned, not forked: the cases' never-touched tensors (tens of GiB of address
    # space) make the kernel refuse a fork under its default overcommit heuristic.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        outcomes = list(pool.map(_compile_job, jobs))
    results, problems = [], batch_invariance_problems()
    for (index, arch), result in zip(jobs, outcomes):
        case = _cases()[index]
        results.append((case, arch, result))
        problems += problems_of(case, arch, result)
    table = report(results, triton.__version__)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    print(table)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print(f"{len(results)} compiles, {len(problems)} problems (triton {triton.__version__})")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
