"""Run by tests/test_faults.py: a training run killed with SIGKILL (as by kill -9) in the middle of
writing a checkpoint, after the actor's files are on disk and before the checkpoint is published.

    python kill_in_save_worker.py '<PPOConfig fields as JSON>' <step whose save is killed>
"""

import json
import os
import signal
import sys

from ppo_fast.trainer import PPOConfig, train
from ppo_fast.trainer.checkpoint import Checkpoints


def main():
    config = PPOConfig(**json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])
    save = Checkpoints.save

    def save_then_die(self, step, actor, critic, state):
        if step == kill_at:
            critic.save_checkpoint = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        return save(self, step, actor, critic, state)

    Checkpoints.save = save_then_die
    train(config)


if __name__ == "__main__":
    main()
