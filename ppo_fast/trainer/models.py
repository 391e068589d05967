"""Every model of a run, built in one place: the actor and critic as DeepSpeed engines, the
frozen reference and reward models, and the hybrid engine that generates with the actor.

``build_components`` loads what a config names (Hugging Face directories, or the embedded default
task); ``build_models`` wraps it for training.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import ppo_fast as pf

from .checkpoint import install_safe_loading
from .config import ConfigError, PPOConfig, check_files
from .prompts import load_prompts
from .rundir import cache_dir


class CriticModel(nn.Module):
    """A causal-LM trunk with a scalar value head: values ``[B, T]`` for every position."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config
        self.value_head = nn.Linear(trunk.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()


@dataclass
class Components:
    """Everything a run needs besides the config."""

    policy: nn.Module
    """Causal LM to optimise (its weights also initialise the reference)."""
    reference: nn.Module
    """Frozen copy of the initial policy (the KL anchor)."""
    critic: nn.Module | None
    """Value model: ``critic(input_ids, attention_mask, position_ids) -> [B, T]``; None for the
    critic-free algorithms."""
    tokenizer: object
    """Encodes prompts (``encode``), decodes completions (``decode``), knows pad/eos ids."""
    prompts: list[str]
    """Training prompts."""
    reward_model: nn.Module | None = None
    """Sequence classifier giving one score per sequence; or use ``reward_fn``."""
    reward_fn: Callable | None = None
    """``reward_fn(prompts, completions) -> [B] scores`` (texts), instead of a reward model."""
    reward_rule: Callable | None = None
    """``reward_rule(prompt, completion_ids) -> float``: an embedded task's rule reward."""
    gold_fn: Callable | None = None
    """``gold_fn(prompt, completion_ids) -> float``: evaluation only, never optimised."""
    eval_prompts: list[str] = field(default_factory=list)
    """Fixed prompts for the gold / proxy evaluations."""


def _from_directories(config: PPOConfig) -> Components:
    from transformers import AutoModel, AutoModelForCausalLM

    from .modeldir import load_tokenizer
    from .rewards import model_directories, same_vocabulary

    dtype, attn = _dtype_and_attention()
    tokenizer = load_tokenizer("policy_model", config.policy_model)
    # Every model that reads the policy's token ids must share its vocabulary.
    for name in ("reward", "gold"):
        for directory in model_directories(getattr(config, name)) if getattr(config, name) else []:
            reason = same_vocabulary(tokenizer, directory)
            if reason:
                raise ConfigError(f"{name}: {reason}")
    reason = same_vocabulary(tokenizer, config.critic_model, "critic model") if config.critic_model else None
    if reason:
        raise ConfigError(f"critic_model: {reason}")
    load = dict(dtype=dtype, attn_implementation=attn)
    critic = None
    if config.algorithm == "ppo":
        critic = CriticModel(AutoModel.from_pretrained(config.critic_model or config.policy_model, **load))
    return Components(
        policy=AutoModelForCausalLM.from_pretrained(config.policy_model, **load),
        reference=AutoModelForCausalLM.from_pretrained(config.policy_model, **load),
        critic=critic,
        tokenizer=tokenizer,
        prompts=load_prompts(config.prompts_file, tokenizer),
        eval_prompts=(load_prompts(config.eval_prompts_file, tokenizer)[:config.eval_prompts]
                      if config.eval_prompts_file else []),
    )


def _dtype_and_attention():
    from ..hybrid import pick_attn_implementation

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return dtype, pick_attn_implementation(dtype, "cuda" if torch.cuda.is_available() else "cpu")


def _default_task(config: PPOConfig, log) -> Components:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from . import default_task

    task = default_task.TASKS[config.task]
    learned_reward = task.proxy is None and not config.reward
    # Shared by every run with the same recipe, outside any run directory; keyed by what made it.
    # The arithmetic tasks share one warm-up (they differ in the reward only).
    family = config.task.split("-")[0]
    recipe = f"{family}-seed{config.seed}-warmup{config.warmup_steps}"
    if task.proxy is None:
        recipe += f"-rm{config.reward_train_steps}"
    artifacts = cache_dir(config) / "default_task" / recipe
    if torch.distributed.get_rank() == 0 and not artifacts.is_dir():
        _remove_abandoned_builds(artifacts)
        log(f"task {family}: warming up the policy" + (" and training the reward model" if task.proxy is None else "")
            + f" (cached in {artifacts})")
        # Built aside and renamed into place, so a kill leaves no half-built cache entry.
        partial = artifacts.with_name(f".{artifacts.name}.partial-{os.getpid()}")
        default_task.warm_up_policy(config.warmup_steps, config.seed, log, task=family).save_pretrained(
            partial / "policy")
        default_task.char_tokenizer(task.alphabet).save_pretrained(partial / "policy")
        if task.proxy is None:
            default_task.train_reward_model(config.reward_train_steps, config.seed, log).save_pretrained(
                partial / "reward_model")
            default_task.char_tokenizer(task.alphabet).save_pretrained(partial / "reward_model")
        try:
            os.replace(partial, artifacts)
        except OSError:  # another process published the same entry first
            shutil.rmtree(partial)
    torch.distributed.barrier()
    policy = LlamaForCausalLM.from_pretrained(artifacts / "policy")
    prompts = (load_prompts(config.prompts_file) if config.prompts_file
               else default_task.training_prompts(config.task, config.seed))
    eval_prompts = (load_prompts(config.eval_prompts_file)[:config.eval_prompts] if config.eval_prompts_file
                    else default_task.held_out_prompts(config.task, config.seed, config.eval_prompts))
    return Components(
        policy=policy,
        reference=copy.deepcopy(policy),
        critic=CriticModel(copy.deepcopy(policy.model)) if config.algorithm == "ppo" else None,
        reward_model=(LlamaForSequenceClassification.from_pretrained(artifacts / "reward_model")
                      if learned_reward else None),
        reward_rule=task.proxy if not config.reward else None,
        tokenizer=default_task.char_tokenizer(task.alphabet),
        prompts=prompts,
        gold_fn=task.gold,
        eval_prompts=eval_prompts,
    )


def _remove_abandoned_builds(artifacts) -> None:
    """Half-built cache entries of processes that died (their pid is in the name)."""
    for partial in artifacts.parent.glob(f".{artifacts.name}.partial-*"):
        pid = int(partial.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def build_components(config: PPOConfig, log=print) -> Components:
    """Models, tokenizer and prompts from the config: local Hugging Face directories, or the
    embedded default task when ``policy_model`` is empty."""
    from transformers.utils import logging as hf_logging

    from ..distributed import init_distributed

    check_files(config)
    hf_logging.disable_progress_bar()
    init_distributed()
    torch.manual_seed(config.seed)
    return _from_directories(config) if config.policy_model else _default_task(config, log)


@dataclass
class Models:
    actor: object
    """DeepSpeed engine of the policy."""
    critic: object | None
    """DeepSpeed engine of the critic (None: critic-free)."""
    reference: nn.Module
    reward: object
    """What the policy is trained against (:class:`rewards.WeightedSum`)."""
    gold: object | None
    """Evaluation-only reward (:class:`rewards.WeightedSum`), when there is one."""
    hybrid: pf.HybridEngine
    """Generates with the actor's weights (gathered once per rollout under ZeRO-3)."""
    device: torch.device


def ds_config(config: PPOConfig, lr: float) -> dict:
    from ..distributed import default_ds_config

    if config.ds_config:
        with open(config.ds_config) as f:
            ds = json.load(f)
        ds["optimizer"]["params"]["lr"] = lr
    else:
        ds = default_ds_config(stage=config.zero_stage, micro_batch_size=config.micro_batch_size,
                               lr=lr, grad_clip=config.grad_clip)
    ds["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    ds["gradient_accumulation_steps"] = config.minibatch_size // config.micro_batch_size
    ds.pop("train_batch_size", None)
    return ds


def _frozen(model: nn.Module, actor, config: PPOConfig, device: torch.device) -> nn.Module:
    """Inference-only model: a ZeRO-3 engine when training is ZeRO-3 (parameters partitioned,
    and offloaded to CPU memory with offload_frozen), else the plain module in the actor's
    dtype."""
    model.requires_grad_(False).eval()
    if actor.zero_optimization_stage() == 3 or config.offload_frozen:
        import deepspeed

        zero = {"stage": 3}
        if config.offload_frozen:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        engine, *_ = deepspeed.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": config.micro_batch_size,
            "zero_optimization": zero,
            "bf16": {"enabled": torch.cuda.is_available()}})
        return engine.module
    return model.to(device=device, dtype=next(actor.module.parameters()).dtype)


def build_models(config: PPOConfig, components: Components) -> Models:
    import deepspeed

    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                          else "cpu")
    actor, *_ = deepspeed.initialize(model=components.policy,
                                     config=ds_config(config, config.actor_lr),
                                     model_parameters=components.policy.parameters())
    critic = None
    if config.algorithm == "ppo":
        if components.critic is None:
            raise ValueError("algorithm ppo needs a critic (Components.critic)")
        critic, *_ = deepspeed.initialize(model=components.critic,
                                          config=ds_config(config, config.critic_lr),
                                          model_parameters=components.critic.parameters())
    for engine in (actor, critic):
        if engine is not None:
            install_safe_loading(engine)
    hybrid = pf.HybridEngine(actor, components.tokenizer, max_new_tokens=config.max_new_tokens,
                             do_sample=True, temperature=config.temperature, top_p=config.top_p,
                             max_gathered_bytes=config.max_gathered_bytes or None)
    reference = _frozen(components.reference, actor, config, device)
    return Models(actor=actor, critic=critic, hybrid=hybrid, reference=reference,
                  reward=_reward(config, components, actor, device), gold=_gold(config, components, actor, device),
                  device=device)


def _load_reward_model(config, actor, device, field_name: str):
    from .modeldir import load_reward_model

    def load(directory: str) -> nn.Module:
        dtype, attn = _dtype_and_attention()
        return _frozen(load_reward_model(field_name, directory, dtype=dtype, attn_implementation=attn), actor,
                       config, device)

    return load


def _reward(config: PPOConfig, components: Components, actor, device):
    """The trained-against reward: the config's spec, else what the components bring."""
    from . import rewards

    if config.reward:
        return rewards.build(config.reward, load_model=_load_reward_model(config, actor, device, "reward"),
                             ensemble_k=config.reward_ensemble_k)
    if components.reward_model is not None:
        term = rewards.ModelReward(_frozen(components.reward_model, actor, config, device), "reward_model")
    elif components.reward_fn is not None:
        term = rewards.FunctionReward(components.reward_fn, "reward_fn")
    elif components.reward_rule is not None:
        term = rewards.TokenReward(components.reward_rule, f"{config.task} reward")
    else:
        raise ValueError("a run needs a reward: the reward field, or a reward_model, reward_fn or "
                         "reward_rule in its Components")
    return rewards.WeightedSum([(1.0, term)])


def _gold(config: PPOConfig, components: Components, actor, device):
    from . import rewards

    if config.gold:
        return rewards.build(config.gold, load_model=_load_reward_model(config, actor, device, "gold"),
                             ensemble_k=config.reward_ensemble_k)
    if components.gold_fn is not None:
        return rewards.WeightedSum([(1.0, rewards.TokenReward(components.gold_fn, "gold"))])
    return None
