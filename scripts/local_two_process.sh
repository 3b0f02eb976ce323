#!/bin/bash
# Try a multi-process run on one machine: 2 processes with 2 CPU devices each.
#   bash scripts/local_two_process.sh DATA WORKDIR [train flags]
set -euo pipefail
DATA=${1:?usage: scripts/local_two_process.sh DATA WORKDIR [train flags]}
WORKDIR=${2:?}
shift 2
PORT=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu
pids=()
for i in 0 1; do
  deepcad-jax train --data "$DATA" --workdir "$WORKDIR" --coordinator 127.0.0.1:$PORT \
    --num-processes 2 --process-id $i "$@" &
  pids+=($!)
done
trap 'kill ${pids[@]} 2>/dev/null' EXIT
wait "${pids[@]}"
