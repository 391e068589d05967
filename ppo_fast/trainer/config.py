"""PPOConfig: every knob of a run, with a docstring per field.

Loaded from YAML (``--config run.yaml``) and overridden from the command line (``--key value``,
``--ppo-epochs 2``); ``ppo-fast train --help`` lists every field with its docstring.

A config is checked when it is built, field by field, before anything expensive runs: values are
coerced to the field's type where that is unambiguous (YAML reads ``1e-3`` as a string, a flag
may say ``"false"``) and rejected otherwise, ranges and divisibility are checked, and
:func:`check_files` checks that every file the run will read exists and is whole. Errors are
:class:`ConfigError` and name the field.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..arguments import AGG_MODES, kl_estimator_name
from .errors import ConfigError

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A run name is a name: a letter or digit first, then up to 127 letters, digits, '.', '_' or '-'
(no path separator, nothing that climbs out of output_dir)."""

RESUMABLE = ("steps", "save_every", "eval_every", "max_nonfinite_in_a_row", "max_gathered_bytes", "fused_head",
             "max_minutes", "stop_on_alarm")
"""Fields a resumed train run may change (PPOConfig.RESUMABLE; each command's config names its
own). Every other field is the run's own: a resume that sets one differently is refused, since it
would continue a different run on top of this one."""

OLD_LOGPROBS = ("auto", "recompute", "rollout")

LOCATION = ("run_name", "output_dir", "cache_dir", "resume", "overwrite")
"""Fields that say where a run is and how to start it, not what it computes."""


ALGORITHMS = ("ppo", "grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus",
              "reinforce_plus_plus_baseline", "remax", "opo", "gpg", "grpo_passk", "gdpo")
"""ppo (GAE and a critic), then the critic-free estimators of verl's registry the trainer runs.
verl's gae is ppo here; its optimal-token baselines need every token's sum of squared
probabilities, which the trainer does not compute."""

GROUPED = ("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo", "gpg",
           "grpo_passk", "gdpo")
"""Estimators that compare a completion with the others of its prompt."""

GROUP_SIZE = 4
"""samples_per_prompt of a group estimator when the config leaves it at 0: the group size of
benches/bench_hacking.py and examples/sample, where GRPO learns the arithmetic task."""

TASKS = ("vowels", "arithmetic", "arithmetic-hackable")


class RunConfig:
    """What every command's config shares: fields coerced to their types and range-checked when
    built (``RANGES``: field -> (predicate, what it must be)), a run name that is a name,
    ``check()`` for the rules between fields, YAML in, a dict out. Subclasses are dataclasses
    with a docstring under each field (``--help`` shows it)."""

    RANGES: ClassVar[dict] = {}
    RESUMABLE: ClassVar[tuple] = ()
    """Fields a resume may set differently from the run's config.json (see RESUMABLE)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        for name, (ok, what) in self.RANGES.items():
            if getattr(self, name) is not None and not ok(getattr(self, name)):
                raise ConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if getattr(self, "run_name", "") and not RUN_NAME.fullmatch(self.run_name):
            raise ConfigError(f"run_name must be a plain name of at most 128 characters (letters, "
                              f"digits, '.', '_', '-'; no path separator, not starting with '.' or "
                              f"'-'), got {self.run_name!r}")
        if getattr(self, "resume", False) and getattr(self, "overwrite", False):
            raise ConfigError("resume and overwrite exclude each other")
        self.check()

    def check(self) -> None:
        """Rules between fields; raises ConfigError."""

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        """The config in the YAML file ``path``, with ``overrides`` set over it."""
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = _read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of field: value, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{path}: unknown config keys {unknown}")
        return cls(**{**data, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PPOConfig(RunConfig):
    # --- run ---------------------------------------------------------------------------------
    run_name: str = ""
    """Name of the run; its files go to <output_dir>/<run_name>/. Empty: a fresh name from the
    date and time. An existing run directory is refused unless resume or overwrite is set."""
    output_dir: str = "runs"
    """Directory that holds run directories."""
    seed: int = 0
    """Seed for prompts, sampling and model initialisation."""
    resume: bool = False
    """Continue the run named run_name from its newest intact checkpoint (after Ctrl-C or kill -9
    too; a damaged checkpoint is passed over for the one before) to the metrics a run never stopped
    gives. It keeps the settings the run started with (only steps, save_every, eval_every,
    max_nonfinite_in_a_row, max_gathered_bytes, fused_head, max_minutes and stop_on_alarm may
    change); best_policy/ and its record (best.json) carry over, and the summary times the whole
    run; a run that has done its steps is left as it is; an error when the run has no
    checkpoint."""
    overwrite: bool = False
    """Delete an existing run directory of the same name and start over (refused when the run
    would delete its own input: a model, prompts or a reward spec's model inside it)."""
    cache_dir: str = ""
    """Where reusable work lives (the default task's warm-up and reward model); empty:
    <output_dir>/.cache."""

    # --- models ------------------------------------------------------------------------------
    policy_model: str = ""
    """Hugging Face causal-LM directory for the policy (and the reference); empty: the embedded
    default task builds a tiny Llama-style model from a config."""
    critic_model: str = ""
    """Causal-LM directory whose trunk the critic uses (a value head is added); empty: the
    policy's."""
    reward: str = ""
    """What the policy is trained to maximise: a reward-model directory (a sequence classifier
    with its trained score head, sharing the policy's tokenizer; a causal LM is refused), a Python
    function (module:function or path/file.py:function, called as fn(prompts, completions) ->
    scores), a weighted list of them ("0.7*runs/rm/model, 0.3*my_rewards:brevity"), or
    "ensemble(DIR|DIR|...)" of reward models, combined as mean - reward_ensemble_k * std. Empty
    with an embedded task: the task's own reward."""
    reward_ensemble_k: float = 1.0
    """k of the conservative ensemble combination mean - k * std (0: the plain mean)."""
    gold: str = ""
    """An evaluation-only reward in the same form as reward (a rule that knows the answer, or a
    held-out reward model): never optimised, it is what the reward-hacking alarms compare the
    trained reward against. Empty with an embedded task: the task's gold rule."""
    task: str = "vowels"
    """Embedded task used when policy_model is empty: vowels (preferences learned by a reward
    model), arithmetic (a verifiable rule reward) or arithmetic-hackable (a length-biased proxy
    reward that invites reward hacking; the rule stays the gold)."""
    prompts_file: str = ""
    """Training prompts: JSON/JSONL/Parquet/CSV with a "prompt" (or chat "messages") column, or a
    text file with one prompt per line; empty: the embedded task's prompts."""
    eval_prompts_file: str = ""
    """Held-out prompts for the evaluations (same formats); empty: the embedded task's, or the
    first eval_prompts training prompts."""

    # --- rollout -----------------------------------------------------------------------------
    steps: int = 40
    """PPO steps (rollout + update)."""
    rollout_batch_size: int = 32
    """Prompts per rollout on each rank (each sampled samples_per_prompt times)."""
    max_prompt_len: int = 16
    """Prompts longer than this many tokens are an error."""
    max_new_tokens: int = 12
    """Tokens generated per prompt; the longest prompt plus these must fit the policy's context
    (max_position_embeddings), checked before the run starts."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (1: off)."""

    # --- algorithm ---------------------------------------------------------------------------
    algorithm: str = "ppo"
    """Advantage estimator, by verl's names: ppo (GAE with a critic), or a critic-free one: grpo,
    rloo, reinforce_plus_plus, reinforce_plus_plus_baseline, remax, opo, gpg, grpo_passk, gdpo
    (no critic is built; the group estimators need samples_per_prompt >= 2)."""
    samples_per_prompt: int = 0
    """Completions sampled per prompt in a rollout (the group of GRPO, RLOO, ...); 0: the
    algorithm's default, 4 for the group estimators (GROUP_SIZE) and 1 for the others."""
    loss_type: str = "vanilla"
    """Policy objective (pf.ppo_loss's loss_type: vanilla, gspo, cispo, gpg, clip_cov, kl_cov,
    ...)."""
    kl_loss_coef: float = 0.0
    """Weight of a KL-to-reference term in the actor loss, as verl's use_kl_loss (0: off; the KL
    penalty in the reward, kl_coef, applies to every algorithm)."""
    kl_loss_estimator: str = "k3"
    """The KL term's estimator: one of the reward's (from the sampled tokens' log-probs, verl's
    kl_loss_type names accepted), or full: the exact KL over the whole vocabulary, from the
    reference's hidden states and head beside the actor's (the fused head; both models' logits on
    the logits path), one more reference forward per micro-batch."""

    # --- rewards and advantages --------------------------------------------------------------
    kl_coef: float = 0.3
    """Initial β of the KL penalty in the reward (-β·KL per token). With the adaptive controller,
    the β its integral holds until the KL first reaches target_kl: near the 0.4-0.5 that holds the
    default run at its target, where 0.1 let the KL run to 1.6x the target before β caught up
    (benches/results/kl_control_cpu.md)."""
    kl_estimator: str = "k1"
    """Estimator of the per-token KL in the reward, from the sampled tokens' log-probs: k1, abs,
    k2, k3, k1+, k3+, or verl's kl, mse, low_var_kl."""
    adaptive_kl: bool = True
    """Adapt β towards target_kl (Ziegler et al. 2019); False keeps it fixed."""
    target_kl: float = 10.0
    """KL per sequence (nats) the adaptive controller steers towards."""
    kl_horizon: int = 32
    """Horizon of the adaptive KL controller, in samples: β moves by up to 0.2·samples/horizon per
    step, so one rollout batch (32) lets it reach its target within the default 40 steps (at 320
    the final KL was 2.6x a target of 6 on the embedded default; 3 seeds each)."""
    kl_proportional: float = 2.0
    """Proportional gain of the adaptive KL controller: β is multiplied by
    exp(kl_proportional · clip(KL / target_kl − 1, ±1)) on top of the horizon's integral update
    (pf.AdaptiveKLController's proportional; 0: Ziegler's integral controller alone, which let
    the default run's KL reach 1.8-2x its target; over seeds 0-5 of the default run, after
    step 8, the KL left the band of half the target either side of it at 1 step with 2, at 4
    steps with 1 and at 2 steps with 3)."""
    kl_hold_until_target: bool = True
    """Keep the controller's integral at kl_coef until the KL first reaches target_kl
    (pf.AdaptiveKLController's hold_until_target): a run's KL starts at 0, and lowering β while
    it rises only winds the controller down (Ziegler's controller had cut β 4x by then)."""
    score_clip: float = 0.0
    """Clip the reward model's score to ±score_clip (0: no clipping)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE λ."""

    # --- update ------------------------------------------------------------------------------
    ppo_epochs: int = 2
    """Passes over each rollout."""
    minibatch_size: int = 16
    """Sequences per optimizer step on each rank."""
    micro_batch_size: int = 16
    """Sequences per forward/backward; minibatch_size / micro_batch_size is the gradient
    accumulation."""
    actor_lr: float = 2e-3
    """Actor learning rate."""
    critic_lr: float = 5e-3
    """Critic learning rate."""
    clip_low: float | None = None
    """PPO ratio clip below 1; none: 0.2, for the objectives that clip (the others refuse a
    value)."""
    clip_high: float | None = None
    """PPO ratio clip above 1; none: clip_low. Above clip_low it is DAPO's clip-higher (0.28)."""
    value_clip: float = 0.2
    """Value-function clip around the old values (0: off)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    loss_agg: str = ""
    """Loss aggregation (token-mean, seq-mean-token-mean, ...); empty: the loss type's own
    (token-mean for vanilla PPO)."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    fused_head: bool = True
    """Log-probs and the actor loss from the last hidden states and the output embedding
    (pf.fused_linear_*), never the [tokens, vocab] logits, for each model whose logits are exactly
    its head's output on the first batch (checked; otherwise the logits path, with the reason
    logged). Off: always the logits path."""
    batch_invariant: bool = False
    """Run every forward pass under pf.batch_invariant() (docs/batch-invariant.md): a row's numbers
    then do not depend on its batch, its padding or prefill vs decode, so the rollout's log-probs
    of its tokens equal the trainer's bit for bit and the first minibatch's ratio is exactly 1 on
    every token. Native kernels on the CPU, Triton on CUDA; forwards are slower
    (benches/results/batch_invariant_cpu.md)."""
    old_logprobs: str = "auto"
    """Where PPO's old log-probs come from: "recompute" (a no-grad forward of the actor over the
    rollout, as verl and OpenRLHF do), "rollout" (the hybrid engine's log-probs of its own samples:
    one actor forward fewer per step; the same numbers only under batch_invariant), or "auto"
    ("rollout" under batch_invariant, else "recompute")."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage of the actor and critic (0-3)."""
    ds_config: str = ""
    """DeepSpeed config JSON for actor and critic (overrides zero_stage and the learning-rate
    defaults); empty: built from the fields above."""
    max_gathered_bytes: int = 0
    """ZeRO-3 rollouts: gather at most this many bytes of weights at once (0: the whole model)."""
    offload_frozen: bool = False
    """Keep the reference and reward models as ZeRO-3 inference engines with their parameters in
    CPU memory (they are gathered layer by layer for each forward)."""

    # --- faults, checkpoints, logging --------------------------------------------------------
    max_nonfinite_in_a_row: int = 3
    """Stop (with a checkpoint) after this many consecutive updates with a non-finite loss."""
    save_every: int = 10
    """Checkpoint every this many steps (0: never), and always at the end and on a stop."""
    eval_every: int = 5
    """Measure the proxy reward (and the gold reward, when a gold function exists) on the
    evaluation prompts before the first step and every this many steps (0: never)."""
    eval_prompts: int = 64
    """Prompts per gold-reward evaluation."""
    max_minutes: float = 0.0
    """Stop after the step that passes this many minutes of training (0: no limit); the run then
    ends as a finished one (checkpoint, summary, final policy)."""

    # --- reward-hacking alarms (checked at every evaluation) ---------------------------------
    kl_budget: float = 0.0
    """KL to the reference (nats per sequence, on the evaluation prompts) past which the KL alarm
    fires; 0: twice target_kl."""
    alarm_gold_drop: float = 0.5
    """The divergence alarm fires when the trained reward is above its value at the best gold
    (or held-out) evaluation while gold has fallen from that best by more than this many
    standard deviations of the per-prompt gold reward."""
    alarm_length_r2: float = 0.5
    """The length alarm fires when the completion length explains more than this share of the
    variance of the trained reward across the evaluation prompts, beyond what gold explains (the
    rise of R^2 when length joins gold in a linear fit; plain R^2 without gold), with longer
    scoring higher."""
    stop_on_alarm: bool = False
    """Stop the run at the first alarm after a training step (checkpoint saved); best_policy/
    keeps the policy of the best gold (or held-out) evaluation either way."""

    # --- embedded default task ---------------------------------------------------------------
    warmup_steps: int = 150
    """Supervised warm-up steps of the default policy."""
    reward_train_steps: int = 300
    """Training steps of the default reward model on synthetic preference pairs."""

    def loss_options(self) -> dict:
        """The keyword arguments of ``pf.ppo_loss`` this run sets: the objective and its clip as
        configured (unset ones take the library's defaults), and an empty loss_agg leaves the
        objective's own aggregation (Dr. GRPO's, GSPO's)."""
        return dict(loss_type=self.loss_type, clip_low=self.clip_low, clip_high=self.clip_high,
                    entropy_coef=self.entropy_coef, temperature=self.temperature, agg=self.loss_agg or None)

    def check(self) -> None:
        if self.kl_estimator == "full":
            raise ConfigError("kl_estimator='full' needs both models' whole distributions; the KL penalty in the "
                              "reward reads the sampled tokens' log-probs: pick k1, abs, k2, k3, k1+, k3+, or verl's "
                              "kl, mse, low_var_kl; the full KL goes in the actor loss (kl_loss_estimator='full' "
                              "with kl_loss_coef > 0)")
        try:
            kl_estimator_name(self.kl_estimator)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            kl_estimator_name(self.kl_loss_estimator, full=True)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("kl_estimator", "kl_loss_estimator", 1)) from None
        if self.samples_per_prompt == 0:
            self.samples_per_prompt = GROUP_SIZE if self.algorithm in GROUPED else 1
        if self.minibatch_size % self.micro_batch_size:
            raise ConfigError(f"minibatch_size ({self.minibatch_size}) must be a multiple of "
                              f"micro_batch_size ({self.micro_batch_size})")
        sequences = self.rollout_batch_size * self.samples_per_prompt
        if sequences % self.minibatch_size:
            raise ConfigError(f"rollout_batch_size * samples_per_prompt ({self.rollout_batch_size} * "
                              f"{self.samples_per_prompt} = {sequences} sequences) must be a multiple of "
                              f"minibatch_size ({self.minibatch_size})")
        if self.algorithm in GROUPED and self.samples_per_prompt < 2:
            raise ConfigError(f"algorithm {self.algorithm} compares the completions of one prompt: "
                              f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        from ..arguments import LossOptions
        from ..objectives import LOSS_TYPES

        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        try:
            LossOptions(**self.loss_options())
        except ValueError as exc:
            hint = " (the trainer runs each objective with its default loss_params)" if "loss_params" in str(exc) else ""
            raise ConfigError(f"{exc}{hint}") from None
        if self.resume and not self.run_name:
            raise ConfigError("resume needs run_name: the name of the run to continue")
        if self.batch_invariant:
            key = "CUDA" if _cuda_available() else "CPU"
            missing = _batch_invariant_kernels_missing().get(key)
            if missing is not None:
                raise ConfigError(f"batch_invariant: this run computes on {key} and the mode has no kernels for it "
                                  f"here ({missing}); leave batch_invariant off")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ConfigError(f"old_logprobs must be one of {', '.join(OLD_LOGPROBS)}, got {self.old_logprobs!r}")

    @property
    def old_logprobs_from_rollout(self) -> bool:
        return self.old_logprobs == "rollout" or (self.old_logprobs == "auto" and self.batch_invariant)


def _cuda_available() -> bool:
    import torch  # not at the top: reading a config (--help) does not need it

    return torch.cuda.is_available()


def _batch_invariant_kernels_missing() -> dict[str, str]:
    from ..batch_invariant import kernels_missing

    return kernels_missing()


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


OPTIONAL = " | None"
"""How a field that may be left unset (None, ``none`` on the command line and in YAML, ``null``
in YAML) spells its type."""


def _coerce(name: str, kind: str, value):
    """``value`` as the field's type, or a ConfigError naming the field."""
    if kind.endswith(OPTIONAL):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return _coerce(name, kind[:-len(OPTIONAL)], value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except ValueError:
                pass
        if _whole(value) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind == "int":
        if _whole(value):
            return value
        number = _number(value)
        if number is not None and number.is_integer():
            return int(number)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if kind == "float":
        number = _number(value)
        if number is not None:
            return number
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{name} must be a string, got {type(value).__name__} {value!r} "
                      "(quote it in YAML)")


def _number(value) -> float | None:
    """A finite float from a number or a string that spells one (YAML reads 1e-3 as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _above(low):
    return (lambda v: v > low), f"> {low}"


def _within(low, high):
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


_RANGES = {
    **{name: _at_least(1) for name in (
        "steps", "rollout_batch_size", "max_prompt_len", "max_new_tokens", "kl_horizon",
        "ppo_epochs", "minibatch_size", "micro_batch_size", "max_nonfinite_in_a_row",
        "eval_prompts")},
    "seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
    **{name: _at_least(0) for name in (
        "save_every", "eval_every", "max_gathered_bytes", "warmup_steps", "samples_per_prompt",
        "reward_train_steps", "kl_coef", "score_clip", "value_clip", "entropy_coef", "grad_clip",
        "reward_ensemble_k", "kl_loss_coef", "max_minutes", "kl_budget", "alarm_gold_drop", "kl_proportional")},
    **{name: _above(0) for name in ("temperature", "target_kl", "actor_lr", "critic_lr",
                                     "clip_high")},
    "top_p": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "clip_low": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "gamma": _within(0, 1),
    "lam": _within(0, 1),
    "zero_stage": ((lambda v: v in (0, 1, 2, 3)), "0, 1, 2 or 3"),
    "loss_agg": ((lambda v: v in AGG_MODES or v == ""), f"one of {', '.join(AGG_MODES)}, or empty (the loss "
                 "type's own)"),
    "output_dir": ((lambda v: bool(v)), "a directory"),
    "alarm_length_r2": _within(0, 1),
    "algorithm": ((lambda v: v in ALGORITHMS), f"one of {', '.join(ALGORITHMS)}"),
    "task": ((lambda v: v in TASKS), f"one of {', '.join(TASKS)}"),
}
PPOConfig.RANGES = _RANGES
PPOConfig.RESUMABLE = RESUMABLE


def check_files(config: PPOConfig) -> None:
    """Every file the run will read exists and is whole (model directories: config, weights,
    tokenizer; a reward model's score head; the DeepSpeed config parses), before any model loads;
    a ConfigError names the field and the path."""
    from .modeldir import check_model_dir, load_tokenizer, model_config

    tokenizer = None
    if config.policy_model:
        check_model_dir("policy_model", config.policy_model)
        # Chat prompts become text through the policy's chat template; prompt lengths are
        # counted in its tokens.
        tokenizer = load_tokenizer("policy_model", config.policy_model)
    if config.critic_model and config.algorithm != "ppo":
        raise ConfigError(f"critic_model: algorithm {config.algorithm} is critic-free; no critic is built")
    if config.critic_model:
        check_model_dir("critic_model", config.critic_model)
    if config.policy_model and config.task != "vowels":
        raise ConfigError(f"task: {config.task!r} is an embedded task that brings its own policy; it cannot go "
                          "with policy_model")
    if config.policy_model and not config.prompts_file:
        raise ConfigError("prompts_file is required with policy_model (the prompts to train on)")
    if config.policy_model and not config.reward:
        raise ConfigError("reward is required with policy_model: a reward-model directory, "
                          "module:function, or a weighted list (or pass reward_fn to PPOTrainer "
                          "through Components)")
    check_reward_specs(config, "reward", "gold")
    # Each prompt with max_new_tokens must fit the policy's context.
    if config.policy_model:
        context = getattr(model_config("policy_model", config.policy_model), "max_position_embeddings", None)
        room = dict(max_new_tokens=config.max_new_tokens, context=context, model=f"policy_model {config.policy_model}")
    else:
        from .default_task import CONTEXT, TASKS, char_tokenizer, held_out_prompts, training_prompts

        tokenizer = char_tokenizer(TASKS[config.task].alphabet)
        room = dict(max_new_tokens=config.max_new_tokens, context=CONTEXT, model=f"the {config.task} task's policy")
        if not config.prompts_file:
            check_prompt_lengths("task", f"the {config.task} task's training prompts",
                                 training_prompts(config.task, config.seed), tokenizer, config.max_prompt_len, **room)
        if not config.eval_prompts_file:
            check_prompt_lengths("task", f"the {config.task} task's held-out prompts",
                                 held_out_prompts(config.task, config.seed, config.eval_prompts), tokenizer,
                                 config.max_prompt_len, **room)
    if config.prompts_file:
        check_prompts_file("prompts_file", config.prompts_file, tokenizer, config.max_prompt_len, **room)
    if config.eval_prompts_file:
        check_prompts_file("eval_prompts_file", config.eval_prompts_file, tokenizer, config.max_prompt_len,
                           limit=config.eval_prompts, **room)
    if config.ds_config:
        try:
            ds = json.loads(Path(config.ds_config).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ds_config: cannot read {config.ds_config} as JSON ({exc})") from None
        if not isinstance(ds, dict) or not isinstance(ds.get("optimizer", {}).get("params"), dict):
            raise ConfigError(f"ds_config: {config.ds_config} must be a JSON object with an "
                              "optimizer.params section (the trainer sets its lr there)")
        if not isinstance(ds.get("zero_optimization", {}), dict):
            raise ConfigError(f"ds_config: zero_optimization in {config.ds_config} must be a JSON "
                              "object")


def check_reward_specs(config, *names: str) -> None:
    """Each of the config's reward-spec fields ``names`` that is set names rewards that exist (a
    model directory: a whole reward model)."""
    from .rewards import RewardSpecError, check_spec

    for name in names:
        if getattr(config, name):
            try:
                check_spec(getattr(config, name), name)
            except RewardSpecError as exc:
                raise ConfigError(str(exc)) from None


def check_prompts_file(name: str, path: str, tokenizer, max_prompt_len: int, limit: int | None = None,
                       **room) -> None:
    """The prompts file of field ``name`` reads (chat prompts through ``tokenizer``'s template) and
    its first ``limit`` prompts (all: None) pass :func:`check_prompt_lengths` (``room``: its
    max_new_tokens, context and model); a ConfigError naming the field, the file and the first
    prompt at fault otherwise."""
    from .prompts import load_prompts

    if not Path(path).is_file():
        raise ConfigError(f"{name}: {path} " + ("is a directory, not a file" if Path(path).is_dir()
                                                 else "does not exist"))
    try:
        prompts = load_prompts(path, tokenizer)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    check_prompt_lengths(name, path, prompts[:limit], tokenizer, max_prompt_len, **room)


def check_prompt_lengths(name: str, where: str, prompts: list[str], tokenizer, max_prompt_len: int,
                         max_new_tokens: int = 0, context: int | None = None, model: str = "") -> None:
    """Each prompt (of ``where``: a file, or the prompts a task generates) is at most
    ``max_prompt_len`` tokens, and with ``max_new_tokens`` fits the ``context`` tokens of
    ``model`` (a phrase naming it; no context: no limit), which generation would otherwise refuse
    after the run started; a ConfigError naming field ``name``, the prompt and its row."""
    lengths = [len(tokenizer.encode(prompt, add_special_tokens=True)) for prompt in prompts]
    for row, (prompt, length) in enumerate(zip(prompts, lengths)):
        if length > max_prompt_len:
            raise ConfigError(f"{name}: prompt {row} of {where} ({prompt[:40]!r}) is {length} tokens, longer than "
                              f"max_prompt_len={max_prompt_len}")
    if context is None or not prompts or max(lengths) + max_new_tokens <= context:
        return
    # The longest prompt is the one to name: it sets how many new tokens fit.
    row = max(range(len(prompts)), key=lengths.__getitem__)
    length, over = lengths[row], sum(n + max_new_tokens > context for n in lengths)
    fit = f"at most {context - length} new tokens fit" if context > length else "the prompt alone fills it"
    raise ConfigError(f"{name}: prompt {row} of {where} ({prompts[row][:40]!r}) is {length} tokens; with "
                      f"max_new_tokens={max_new_tokens} its sequences reach {length + max_new_tokens} tokens, "
                      f"beyond the context of {model} ({context} tokens, its max_position_embeddings): {fit} "
                      f"({over} of the {len(prompts)} prompts do not fit)")


def saved_config(run_dir: Path, cls=None):
    """The config a run started with (its ``config.json``, read as ``cls``: PPOConfig by default)."""
    path = Path(run_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
        return (cls or PPOConfig)(**{**data, "resume": False, "overwrite": False})
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"resume: cannot read the run's settings from {path} ({exc}); a resume "
                          "continues a run with the settings it started with") from None


def resumed(given, saved, explicit=None):
    """What a resumed run continues with: the settings it started with, and from ``given`` the
    location and the resumable fields (its class's RESUMABLE). ``explicit``: the fields the user
    set (all of them when None); one of them that is not resumable and differs from the run's is
    an error."""
    fields = [f.name for f in dataclasses.fields(given)]
    own = given.RESUMABLE + tuple(name for name in LOCATION if name in fields)
    names = fields if explicit is None else explicit
    differing = [f"{name}={getattr(given, name)!r} (the run has {getattr(saved, name)!r})"
                 for name in names if name not in own and getattr(given, name) != getattr(saved, name)]
    if differing:
        raise ConfigError(f"resume continues run {given.run_name!r} with the settings it started "
                          f"with; these differ from them: {', '.join(differing)}. Start a new run "
                          f"to change them (resumable: {', '.join(given.RESUMABLE)})")
    keep = [name for name in own if explicit is None or name in explicit or name in LOCATION]
    return dataclasses.replace(saved, **{name: getattr(given, name) for name in keep})


def _read_yaml(path: str):
    """The YAML document in ``path``; a key given twice is an error (PyYAML would keep the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None


@functools.lru_cache(maxsize=None)
def field_docs(cls=None) -> dict[str, str]:
    """Each field's docstring, read from the config class's source (PPOConfig by default)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls or PPOConfig)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def add_arguments(parser, cls=None) -> None:
    """One ``--field-name`` option per field of the config class (PPOConfig by default),
    documented by the field's docstring."""
    cls = cls or PPOConfig
    docs = field_docs(cls)
    parser.add_argument("--config", help="YAML file with any of the fields below")
    types = {"int": int, "float": float, "str": str, "bool": _parse_bool}
    for f in dataclasses.fields(cls):
        kind = f.type.removesuffix(OPTIONAL)
        # An optional field's "none" reaches _coerce as text: argparse's None means "not given".
        parse = str if f.type.endswith(OPTIONAL) else types[kind]
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=parse,
                            default=None, metavar=kind.upper() + ("|none" if f.type.endswith(OPTIONAL) else ""),
                            help=f"{docs.get(f.name, '')} (default: {f.default!r})")


def from_args(args, cls=None):
    """The config (a PPOConfig by default) from ``--config`` and the command line. A resume starts
    from the run's saved settings, and only what was set explicitly (in the YAML or as an option)
    is compared with them."""
    cls = cls or PPOConfig
    explicit = set(_yaml_keys(args.config)) if args.config else set()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                 if getattr(args, f.name, None) is not None}
    config = cls.from_yaml(args.config, **overrides) if args.config else cls(**overrides)
    run_dir = Path(config.output_dir) / config.run_name
    if not (getattr(config, "resume", False) and config.run_name and (run_dir / "config.json").is_file()):
        return config  # the run directory check says what is wrong with a resume
    return resumed(config, saved_config(run_dir, cls), explicit | set(overrides))


def _yaml_keys(path: str) -> list[str]:
    return list(_read_yaml(path) or {})
