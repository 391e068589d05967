"""The PPO trainer: ``ppo-fast train`` (see :mod:`ppo_fast.trainer.ppo` for the loop)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .config import PPOConfig
from .ppo import Components, CriticModel, PPOTrainer, TrainingStopped, load_prompts

__all__ = ["Components", "CriticModel", "PPOConfig", "PPOTrainer", "TrainingStopped",
           "build_components", "train"]


def _from_directories(config: PPOConfig) -> Components:
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    from ..hybrid import pick_attn_implementation

    if not config.prompts_file:
        raise ValueError("prompts_file is required with policy_model (one prompt per line)")
    if not config.reward_model:
        raise ValueError("reward_model is required with policy_model (or pass reward_fn to "
                         "PPOTrainer through Components)")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    attn = pick_attn_implementation(dtype, "cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(config.policy_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    load = dict(dtype=dtype, attn_implementation=attn)
    return Components(
        policy=AutoModelForCausalLM.from_pretrained(config.policy_model, **load),
        reference=AutoModelForCausalLM.from_pretrained(config.policy_model, **load),
        critic=CriticModel(AutoModel.from_pretrained(config.critic_model or config.policy_model, **load)),
        reward_model=AutoModelForSequenceClassification.from_pretrained(config.reward_model, **load),
        tokenizer=tokenizer,
        prompts=load_prompts(config.prompts_file),
    )


def _default_task(config: PPOConfig, log) -> Components:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from . import default_task as task

    # Keyed by what made them, so a rerun with another seed does not reuse them.
    artifacts = (Path(config.output_dir) / config.run_name / "default_task"
                 / f"seed{config.seed}-warmup{config.warmup_steps}-rm{config.reward_train_steps}")
    rank = torch.distributed.get_rank()
    if rank == 0 and not (artifacts / "reward_model" / "config.json").exists():
        log("default task: warming up the policy and training the reward model "
            f"(saved to {artifacts})")
        task.warm_up_policy(config.warmup_steps, config.seed, log).save_pretrained(artifacts / "policy")
        task.train_reward_model(config.reward_train_steps, config.seed, log).save_pretrained(
            artifacts / "reward_model")
        for name in ("policy", "reward_model"):
            task.char_tokenizer().save_pretrained(artifacts / name)
    torch.distributed.barrier()
    policy = LlamaForCausalLM.from_pretrained(artifacts / "policy")
    prompts = (load_prompts(config.prompts_file) if config.prompts_file
               else task.make_prompts(4096, config.seed))
    return Components(
        policy=policy,
        reference=copy.deepcopy(policy),
        critic=CriticModel(copy.deepcopy(policy.model)),
        reward_model=LlamaForSequenceClassification.from_pretrained(artifacts / "reward_model"),
        tokenizer=task.char_tokenizer(),
        prompts=prompts,
        gold_fn=task.gold_reward,
        eval_prompts=task.make_prompts(config.eval_prompts, config.seed + 999),
    )


def build_components(config: PPOConfig, log=print) -> Components:
    """Models, tokenizer and prompts from the config: local Hugging Face directories, or the
    embedded default task when ``policy_model`` is empty."""
    from ..distributed import init_distributed

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    init_distributed()
    torch.manual_seed(config.seed)
    return _from_directories(config) if config.policy_model else _default_task(config, log)


def train(config: PPOConfig, log=print) -> dict:
    """Build everything and run; returns the summary (see ``summary.json``)."""
    trainer = PPOTrainer(config, build_components(config, log), log=log)
    return trainer.train()
