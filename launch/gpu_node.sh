#!/usr/bin/env bash
# Trains on one GPU node: ONE process that sees all its GPUs (e.g. 8). The
# mesh spans them all; the batch is split over "data", the frozen model is
# sharded by config.train.sharding (e.g. fsdp for 7-8B models in bfloat16).
#
#   WORKDIR=runs/llama8b bash launch/gpu_node.sh [--setup] [--config.train.steps=500 ...]
#
# --setup    pip install the repo with CUDA 12 jax into the active Python.
# Re-running the same command resumes from the latest checkpoint in WORKDIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-configs/llama3_8b_pod.py}"
WORKDIR="${WORKDIR:-runs/gpu_node}"
PYTHON="${PYTHON:-python3}"

ARGS=()
for a in "$@"; do
  case "$a" in
    --setup) "$PYTHON" -m pip install -q -e "$ROOT" 'jax[cuda12]' ;;
    *) ARGS+=("$a") ;;
  esac
done

cd "$ROOT"
# Let XLA overlap collectives with compute; keep 10% of GPU memory for the host side.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
# One process, all GPUs: the pod config's multihost flag is switched off.
exec "$PYTHON" -m semsafe_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.multihost=False "${ARGS[@]+"${ARGS[@]}"}"
