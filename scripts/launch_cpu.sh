#!/usr/bin/env bash
# CPU only: NUM_RANKS processes on this machine, gloo, each rank bound to its own cores.
#   NUM_RANKS=2 scripts/launch_cpu.sh [subcommand | script.py] [options...]
# Default config: ZeRO-3 in fp32 (DS_CONFIG=scripts/ds/zero2_cpu_fp32.json for ZeRO-2).
# Core binding needs numactl (apt-get install numactl); without it each rank gets an equal
# share of the cores through OMP_NUM_THREADS instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/entry.sh"
ranks=${NUM_RANKS:-2}
export CUDA_VISIBLE_DEVICES=""
bind=()
if command -v numactl >/dev/null; then
    bind=(--bind_cores_to_rank)
else
    echo "launch_cpu.sh: numactl not found, ranks are not bound to cores" >&2
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))}
fi
exec deepspeed --num_gpus "$ranks" "${bind[@]}" "${entry[@]}" \
    --ds-config "${DS_CONFIG:-$here/ds/zero3_cpu_fp32.json}" "$@"
