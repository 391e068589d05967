"""The RLHF pipeline behind ``ppo-fast sft | rm | train | eval``.

* ``config.py``      PPOConfig: every knob, documented, from YAML and the command line (RunConfig:
                     what every command's config shares)
* ``models.py``      actor, critic, reference and reward models, built in one place
* ``rewards.py``     rewards from a spec: reward models, functions, weighted lists, ensembles
* ``prompts.py``     reading, sampling and encoding prompts
* ``data.py``        user data (JSON/JSONL/CSV by Python's parsers, Parquet by pyarrow): SFT
                     examples, preference pairs, prompts, with errors naming the file, row and column
* ``modeldir.py``    model directories checked before a run: config, whole weights, tokenizer, a
                     reward model's trained score head
* ``loop.py``        PPOTrainer: generate → score → advantages (PPO or critic-free) → update, and
                     fault handling
* ``diagnostics.py`` reward-hacking diagnostics and alarms
* ``supervised.py``  ``ppo-fast sft`` and ``ppo-fast rm``
* ``evaluation.py``  ``ppo-fast eval``
* ``rundir.py``      the run directory: never written into by accident
* ``checkpoint.py``  checkpoints that a crash cannot tear and a resume can trust
* ``reporting.py``   metrics.jsonl, TensorBoard, progress bar, plot and summary
* ``default_task.py`` the embedded tasks (vowels, the default; arithmetic; arithmetic-hackable)
"""

from __future__ import annotations

from .checkpoint import CheckpointError
from .config import ConfigError, PPOConfig, check_files
from .loop import PPOTrainer, TrainingStopped
from .models import Components, CriticModel, build_components
from .prompts import load_prompts

__all__ = ["CheckpointError", "Components", "ConfigError", "CriticModel", "PPOConfig",
           "PPOTrainer", "TrainingStopped", "build_components", "load_prompts", "train"]


def train(config: PPOConfig, log=print) -> dict:
    """Build everything and run; returns the summary (see ``summary.json``). The config, the
    files it names and the run directory are checked before any model is built."""
    from ..dispatch import forced_backend
    from ..distributed import init_distributed
    from .rundir import prepare_run_dir, release

    check_files(config)
    try:
        forced_backend()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    init_distributed()
    config = prepare_run_dir(config, log)
    try:
        trainer = PPOTrainer(config, build_components(config, log), log=log)
        return trainer.train()
    finally:
        release(config)
