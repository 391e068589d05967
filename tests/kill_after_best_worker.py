"""Run by tests/test_faults.py: a training run killed with SIGKILL (as by kill -9) right after it
publishes a new best policy (best_policy/) at a step after a given checkpoint, before its next
checkpoint.

    python kill_after_best_worker.py '<PPOConfig fields as JSON>' <step of the last checkpoint>
"""

import json
import os
import signal
import sys

from ppo_fast.trainer import PPOConfig, PPOTrainer, train


def main():
    config = PPOConfig(**json.loads(sys.argv[1]))
    checkpointed = int(sys.argv[2])
    keep_best = PPOTrainer._keep_best

    def keep_best_then_die(self, *args):
        best = self.run_dir / "best_policy"
        before = best.stat().st_ino if best.exists() else None
        keep_best(self, *args)
        # A new best_policy/ is a new directory renamed into place.
        if self.step > checkpointed and best.exists() and best.stat().st_ino != before:
            os.kill(os.getpid(), signal.SIGKILL)

    PPOTrainer._keep_best = keep_best_then_die
    train(config)


if __name__ == "__main__":
    main()
