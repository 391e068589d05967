#!/usr/bin/env bash
# Several nodes. Run on node 0; DeepSpeed reaches the others over passwordless ssh.
#   HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 scripts/launch_multi_node.sh [subcommand | script.py] [options...]
# hostfile lines look like "node-0 slots=8". The package must be installed on every node, at the
# same path. NUM_NODES limits the nodes used (default: all in the hostfile).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/entry.sh"
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines: <host> slots=<gpus>)}"
: "${MASTER_ADDR:?set MASTER_ADDR to an address of node 0 that the other nodes can reach}"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" --num_nodes "${NUM_NODES:--1}" \
    "${entry[@]}" \
    --ds-config "${DS_CONFIG:-$here/ds/zero3_gpu_bf16.json}" "$@"
