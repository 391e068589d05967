"""Run by tests/test_trainer.py under ``deepspeed --num_gpus 2``: faults seen by one rank only must
stop both ranks together (no rank may wait forever in a collective).

--mode nan:        rank 1's actor loss turns NaN from its 5th micro-batch on.
--mode interrupt:  rank 1 alone receives SIGINT during step 2.
--mode terminate:  rank 1 alone receives SIGINT then SIGTERM during step 2 (what a Ctrl-C under the
                   deepspeed launcher sends), which must not abort the save.
Each rank writes <out>/rank<r>.json with what happened.
"""

import argparse
import json
import os
import signal

from helpers import poison_actor_loss
from ppo_fast.distributed import shutdown_distributed
from ppo_fast.trainer import PPOConfig, PPOTrainer, TrainingStopped, build_components


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["nan", "interrupt", "terminate"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    config = PPOConfig(output_dir=args.out, run_name="run", steps=6, save_every=100,
                       warmup_steps=30, reward_train_steps=60, rollout_batch_size=16,
                       minibatch_size=8, micro_batch_size=8, eval_prompts=16, eval_every=100,
                       max_nonfinite_in_a_row=2)
    trainer = PPOTrainer(config, build_components(config))
    rank = trainer.rank
    if rank == 1 and args.mode == "nan":
        poison_actor_loss(after=4)
    if rank == 1 and args.mode in ("interrupt", "terminate"):
        real_step = trainer.one_step

        def step_then_signal():
            row = real_step()
            if trainer.step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                if args.mode == "terminate":
                    os.kill(os.getpid(), signal.SIGTERM)
            return row

        trainer.one_step = step_then_signal
    result = {"rank": rank}
    try:
        result["returned"] = trainer.train()
    except TrainingStopped as exc:
        result["stopped"] = str(exc)
    result["step"] = trainer.step
    latest = trainer.checkpoints.directory / "latest"
    result["latest"] = latest.read_text() if latest.exists() else None
    result["nonfinite_total"] = trainer.nonfinite_total
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
