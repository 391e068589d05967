"""``ppo-fast``: the command line.

    ppo-fast                 the default job: RLHF with PPO on the embedded default task (CPU, minutes)
    ppo-fast train [--config run.yaml] [--key value ...]
                             the PPO trainer; every PPOConfig field is an option (see train --help)
    ppo-fast demo [--key v]  the ops alone: PPO on a toy policy in seconds
    ppo-fast rollout [...]   generate with the hybrid engine under DeepSpeed, and time it
                             (deepspeed --num_gpus 2 --module ppo_fast.cli rollout --compare)
    ppo-fast backends        which backend serves each device, and why
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import __version__


def _add_config_options(parser: argparse.ArgumentParser, config_cls) -> None:
    for field in dataclasses.fields(config_cls):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=field.type
                            if callable(field.type) else type(field.default),
                            default=field.default, help=f"(default: {field.default})")


def _build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig

    parser = argparse.ArgumentParser(prog="ppo-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ppo-fast {__version__}")
    # The deepspeed launcher passes --local_rank before the subcommand; the env var LOCAL_RANK
    # carries the same value, so it is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="PPO on a toy policy with ppo_fast's ops (CPU, seconds)")
    _add_config_options(demo, DemoConfig)
    sub.add_parser("backends", help="which backend serves each device, and why")
    from .rollout import add_arguments

    add_arguments(sub.add_parser("rollout", help="hybrid-engine rollouts under DeepSpeed, timed"))
    from .trainer.config import add_arguments as add_train_arguments

    add_train_arguments(sub.add_parser(
        "train", help="RLHF with PPO (default: the embedded task)",
        description="RLHF with PPO. Runs as one process or under the deepspeed launcher "
                    "(deepspeed --num_gpus N --module ppo_fast.cli train ...)."))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "backends":
        import torch

        from . import backend

        for device in ("cpu", "cuda"):
            for name, reason in backend.reasons(torch.device(device)).items():
                print(f"{device:5} {name:10} {reason or 'available'}")
        return 0
    if args.command in (None, "train"):
        from .trainer import TrainingStopped, train
        from .trainer.config import PPOConfig, from_args

        from .distributed import shutdown_distributed

        config = PPOConfig() if args.command is None else from_args(args)
        try:
            train(config)
        except TrainingStopped as exc:
            # Every rank stops on the same step (the decision is collective), so all get here.
            print(exc, file=sys.stderr)
            shutdown_distributed()
            return 3
        shutdown_distributed()
        return 0
    if args.command == "rollout":
        from .distributed import shutdown_distributed
        from .rollout import run as rollout

        rollout(args)
        shutdown_distributed()
        return 0
    from .demo import DemoConfig, run

    config = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    summary = run(config)
    return 0 if summary["score_after"] > summary["score_before"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
