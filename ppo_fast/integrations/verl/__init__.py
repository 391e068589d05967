"""verl 0.9.1, computed by ppo_fast: the same functions under verl's names and signatures, and
:func:`install`, which puts them into verl itself.

Two ways in:

* change an import: ``from ppo_fast.integrations.verl import compute_policy_loss_gspo, agg_loss``
  (every name verl's ``core_algos``, ``rollout_corr_helper`` and ``torch_functional`` use is here);
* or leave verl's code and config alone and call :func:`install` in every process that runs verl
  code, before verl builds its workers: ``PPO_FAST_VERL=1`` does it when verl is imported (verl
  loads the ``verl.plugins`` entry point ``ppo_fast`` in the driver and in each Ray worker),
  ``VERL_USE_EXTERNAL_MODULES=ppo_fast.integrations.verl.plugin`` too.

:func:`install` registers ours under verl's names in ``POLICY_LOSS_REGISTRY`` (all twelve loss
modes) and ``ADV_ESTIMATOR_REGISTRY`` (all fourteen estimators), and rebinds every module
attribute through which verl 0.9.1 reaches these functions: ``core_algos``' own functions (its
trainer calls the GAE and GRPO estimators directly), the by-name imports of ``agg_loss``,
``kl_penalty`` and ``compute_value_loss`` in the actor's loss code and the trainers, the
rollout-correction helpers, and ``logprobs_from_logits`` / entropy / Σπ² in
``verl.utils.torch_functional`` and in each engine that imported them by name (FSDP, automodel,
torchtitan, the naive rollout). The speed is there: the engines' logits become log-probs and
entropy in our fused kernel. With ``use_fused_kernels=True`` verl's fused linear heads (its Triton
``linear_cross_entropy`` and its torch ``FusedLinearForPPO``) are ours too
(:mod:`~ppo_fast.integrations.verl.head`); Megatron's vocab-parallel functions are left to verl.

``install(batch_invariant=True)`` (``PPO_FAST_VERL_BATCH_INVARIANT=1`` with the plugin) also runs
every forward of verl's Hugging Face engines (FSDP, and Automodel, :data:`BATCH_INVARIANT_TARGETS`)
under :func:`ppo_fast.batch_invariant`: a sequence's log-probs then no longer depend on the
micro-batch it is packed into, so ``compute_log_prob``'s ``old_log_prob`` (at
``log_prob_micro_batch_size_per_gpu``) equals the update's ``log_prob`` (at
``ppo_micro_batch_size_per_gpu``) bit for bit, and the first PPO ratio is exactly 1 (verl #6280).
The model must use ``attn_implementation="sdpa"`` or ``"eager"``
(``actor_rollout_ref.model.override_config.attn_implementation=sdpa``; verl's default,
flash-attention, is refused with that advice). The backward keeps torch's kernels.
"""

from __future__ import annotations

import functools
import importlib
import logging

from . import advantages as _advantages
from . import head as _head
from . import logprobs as _logprobs
from . import losses as _losses
from . import rollout_correction as _rollout_correction
from .advantages import *  # noqa: F401,F403  (verl's estimator names)
from .head import *  # noqa: F401,F403  (verl's fused linear head names)
from .logprobs import *  # noqa: F401,F403  (verl's torch_functional names)
from .losses import *  # noqa: F401,F403  (verl's core_algos loss names)
from .rollout_correction import *  # noqa: F401,F403  (verl's rollout_corr_helper names)

ESTIMATORS = _advantages.ESTIMATORS
"""verl's ``ADV_ESTIMATOR_REGISTRY`` names → ours."""

ROLLOUT_CORRECTION = _rollout_correction.FUNCTIONS
"""verl's ``rollout_corr_helper`` function names → ours."""

__all__ = [*_losses.__all__, *_logprobs.__all__, *_head.__all__, *_advantages.__all__,
           *_rollout_correction.__all__,
           "BATCH_INVARIANT_TARGETS", "ESTIMATORS", "POLICY_LOSSES", "ROLLOUT_CORRECTION", "TARGETS",
           "batch_invariant_installed", "install", "installed", "uninstall"]

logger = logging.getLogger(__name__)

POLICY_LOSSES = {name: getattr(_losses, f"compute_policy_loss_{name}")
                 for name in ("vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov",
                              "geo_mean", "dro", "cispo", "bypass_mode")}
"""verl's ``POLICY_LOSS_REGISTRY`` names → ours."""

_LOG_PROBS = {name: getattr(_logprobs, name) for name in _logprobs.__all__}
_CORE = {
    **{f"compute_policy_loss_{name}": fn for name, fn in POLICY_LOSSES.items()},
    **{name: getattr(_losses, name) for name in ("compute_policy_loss_reinforce", "agg_loss", "kl_penalty",
                                                 "kl_penalty_forward", "compute_value_loss")},
    **{fn.__name__: fn for fn in ESTIMATORS.values()},
}
_logprobs_from_logits = _logprobs.logprobs_from_logits
_agg_loss, _kl_penalty, _value_loss = _losses.agg_loss, _losses.kl_penalty, _losses.compute_value_loss

TARGETS: dict[str, dict[str, object]] = {
    "verl.trainer.ppo.core_algos": _CORE,
    "verl.trainer.ppo.rollout_corr_helper": dict(ROLLOUT_CORRECTION),
    "verl.utils.torch_functional": _LOG_PROBS,
    "verl.workers.utils.losses": {"agg_loss": _agg_loss, "compute_value_loss": _value_loss,
                                  "kl_penalty": _kl_penalty},
    "verl.trainer.ppo.ray_trainer": {"agg_loss": _agg_loss},
    "verl.experimental.separation.ray_trainer": {"agg_loss": _agg_loss},
    "verl.trainer.ppo.v1.trainer_base": {"agg_loss": _agg_loss},
    "verl.trainer.distillation.losses": {"agg_loss": _agg_loss, "kl_penalty": _kl_penalty},
    "verl.workers.engine.fsdp.transformer_impl": {"logprobs_from_logits": _logprobs_from_logits},
    "verl.workers.engine.automodel.transformer_impl": {"logprobs_from_logits": _logprobs_from_logits},
    "verl.workers.engine.torchtitan.transformer_impl": {"logprobs_from_logits": _logprobs_from_logits},
    "verl.workers.rollout.naive.naive_rollout": {"logprobs_from_logits": _logprobs_from_logits},
    "verl.trainer.ppo.prefix_grouper_utils": {"logprobs_from_logits": _logprobs_from_logits},
    "verl.utils.kernel.linear_cross_entropy": {"linear_cross_entropy": _head.linear_cross_entropy},
    "verl.utils.experimental.torch_functional": {"FusedLinearForPPO": _head.FusedLinearForPPO},
}
"""Module → {attribute: ours}: every place verl 0.9.1 looks these functions up."""

BATCH_INVARIANT_TARGETS: dict[str, tuple[str, ...]] = {
    "verl.workers.engine.fsdp.transformer_impl": ("FSDPEngineWithLMHead",),
    "verl.workers.engine.automodel.transformer_impl": ("AutomodelEngineWithLMHead",),
}
"""Module → the engine classes whose ``forward_step`` (one micro-batch's forward, and the loss)
``install(batch_invariant=True)`` runs under the mode. Their subclasses (the value-head engines,
VeOmni's) inherit it. TorchTitan's and Megatron's engines run their own model code, not a Hugging
Face model, and are not covered."""

_originals: dict[tuple[str, str], object] = {}
"""(module, attribute path) → verl's original, for :func:`uninstall`."""
_registry_originals: dict[tuple[str, str], object] = {}


def _registries(core_algos):
    return {"POLICY_LOSS_REGISTRY": (core_algos.POLICY_LOSS_REGISTRY, POLICY_LOSSES),
            "ADV_ESTIMATOR_REGISTRY": (core_algos.ADV_ESTIMATOR_REGISTRY, ESTIMATORS)}


def _under_batch_invariant(forward_step):
    from ...batch_invariant import batch_invariant

    @functools.wraps(forward_step)
    def forward_step_batch_invariant(self, *args, **kwargs):
        with batch_invariant():
            return forward_step(self, *args, **kwargs)

    return forward_step_batch_invariant


def install(batch_invariant: bool = False) -> dict[str, str]:
    """Put ppo_fast's functions into the installed verl; returns ``{target: what happened}``.

    Idempotent. A module that does not import here (an engine whose own dependencies are missing)
    is reported and left alone; if verl itself does not import, ImportError. Call it before verl
    constructs its engines (they bind the entropy function when built). ``batch_invariant``: also
    run the Hugging Face engines' forwards under :func:`ppo_fast.batch_invariant` (see the module
    docstring); ``install()`` after ``install(batch_invariant=True)`` keeps it.
    """
    if not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant must be a bool, got {batch_invariant!r}")
    core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
    version = getattr(importlib.import_module("verl"), "__version__", "?")
    if version != "0.9.1":
        logger.warning("ppo_fast.integrations.verl targets verl 0.9.1; installing into verl %s",
                       version)
    report = {}
    for name, (registry, ours) in _registries(core_algos).items():
        for key, fn in ours.items():
            _registry_originals.setdefault((name, key), registry.get(key))
            registry[key] = fn
        report[f"verl.trainer.ppo.core_algos.{name}"] = f"{len(ours)} entries"
    for module_name, attributes in TARGETS.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # an engine's optional dependency (megatron, veomni, ...)
            report[module_name] = f"not patched: {type(error).__name__}: {error}"
            continue
        for attribute, fn in attributes.items():
            if not hasattr(module, attribute):
                report[f"{module_name}.{attribute}"] = "not patched: no such attribute"
                continue
            _originals.setdefault((module_name, attribute), getattr(module, attribute))
            setattr(module, attribute, fn)
        report[module_name] = f"patched {len(attributes)}"
    if batch_invariant:
        for module_name, classes in BATCH_INVARIANT_TARGETS.items():
            try:
                module = importlib.import_module(module_name)
            except Exception as error:
                report[f"{module_name} (batch_invariant)"] = f"not patched: {type(error).__name__}: {error}"
                continue
            for class_name in classes:
                key = (module_name, f"{class_name}.forward_step")
                if key not in _originals:
                    engine = getattr(module, class_name)
                    _originals[key] = engine.forward_step
                    engine.forward_step = _under_batch_invariant(engine.forward_step)
                report[f"{module_name}.{class_name}.forward_step"] = "under batch_invariant()"
    return report


def uninstall() -> None:
    """Undo :func:`install`: verl's own functions back in every place."""
    core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
    registries = {name: registry for name, (registry, _) in _registries(core_algos).items()}
    for (name, key), original in _registry_originals.items():
        if original is None:
            registries[name].pop(key, None)
        else:
            registries[name][key] = original
    for (module_name, path), original in _originals.items():
        owner = importlib.import_module(module_name)
        *owners, attribute = path.split(".")
        for name in owners:
            owner = getattr(owner, name)
        setattr(owner, attribute, original)
    _originals.clear()
    _registry_originals.clear()


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return bool(_originals)


def batch_invariant_installed() -> bool:
    """Whether :func:`install` put verl's engine forwards under the batch-invariant mode."""
    return any(path.endswith(".forward_step") for _, path in _originals)
