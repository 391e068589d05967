"""``ppo_fast::ppo_loss_tokens``: the PPO actor loss per token, straight from the logits (the
token-level vanilla objective; :func:`ppo_fast.ppo_loss` takes every other objective through
:mod:`ppo_fast.ops.token_logprobs` and the spec).

Read top to bottom: the packing of the loss options, the schema and fake kernel, the autograd
formula, then the implementations (reference PyTorch, Triton, native C++) and their table. Each
implementation is

    forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp, coefficients,
            ignore_index, kl_estimator) -> the per-token outputs in the order of PPO_OUTPUTS

The backward is the row backward of :mod:`ppo_fast.ops.token_logprobs` with
``g = upstream · ∂loss/∂logp`` and ``h = −upstream · entropy_coef``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import arguments as check
from .. import dispatch, native, spec
from ..arguments import LossOptions
from .full_kl import full_kl_from_logits
from .token_logprobs import (DEVICE_TYPES, dlogits_of, flat, native_rows, no_kernel, out_dtype, refuse_second_backward,
                             rows)
from .token_logprobs import reference_forward as reference_rows

PPO_OUTPUTS = ("token_loss", "dloss_dlogp", "logp", "entropy", "lse", "pg", "kl", "log_ratio",
               "flags")
"""The per-token outputs, in order; ``flags`` is int8 (bit 0: clipped, bit 1: clipped by the
dual-clip cap), the rest are float32 (float64 for float64 logits)."""


class LossCoefficients(NamedTuple):
    """The loss options every backend reads, packed once: the op passes them as one list of floats
    in this order, the Triton kernel reads them from one device tensor (``kernels.ppo_loss.SCALARS``
    names the same order) and the C++ kernel from one vector."""

    inv_temp: float
    clip_low: float
    clip_high: float
    dual_clip: float
    """0 when dual-clip is off (when on it is > 1)."""
    tis_cap: float
    kl_coef: float
    entropy_coef: float

    @classmethod
    def of(cls, opts: LossOptions, has_ref: bool) -> "LossCoefficients":
        return cls(1.0 / float(opts.temperature), float(opts.clip_low), float(opts.clip_high),
                   0.0 if opts.dual_clip is None else float(opts.dual_clip), float(opts.tis_cap),
                   float(opts.kl_coef) if has_ref else 0.0, float(opts.entropy_coef))

    def options(self, kl_estimator: str) -> LossOptions:
        return LossOptions(clip_low=self.clip_low, clip_high=self.clip_high,
                           dual_clip=self.dual_clip or None, tis_cap=self.tis_cap, kl_coef=self.kl_coef,
                           kl_estimator=kl_estimator, entropy_coef=self.entropy_coef)


# --------------------------------------------------------------------------------------------
# Schema, fake kernel, autograd formula
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("ppo_fast::ppo_loss_tokens", mutates_args=())
def ppo_loss_tokens_op(
    logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, ref_logp: Optional[Tensor],
    rollout_logp: Optional[Tensor], coefficients: list[float], ignore_index: int, kl_estimator: str,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token outputs in the order of ``PPO_OUTPUTS``; only ``token_loss`` is differentiable.
    ``coefficients``: a :class:`LossCoefficients` as a list."""
    raise no_kernel("ppo_loss_tokens", logits)


@ppo_loss_tokens_op.register_fake
def _(logits, *args):
    lead, dtype = logits.shape[:-1], out_dtype(logits.dtype)
    floats = [logits.new_empty(lead, dtype=dtype) for _ in PPO_OUTPUTS[:-1]]
    return (*floats, logits.new_empty(lead, dtype=torch.int8))


def _forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp, coefficients, ignore_index,
             kl_estimator, inplace_backward):
    # inplace_backward is for the autograd formula.
    forward = dispatch.implementation("ppo_loss", logits.device)
    return forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp,
                   LossCoefficients(*coefficients), ignore_index, kl_estimator)


for _device_type in DEVICE_TYPES:
    ppo_loss_tokens_op.register_kernel(_device_type)(_forward)


def _setup(ctx, inputs, output):
    logits, labels, *_, coefficients, ignore_index, _kl_estimator, inplace_backward = inputs
    out = dict(zip(PPO_OUTPUTS, output))
    ctx.save_for_backward(logits, labels, out["lse"], out["entropy"], out["dloss_dlogp"])
    ctx.coefficients, ctx.ignore_index = LossCoefficients(*coefficients), ignore_index
    ctx.inplace_backward, ctx.input_count = inplace_backward, len(inputs)


def _autograd_backward(ctx, grad_token_loss, *_grads_of_metrics):
    logits, labels, lse, entropy, dloss_dlogp = ctx.saved_tensors
    if grad_token_loss is None:
        grad_token_loss = torch.zeros_like(lse)
    entropy_coef = ctx.coefficients.entropy_coef
    grad_entropy = grad_token_loss * -entropy_coef if entropy_coef != 0 else None
    dlogits = dlogits_of(logits, labels, lse, entropy, grad_token_loss * dloss_dlogp, grad_entropy,
                         ctx.coefficients.inv_temp, ctx.ignore_index, ctx.inplace_backward)
    return (refuse_second_backward(dlogits, "pf.ppo_loss", logits),) + (None,) * (ctx.input_count - 1)


ppo_loss_tokens_op.register_autograd(_autograd_backward, setup_context=_setup)


def ppo_token_terms(logits, labels, old_logp, advantages, ref_logp, rollout_logp, opts: LossOptions,
                    inplace_backward: bool) -> spec.TokenTerms:
    """The actor loss per token from logits, by whichever backend serves the device. Labels equal
    to ``ignore_index`` are skipped (their rows are never read on CUDA)."""
    dtype = out_dtype(logits.dtype)

    def data(t):
        return None if t is None else t.detach().to(dtype)

    coefficients = LossCoefficients.of(opts, ref_logp is not None)
    # Without ref_logp the kernels compute no KL (kl_estimator="full" adds its own after them), so
    # any of their estimators stands in.
    estimator = opts.kl_estimator if ref_logp is not None else "k1"
    out = dict(zip(PPO_OUTPUTS, ppo_loss_tokens_op(
        logits, labels, data(old_logp), data(advantages), data(ref_logp), data(rollout_logp),
        list(coefficients), int(opts.ignore_index), estimator, bool(inplace_backward))))
    check.no_infinite_maximum(logits, torch.isposinf(out["lse"]), opts.temperature)
    flags = out["flags"]
    return spec.TokenTerms(loss=out["token_loss"], pg=out["pg"], kl=out["kl"], entropy=out["entropy"],
                           log_ratio=out["log_ratio"], clipped=(flags & 1) != 0,
                           clipped_lower=(flags & 2) != 0)


# --------------------------------------------------------------------------------------------
# reference: the spec's per-token terms, and their derivative in logp written out by hand
# --------------------------------------------------------------------------------------------


def _dloss_dlogp(logp, old_logp, advantages, ref_logp, rollout_logp, opts: LossOptions, terms):
    """∂ token loss / ∂ logp, the derivative of :func:`ppo_fast.spec.ppo_token_terms`."""
    raw_log_ratio = logp - old_logp
    ratio = terms.log_ratio.exp()
    in_clamp = raw_log_ratio.abs() <= spec.LOG_RATIO_CLAMP
    dpg = torch.where(terms.clipped | terms.clipped_lower | ~in_clamp, 0.0, -advantages * ratio)
    if rollout_logp is not None:
        is_log_ratio = (old_logp - rollout_logp).clamp(-spec.LOG_RATIO_CLAMP, spec.LOG_RATIO_CLAMP)
        dpg = dpg * is_log_ratio.exp().clamp(max=opts.tis_cap)
    if ref_logp is None or opts.kl_coef == 0:
        return dpg
    diff = logp - ref_logp
    estimator = opts.kl_estimator
    if estimator == "k1":
        dkl = torch.ones_like(diff)
    elif estimator == "abs":
        dkl = diff.sign()
    elif estimator in ("k2", "k1+", "k3+"):
        dkl = diff
    else:
        x = -diff
        raw = x.clamp(-spec.LOG_RATIO_CLAMP, spec.LOG_RATIO_CLAMP).exp() - x - 1
        passes = (x.abs() <= spec.LOG_RATIO_CLAMP) & (raw.abs() <= spec.K3_VALUE_CLAMP)
        dkl = torch.where(passes, 1 - x.exp(), 0.0)
    return dpg + opts.kl_coef * dkl


def reference_forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp,
                      coefficients: LossCoefficients, ignore_index, kl_estimator):
    logp, entropy, lse = reference_rows(logits, labels, coefficients.inv_temp, ignore_index, True)
    opts = coefficients.options(kl_estimator)
    dtype = logp.dtype
    old_logp, advantages = old_logp.to(dtype), advantages.to(dtype)
    ref_logp = None if ref_logp is None else ref_logp.to(dtype)
    rollout_logp = None if rollout_logp is None else rollout_logp.to(dtype)
    terms = spec.ppo_token_terms(logp, old_logp, advantages, opts, entropy=entropy, ref_logp=ref_logp,
                                 rollout_logp=rollout_logp)
    dloss = _dloss_dlogp(logp, old_logp, advantages, ref_logp, rollout_logp, opts, terms)
    active = labels != ignore_index
    flags = terms.clipped.to(torch.int8) + 2 * terms.clipped_lower.to(torch.int8)

    def kept(t):
        return torch.where(active, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return (kept(terms.loss), kept(dloss), logp, entropy, lse, kept(terms.pg), kept(terms.kl),
            kept(terms.log_ratio), kept(flags))


# --------------------------------------------------------------------------------------------
# triton: the row pass and the per-token loss in one kernel (kernels/ppo_loss.py)
# --------------------------------------------------------------------------------------------


def triton_forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp,
                   coefficients: LossCoefficients, ignore_index, kl_estimator):
    from ..kernels import logprobs as row_kernels
    from ..kernels import ppo_loss as kernels
    from ..kernels.launch import accumulator
    from ..kernels.launch import coefficients as device_coefficients

    lead, dtype = logits.shape[:-1], out_dtype(logits.dtype)
    outputs = {name: torch.empty(lead, dtype=dtype, device=logits.device) for name in PPO_OUTPUTS[:-1]}
    outputs["flags"] = torch.empty(lead, dtype=torch.int8, device=logits.device)
    rows, layout = row_kernels.row_layout(logits)

    def per_token(t):
        return None if t is None else flat(t.to(dtype))

    kernels.ppo_fwd(
        rows, layout, flat(labels), per_token(old_logp), per_token(advantages), per_token(ref_logp),
        per_token(rollout_logp), {name: t.view(-1) for name, t in outputs.items()},
        device_coefficients(list(coefficients), logits.dtype, logits.device), ignore_index=ignore_index,
        has_dual_clip=coefficients.dual_clip > 0, kl_mode=kl_estimator, acc=accumulator(logits.dtype))
    return tuple(outputs[name] for name in PPO_OUTPUTS)


# --------------------------------------------------------------------------------------------
# native: the row pass and the per-token loss in one C++ kernel
# --------------------------------------------------------------------------------------------


def native_forward(logits, labels, old_logp, advantages, ref_logp, rollout_logp,
                   coefficients: LossCoefficients, ignore_index, kl_estimator):
    dtype, shape = spec.compute_dtype(logits), labels.shape

    def per_token(t):
        return None if t is None else t.to(dtype).reshape(shape).contiguous()

    return tuple(native.load().ppo_loss_forward(
        native_rows(logits), labels.long().contiguous(), per_token(old_logp), per_token(advantages),
        per_token(ref_logp), per_token(rollout_logp), list(coefficients), int(ignore_index),
        str(kl_estimator)))


IMPLEMENTATIONS = dispatch.register("ppo_loss", {"reference": reference_forward, "triton": triton_forward,
                                                 "native": native_forward})


# --------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------


def ppo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    loss_type: str = "vanilla",
    loss_params: dict | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str | None = None,
    rollout_logp: torch.Tensor | None = None,
    tis_cap: float = 2.0,
    rollout_is_weights: torch.Tensor | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    dp_size: int = 1,
    horizon: float | None = None,
    inplace_backward: bool = False,
):
    """The whole actor loss from logits, fused on CUDA; returns ``(loss, metrics)``.

    ``loss = policy_loss + kl_coef·agg(KL(π ‖ π_ref)) − entropy_coef·agg(entropy)``, with the
    options of :func:`policy_loss`. logits ``[..., V]``, labels and every per-token tensor
    ``[...]``. Differentiable in ``logits`` only (old/ref/rollout log-probs, reference logits and
    advantages are data). Tokens with mask 0 or label ``ignore_index`` are skipped: on CUDA their
    logits are never read. Metrics: those of :func:`policy_loss` plus ``kl_loss``,
    ``entropy_loss`` (the aggregated terms), ``entropy`` and ``kl`` (masked means).

    The KL: an estimator (``kl_estimator`` k1…k3+) from ``ref_logp``, the reference's log-prob of
    the sampled token; or with ``kl_estimator="full"`` the exact ``Σ_v π_v log(π_v / π_ref,v)``
    from ``ref_logits`` (the reference model's logits, any float dtype, the same temperature):
    one read of both rows forward gives the log-prob, the entropy and the KL, one read of both
    backward writes dlogits (:mod:`ppo_fast.ops.full_kl`), then the objective runs on
    ``[tokens]``-sized tensors.

    On CUDA, token-level ``loss_type="vanilla"`` without ``rollout_is_weights``: one kernel reads each logits
    row once and computes log-prob, entropy, ratio, clipped surrogate, KL and the per-token
    gradient coefficient; the backward reads the row once more and writes dlogits (into the
    logits buffer with ``inplace_backward=True``). Every other objective and weighting: the fused
    log-prob/entropy kernel (the same passes over the logits), then the objective on
    ``[tokens]``-sized tensors; no ``[tokens, vocab]`` tensor beyond dlogits either way.
    """
    opts = check.actor_options(ref_logp, {"ref_logits": ref_logits}, loss_type=loss_type, loss_params=loss_params,
                               clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, tis_cap=tis_cap,
                               num_tokens=num_tokens, num_seqs=num_seqs, dp_size=dp_size, horizon=horizon,
                               kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                               temperature=temperature, ignore_index=ignore_index)
    check.floating("logits", check.tensor("logits", logits))
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if ref_logits is not None:
        check.reference_logits(logits, ref_logits)
    labels = check.actor_inputs("logits", logits, logits.shape[:-1], "logits.shape[:-1]", logits.shape[-1],
                                labels, old_logp, advantages, mask, ref_logp, rollout_logp,
                                rollout_is_weights, opts)
    valid = labels != ignore_index
    if ref_logits is not None:
        # One pass over each row of both models gives the log-prob, the entropy and the KL, and one
        # backward pass their three gradients; the rows are read where they lie (a shifted
        # logits[:, :-1] is not copied). The objective then runs on [tokens]-sized tensors.
        kl, logp, entropy = full_kl_from_logits(logits, ref_logits, labels, opts.temperature, ignore_index,
                                                inplace_backward)
        terms = with_full_kl(token_terms_from_logprobs(logp, entropy, valid, old_logp, advantages, None, rollout_logp,
                                                       rollout_is_weights, opts), kl, opts)
    elif opts.loss_type == "vanilla" and opts.loss_params["importance_level"] == "token" \
            and rollout_is_weights is None:
        terms = ppo_token_terms(logits, labels, old_logp, advantages, ref_logp, rollout_logp, opts,
                                inplace_backward)
    else:
        logp, entropy, _ = rows(logits, labels, opts.temperature, ignore_index, True, inplace_backward)
        terms = token_terms_from_logprobs(logp, entropy, valid, old_logp, advantages, ref_logp, rollout_logp,
                                          rollout_is_weights, opts)
    return spec.reduce(terms, valid, opts)


def token_terms_from_logprobs(logp, entropy, valid, old_logp, advantages, ref_logp, rollout_logp,
                              rollout_is_weights, opts) -> spec.TokenTerms:
    """The actor loss per token from per-token log-probs and entropy."""
    return spec.ppo_token_terms(logp, detached(old_logp), detached(advantages), opts, mask=valid, entropy=entropy,
                                ref_logp=detached(ref_logp), rollout_logp=detached(rollout_logp),
                                rollout_is_weights=detached(rollout_is_weights))


def with_full_kl(terms: spec.TokenTerms, kl: torch.Tensor, opts: LossOptions) -> spec.TokenTerms:
    """``terms`` with the full KL (``kl_estimator="full"``, 0 at skipped tokens) as their KL term."""
    return terms._replace(loss=terms.loss + opts.kl_coef * kl, kl=kl)


def detached(t: torch.Tensor | None) -> torch.Tensor | None:
    """Data, not a path for gradients (old/ref/rollout log-probs, advantages, weights)."""
    return None if t is None else t.detach()
