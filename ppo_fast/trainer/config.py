"""PPOConfig: every knob of a run, with a docstring per field.

Loaded from YAML (``--config run.yaml``) and overridden from the command line (``--key value``,
``--ppo-epochs 2``); ``ppo-fast train --help`` lists every field with its docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass


@dataclass
class PPOConfig:
    # --- run ---------------------------------------------------------------------------------
    run_name: str = "default"
    """Name of the run; its files go to <output_dir>/<run_name>/."""
    output_dir: str = "runs"
    """Directory that holds run directories."""
    seed: int = 0
    """Seed for prompts, sampling and model initialisation."""
    resume: bool = False
    """Continue from the last checkpoint in the run directory (after Ctrl-C or kill -9 too)."""

    # --- models ------------------------------------------------------------------------------
    policy_model: str = ""
    """Hugging Face causal-LM directory for the policy (and the reference); empty: the embedded
    default task builds a tiny Llama-style model from a config."""
    critic_model: str = ""
    """Causal-LM directory whose trunk the critic uses (a value head is added); empty: the
    policy's."""
    reward_model: str = ""
    """AutoModelForSequenceClassification directory; empty with the default task: a reward model
    trained on synthetic preferences. A Python callable can be passed to the trainer instead."""
    prompts_file: str = ""
    """Text file with one prompt per line (or JSONL with a "prompt" field); empty: the default
    task's synthetic prompts."""

    # --- rollout -----------------------------------------------------------------------------
    steps: int = 40
    """PPO steps (rollout + update)."""
    rollout_batch_size: int = 32
    """Prompts per rollout on each rank."""
    max_prompt_len: int = 16
    """Prompts longer than this many tokens are an error."""
    max_new_tokens: int = 12
    """Tokens generated per prompt."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (1: off)."""

    # --- rewards and advantages --------------------------------------------------------------
    kl_coef: float = 0.1
    """Initial β of the KL penalty in the reward (-β·KL per token)."""
    kl_estimator: str = "k1"
    """Estimator of the per-token KL in the reward (k1, abs, k2, k3)."""
    adaptive_kl: bool = True
    """Adapt β towards target_kl (Ziegler et al. 2019); False keeps it fixed."""
    target_kl: float = 6.0
    """KL per sequence (nats) the adaptive controller steers towards."""
    kl_horizon: int = 320
    """Horizon of the adaptive KL controller, in samples."""
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
    clip_low: float = 0.2
    """PPO ratio clip below 1."""
    clip_high: float = 0.28
    """PPO ratio clip above 1 (DAPO's clip-higher when above clip_low)."""
    value_clip: float = 0.2
    """Value-function clip around the old values (0: off)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    loss_agg: str = "token-mean"
    """Loss aggregation (token-mean, seq-mean-token-mean, ...)."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
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
    """Checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    eval_every: int = 5
    """Measure the proxy reward (and the gold reward, when a gold function exists) on the
    evaluation prompts every this many steps."""
    eval_prompts: int = 64
    """Prompts per gold-reward evaluation."""

    # --- embedded default task ---------------------------------------------------------------
    warmup_steps: int = 150
    """Supervised warm-up steps of the default policy."""
    reward_train_steps: int = 300
    """Training steps of the default reward model on synthetic preference pairs."""

    @classmethod
    def from_yaml(cls, path: str) -> "PPOConfig":
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=None)
def field_docs() -> dict[str, str]:
    """Each field's docstring, read from this class's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(PPOConfig)))
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


def add_arguments(parser) -> None:
    """One ``--field-name`` option per config field, documented by the field's docstring."""
    docs = field_docs()
    parser.add_argument("--config", help="YAML file with any of the fields below")
    types = {"int": int, "float": float, "str": str, "bool": _parse_bool}
    for f in dataclasses.fields(PPOConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=types[f.type],
                            default=None, metavar=f.type.upper(),
                            help=f"{docs.get(f.name, '')} (default: {f.default!r})")


def from_args(args) -> PPOConfig:
    config = PPOConfig.from_yaml(args.config) if args.config else PPOConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PPOConfig)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(config, **overrides)
