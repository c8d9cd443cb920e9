#!/usr/bin/env bash
# Run ssb_jax on every worker of a Cloud TPU VM slice (one JAX process per worker host).
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE [CONFIG] [extra --config.key=value ...]
#   e.g. launch/tpu_pod.sh ssb-v4 us-central2-b v4-32 configs/qwen3b.py --config.mesh.data=2
#
# Creates the slice if it does not exist (set TPU_VERSION to choose the runtime), copies this
# checkout to all workers, installs it with the TPU extra, runs the pipeline on all of them
# (jax.distributed initializes itself on TPU VMs), then copies the run directory back from worker 0.
#
# A slice with more than one worker (v4-16 and up) needs a run directory that every worker sees:
# set BUCKET=gs://your-bucket to mount it with gcsfuse at /mnt/ssb on all workers (the run goes to
# /mnt/ssb/runs/<config>), or set WORKDIR to an NFS/Filestore path mounted everywhere. The pipeline
# checks this at start and stops with a clear error otherwise.
set -euo pipefail
NAME=${1:?slice name}; ZONE=${2:?zone}; TYPE=${3:?accelerator type, e.g. v4-32}
CONFIG=${4:-configs/qwen3b.py}; shift $(( $# < 4 ? $# : 4 ))
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
WORKDIR=${WORKDIR:-runs/$(basename "$CONFIG" .py)}
REMOTE_DIR=ssb_jax
tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }

if ! tpu describe "$NAME" >/dev/null 2>&1; then
  echo "creating $TYPE slice $NAME in $ZONE"
  tpu create "$NAME" --accelerator-type "$TYPE" --version "$TPU_VERSION"
fi

echo "copying the checkout to every worker"
tar czf /tmp/ssb_jax_src.tgz --exclude .git --exclude runs --exclude '*.egg-info' .
tpu scp /tmp/ssb_jax_src.tgz "$NAME:/tmp/ssb_jax_src.tgz" --worker=all
tpu ssh "$NAME" --worker=all --command \
  "mkdir -p $REMOTE_DIR && tar xzf /tmp/ssb_jax_src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"

if [[ -n "${BUCKET:-}" ]]; then
  echo "mounting $BUCKET at /mnt/ssb on every worker"
  tpu ssh "$NAME" --worker=all --command \
    "sudo mkdir -p /mnt/ssb && sudo chown \$USER /mnt/ssb && (mountpoint -q /mnt/ssb || gcsfuse --implicit-dirs ${BUCKET#gs://} /mnt/ssb)"
  WORKDIR=/mnt/ssb/runs/$(basename "$CONFIG" .py)
fi

echo "running $CONFIG on all workers"
tpu ssh "$NAME" --worker=all --command \
  "cd $REMOTE_DIR && python3 -m ssb_jax.main --config $CONFIG --config.workdir=$WORKDIR $*"

echo "collecting $WORKDIR from worker 0"
mkdir -p "$(dirname "$WORKDIR")"
tpu ssh "$NAME" --worker=0 --command "cd $REMOTE_DIR && tar czf /tmp/ssb_run.tgz $WORKDIR"
tpu scp "$NAME:/tmp/ssb_run.tgz" /tmp/ssb_run.tgz --worker=0
tar xzf /tmp/ssb_run.tgz
echo "done: $WORKDIR (delete the slice with: gcloud compute tpus tpu-vm delete $NAME --zone $ZONE)"
