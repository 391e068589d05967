"""``ppo-fast``: the command line.

    ppo-fast                 the default job: RLHF with PPO on the embedded default task (CPU, minutes)
    ppo-fast train [--config run.yaml] [--key value ...]
                             the PPO trainer; every PPOConfig field is an option (see train --help);
                             under DeepSpeed: deepspeed --num_gpus N --module ppo_fast.cli train ...
    ppo-fast backends        which backend serves each op on each device, and why
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _build_parser() -> argparse.ArgumentParser:
    from .trainer.config import add_arguments as add_train_arguments

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
                    "(deepspeed --num_gpus N --module ppo_fast.cli train ...)."))
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
    from .distributed import shutdown_distributed
    from .trainer import CheckpointError, ConfigError, TrainingStopped, train
    from .trainer.config import PPOConfig, from_args

    try:
        config = PPOConfig() if args.command is None else from_args(args)
        result = train(config)
    except (ConfigError, CheckpointError) as exc:
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
    # An interrupted run is not a finished one: scripts can tell by the status (as a shell's 130).
    return 130 if "interrupted_at" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
