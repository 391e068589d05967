"""Batch-invariant forward passes: one switch under which a row's numbers do not depend on its batch.

    import ppo_fast as pf
    with pf.batch_invariant():
        logits = model(ids, attention_mask=mask, position_ids=pf.sequences.position_ids(mask)).logits

Under the mode, a Hugging Face causal LM on the CPU or on CUDA gives every row bitwise the same
hidden states, logits and log-probs whatever the batch size, the row's place in the batch, its
left padding, and whether its tokens are computed all at once or decoded one at a time against the
KV cache. See docs/batch-invariant.md for what it guarantees and costs.

How: the aten ops whose kernels are not batch-invariant (torch 2.13 on the CPU, measured: GEMMs
pick kernels by M and the row sums split a long row across threads when rows are few; on CUDA
cuBLAS picks tiles and split-K by M and the reductions their split by the row count) are
re-registered, while the mode is on, through ``torch.library`` for their device's dispatch key
(:data:`OPS`): on the CPU the native kernels of ``csrc/batch_invariant_cpu.cpp``, on CUDA the
Triton kernels of ``kernels/batch_invariant.py``. Softmax, log-softmax and layer norm were
measured invariant on the CPU and keep torch's kernels (on CUDA they reduce one row per block,
and were not measured here: no GPU). Attention runs through transformers'
``AttentionInterface``: while the mode is on, the ``sdpa`` entry (every model's default) and the
name ``"batch_invariant"`` route to one kernel per device that reduces each query over its valid
keys in one order (the ``eager`` name routes there too while the mode is on; flash-attention and
flex attention are refused with an error naming the model). Autograd sits above the dispatch key,
so gradients flow through torch's own derivative formulas (which then run the same kernels); the
backward is correct, not invariant.

On a CPU with AMX-BF16 (Intel Sapphire Rapids and later) bfloat16 GEMMs run on the AMX tiles;
elsewhere, and with ``PPO_FAST_AMX=0`` in the environment, on a vector kernel. Each path is
batch-invariant, but their bits differ from each other, so processes whose numbers must agree (a
rollout and its trainer, the ranks of a run) need the same path: :func:`batch_invariant_bfloat16_gemm` says
which one a process takes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import threading
import warnings
from typing import Callable, Iterator

import torch

from . import native as _native

ATTENTION_NAME = "batch_invariant"
"""The ``attn_implementation`` name of the batch-invariant attention, registered with
transformers' ``AttentionInterface`` the first time the mode is enabled."""


def _kernels():
    return _native.load()


def batch_invariant_bfloat16_gemm() -> str | None:
    """The path of the mode's bfloat16 GEMM on the CPU in this process: ``"amx"`` (the AMX tiles) or
    ``"vector"``; None where the native kernels are unavailable. Decided on first use for the whole
    process, by the CPU and ``PPO_FAST_AMX``."""
    if _native.unavailable() is not None:
        return None
    return "amx" if _kernels().bi_amx() else "vector"


def _cpu_mm(self, mat2):
    return _kernels().bi_mm(self, mat2)


def _cpu_addmm(self, mat1, mat2, *, beta=1, alpha=1):
    return _kernels().bi_addmm(self, mat1, mat2, float(beta), float(alpha))


def _cpu_bmm(self, mat2):
    return _kernels().bi_bmm(self, mat2)


def _reduce(x: torch.Tensor, dim, keepdim: bool, dtype, mean: bool, row_reduce) -> torch.Tensor:
    """sum / mean over ``dim``: the reduced dimensions are moved last (a copy only when they are
    not already last and contiguous) and every remaining index is one row reduced in one order,
    by ``row_reduce(rows [R, L], mean, out_dtype) -> [R]``."""
    if x.is_complex():
        raise NotImplementedError("batch_invariant sum/mean of complex tensors is not covered")
    if dtype is not None:
        x = x.to(dtype)
    out_dtype = x.dtype
    if mean and not x.is_floating_point():
        raise RuntimeError(f"mean(): could not infer output dtype. Input dtype must be either a floating point or "
                           f"complex dtype. Got: {x.dtype}")
    if not mean and not x.is_floating_point():
        out_dtype = torch.int64 if dtype is None else dtype
    ndim = max(x.dim(), 1)
    dims = sorted({d % ndim for d in dim}) if dim else list(range(ndim))
    kept = [d for d in range(x.dim()) if d not in dims]
    moved = x.reshape(1) if x.dim() == 0 else x.permute(kept + dims).contiguous()
    kept_shape = [x.shape[d] for d in kept]
    rows = math.prod(kept_shape)
    out = row_reduce(moved.view(rows, moved.numel() // rows if rows else 0), mean, out_dtype)
    if keepdim and x.dim() > 0:
        return out.view([1 if d in dims else size for d, size in enumerate(x.shape)])
    return out.view(kept_shape)


def _cpu_row_reduce(rows, mean, out_dtype):
    return _kernels().bi_row_reduce(rows, mean, out_dtype)


def _cpu_mean(self, dim, keepdim=False, *, dtype=None):
    return _reduce(self, dim, keepdim, dtype, True, _cpu_row_reduce)


def _cpu_sum(self, dim, keepdim=False, *, dtype=None):
    return _reduce(self, dim, keepdim, dtype, False, _cpu_row_reduce)


# --- CUDA: the Triton kernels of kernels/batch_invariant.py ------------------------------------

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_matmul(a, b, bias, alpha, beta, name):
    from .kernels import batch_invariant as kernels
    from .kernels.launch import accumulator

    if a.dtype != b.dtype or (bias is not None and bias.dtype != a.dtype):
        raise RuntimeError(f"{name}: expected the operands to have one dtype, got {a.dtype} and {b.dtype}"
                           + ("" if bias is None else f" (and {bias.dtype} for self)"))
    if a.dtype not in _FLOATS:
        raise NotImplementedError(f"batch_invariant {name} covers {', '.join(map(str, _FLOATS))}; got {a.dtype}")
    if a.shape[2] != b.shape[1]:
        raise RuntimeError(f"{name}: mat1 and mat2 shapes cannot be multiplied ({a.shape[1]}x{a.shape[2]} and "
                           f"{b.shape[1]}x{b.shape[2]})")
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    if out.numel():
        if bias is not None:
            bias = bias.expand(out.shape)
        kernels.plan_matmul(a, b, out, bias, alpha, beta, accumulator(a.dtype))()
    return out


def _triton_mm(self, mat2):
    return _triton_matmul(self.unsqueeze(0), mat2.unsqueeze(0), None, 1.0, 0.0, "mm")[0]


def _triton_addmm(self, mat1, mat2, *, beta=1, alpha=1):
    # beta = 0 ignores self, NaN included (torch's rule).
    bias = None if beta == 0 else self.expand(mat1.shape[0], mat2.shape[1]).unsqueeze(0)
    return _triton_matmul(mat1.unsqueeze(0), mat2.unsqueeze(0), bias, alpha, beta, "addmm")[0]


def _triton_bmm(self, mat2):
    return _triton_matmul(self, mat2, None, 1.0, 0.0, "bmm")


def _triton_row_reduce(rows, mean, out_dtype):
    from .kernels import batch_invariant as kernels
    from .kernels.launch import accumulator

    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    out = torch.empty(rows.shape[0], dtype=out_dtype, device=rows.device)
    if rows.shape[0]:
        kernels.plan_row_reduce(rows, out, mean, accumulator(rows.dtype))()
    return out


def _triton_mean(self, dim, keepdim=False, *, dtype=None):
    return _reduce(self, dim, keepdim, dtype, True, _triton_row_reduce)


def _triton_sum(self, dim, keepdim=False, *, dtype=None):
    return _reduce(self, dim, keepdim, dtype, False, _triton_row_reduce)


def _key_bounds(bias: torch.Tensor, heads: int, kv_heads: int, shape) -> torch.Tensor:
    """int64 [B, Hkv, T, 2]: for each query and KV head, the first valid key of any of the KV head's
    query heads and one past the last (S and 0 when there is none)."""
    valid = bias > _MASKED_BELOW
    if valid.shape[1] == heads and heads > 1:
        valid = valid.reshape(valid.shape[0], kv_heads, heads // kv_heads, *valid.shape[2:]).any(2)
    valid = valid.expand(shape).to(torch.uint8)
    any_valid = valid.amax(-1).bool()
    S = valid.shape[-1]
    first = torch.where(any_valid, valid.argmax(-1), S)
    end = torch.where(any_valid, S - valid.flip(-1).argmax(-1), 0)
    return torch.stack((first, end), -1).contiguous()


def _triton_attention(query, key, value, bias, scale):
    from .kernels import batch_invariant as kernels

    if query.dtype not in _FLOATS[:3]:
        raise NotImplementedError(f"batch_invariant attention covers float16, bfloat16 and float32; got {query.dtype}")
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    B, H, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    out = torch.empty(B, T, H, D, dtype=query.dtype, device=query.device)
    bounds = None
    if bias is not None:
        bounds = _key_bounds(bias, H, Hkv, (B, Hkv, T, S))
        bias = bias.float().expand(B, H, T, S)
    if out.numel():
        kernels.plan_attention(query, key, value, out, bias, bounds, scale, _MASKED_BELOW)()
    return out


def _written_into_out(name: str, functional: Callable) -> Callable:
    """``name.out`` from its functional form, with torch's out= contract: ``out`` must have the
    result's dtype, and is resized to its shape (with torch's warning when it held elements)."""

    def written(*args, out, **kwargs):
        result = functional(*args, **kwargs)
        if out.dtype != result.dtype:
            raise RuntimeError(f"{name}: expected out tensor to have dtype {result.dtype}, but got {out.dtype} instead")
        if out.shape != result.shape:
            if out.numel():
                warnings.warn(f"{name}: an output with one or more elements was resized since it had shape "
                              f"{list(out.shape)}, which does not match the required output shape "
                              f"{list(result.shape)}", UserWarning, stacklevel=2)
            out.resize_(result.shape)
        return out.copy_(result)

    return written


def _with_variants(ops: dict[str, Callable]) -> dict[str, Callable]:
    """A device's table with the out= forms of its GEMMs and the in-place addmm_, which would
    otherwise run torch's kernels under the mode."""
    addmm = ops["addmm"]

    def addmm_in_place(self, mat1, mat2, *, beta=1, alpha=1):
        return self.copy_(addmm(self, mat1, mat2, beta=beta, alpha=alpha))

    return {**ops, **{f"{name}.out": _written_into_out(name, ops[name]) for name in ("mm", "addmm", "bmm")},
            "addmm_": addmm_in_place}


OPS: dict[str, dict[str, Callable]] = {
    "CPU": _with_variants({
        "mm": _cpu_mm,
        "addmm": _cpu_addmm,
        "bmm": _cpu_bmm,
        "mean.dim": _cpu_mean,
        "sum.dim_IntList": _cpu_sum,
    }),
    "CUDA": _with_variants({
        "mm": _triton_mm,
        "addmm": _triton_addmm,
        "bmm": _triton_bmm,
        "mean.dim": _triton_mean,
        "sum.dim_IntList": _triton_sum,
    }),
}
"""dispatch key → {aten overload: its batch-invariant implementation}, registered while the mode is
on. A device's kernels (CUDA: Triton) enter as one more key; the ops of a key not listed run torch's
own kernels, which is why attention checks its device (see :data:`ATTENTION_KERNELS`)."""

ATTENTION_KERNELS: dict[str, Callable] = {
    "cpu": lambda q, k, v, bias, scale: _kernels().bi_attention(q, k, v, bias, scale),
    "cuda": _triton_attention,
}
"""device type → attention forward kernel ``(q [B,H,T,D], k, v [B,Hkv,S,D], bias float32
broadcastable to [B,H,T,S] or None for causal, scale) → [B,T,H,D]``."""

_MASKED_BELOW = -torch.finfo(torch.float32).max / 2
"""An additive mask value at or below this masks its key (−inf, or the lowest float that
transformers' eager masks write)."""


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, bias, scale):
        kernel = ATTENTION_KERNELS.get(query.device.type)
        if kernel is None:
            raise NotImplementedError(
                f"batch_invariant attention has kernels for {sorted(ATTENTION_KERNELS)} tensors; these are on "
                f"{query.device.type}")
        ctx.save_for_backward(query, key, value, bias)
        ctx.scale = scale
        return kernel(query, key, value, bias, scale)

    @staticmethod
    def backward(ctx, grad_out):
        # Recomputed in float32 with plain ops: correct, not batch-invariant (it need not be).
        query, key, value, bias = ctx.saved_tensors
        group = query.shape[1] // key.shape[1]
        q, k, v = query.float(), key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1)
        if bias is None:
            T, S = q.shape[2], k.shape[2]
            future = torch.arange(S, device=q.device) > torch.arange(S - T, S, device=q.device)[:, None]
            bias = torch.zeros(T, S, device=q.device).masked_fill(future, -math.inf)
        valid = bias.float() > _MASKED_BELOW
        scores = (q @ k.transpose(-1, -2)) * ctx.scale + torch.where(valid, bias.float(), 0.0)
        p = torch.where(valid, torch.softmax(scores.masked_fill(~valid, -math.inf), dim=-1), 0.0)
        d_out = grad_out.float().transpose(1, 2)
        d_p = d_out @ v.transpose(-1, -2)
        d_scores = p * (d_p - (d_p * p).sum(-1, keepdim=True))
        d_query = (d_scores @ k) * ctx.scale
        d_key = (d_scores.transpose(-1, -2) @ q) * ctx.scale
        d_value = p.transpose(-1, -2) @ d_out
        fold = (key.shape[0], key.shape[1], group, key.shape[2], key.shape[3])
        return (d_query.to(query.dtype), d_key.reshape(fold).sum(2).to(key.dtype),
                d_value.reshape(fold).sum(2).to(value.dtype), None, None)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function (the ``AttentionInterface`` signature): query
    ``[B, H, T, D]``, key/value ``[B, Hkv, S, D]``, a boolean (True = attend) or additive mask
    broadcastable to ``[B, H, T, S]``, or None for causal attention. Each query reduces over its
    valid keys in increasing key order, so neither padding nor the rest of the batch nor prefill
    versus decode changes its bits. Returns ``([B, T, H, D], None)``."""
    if dropout:
        raise ValueError(f"batch_invariant attention applies no dropout; got dropout={dropout} (the model is in "
                         "training mode with attention dropout: call model.eval() or set the config's attention "
                         "dropout to 0)")
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"batch_invariant attention does not support {unsupported} "
                                      f"({type(module).__name__})")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    bias = attention_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill_(~bias, -math.inf)
    elif bias is None and not causal:
        bias = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=query.device)
    return _Attention.apply(query, key, value, bias, float(scaling)), None


def _not_covered(name: str) -> Callable:
    def refuse(module, *args, **kwargs):
        raise NotImplementedError(
            f"{type(module).__name__} runs attn_implementation={name!r}, which batch_invariant() does not cover; "
            "load the model with attn_implementation='sdpa' (the default), 'eager' or 'batch_invariant'")
    return refuse


_lock = threading.RLock()
_depth = 0
_library: torch.library.Library | None = None
_saved_attention: dict[str, Callable] | None = None


def _attention_mappings():
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return AttentionInterface._global_mapping


def kernels_missing() -> dict[str, str]:
    """Dispatch key → why the mode has no kernels for it here (the CPU's are native, built on first
    use; CUDA's are Triton); the keys it covers are absent."""
    missing = {}
    reason = _native.unavailable()
    if reason is not None:
        missing["CPU"] = f"the native CPU kernels are unavailable: {reason}"
    if importlib.util.find_spec("triton") is None:
        missing["CUDA"] = "triton is not installed"
    return missing


def _install() -> None:
    global _library, _saved_attention
    missing = kernels_missing()
    if len(missing) == len(OPS):
        raise RuntimeError("batch_invariant() has no kernels to run: "
                           + "; ".join(f"{key}: {why}" for key, why in missing.items()))
    for key, why in missing.items():
        warnings.warn(f"batch_invariant(): {key} tensors are not covered ({why}); their ops run torch's own "
                      "kernels, which are not batch-invariant", RuntimeWarning, stacklevel=4)
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore")
            for key, ops in OPS.items():
                if key in missing:
                    continue
                for op, implementation in ops.items():
                    library.impl(op, implementation, key)
        try:
            mapping = _attention_mappings()
        except ImportError:  # no transformers: the aten ops alone
            mapping = None
        if mapping is not None:
            # Every entry this changes, with its previous value (None: it had none), to put back.
            saved: dict[str, Callable | None] = {"sdpa": mapping["sdpa"], "eager": mapping.get("eager")}
            for name in list(mapping):
                if name not in ("sdpa", "eager", ATTENTION_NAME, "paged|eager"):
                    saved[name] = mapping[name]
                    mapping[name] = _not_covered(name)
            mapping["sdpa"] = mapping["eager"] = attention
            _saved_attention = saved
    except BaseException:
        library._destroy()
        raise
    _library = library


def _uninstall() -> None:
    global _library, _saved_attention
    if _saved_attention is not None:
        from transformers.modeling_utils import AttentionInterface

        mapping = AttentionInterface._global_mapping
        for name, previous in _saved_attention.items():
            if previous is None:
                mapping.pop(name, None)
            else:
                mapping[name] = previous
        _saved_attention = None
    if _library is not None:
        _library._destroy()
        _library = None


def enable_batch_invariant() -> None:
    """Turn the mode on (process-wide); calls nest: each needs its :func:`disable_batch_invariant`."""
    global _depth
    with _lock:
        if _depth == 0:
            _install()
        _depth += 1


def disable_batch_invariant() -> None:
    """Undo one :func:`enable_batch_invariant`; the last one restores torch's kernels and
    transformers' attention functions."""
    global _depth
    with _lock:
        if _depth == 0:
            raise RuntimeError("disable_batch_invariant() called while the mode is off (no matching enable)")
        _depth -= 1
        if _depth == 0:
            _uninstall()


def is_batch_invariant() -> bool:
    """Whether the mode is on."""
    return _depth > 0


@contextlib.contextmanager
def batch_invariant() -> Iterator[None]:
    """The mode for the ``with`` block (nesting-safe; restored on exit, exceptions included)."""
    enable_batch_invariant()
    try:
        yield
    finally:
        disable_batch_invariant()
