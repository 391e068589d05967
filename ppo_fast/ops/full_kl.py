"""``ppo_fast::full_kl``: the exact KL to the reference over the whole vocabulary,
``kl_estimator="full"``, and its backward ``ppo_fast::full_kl_backward``:

    KL_t = Σ_v π_v (log π_v − log ρ_v),   π = softmax(z / T),  ρ = softmax(r / T)
    ∂KL_t/∂z_u = π_u (log π_u − log ρ_u − KL_t) / T

with z the policy's logits and r the reference's at token t (a term with π_v = 0 is 0). The
estimators k1…k3+ see only the sampled token's two log-probs; this one sees both distributions,
so it is exact and has no variance. The reference is data: no gradient reaches r.

The pass that computes the KL also gives the policy's log-prob of the label and its entropy, and
the backward takes their gradients with the KL's: a loss over all three (the PPO loss with
``kl_estimator="full"``) reads each row of both models once forward and once backward, and writes
dlogits once.

Read top to bottom: the schema and fake kernel, the autograd formula, then the implementations,
one per backend (reference PyTorch, Triton, native C++), and their table. Every implementation
has the same two functions (:class:`KLOps`):

    forward(logits, ref_logits, labels, inv_temp, ignore_index) -> (kl, lse, ref_lse, logp, entropy)
    backward(dlogits, logits, ref_logits, labels, kl, lse, ref_lse, entropy, grad_kl, grad_logp,
             grad_entropy, inv_temp, ignore_index)
        writes the gradient of grad_kl·KL + grad_logp·logp + grad_entropy·entropy into dlogits
        (any float dtype)

The Triton and native ones read each row of both models once per direction and never hold more
than a block of a row (``kernels/full_kl.py``, ``csrc/ppo_fast_cpu.cpp``); the reference goes
chunk by chunk over the tokens, so its float32 work is one chunk's logits at a time. The backward
is elementwise given each row's KL and log-sum-exps: a ``[tokens, entries]`` tile of the
vocabulary gets its entries' gradient (the heads' form, :func:`ppo_fast.ops.linear_logprobs.
full_kl_from_heads`, runs the op on each chunk of logits it computes). Every row's numbers are
row-wise reductions in an order fixed by V and the dtype, so they do not depend on the chunk or
the batch around the row.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import dispatch, native
from ..spec import compute_dtype
from .token_logprobs import DEVICE_TYPES, flat, native_rows, no_kernel, out_dtype, row_ops_for


class KLOps(NamedTuple):
    forward: Callable
    backward: Callable


def kl_ops_for(device) -> KLOps:
    """The implementation that serves tensors on ``device``."""
    return dispatch.implementation("full_kl", device)


# --------------------------------------------------------------------------------------------
# Schema, fake kernel, autograd formula
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ppo_fast::full_kl", mutates_args=())
def full_kl_op(logits: Tensor, ref_logits: Tensor, labels: Tensor, inv_temp: float, ignore_index: int,
               inplace_backward: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(kl, lse, ref_lse, logp, entropy)``, each ``[...]`` float32 (float64 for float64 logits),
    for logits and ref_logits ``[..., V]`` (any float dtypes, one shape) and labels ``[...]``; 0
    where the label is ``ignore_index``, whatever those rows hold. ``kl``, ``logp`` (the policy's
    log-prob of the label) and ``entropy`` (the policy's) are differentiable, in ``logits``; the
    log-sum-exps of s = logits/T and of ref_logits/T are for the backward and the error checks.
    ``inplace_backward``: the backward writes dlogits over the logits where the serving backend
    can (as :func:`ppo_fast.token_logprobs`'s)."""
    raise no_kernel("full_kl", logits)


@full_kl_op.register_fake
def _(logits, ref_logits, labels, inv_temp, ignore_index, inplace_backward=False):
    return tuple(logits.new_empty(logits.shape[:-1], dtype=out_dtype(logits.dtype)) for _ in range(5))


@torch.library.custom_op("ppo_fast::full_kl_backward", mutates_args=("dlogits",))
def full_kl_backward_op(dlogits: Tensor, logits: Tensor, ref_logits: Tensor, labels: Tensor, kl: Tensor,
                        lse: Tensor, ref_lse: Tensor, grad_kl: Tensor, inv_temp: float, ignore_index: int,
                        entropy: Optional[Tensor] = None, grad_logp: Optional[Tensor] = None,
                        grad_entropy: Optional[Tensor] = None) -> None:
    """Writes ``grad_kl · ∂KL/∂logits`` into ``dlogits`` (the logits' shape, any float dtype, unit
    column stride) from the forward's ``kl``, ``lse`` and ``ref_lse``, plus those of the log-prob
    and the entropy with ``grad_logp`` and ``grad_entropy`` (None: no gradient; ``grad_entropy``
    needs the forward's ``entropy``); zeros on ignored rows. ``dlogits`` may be ``logits``
    or ``ref_logits`` itself (same dtype): every backend reads each element before it writes it."""
    raise no_kernel("full_kl_backward", logits)


@full_kl_backward_op.register_fake
def _(dlogits, logits, ref_logits, labels, kl, lse, ref_lse, grad_kl, inv_temp, ignore_index, entropy=None,
      grad_logp=None, grad_entropy=None):
    return None


def _forward(logits, ref_logits, labels, inv_temp, ignore_index, inplace_backward=False):
    # inplace_backward is for the autograd formula.
    return tuple(kl_ops_for(logits.device).forward(logits, ref_logits, labels, inv_temp, ignore_index))


def _backward(dlogits, logits, ref_logits, labels, kl, lse, ref_lse, grad_kl, inv_temp, ignore_index, entropy=None,
              grad_logp=None, grad_entropy=None):
    if grad_entropy is not None and entropy is None:
        raise ValueError("full_kl_backward: grad_entropy needs the forward's entropy")
    # One backward for every case: a gradient not given is a zero one (its terms add exact zeros).
    zeros = torch.zeros_like(kl)
    entropy, grad_logp, grad_entropy = (zeros if t is None else t.to(kl.dtype)
                                        for t in (entropy, grad_logp, grad_entropy))
    kl_ops_for(logits.device).backward(dlogits, logits, ref_logits, labels, kl, lse, ref_lse, entropy,
                                       grad_kl.to(kl.dtype), grad_logp, grad_entropy, inv_temp, ignore_index)


for _device_type in DEVICE_TYPES:
    full_kl_op.register_kernel(_device_type)(_forward)
    full_kl_backward_op.register_kernel(_device_type)(_backward)


def _setup(ctx, inputs, output):
    logits, ref_logits, labels, inv_temp, ignore_index, inplace_backward = inputs
    kl, lse, ref_lse, _logp, entropy = output
    ctx.mark_non_differentiable(lse, ref_lse)
    ctx.save_for_backward(logits, ref_logits, labels, kl, lse, ref_lse, entropy)
    ctx.inv_temp, ctx.ignore_index, ctx.inplace_backward = inv_temp, ignore_index, inplace_backward


def _autograd_backward(ctx, grad_kl, _grad_lse, _grad_ref_lse, grad_logp, grad_entropy):
    logits, ref_logits, labels, kl, lse, ref_lse, entropy = ctx.saved_tensors
    grad_kl, grad_logp, grad_entropy = (torch.zeros_like(kl) if g is None else g.to(kl.dtype)
                                        for g in (grad_kl, grad_logp, grad_entropy))
    if torch.is_grad_enabled():
        # create_graph=True: the kernels' gradient would be a constant to a second backward (a
        # gradient penalty silently missing the KL's share), so the formula runs in PyTorch ops.
        return (_differentiable_dlogits(logits, ref_logits, labels, grad_kl, grad_logp, grad_entropy, ctx.inv_temp,
                                        ctx.ignore_index), None, None, None, None, None)
    # The backends that write the log-prob backward over the logits read every element of both rows
    # before writing it here too, and a fresh buffer comes from where theirs does (on the CPU, 2 MiB
    # pages kept between steps: faulting in [N, V] fresh pages costs about a pass over them).
    row_ops = row_ops_for(logits.device)
    dlogits = logits if ctx.inplace_backward and row_ops.writes_in_place(logits) else row_ops.empty_dlogits(logits)
    full_kl_backward_op(dlogits, logits, ref_logits, labels, kl, lse, ref_lse, grad_kl, ctx.inv_temp,
                        ctx.ignore_index, entropy, grad_logp, grad_entropy)
    return dlogits, None, None, None, None, None


def _differentiable_dlogits(logits, ref_logits, labels, grad_kl, grad_logp, grad_entropy, inv_temp, ignore_index):
    """``∂L/∂logits`` from the upstream gradients of the KL, the log-prob and the entropy in PyTorch
    ops over the whole ``[..., V]``, differentiable in the logits and in the upstream gradients:
    the backward under ``create_graph=True``."""
    dtype = compute_dtype(logits)
    active = labels != ignore_index
    rows = active.unsqueeze(-1)
    log_p = torch.log_softmax(torch.where(rows, logits.to(dtype), 0.0) * inv_temp, dim=-1)
    log_ref = torch.log_softmax(torch.where(rows, ref_logits.to(dtype), 0.0) * inv_temp, dim=-1)
    p = log_p.exp()
    # Selected before any arithmetic, so no −inf − −inf at π = 0 reaches a second backward either.
    present = p > 0
    kept_log_p = torch.where(present, log_p, 0.0)
    gap = kept_log_p - torch.where(present, log_ref, 0.0)
    kl = (p * gap).sum(-1, keepdim=True)
    index = labels.masked_fill(~active, 0).long().unsqueeze(-1)
    chosen = torch.zeros_like(p).scatter_(-1, index, 1.0)
    entropy = -(p * kept_log_p).sum(-1, keepdim=True)
    dz = (p * (gap - kl) * (grad_kl.to(dtype) * inv_temp).unsqueeze(-1)
          + (chosen - p) * (grad_logp.to(dtype) * inv_temp).unsqueeze(-1)
          - p * (kept_log_p + entropy) * (grad_entropy.to(dtype) * inv_temp).unsqueeze(-1))
    return torch.where(rows, dz, 0.0).to(logits.dtype)


full_kl_op.register_autograd(_autograd_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# reference: PyTorch on any device, chunk by chunk over the tokens
# --------------------------------------------------------------------------------------------

CHUNK_BYTES = 64 * 2**20
"""Bytes of one chunk's logits in the compute dtype (policy and reference each)."""


def _rows_per_chunk(vocab: int, dtype: torch.dtype) -> int:
    itemsize = 8 if dtype == torch.float64 else 4
    return max(CHUNK_BYTES // max(vocab * itemsize, 1), 1)


def _chunks(logits: Tensor, ref_logits: Tensor, *per_row: Tensor):
    """``(part, logits_rows, ref_rows, *per_row_rows)`` over the rows of the two ``[..., V]`` tensors
    and their ``[...]`` per-row tensors, as ``[rows, V]`` and ``[rows]``, one chunk at a time."""
    vocab = logits.shape[-1]
    rows, ref_rows = logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab)
    flat_per_row = [t.reshape(-1) for t in per_row]
    step = _rows_per_chunk(vocab, logits.dtype)
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        yield (part, rows[part], ref_rows[part], *(t[part] for t in flat_per_row))


def reference_forward(logits, ref_logits, labels, inv_temp, ignore_index):
    dtype = compute_dtype(logits)
    out = tuple(torch.zeros(labels.shape, dtype=dtype, device=logits.device) for _ in range(5))
    for part, z, r, lab, kl_rows, lse_rows, ref_lse_rows, logp_rows, entropy_rows in _chunks(
            logits, ref_logits, labels, *(t.view(-1) for t in out)):
        active = lab != ignore_index
        rows = active.unsqueeze(-1)
        s = torch.where(rows, z.to(dtype), 0.0).mul_(inv_temp)
        s_ref = torch.where(rows, r.to(dtype), 0.0).mul_(inv_temp)
        lse_rows.copy_(torch.where(active, torch.logsumexp(s, -1), 0.0))
        ref_lse_rows.copy_(torch.where(active, torch.logsumexp(s_ref, -1), 0.0))
        log_p = s.sub_(lse_rows.unsqueeze(-1))
        index = lab.masked_fill(~active, 0).long().unsqueeze(-1)
        logp_rows.copy_(torch.where(active, log_p.gather(-1, index).squeeze(-1), 0.0))
        p = log_p.exp()
        # p·log p is 0 where p = 0: selected, so 0·(−inf) gives no NaN.
        entropy_rows.copy_(torch.where(active, -torch.where(p > 0, p * log_p, 0.0).sum(-1), 0.0))
        # π_v = 0 (a banned token, or an underflow) contributes 0, whatever ρ_v is: 0·log 0 = 0.
        gap = torch.where(p > 0, log_p.sub_(s_ref.sub_(ref_lse_rows.unsqueeze(-1))), 0.0)
        # A model with no distribution (NaN or +inf in its row, or all of it −inf) gives NaN, as
        # on the other backends, not the +inf of a banned token.
        defined = torch.isfinite(lse_rows) & torch.isfinite(ref_lse_rows)
        kl_rows.copy_(torch.where(active, torch.where(defined, (p * gap).sum(-1), float("nan")), 0.0))
    return out


def reference_backward(dlogits, logits, ref_logits, labels, kl, lse, ref_lse, entropy, grad_kl, grad_logp,
                       grad_entropy, inv_temp, ignore_index) -> None:
    dtype = lse.dtype
    flat_dlogits = dlogits.view(-1, dlogits.shape[-1])
    for part, z, r, lab, kl_rows, lse_rows, ref_lse_rows, *per_row in _chunks(
            logits, ref_logits, labels, kl, lse, ref_lse, entropy, grad_kl, grad_logp, grad_entropy):
        entropy_rows, g, g_y, h = (t.to(dtype).unsqueeze(-1) * scale
                                   for t, scale in zip(per_row, (1.0, inv_temp, inv_temp, inv_temp)))
        log_p = z.to(dtype).mul(inv_temp).sub_(lse_rows.unsqueeze(-1))
        log_ref = r.to(dtype).mul(inv_temp).sub_(ref_lse_rows.unsqueeze(-1))
        p = log_p.exp()
        active = lab != ignore_index
        # −h·π·(log π + H), 0 where π = 0, before log_p is overwritten below.
        entropy_term = torch.where(p > 0, p * (log_p + entropy_rows), 0.0).mul_(h)
        gap = torch.where(p > 0, log_p.sub_(log_ref).sub_(kl_rows.unsqueeze(-1)), 0.0)
        dz = p.mul(gap).mul_(g).sub_(p.mul_(g_y)).sub_(entropy_term)
        dz.scatter_add_(-1, lab.masked_fill(~active, 0).long().unsqueeze(-1), g_y.to(dz.dtype))
        flat_dlogits[part] = dz.masked_fill_(~active.unsqueeze(-1), 0.0)


REFERENCE = KLOps(reference_forward, reference_backward)


# --------------------------------------------------------------------------------------------
# triton: kernels/full_kl.py, on CUDA or under TRITON_INTERPRET=1
# --------------------------------------------------------------------------------------------


def triton_forward(logits, ref_logits, labels, inv_temp, ignore_index):
    from ..kernels import full_kl as kernels
    from ..kernels.launch import accumulator, coefficients
    from ..kernels.logprobs import row_layout

    dtype = out_dtype(logits.dtype)
    out = tuple(torch.empty(labels.shape, dtype=dtype, device=logits.device) for _ in range(5))
    rows, layout = row_layout(logits)
    ref_rows, ref_layout = row_layout(ref_logits)
    kernels.full_kl_fwd(rows, layout, ref_rows, ref_layout, flat(labels), *(t.view(-1) for t in out),
                        coefficients([inv_temp], logits.dtype, logits.device), ignore_index, accumulator(logits.dtype))
    return out


def triton_backward(dlogits, logits, ref_logits, labels, kl, lse, ref_lse, entropy, grad_kl, grad_logp, grad_entropy,
                    inv_temp, ignore_index) -> None:
    from ..kernels import full_kl as kernels
    from ..kernels.launch import accumulator, coefficients
    from ..kernels.logprobs import row_layout

    rows, layout = row_layout(logits)
    ref_rows, ref_layout = row_layout(ref_logits)
    drows, dlayout = row_layout(dlogits)
    if drows is not dlogits:
        raise ValueError("dlogits must have unit column stride and rows addressable as "
                         f"[outer, inner, V]; got strides {tuple(dlogits.stride())}")
    kernels.full_kl_bwd(rows, layout, ref_rows, ref_layout, dlogits, dlayout, flat(labels),
                        *(flat(t) for t in (kl, lse, ref_lse, entropy, grad_kl, grad_logp, grad_entropy)),
                        coefficients([inv_temp], logits.dtype, logits.device), ignore_index,
                        accumulator(logits.dtype))


TRITON = KLOps(triton_forward, triton_backward)


# --------------------------------------------------------------------------------------------
# native: C++ CPU kernels (csrc/ppo_fast_cpu.cpp, built by ppo_fast.native)
# --------------------------------------------------------------------------------------------


def native_forward(logits, ref_logits, labels, inv_temp, ignore_index):
    return tuple(native.load().full_kl_forward(native_rows(logits), native_rows(ref_logits),
                                               labels.long().contiguous(), float(inv_temp), int(ignore_index)))


def native_backward(dlogits, logits, ref_logits, labels, kl, lse, ref_lse, entropy, grad_kl, grad_logp, grad_entropy,
                    inv_temp, ignore_index) -> None:
    native.load().full_kl_backward(dlogits, native_rows(logits), native_rows(ref_logits), labels.long().contiguous(),
                                   *(t.contiguous() for t in (kl, lse, ref_lse, entropy, grad_kl, grad_logp,
                                                              grad_entropy)),
                                   float(inv_temp), int(ignore_index))


NATIVE = KLOps(native_forward, native_backward)


IMPLEMENTATIONS = dispatch.register("full_kl", {"reference": REFERENCE, "triton": TRITON, "native": NATIVE})


# --------------------------------------------------------------------------------------------
# The functions the losses call
# --------------------------------------------------------------------------------------------


def check_kl_finite(kl: Tensor, start: int, what: str, policy_lse: Tensor | None = None,
                    policy: str = "the policy's logits") -> None:
    """A KL that is not finite at a token is an error naming it, not a NaN or inf step (not while
    tracing): +inf where the reference gives probability 0 to a token the policy does not, NaN
    where the reference's logits hold NaN or +inf, are all −inf, or overflow once divided by the
    temperature. ``policy_lse`` (the policy's log-sum-exps of the same tokens, 0 at ignored ones)
    names ``policy`` instead when theirs is what is not finite."""
    kl, policy_lse = kl.reshape(-1), None if policy_lse is None else policy_lse.reshape(-1)
    if torch.compiler.is_compiling() or kl.device.type == "meta" or bool(torch.isfinite(kl).all()):
        return
    token = start + int((~torch.isfinite(kl)).nonzero()[0, 0])
    if policy_lse is not None and not bool(torch.isfinite(policy_lse[token - start])):
        raise ValueError(f"{policy} at token {token} (of the flattened tokens, from 0) give no distribution: they "
                         "hold NaN or +inf, are all -inf, or overflow float32 once divided by the temperature, and "
                         "the full KL would be NaN")
    if bool(torch.isinf(kl[token - start])):
        raise ValueError(f"{what} at token {token} (of the flattened tokens, from 0) give probability 0 to a token "
                         "the policy gives a positive probability: the full KL is +inf there. Ban a token in both "
                         "models or in neither")
    raise ValueError(f"{what} at token {token} (of the flattened tokens, from 0) give no distribution: they hold NaN "
                     "or +inf, are all -inf, or overflow float32 once divided by the temperature, and the full KL "
                     "would be NaN")


def full_kl_from_logits(logits: Tensor, ref_logits: Tensor, labels: Tensor, temperature: float,
                        ignore_index: int, inplace_backward: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(kl, logp, entropy)`` ``[...]`` for logits and ref_logits ``[..., V]`` (checked by the
    caller): the full KL, and the policy's log-prob of the label and entropy from the same pass;
    0 where the label is ``ignore_index``, whatever those rows hold. float32 (float64 for float64
    logits); differentiable in ``logits``, one backward pass for all three, written over the
    logits with ``inplace_backward`` where the backend can. A token whose KL is not finite is an
    error naming it."""
    kl, lse, _, logp, entropy = full_kl_op(logits, ref_logits.detach(), labels, 1.0 / float(temperature),
                                           int(ignore_index), bool(inplace_backward))
    check_kl_finite(kl, 0, "ref_logits", lse, "logits")
    return kl, logp, entropy
