#!/usr/bin/env bash
# Runs the SAME training command on every worker of a TPU pod slice.
# JAX needs one process per host, all started together; with
# --config.multihost=True each calls jax.distributed.initialize(), which finds
# the other workers through the TPU metadata server.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/llama8b \
#     bash launch/tpu_pod.sh [--setup] [--config.train.steps=500 ...]
#
# --setup    first copy this repo to every worker and pip install it (+ jax[tpu],
#            and gcsfs, which gs:// workdirs go through).
# Extra arguments go to semsafe_jax.main unchanged. Re-running the same
# command resumes from the latest checkpoint in WORKDIR. WORKDIR must be a path
# every host sees: a gs:// URL (every stage reads and writes it through
# etils.epath), or a shared mount such as NFS. Checkpoints are written by all
# hosts, data, logs and reports by host 0.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${WORKDIR:?set WORKDIR (gs://bucket/path, or a directory every worker sees)}"
CONFIG="${CONFIG:-configs/llama3_8b_pod.py}"
REMOTE_DIR="${REMOTE_DIR:-semsafe_jax}"   # relative to each worker's home
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi

SETUP=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --setup) SETUP=1 ;;
    *) ARGS+=("$a") ;;
  esac
done

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}

if [[ "$SETUP" == 1 ]]; then
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  tar -C "$ROOT" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/semsafe_jax.tgz .
  gcloud compute tpus tpu-vm scp /tmp/semsafe_jax.tgz "$TPU_NAME":/tmp/semsafe_jax.tgz \
    --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all
  ssh_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf /tmp/semsafe_jax.tgz && \
    cd ~/$REMOTE_DIR && python3 -m pip install -q -U pip && \
    python3 -m pip install -q -e . 'jax[tpu]' gcsfs"
fi

# Quote each extra argument for the remote shell.
EXTRA=""
for a in "${ARGS[@]+"${ARGS[@]}"}"; do EXTRA+=" $(printf '%q' "$a")"; done

CMD="cd ~/$REMOTE_DIR && python3 -m semsafe_jax.main --config=$(printf '%q' "$CONFIG")"
CMD+=" --workdir=$(printf '%q' "$WORKDIR") --config.multihost=True$EXTRA"
ssh_all "$CMD"
