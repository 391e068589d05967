"""``ppo_fast::token_logprobs``: log-probs, entropy and log-sum-exp of each logits row, and its
backward ``ppo_fast::token_logprobs_backward``, which every op that reads logits rows (the PPO
loss, the linear head) reuses.

Read top to bottom: the schema and fake kernel, the autograd formula, then the implementations,
one per backend (reference PyTorch, Triton, native C++), and their table.

Every implementation has the same four functions (:class:`RowOps`):

    forward(logits, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared=False)
        -> (logp, entropy, lse[, sum_pi_squared])
    backward(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index)
        writes ∂loss/∂logits into dlogits
    writes_in_place(logits) -> bool      may dlogits be the logits buffer
    empty_dlogits(logits) -> Tensor      a fresh buffer for dlogits
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import arguments as check
from .. import dispatch, native
from ..arguments import check_temperature, int_option
from ..spec import compute_dtype

DEVICE_TYPES = ("cpu", "cuda")


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every per-token output: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_kernel(name: str, tensor: Tensor):
    return NotImplementedError(f"ppo_fast::{name} runs on {' and '.join(DEVICE_TYPES)} tensors, "
                               f"not {tensor.device.type}")


def rows_apart(logits) -> bool:
    """Whether the rows of ``logits [..., V]`` (unit stride on V) occupy disjoint memory, so a
    gradient written over one row cannot change another that is still to be read. An expanded
    view (stride 0) or overlapping strides fail; sizes of 1 do not count."""
    extent = logits.shape[-1]
    for stride, size in sorted((abs(t), s) for s, t in zip(logits.shape[:-1], logits.stride()[:-1]) if s > 1):
        if stride < extent:
            return False
        extent += stride * (size - 1)
    return True


class RowOps(NamedTuple):
    forward: Callable
    backward: Callable
    writes_in_place: Callable
    empty_dlogits: Callable


def row_ops_for(device) -> RowOps:
    """The row implementation that serves tensors on ``device``."""
    return dispatch.implementation("token_logprobs", device)


# --------------------------------------------------------------------------------------------
# Schema, fake kernel, autograd formula
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ppo_fast::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, labels: Tensor, inv_temp: float, ignore_index: int,
                      with_entropy: bool, inplace_backward: bool,
                      with_sum_pi_squared: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse, sum_pi_squared)``, each ``[...]`` float32 (float64 for float64
    logits); ``entropy`` is zeros without ``with_entropy``, ``sum_pi_squared`` is empty (shape
    ``[0]``) without ``with_sum_pi_squared``. Only ``logp`` and ``entropy`` are differentiable:
    ``lse`` and ``sum_pi_squared`` come back with ``requires_grad=False``."""
    raise no_kernel("token_logprobs", logits)


@token_logprobs_op.register_fake
def _(logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward,
      with_sum_pi_squared=False):
    lead, dtype = logits.shape[:-1], out_dtype(logits.dtype)
    return (*(logits.new_empty(lead, dtype=dtype) for _ in range(3)),
            logits.new_empty(lead if with_sum_pi_squared else (0,), dtype=dtype))


def _forward(logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward,
             with_sum_pi_squared=False):
    # inplace_backward is for the autograd formula; the forward gives Σ p² only when asked for.
    out = row_ops_for(logits.device).forward(logits, labels, inv_temp, ignore_index, with_entropy,
                                      with_sum_pi_squared)
    if with_sum_pi_squared:
        return out
    return (*out, out[0].new_empty(0))


@torch.library.custom_op("ppo_fast::token_logprobs_backward", mutates_args=("dlogits",))
def token_logprobs_backward_op(dlogits: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                               entropy: Tensor, grad_logp: Tensor, grad_entropy: Optional[Tensor],
                               inv_temp: float, ignore_index: int) -> None:
    raise no_kernel("token_logprobs_backward", logits)


@token_logprobs_backward_op.register_fake
def _(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index):
    return None


def _backward(dlogits, logits, *args):
    row_ops_for(logits.device).backward(dlogits, logits, *args)


for _device_type in DEVICE_TYPES:
    token_logprobs_op.register_kernel(_device_type)(_forward)
    token_logprobs_backward_op.register_kernel(_device_type)(_backward)


def dlogits_of(logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index,
               inplace_backward: bool) -> Tensor:
    """∂loss/∂logits from the upstream gradients of logp and entropy (None: no gradient), written
    over the logits where asked for and the serving backend can."""
    impl = row_ops_for(logits.device)
    if inplace_backward and impl.writes_in_place(logits):
        dlogits = logits
    else:
        dlogits = impl.empty_dlogits(logits)
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    token_logprobs_backward_op(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                               inv_temp, ignore_index)
    return dlogits


class SecondBackwardRefused(torch.autograd.Function):
    """``apply(gradient, name, *inputs)``: a kernel's gradient, which autograd sees as a constant,
    tied to the inputs it depends on so that a second backward (through the gradient of a
    ``create_graph=True`` backward, as a gradient penalty takes) reaches this node and says why it
    cannot go on, rather than adding a silent zero."""

    @staticmethod
    def forward(ctx, gradient, name, *inputs):
        ctx.name = name
        return gradient.view_as(gradient)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name}'s gradient comes from its kernels and cannot be differentiated twice (a "
                           "backward through the gradient of a create_graph=True backward); compute the loss with "
                           "ppo_fast.spec's functions, in PyTorch ops, for higher-order gradients")


def refuse_second_backward(gradient: Tensor, name: str, *inputs: Tensor) -> Tensor:
    """``gradient``, which a second backward refuses where the backward runs under
    ``create_graph=True``; as it is otherwise."""
    return SecondBackwardRefused.apply(gradient, name, *inputs) if torch.is_grad_enabled() else gradient


def _setup(ctx, inputs, output):
    logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward = inputs[:6]
    _, entropy, lse, sum_pi_squared = output
    # Σ p² is a statistic of the old policy, read under no_grad: no backward formula for it. Marked
    # non-differentiable, a gradient cannot reach it silently (it is a constant to autograd).
    ctx.mark_non_differentiable(lse, sum_pi_squared)
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.inv_temp, ctx.ignore_index = inv_temp, ignore_index
    ctx.with_entropy, ctx.inplace_backward = with_entropy, inplace_backward


def _autograd_backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_sum_pi_squared):
    logits, labels, lse, entropy = ctx.saved_tensors
    dlogits = dlogits_of(logits, labels, lse, entropy, grad_logp,
                         grad_entropy if ctx.with_entropy else None, ctx.inv_temp, ctx.ignore_index,
                         ctx.inplace_backward)
    return refuse_second_backward(dlogits, "pf.token_logprobs", logits), None, None, None, None, None, None


token_logprobs_op.register_autograd(_autograd_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# reference: PyTorch on any device
# --------------------------------------------------------------------------------------------

# Values come from the spec's formulas; gradients are written out by hand, as the kernels write
# them, because an op's implementation runs below autograd and cannot differentiate the spec
# itself; the tests hold both against the spec's autograd in float64.
#
# On the CPU, where this backend is the fallback, each fresh [N, V] buffer costs about as much as
# a pass over it (the pages are faulted in anew), so both directions allocate as few as they can:
# the forward one (two with entropy), the backward none beyond dlogits (one more with entropy).


def _scaled(logits, inv_temp, dtype):
    """s = logits / τ in the compute dtype; the logits themselves when τ = 1 (ops that read them
    upcast on the fly)."""
    return logits if inv_temp == 1.0 else logits.to(dtype) * inv_temp


def reference_forward(logits, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared=False):
    """``(logp, entropy, lse)``, and ``sum_pi_squared`` as a fourth output when asked for; entropy
    is zeros without ``with_entropy``. Every output is 0 where the label is ``ignore_index``."""
    dtype = compute_dtype(logits)
    s = _scaled(logits, inv_temp, dtype)
    log_probs = torch.log_softmax(s, dim=-1, dtype=dtype)
    ignored = labels == ignore_index
    index = labels.masked_fill(ignored, 0).long().unsqueeze(-1)
    logp = log_probs.gather(-1, index).squeeze(-1)
    # lse = s_j − log p_j at any j: at the label it costs nothing. Where the label is banned (−inf)
    # that is NaN; there, at the row's maximum (log_softmax keeps the order of s), log p is finite.
    lse = s.gather(-1, index).squeeze(-1).to(dtype) - logp
    # A row whose maximum is +inf has lse = +inf, as on the other backends (log_softmax gives NaN).
    banned = ~torch.isfinite(lse)
    if bool(banned.any()):
        top = s[banned].amax(-1).to(dtype)
        lse[banned] = torch.where(torch.isposinf(top), top, top - log_probs[banned].amax(-1))
    entropy = torch.zeros_like(logp)
    sum_pi_squared = None
    if with_entropy or with_sum_pi_squared:
        p = log_probs.exp()
        if with_sum_pi_squared:
            # Σ p² as a batched dot product: no [N, V] buffer for p², and p stays for the entropy.
            sum_pi_squared = torch.einsum("...v,...v->...", p, p).masked_fill_(ignored, 0.0)
        if with_entropy:
            # p·log p is 0 where p = 0: a finite floor instead of −inf keeps 0·(−inf) from
            # giving NaN.
            entropy = -p.mul_(log_probs.clamp_(min=torch.finfo(dtype).min)).sum(-1)
    out = (logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0),
           lse.masked_fill(ignored, 0.0))
    return out if sum_pi_squared is None else (*out, sum_pi_squared)


def reference_backward(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy,
                       inv_temp, ignore_index) -> None:
    """∂/∂z_j = ( g·(1[j = y] − p_j) − h·p_j·(log p_j + H) ) / τ, zero on ignored rows (log p_j + H
    is s_j − E[s] without the logits' size in it)."""
    dtype = lse.dtype
    s = _scaled(logits, inv_temp, dtype)
    active = labels != ignore_index
    work = dlogits if dlogits.dtype == dtype else torch.empty(logits.shape, dtype=dtype,
                                                                device=logits.device)
    p = torch.sub(s, lse.unsqueeze(-1), out=work).exp_()
    g = grad_logp.to(dtype).unsqueeze(-1)
    if grad_entropy is None:
        d = p.mul_(-g)
    else:
        centred = torch.sub(s, lse.unsqueeze(-1)).add_(entropy.to(dtype).unsqueeze(-1)).clamp_(min=torch.finfo(dtype).min)
        entropy_term = centred.mul_(p).mul_(grad_entropy.to(dtype).unsqueeze(-1))
        d = p.mul_(-g).sub_(entropy_term)
    d.scatter_add_(-1, labels.masked_fill(~active, 0).long().unsqueeze(-1), g)
    if inv_temp != 1.0:
        d.mul_(inv_temp)
    d.masked_fill_(~active.unsqueeze(-1), 0.0)
    if d is not dlogits:
        dlogits.copy_(d)


def _fresh_dlogits(logits: Tensor) -> Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


REFERENCE = RowOps(reference_forward, reference_backward, lambda logits: False, _fresh_dlogits)


# --------------------------------------------------------------------------------------------
# triton: fused kernels (kernels/logprobs.py), on CUDA or under TRITON_INTERPRET=1
# --------------------------------------------------------------------------------------------

# ppo_fast.kernels imports triton, so it is imported where a call first needs it: `import
# ppo_fast` works without triton. Triton takes Python floats as float32, so coefficients travel
# in a small device tensor of the accumulation dtype (kernels.launch.coefficients).


def flat(t):
    return None if t is None else t.reshape(-1).contiguous()


def _triton_writes_in_place(logits: Tensor) -> bool:
    """The gradient can go into the logits buffer where the kernels address it without a copy and
    no two rows share memory (an expanded view would have a written row read again as another)."""
    from ..kernels import logprobs as kernels

    return kernels.row_layout(logits)[0] is logits and rows_apart(logits)


def triton_forward(logits, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared=False):
    """``(logp, entropy, lse)``, and ``sum_pi_squared`` as a fourth output when asked for, all
    from one read of the logits."""
    from ..kernels import logprobs as kernels
    from ..kernels.launch import accumulator, coefficients

    lead, dtype = logits.shape[:-1], out_dtype(logits.dtype)
    logp = torch.empty(lead, dtype=dtype, device=logits.device)
    entropy = torch.zeros(lead, dtype=dtype, device=logits.device)
    lse = torch.empty(lead, dtype=dtype, device=logits.device)
    sum_pi_squared = torch.empty(lead, dtype=dtype, device=logits.device) if with_sum_pi_squared else None
    rows, layout = kernels.row_layout(logits)
    kernels.logprobs_fwd(
        rows, layout, flat(labels), logp.view(-1), entropy.view(-1), lse.view(-1),
        coefficients([inv_temp], logits.dtype, logits.device), ignore_index, with_entropy,
        accumulator(logits.dtype), None if sum_pi_squared is None else sum_pi_squared.view(-1))
    out = (logp, entropy, lse)
    return out if sum_pi_squared is None else (*out, sum_pi_squared)


def triton_backward(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temp,
                    ignore_index) -> None:
    """``dlogits`` has the logits' shape and unit column stride; it may be ``logits`` itself: each
    element is read before it is overwritten, by the same program."""
    from ..kernels import logprobs as kernels
    from ..kernels.launch import accumulator, coefficients

    rows, layout = kernels.row_layout(logits)
    drows, dlayout = kernels.row_layout(dlogits)
    if drows is not dlogits:
        raise ValueError("dlogits must have unit column stride and rows addressable as "
                         f"[outer, inner, V]; got strides {tuple(dlogits.stride())}")
    kernels.logprobs_bwd(
        rows, layout, dlogits, dlayout, flat(labels), lse.reshape(-1), entropy.reshape(-1),
        flat(grad_logp), flat(grad_entropy), coefficients([inv_temp], logits.dtype, logits.device),
        ignore_index, accumulator(logits.dtype))


TRITON = RowOps(triton_forward, triton_backward, _triton_writes_in_place, _fresh_dlogits)


# --------------------------------------------------------------------------------------------
# native: C++ CPU kernels (csrc/ppo_fast_cpu.cpp, built by ppo_fast.native)
# --------------------------------------------------------------------------------------------


def native_rows(logits: Tensor) -> Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _native_writes_in_place(logits: Tensor) -> bool:
    """Each row is read whole before any of it is written, so the gradient can go over the row it
    came from, unless the row was read from a copy (not unit-stride on the vocabulary) or rows
    share memory (an expanded view: a row written would be read again as another)."""
    return logits.stride(-1) == 1 and rows_apart(logits)


def _native_empty_dlogits(logits: Tensor) -> Tensor:
    """Large buffers on 2 MiB pages (see ``empty_gradient_like`` in csrc/ppo_fast_cpu.cpp)."""
    return native.load().empty_gradient_like(logits)


def native_forward(logits, labels, inv_temp, ignore_index, with_entropy, with_sum_pi_squared=False):
    return tuple(native.load().token_logprobs_forward(
        native_rows(logits), labels.long().contiguous(), float(inv_temp), int(ignore_index),
        bool(with_entropy), bool(with_sum_pi_squared)))


def native_backward(dlogits, logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temp,
                    ignore_index) -> None:
    dtype = lse.dtype
    native.load().token_logprobs_backward(
        dlogits, native_rows(logits), labels.long().contiguous(), lse.contiguous(),
        entropy.to(dtype).contiguous(), grad_logp.to(dtype).contiguous(),
        None if grad_entropy is None else grad_entropy.to(dtype).contiguous(), float(inv_temp),
        int(ignore_index))


NATIVE = RowOps(native_forward, native_backward, _native_writes_in_place, _native_empty_dlogits)


IMPLEMENTATIONS = dispatch.register("token_logprobs", {"reference": REFERENCE, "triton": TRITON,
                                                       "native": NATIVE})


# --------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_sum_pi_squared: bool = False,
    inplace_backward: bool = False,
):
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``, differentiable.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 / float64.
        labels: ``[...]`` integer, in ``[0, V)`` or ``ignore_index`` (gives 0 for every output,
            zero gradient). Under ``torch.compile`` the range is not checked; on the Triton
            path an out-of-range label then gives NaN.
        return_entropy: also return the entropy of each position's distribution.
        return_sum_pi_squared: also return ``Σ_v softmax(logits / temperature)_v²`` per position
            (in ``[1/V, 1]``; verl's ``sum_pi_squared`` for its optimal-token-baseline
            advantages), computed in the same pass over the logits. Forward only: it comes back
            with ``requires_grad=False`` and no gradient flows through it.
        inplace_backward: on the Triton and native paths, write the gradient into the logits
            buffer itself during backward (saves one ``[N, V]`` buffer; the logits are
            overwritten). Logits whose rows share memory (an expanded view) get a fresh buffer.

    Returns:
        ``logp`` ``[...]`` float32 (float64 for float64 logits) when neither extra is asked for,
        else the tuple ``(logp, entropy, sum_pi_squared)`` without the ones not asked for:
        ``(logp, entropy)`` or ``(logp, sum_pi_squared)``. On CUDA one read of the logits
        forward and one read + one write backward; no float32 copy of the logits is made.
    """
    int_option("ignore_index", ignore_index)
    check_temperature(temperature)
    for flag, value in (("return_entropy", return_entropy), ("return_sum_pi_squared", return_sum_pi_squared),
                        ("inplace_backward", inplace_backward)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be a bool, got {value!r}")
    labels = check.logits_and_labels(logits, labels, ignore_index)
    logp, entropy, sum_pi_squared = rows(logits, labels, temperature, ignore_index, return_entropy,
                                                inplace_backward, return_sum_pi_squared)
    out = (logp,)
    if return_entropy:
        out += (entropy,)
    if return_sum_pi_squared:
        out += (sum_pi_squared,)
    return out if len(out) > 1 else logp


def rows(logits, labels, temperature, ignore_index, with_entropy, inplace_backward, with_sum_pi_squared=False):
    """``(logp, entropy, sum_pi_squared)`` of the log-prob op; a row whose scaled logits reach +inf
    (its log-sum-exp is +inf on every backend) is an error naming it."""
    logp, entropy, lse, sum_pi_squared = token_logprobs_op(
        logits, labels, 1.0 / float(temperature), int(ignore_index), bool(with_entropy), bool(inplace_backward),
        bool(with_sum_pi_squared))
    check.no_infinite_maximum(logits, torch.isposinf(lse), temperature)
    return logp, entropy, sum_pi_squared
