#!/usr/bin/env bash
# One GPU.       scripts/launch_single_gpu.sh [ppo-fast subcommand] [options...]
# Default subcommand: train. DS_CONFIG overrides the DeepSpeed config (default ZeRO-2, bf16).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/entry.sh"
exec deepspeed --num_gpus 1 "${entry[@]}" \
    --ds-config "${DS_CONFIG:-$here/ds/zero2_gpu_bf16.json}" "$@"
