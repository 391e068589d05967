"""The PPO trainer behind ``ppo-fast train``.

* ``config.py``      PPOConfig: every knob, documented, from YAML and the command line
* ``models.py``      actor, critic, reference and reward models, built in one place
* ``prompts.py``     reading, sampling and encoding prompts
* ``loop.py``        PPOTrainer: generate → score → advantages → update, and fault handling
* ``checkpoint.py``  checkpoints with exact resume, and the exported policy
* ``reporting.py``   metrics.jsonl, TensorBoard, progress bar, plot and summary
* ``default_task.py`` the embedded default task
"""

from __future__ import annotations

from .config import PPOConfig
from .loop import PPOTrainer, TrainingStopped
from .models import Components, CriticModel, build_components
from .prompts import load_prompts

__all__ = ["Components", "CriticModel", "PPOConfig", "PPOTrainer", "TrainingStopped",
           "build_components", "load_prompts", "train"]


def train(config: PPOConfig, log=print) -> dict:
    """Build everything and run; returns the summary (see ``summary.json``)."""
    trainer = PPOTrainer(config, build_components(config, log), log=log)
    return trainer.train()
