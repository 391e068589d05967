#!/usr/bin/env bash
# One GPU.       scripts/launch_single_gpu.sh [ppo-fast subcommand] [options...]
# Default subcommand: train. DS_CONFIG overrides the DeepSpeed config (default ZeRO-2, bf16).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command=${1:-train}; shift $(( $# > 0 ? 1 : 0 ))
exec deepspeed --num_gpus 1 --module ppo_fast.cli "$command" \
    --ds-config "${DS_CONFIG:-$here/ds/zero2_gpu_bf16.json}" "$@"
