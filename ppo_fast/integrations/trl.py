"""TRL 1.16's ``GRPOTrainer`` with its loss computed by ppo_fast.

    from ppo_fast.integrations.trl import GRPOTrainer     # in place of trl.GRPOTrainer
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

    from ppo_fast.integrations import trl as pf_trl       # or: a trainer already built
    pf_trl.patch(trainer)                                 # (trl.GRPOTrainer or a subclass of it)

Generation, rewards, advantages, batching, the optimiser and logging stay TRL's. Two things change:

1. **Log-probs and entropies** (of the policy, the old policy and the reference model) come from
   ppo_fast. With ``ppo_fast_head="fused"`` (``GRPOTrainer(..., ppo_fast_head="fused")`` or
   ``patch(trainer, head="fused")``) TRL's own fused LM head call stays, and what it runs is
   :func:`ppo_fast.fused_linear_token_logprobs` in place of TRL's ``ChunkedLogProbFunction``: no
   ``[B, C, V]`` logits, as TRL; TRL's logit scale (Granite, Falcon-H1, ...) enters as a
   temperature of ``temperature / scale``, and a model whose config soft-caps its logits (Gemma 2)
   takes the logits path below. With ``"logits"`` (the default), :func:`ppo_fast.token_logprobs`
   scores the model's own logits, not TRL's head. The model runs its ordinary forward (the patched forward
   without ``fused_lm_head`` is the original one) with ``logits_to_keep`` = the ``C`` positions
   that predict the completion, so logit scaling and soft-capping are the model's own; the
   ``[B, C, V]`` logits (model dtype) are divided by TRL's ``temperature`` and read once by the
   fused kernel on CUDA (float32 out, no float32 copy), whose backward writes the gradient into
   the logits buffer. Unlike TRL's chunked head this materialises the ``[B, C, V]`` logits.
   Positions outside the completion mask give log-prob 0 and entropy 0, as TRL's head.

2. **The policy term per token** is :func:`ppo_fast.objectives.policy_terms`:

   ======================================  =================================================
   TRL ``loss_type``                       ppo_fast objective
   ======================================  =================================================
   grpo, bnpo, dr_grpo, dapo, luspo        ``vanilla``, ``clip_low=epsilon``,
                                           ``clip_high=epsilon_high``, ``dual_clip=delta``
   cispo                                   ``cispo``, ``ratio_min=0``, ``ratio_max=epsilon_high``
                                           (TRL caps the ratio absolutely at epsilon_high)
   sapo                                    ``sapo``, ``tau_pos/neg=sapo_temperature_pos/neg``
   vespo                                   ``vespo``, ``k/lambda_pos/neg=vespo_*``; the vLLM
                                           IS ratio enters φ as ``weights``
   ======================================  =================================================

   with ``importance_level=importance_sampling_level`` and ``token_gradient=False`` (TRL's
   sequence ratio ``exp(mean_t(ℓ − ℓ_old))`` takes the gradient of the mean; luspo is GSPO
   with that ratio, which is vanilla at the sequence level: vanilla also takes TRL's ``delta``,
   which TRL applies to luspo). The vLLM importance-sampling ratio, when TRL applies it, is the
   objective's ``weights``.

The rest is TRL 1.16's ``_compute_loss``, arithmetic and quirks included (``trl/trainer/
grpo_trainer.py``): the off-policy sequence mask and the high-entropy token mask (TRL's own
``get_off_policy_mask`` / ``get_high_entropy_mask``, so a subclass's override still applies)
zero the policy term; the KL term ``β·(e^(ref−ℓ) − (ref−ℓ) − 1)``, times TRL's ratio ``c1``
(unclamped, differentiable) with ``use_bias_correction_kl``, is added after every mask and IS
weight; each ``loss_type``'s aggregation with its normaliser (dapo/cispo/vespo divide by the
float32 ``num_items_in_batch / num_processes · G / steps_per_generation``; dr_grpo by the local
``B · max_completion_length``; grpo/sapo/bnpo/luspo by ``G``); the entropy bonus, adaptive
controller included; the MoE auxiliary loss (from the model's forward); and the metrics under
TRL's keys in ``self._metrics`` (``policy_loss`` only while the entropy bonus is on, as TRL;
``vespo/phi_seq_mean`` from TRL's ``get_gamma_weights``, which ppo_fast's vespo reproduces).
Settings are read from the trainer at every step, as TRL reads them.

Where we differ from TRL 1.16, on purpose:

* The temperature is ``trainer.temperature`` at each call; TRL's head keeps the one it was
  built with (they differ only if the attribute is changed after construction).
* Inputs are read only where the completion mask (times ``tool_mask``) is 1: TRL multiplies by
  the mask, so a NaN or inf in padding turns its loss into NaN; ours does not change.
* Our ratios are ``exp`` of the log-ratio clamped to ±20 (TRL's are not); they differ only
  where ``|ℓ − ℓ_old| > 20``. The KL's ``c1`` and the clip metrics use TRL's unclamped ratio.
* ``delta`` must exceed ``1 + epsilon_high`` (raises at construction otherwise). Then TRL's
  ``clamp(c1, max=delta)`` equals the dual-clip cap ``min(·, −A·delta)`` for ``A < 0`` and
  never binds for ``A ≥ 0``, and TRL's clip metrics (computed from the clamped ``c1``) are those
  without delta; only at an exact tie ``r == delta`` our gradient is half TRL's (``minimum``
  splits a tie). Below ``1 + epsilon_high`` TRL's delta also caps positive advantages' ratios,
  which dual clip does not. For cispo, sapo and vespo TRL ignores ``delta``; so do we.
* ``sapo_temperature_*`` and ``vespo_k_* / vespo_lambda_*`` are taken rounded to the default
  dtype, as TRL's ``torch.where(cond, float, float)`` holds them (float32), so float64 runs
  match too. A vespo lambda below 1e-4 is raised to 1e-4 (TRL: to float32(1e-4), 2.5e-12 less).
* vespo with a vLLM IS ratio: TRL sums ``log ρ`` over every position, padding included, and
  ppo_fast over the mask only; they agree when ``ρ = 1`` outside the mask, which TRL's
  ``token_*`` modes give unless their clip bounds exclude 1. Such bounds raise at construction,
  and a ratio that is not 1 outside the mask raises at the step.

Raised at construction (ValueError naming TRL's argument), where TRL would run something
ppo_fast does not reproduce exactly: ``delta <= 1 + epsilon_high``; ``epsilon`` outside (0, 1)
for the clipped losses (TRL's ``epsilon >= 1`` drops the lower clip); ``epsilon_high <= 0``;
``sapo_temperature_* <= 0``; the vespo IS bounds above. An unknown ``loss_type`` or
``importance_sampling_level``, which TRL raises at the first step, raises at construction too.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
import trl
from trl.trainer import utils as trl_utils
from trl.trainer.utils import nanmax, nanmin

from .. import functional, objectives
from ..arguments import LossOptions, choice, is_number, positive

__all__ = ["GRPOTrainer", "HEADS", "LOSS_TYPES", "loss_options", "patch"]

TRL_VERSION = "1.16"

CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_TYPES = CLIPPED + ("cispo", "sapo", "vespo")
"""TRL's ``loss_type`` values, all supported."""

HEADS = ("logits", "fused")
"""How the log-probs are computed: ppo_fast's op on the model's logits, or ppo_fast's fused linear
head inside TRL's fused LM head call (no logits)."""

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")

if not trl.__version__.startswith(TRL_VERSION + "."):
    warnings.warn(f"ppo_fast.integrations.trl reproduces TRL {TRL_VERSION}'s GRPO loss; TRL "
                  f"{trl.__version__} is installed and its loss may differ", stacklevel=2)


# --------------------------------------------------------------------------------------------
# TRL's options → ppo_fast's
# --------------------------------------------------------------------------------------------


def _as_trl_holds(value: float) -> float:
    # TRL picks these per sign with torch.where(cond, float, float), which makes a tensor of the
    # default dtype (float32): the value it computes with is the rounded one.
    return torch.tensor(float(value)).item()


def _check_vespo_is(trainer) -> None:
    if not (trainer.loss_type == "vespo" and trainer.use_vllm and trainer.vllm_importance_sampling_correction):
        return
    low, high = trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max
    if (low is not None and low > 1) or (high is not None and high < 1):
        raise ValueError(
            "loss_type='vespo' with vllm_importance_sampling_clip_min/max excluding 1 (got "
            f"{low!r}, {high!r}) is not supported: TRL then gives padding an IS ratio != 1 and "
            "sums its log into vespo's weight; ppo_fast reads the ratio on completion tokens only")


def loss_options(trainer) -> LossOptions:
    """The ppo_fast :class:`~ppo_fast.arguments.LossOptions` for a TRL trainer's current settings
    (its ``loss_type``, ``importance_sampling_level``, ``epsilon_low/high``, ``args.delta``,
    ``args.sapo_*``, ``args.vespo_*``). Raises ValueError naming TRL's argument for settings
    ppo_fast cannot reproduce exactly."""
    loss_type, level = trainer.loss_type, trainer.importance_sampling_level
    choice("loss_type", loss_type, LOSS_TYPES)
    choice("importance_sampling_level", level, ("token", "sequence"))
    args = trainer.args
    ratio = {"importance_level": level, "token_gradient": False}
    eps_low, eps_high = trainer.epsilon_low, trainer.epsilon_high
    if loss_type in CLIPPED:
        if not (is_number(eps_low) and 0 < eps_low < 1):
            raise ValueError(f"epsilon must be a number in (0, 1) for loss_type={loss_type!r} (the ratio is "
                             f"clipped below at 1 - epsilon), got {eps_low!r}")
        positive("epsilon_high", eps_high)
        delta = args.delta
        if delta is not None and not (is_number(delta) and delta > 1 + eps_high):
            raise ValueError(f"delta must be a number > 1 + epsilon_high = {1 + eps_high!r} (TRL's recommended "
                             f"range, where it is dual-clip PPO's cap); got {delta!r}. Below that TRL's delta "
                             "also caps the ratio of positive advantages, which ppo_fast does not reproduce")
        return LossOptions(loss_type="vanilla", loss_params=ratio, clip_low=eps_low, clip_high=eps_high,
                           dual_clip=delta)
    if loss_type == "cispo":
        positive("epsilon_high", eps_high)
        return LossOptions(loss_type="cispo", loss_params={**ratio, "ratio_min": 0.0, "ratio_max": eps_high})
    if loss_type == "sapo":
        positive("sapo_temperature_pos", args.sapo_temperature_pos)
        positive("sapo_temperature_neg", args.sapo_temperature_neg)
        return LossOptions(loss_type="sapo", loss_params={
            **ratio, "tau_pos": _as_trl_holds(args.sapo_temperature_pos),
            "tau_neg": _as_trl_holds(args.sapo_temperature_neg)})
    _check_vespo_is(trainer)
    params = {}
    for sign in ("pos", "neg"):
        k, lam = getattr(args, f"vespo_k_{sign}"), getattr(args, f"vespo_lambda_{sign}")
        if not is_number(k):
            raise ValueError(f"vespo_k_{sign} must be a finite number, got {k!r}")
        if not is_number(lam):
            raise ValueError(f"vespo_lambda_{sign} must be a finite number, got {lam!r}")
        params[f"k_{sign}"] = _as_trl_holds(k)
        params[f"lambda_{sign}"] = max(_as_trl_holds(lam), objectives.VESPO_MIN_LAMBDA)
    return LossOptions(loss_type="vespo", loss_params=params)


# --------------------------------------------------------------------------------------------
# Log-probs from the model's logits
# --------------------------------------------------------------------------------------------


class _LogitsScorer:
    """Takes the model's place in TRL's ``_get_per_token_logps_and_entropies``, which slices the
    batch (and any images) and calls ``model(..., labels=labels, fused_lm_head=True)``: runs the
    model's ordinary forward for the logits of the ``completion_length`` positions that predict
    the completion, and scores them with :func:`ppo_fast.token_logprobs`."""

    def __init__(self, model, completion_length: int, temperature: float, entropy: bool):
        self.model, self.completion_length = model, completion_length
        self.temperature, self.entropy = temperature, entropy

    def __call__(self, *, labels, fused_lm_head, input_ids, **inputs):
        if not fused_lm_head:
            raise RuntimeError("ppo_fast's scorer only stands in for TRL's fused LM head call")
        k, length = self.completion_length, input_ids.shape[1]
        if not 0 < k < length:
            raise ValueError(f"the completion length ({k}) must be at least 1 and shorter than the sequence "
                             f"({length}): the first token has no logits predicting it")
        positions = torch.arange(length - k - 1, length - 1, device=input_ids.device)
        outputs = self.model(input_ids=input_ids, **inputs, logits_to_keep=positions, use_cache=False)
        logits = outputs.logits
        if logits.shape[:2] != (input_ids.shape[0], k):
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)} for logits_to_keep of "
                             f"{k} positions; ppo_fast needs a forward that honours a 1-D logits_to_keep tensor")
        out = functional.token_logprobs(logits, labels[:, -k:].to(logits.device), temperature=self.temperature,
                                        return_entropy=self.entropy, inplace_backward=True)
        logp, entropy = out if self.entropy else (out, None)
        return SimpleNamespace(log_probs=logp, entropy=entropy, aux_loss=getattr(outputs, "aux_loss", None))


class _FusedHeadForTRL:
    """Stands in for TRL's ``ChunkedLogProbFunction`` inside TRL's fused forward
    (``add_fused_lm_head``), with its ``apply`` signature and 5-tuple result: the log-probs and
    entropy from :func:`ppo_fast.fused_linear_token_logprobs`; the other statistics TRL's kernel
    can fold in are not asked for by GRPO and are refused."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy",)):
        extra = sorted(set(outputs) - {"log_probs", "entropy"})
        if final_logit_softcapping is not None or extra:
            raise NotImplementedError(
                f"ppo_fast's fused head computes log-probs and entropy of an unclipped head; asked for soft-capping "
                f"{final_logit_softcapping!r} and outputs {extra}: use ppo_fast_head='logits'")
        if not (is_number(logit_scale) and logit_scale > 0):
            raise ValueError(f"the model's logit scale must be a number > 0 for ppo_fast's fused head, got "
                             f"{logit_scale!r}: use ppo_fast_head='logits'")
        # TRL's head runs in the autocast dtype; ours casts once and keeps autocast out of its op.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            out = functional.fused_linear_token_logprobs(
                hidden.to(dtype), weight.to(dtype), targets, bias=None if bias is None else bias.to(dtype),
                temperature=self.temperature / float(logit_scale), return_entropy="entropy" in outputs)
        logp, entropy = out if "entropy" in outputs else (out, None)
        return logp, entropy, None, None, None


def _softcapped(model) -> bool:
    config = getattr(getattr(model, "config", None), "get_text_config", lambda: None)()
    return getattr(config, "final_logit_softcapping", None) is not None


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class _PpoFastGRPO:
    """The overrides that put ppo_fast under a ``trl.GRPOTrainer`` (mixed in before it)."""

    ppo_fast_head = "logits"
    """One of :data:`HEADS` (set by :class:`GRPOTrainer` and :func:`patch`)."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, **kwargs):
        unwrapped = self.accelerator.unwrap_model(model)
        if self.ppo_fast_head == "fused" and not _softcapped(unwrapped):
            saved = trl_utils._ChunkedLogProbFunction
            trl_utils._ChunkedLogProbFunction = _FusedHeadForTRL(self.temperature)
            try:
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, **kwargs)
            finally:
                trl_utils._ChunkedLogProbFunction = saved
        scorer = _LogitsScorer(model, logits_to_keep, self.temperature, compute_entropy)
        return super()._get_per_token_logps_and_entropies(scorer, input_ids, attention_mask, logits_to_keep,
                                                          batch_size=batch_size, compute_entropy=compute_entropy,
                                                          **kwargs)

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        valid = mask.bool()
        logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{key: inputs.get(key) for key in _MULTIMODAL_KEYS})
        opts = loss_options(self)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        # Data read where the mask is 1 only: what padding holds reaches no value and no gradient.
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else torch.where(valid, old, logp.detach())
        keep_sequence = None
        if self.off_policy_mask_threshold is not None:
            sampling = torch.where(valid, inputs.get("sampling_per_token_logps", old), logp.detach())
            keep_sequence = self.get_off_policy_mask(
                advantages=advantages, per_token_logps=logp, sampling_per_token_logps=sampling, mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold).bool()

        is_ratio = inputs.get("importance_sampling_ratio")
        if self.loss_type == "vespo":
            weights = None if is_ratio is None else self._vespo_is_ratio(is_ratio, valid)
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            weights = inputs["importance_sampling_ratio"]
        else:
            weights = None
        terms = objectives.policy_terms(logp, old, advantages.expand_as(logp), valid, opts, weights=weights)
        per_token = terms.pg
        if keep_sequence is not None:
            per_token = torch.where(keep_sequence, per_token, 0.0)
        if entropy_mask is not None:
            per_token = torch.where(entropy_mask, per_token, 0.0)

        # TRL's ratio c1, unclamped and differentiable: the KL's bias correction and the metrics.
        log_ratio = logp - old
        if self.importance_sampling_level == "sequence":
            log_ratio = (torch.where(valid, log_ratio, 0.0).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        if self.beta != 0.0:
            ref = torch.where(valid, inputs["ref_per_token_logps"], logp.detach())
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            if self.args.use_bias_correction_kl:
                kl = kl * ratio
            per_token = per_token + self.beta * kl
        per_token = torch.where(valid, per_token, 0.0)

        loss, policy_loss = self._aggregate(per_token, mask, inputs, mode, accumulation)
        if self._entropy_bonus_enabled:
            loss = loss - self._entropy_bonus(entropies, mask, entropy_mask, mode, accumulation)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            self._update_entropy_coef(entropies, mask, entropy_mask, mode)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            metrics["kl"].append(self._global_mean(kl, valid))
        metrics["entropy"].append(self._global_mean(entropies, valid))
        if self.loss_type in CLIPPED:
            low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
            high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"].append(self._global_mean(low.float(), valid))
            metrics["clip_ratio/high_mean"].append(self._global_mean(high.float(), valid))
            metrics["clip_ratio/region_mean"].append(self._global_mean((low | high).float(), valid))
            metrics["clip_ratio/low_min"].append(
                nanmin(self.accelerator.gather(self._sequence_means(low.float(), valid))).item())
            metrics["clip_ratio/high_max"].append(
                nanmax(self.accelerator.gather(self._sequence_means(high.float(), valid))).item())
        elif self.loss_type == "cispo":
            clipped = (ratio > self.epsilon_high) & (advantages > 0)
            metrics["cispo_clip_ratio"].append(self._global_mean(clipped.float(), valid))
        elif self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages=advantages, log_ratio_per_token=torch.where(valid, logp - old, 0.0), mask=mask,
                importance_sampling_ratio=weights, k_pos=self.args.vespo_k_pos,
                lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg)
            metrics["vespo/phi_seq_mean"].append(self._global_mean(phi, valid))
        return loss

    @staticmethod
    def _vespo_is_ratio(is_ratio, valid):
        if is_ratio.shape != valid.shape:
            raise ValueError(f"importance_sampling_ratio must be per token, shape {tuple(valid.shape)}, for "
                             f"loss_type='vespo'; got shape {tuple(is_ratio.shape)}")
        outside = (is_ratio != 1) & ~valid
        if bool(outside.any()):
            raise ValueError(
                f"importance_sampling_ratio must be 1 outside the completion mask for loss_type='vespo' (TRL sums "
                f"its log over every position, ppo_fast over the mask); found {is_ratio[outside][0].item()} "
                f"at {int(outside.sum())} masked positions")
        return is_ratio

    def _aggregate(self, per_token, mask, inputs, mode, accumulation):
        """``(loss, policy_loss)``: TRL's aggregation of ``loss_type``, its normalisers' dtypes
        included; ``per_token`` is 0 outside the mask."""
        loss_type = self.loss_type
        if loss_type in ("cispo", "dapo", "vespo"):
            # int64 clamped with a float: float32, as TRL, and so is every step of the scaling.
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = per_token.sum() / normalizer
            return loss, loss.detach()
        if loss_type in ("grpo", "sapo"):
            loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif loss_type == "bnpo":
            loss = per_token.sum() / mask.sum().clamp(min=1.0)
        elif loss_type == "dr_grpo":
            loss = per_token.sum() / (per_token.size(0) * self.max_completion_length)
        else:  # luspo
            loss = per_token.sum(-1).mean()
        return loss / accumulation, loss.detach()

    def _entropy_bonus(self, entropies, mask, entropy_mask, mode, accumulation):
        """``coef · mean entropy`` over the tokens the policy term acts on, scaled for
        accumulation; the adaptive coefficient is the one set at the last optimizer step."""
        acting = mask if entropy_mask is None else mask * entropy_mask
        mean_entropy = torch.where(acting.bool(), entropies, 0.0).sum() / acting.sum().clamp(min=1.0) / accumulation
        coef = self.entropy_coef
        if self.use_adaptive_entropy and not self._last_world_entropy <= self.args.entropy_target:
            coef = 0.0
        return coef * mean_entropy

    def _update_entropy_coef(self, entropies, mask, entropy_mask, mode):
        """TRL's adaptive controller: window totals of entropy and tokens, reduced over processes
        at the optimizer step, move the coefficient by ``entropy_coef_delta`` toward the target."""
        if mode == "train" and self.use_adaptive_entropy:
            acting = mask if entropy_mask is None else mask * entropy_mask
            stats = torch.stack([torch.where(acting.bool(), entropies, 0.0).sum(), acting.sum()]).detach()
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                args = self.args
                if world_entropy <= args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _global_mean(self, values, valid) -> float:
        """Mean over the valid tokens of all processes; a ``[B, 1]`` value counts once per row."""
        if values.shape[1] == 1:
            total, count = values.sum(), torch.tensor(float(values.shape[0]), device=values.device)
        else:
            total, count = torch.where(valid, values, 0.0).sum(), valid.sum().float()
        totals = self.accelerator.reduce(torch.stack([total, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    @staticmethod
    def _sequence_means(values, valid):
        """Per row: the value itself for ``[B, 1]``, else the mean over its valid tokens (NaN for
        a row without any, which TRL's nanmin/nanmax then skip)."""
        if values.shape[1] == 1:
            return values.squeeze(1)
        return torch.where(valid, values, 0.0).sum(-1) / valid.sum(-1)


class GRPOTrainer(_PpoFastGRPO, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` (same arguments) whose log-probs and loss are ppo_fast's (see the
    module docstring for what that means exactly). Settings ppo_fast cannot reproduce raise
    ValueError here, at construction."""

    def __init__(self, *args, ppo_fast_head: str = "logits", **kwargs):
        choice("ppo_fast_head", ppo_fast_head, HEADS)
        super().__init__(*args, **kwargs)
        self.ppo_fast_head = ppo_fast_head
        loss_options(self)


_PATCHED: dict[type, type] = {}


def patch(trainer, head: str = "logits"):
    """Make an existing ``trl.GRPOTrainer`` (or an instance of a subclass) compute its log-probs
    and loss with ppo_fast, as :class:`GRPOTrainer` does (``head``: its ``ppo_fast_head``); returns
    the same object. Its class is swapped for a subclass of its own class with ppo_fast's
    overrides first, so a subclass's other overrides still apply. Raises as :class:`GRPOTrainer`'s
    constructor does, leaving the trainer untouched."""
    if not isinstance(trainer, trl.GRPOTrainer):
        raise TypeError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    choice("head", head, HEADS)
    if isinstance(trainer, _PpoFastGRPO):
        trainer.ppo_fast_head = head
        return trainer
    loss_options(trainer)
    cls = type(trainer)
    if cls not in _PATCHED:
        _PATCHED[cls] = type(f"PpoFast{cls.__name__}", (_PpoFastGRPO, cls),
                             {"__module__": __name__, "__doc__": cls.__doc__})
    trainer.__class__ = _PATCHED[cls]
    trainer.ppo_fast_head = head
    return trainer

