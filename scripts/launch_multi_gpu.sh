#!/usr/bin/env bash
# Several GPUs on one node.   NUM_GPUS=8 scripts/launch_multi_gpu.sh [subcommand | script.py] [options...]
# Default: all visible GPUs, ZeRO-3 in bf16 (DS_CONFIG=scripts/ds/zero3_offload_gpu_bf16.json
# offloads parameters and optimizer state to CPU memory when the model does not fit).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/entry.sh"
gpus=${NUM_GPUS:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
exec deepspeed --num_gpus "$gpus" "${entry[@]}" \
    --ds-config "${DS_CONFIG:-$here/ds/zero3_gpu_bf16.json}" "$@"
