# Sourced by the launch_*.sh scripts: what every rank runs. A ppo-fast subcommand (default: train)
# runs the package's own entry point; a path to a Python file (benches/rollout.py) runs that file.
command=${1:-train}; shift $(( $# > 0 ? 1 : 0 ))
if [[ $command == *.py ]]; then
    entry=("$command")
else
    entry=(--module ppo_fast.cli "$command")
fi
