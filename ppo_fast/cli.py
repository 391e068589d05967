"""``ppo-fast``: the command line.

    ppo-fast                 the default job: RLHF with PPO on the embedded default task (CPU, minutes)
    ppo-fast train [--config run.yaml] [--key value ...]
                             the PPO trainer; every PPOConfig field is an option (see train --help);
                             under DeepSpeed: deepspeed --num_gpus N --module ppo_fast.cli train ...
    ppo-fast sft --model DIR --data FILE [--key value ...]
                             supervised fine-tuning of a causal LM (see sft --help); writes <run>/model
    ppo-fast rm --model DIR --data FILE [--key value ...]
                             a reward model from preference pairs (see rm --help); writes <run>/model
    ppo-fast eval --policy DIR [--reference DIR] --prompts FILE [--reward SPEC] [--gold SPEC]
                             a policy on held-out prompts: every reward, win rate against the
                             reference, length and diversity, KL; writes samples.jsonl, summary.json
    ppo-fast backends        which backend serves each op on each device, and why
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _build_parser() -> argparse.ArgumentParser:
    from .trainer.config import add_arguments as add_train_arguments
    from .trainer.evaluation import EvalConfig
    from .trainer.supervised import RMConfig, SFTConfig

    parser = argparse.ArgumentParser(prog="ppo-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ppo-fast {__version__}")
    # The deepspeed launcher passes --local_rank before the subcommand; the env var LOCAL_RANK
    # carries the same value, so it is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("backends", help="which backend serves each op on each device, and why")
    add_train_arguments(sub.add_parser(
        "train", help="RLHF with PPO (default: the embedded task)",
        description="RLHF with PPO. Runs as one process or under the deepspeed launcher "
                    "(deepspeed --num_gpus N --module ppo_fast.cli train ...). Ctrl-C saves a "
                    "checkpoint; --run-name NAME --resume true continues a stopped run."))
    add_train_arguments(sub.add_parser(
        "sft", help="supervised fine-tuning of a causal LM on prompt/response data",
        description="Supervised fine-tuning: the loss on the response tokens of prompt/response or "
                    "chat records. Runs as one process or under the deepspeed launcher. Ctrl-C saves "
                    "a checkpoint; --run-name NAME --resume true continues a stopped run."), SFTConfig)
    add_train_arguments(sub.add_parser(
        "rm", help="reward model (Bradley-Terry) from preference pairs",
        description="A reward model trained on chosen/rejected pairs. Runs as one process or under "
                    "the deepspeed launcher. Ctrl-C saves a checkpoint; --run-name NAME --resume true "
                    "continues a stopped run."), RMConfig)
    add_train_arguments(sub.add_parser(
        "eval", help="evaluate a policy on held-out prompts against a reference",
        description="Generate on held-out prompts, score with every reward and a gold function, win "
                    "rate against a reference policy, length and diversity statistics, KL. One "
                    "process; no checkpoints: its files are written when it ends."), EvalConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "backends":
        from .dispatch import describe

        try:
            print(describe())
        except ValueError as exc:  # an unknown PPO_FAST_BACKEND
            print(f"ppo-fast: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command in ("sft", "rm", "eval"):
        return _one_command(args)
    from .distributed import shutdown_distributed
    from .trainer import CheckpointError, ConfigError, TrainingStopped, train
    from .trainer.config import PPOConfig, from_args
    from .trainer.rewards import RewardError

    try:
        config = PPOConfig() if args.command is None else from_args(args)
        result = train(config)
    except (ConfigError, CheckpointError, RewardError) as exc:
        # Raised on every rank alike (decisions are collective), before or instead of any work.
        print(f"ppo-fast: {exc}", file=sys.stderr)
        shutdown_distributed()
        return 2
    except TrainingStopped as exc:
        # Every rank stops on the same step (the decision is collective), so all get here.
        print(exc, file=sys.stderr)
        shutdown_distributed()
        return 3
    shutdown_distributed()
    # An interrupted run is not a finished one, nor is one an alarm stopped: scripts can tell by
    # the status (as a shell's 130 after Ctrl-C; 3 as for a run stopped on non-finite losses).
    if "interrupted_at" in result:
        return 130
    return 3 if result.get("stopped_by") == "alarm" else 0


def _one_command(args) -> int:
    from .distributed import shutdown_distributed
    from .trainer.checkpoint import CheckpointError
    from .trainer.config import ConfigError, from_args
    from .trainer.evaluation import EvalConfig, evaluate
    from .trainer.rewards import RewardError
    from .trainer.supervised import RMConfig, SFTConfig, run_rm, run_sft

    config_class, run = {"sft": (SFTConfig, run_sft), "rm": (RMConfig, run_rm),
                         "eval": (EvalConfig, evaluate)}[args.command]
    try:
        result = run(from_args(args, config_class))
    except (ConfigError, CheckpointError, RewardError) as exc:
        # Raised on every rank alike (every rank reads the same files and checkpoints), before
        # any training.
        print(f"ppo-fast: {exc}", file=sys.stderr)
        shutdown_distributed()
        return 2
    except KeyboardInterrupt:
        if args.command == "eval":
            raise
        return 130  # a second Ctrl-C, or one while the model loads: the run has said what it kept
    shutdown_distributed()
    # As train: an interrupted run is not a finished one (130, a shell's status after Ctrl-C).
    return 130 if "interrupted_at" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
