#!/usr/bin/env bash
# Run ssb_jax on every worker of a Cloud TPU VM slice (one JAX process per worker host).
#
#   launch/tpu_pod.sh [--dry-run] NAME ZONE ACCELERATOR_TYPE [CONFIG] [extra --config.key=value ...]
#   launch/tpu_pod.sh [--dry-run] attach NAME ZONE     # follow worker 0's log again (after a dropped ssh)
#   launch/tpu_pod.sh [--dry-run] fetch NAME ZONE      # copy the run directory back from worker 0
#   e.g. launch/tpu_pod.sh ssb-v4 us-central2-b v4-32 configs/qwen3b.py --config.mesh.data=4 --config.train.batch_size=16
#
# Creates the slice if it does not exist, with the runtime image of its generation (v4 and older:
# tpu-ubuntu2204-base, v5e/v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e;
# TPU_VERSION overrides). Copies this checkout to all workers, installs Python 3.11 with uv and the
# package with the TPU extra into ~/ssb_venv, starts the pipeline detached (setsid nohup; the log is
# ~/ssb_run.log on each worker) on all of them at once (jax.distributed initializes itself from the
# TPU metadata), follows worker 0's log until the run ends, then copies the run directory back to
# ./runs/. If the ssh drops the run goes on: `attach` follows it again, `fetch` collects it.
#
# A slice with more than one worker (v4-16 and up) needs a run directory that every worker sees:
# set BUCKET=gs://your-bucket to mount it with gcsfuse at /mnt/ssb on all workers (the run goes to
# /mnt/ssb/runs/<config>), or set WORKDIR to an absolute NFS/Filestore path mounted everywhere (and
# SHARED_DIR to a directory there for the model). With a shared directory worker 0 downloads the
# model once (MODEL: hub id, default the config's c.model.path; MODEL=none: no download) into
# SHARED/models/<id> and every worker loads it from there. The pipeline checks the run directory is
# shared at start and stops with a clear error otherwise.
#
# --dry-run prints every command (gcloud, tar, ...) instead of running it and needs no gcloud.
set -euo pipefail

usage() {  # the comment block at the top of this file
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'
}
if [[ $# == 0 || ${1:-} == -h || ${1:-} == --help ]]; then usage; exit $(( $# == 0 ? 2 : 0 )); fi

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if [[ $# == 0 ]]; then usage >&2; exit 2; fi

quote() {  # the arguments as one shell line
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
say() { echo "$*" >&2; }  # progress messages: stderr, so that a dry run's stdout is the commands alone
run() { if (( DRY_RUN )); then quote "$@"; else "$@"; fi; }
tpu() { run gcloud compute tpus tpu-vm "$1" "${@:2}" --zone "$ZONE"; }

LOG="\$HOME/ssb_run.log"  # expanded on the workers
follow() {  # worker 0's log from the start until its run ends
  say "following worker 0's log (Ctrl-C stops following, not the run; re-attach: $0 attach $NAME $ZONE)"
  tpu ssh "$NAME" --worker=0 --command \
    "tail -n +1 --pid=\$(cat \$HOME/ssb_run.pid) -F $LOG; echo \"exit status: \$(cat \$HOME/ssb_run.rc 2>/dev/null || echo running)\""
}
fetch() {  # worker 0's run directory into ./runs/<its name>
  local dest=${FETCH_DIR:-runs}
  say "collecting the run directory from worker 0 into $dest/"
  tpu ssh "$NAME" --worker=0 --command \
    "W=\$(cat \$HOME/ssb_run.workdir) && tar czf /tmp/ssb_run.tgz -C \"\$(dirname \"\$W\")\" \"\$(basename \"\$W\")\""
  tpu scp "$NAME:/tmp/ssb_run.tgz" /tmp/ssb_run.tgz --worker=0
  run mkdir -p "$dest"
  run tar xzf /tmp/ssb_run.tgz -C "$dest"
}

case ${1:-} in
  attach|fetch)
    ACTION=$1; NAME=${2:?slice name}; ZONE=${3:?zone}
    if [[ $ACTION == attach ]]; then follow; else fetch; fi
    exit 0 ;;
esac

if (( $# < 3 )); then say "error: NAME ZONE ACCELERATOR_TYPE are required"; usage >&2; exit 2; fi
NAME=$1; ZONE=$2; TYPE=$3
CONFIG=${4:-configs/qwen3b.py}; shift $(( $# < 4 ? $# : 4 ))
EXTRA=("$@")

case $TYPE in
  v6e*) IMAGE=v2-alpha-tpuv6e ;;
  v5p*) IMAGE=v2-alpha-tpuv5 ;;
  v5litepod*|v5e*) IMAGE=v2-alpha-tpuv5-lite ;;
  *) IMAGE=tpu-ubuntu2204-base ;;  # v4 and older
esac
TPU_VERSION=${TPU_VERSION:-$IMAGE}
REMOTE_DIR="\$HOME/ssb_jax"  # expanded on the workers
VENV="\$HOME/ssb_venv"
SHARED=${SHARED_DIR:-}
if [[ -n ${BUCKET:-} ]]; then
  SHARED=/mnt/ssb
  WORKDIR=${WORKDIR:-/mnt/ssb/runs/$(basename "$CONFIG" .py)}
fi
WORKDIR=${WORKDIR:-runs/$(basename "$CONFIG" .py)}
# A relative run directory lives in the checkout on each worker; an absolute one stays as it is.
if [[ $WORKDIR == /* ]]; then REMOTE_WORKDIR=$WORKDIR; else REMOTE_WORKDIR=$REMOTE_DIR/$WORKDIR; fi

if (( DRY_RUN )); then
  tpu describe "$NAME"
  say "# (dry run: assuming the slice does not exist yet)"
  tpu create "$NAME" --accelerator-type "$TYPE" --version "$TPU_VERSION"
elif ! tpu describe "$NAME" >/dev/null 2>&1; then
  say "creating $TYPE slice $NAME in $ZONE ($TPU_VERSION)"
  tpu create "$NAME" --accelerator-type "$TYPE" --version "$TPU_VERSION"
fi

say "copying the checkout to every worker and installing it"
run tar czf /tmp/ssb_jax_src.tgz --exclude .git --exclude runs --exclude .venv --exclude '*.egg-info' .
tpu scp /tmp/ssb_jax_src.tgz "$NAME:/tmp/ssb_jax_src.tgz" --worker=all
# The images ship Python 3.10; current JAX wants 3.11 or newer: uv brings its own into a venv.
tpu ssh "$NAME" --worker=all --command "set -e; mkdir -p $REMOTE_DIR && tar xzf /tmp/ssb_jax_src.tgz -C $REMOTE_DIR; \
command -v uv >/dev/null || [ -x \$HOME/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH; [ -x $VENV/bin/python ] || uv venv --python 3.11 $VENV; \
cd $REMOTE_DIR && uv pip install --python $VENV/bin/python -q -e '.[tpu]'"

if [[ -n ${BUCKET:-} ]]; then
  say "installing gcsfuse and mounting $BUCKET at /mnt/ssb on every worker"
  tpu ssh "$NAME" --worker=all --command "set -e; if ! command -v gcsfuse >/dev/null; then \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; \
sudo mkdir -p /mnt/ssb && sudo chown \$USER /mnt/ssb; \
mountpoint -q /mnt/ssb || gcsfuse --implicit-dirs ${BUCKET#gs://} /mnt/ssb"
fi

MODEL_ARG=""
if [[ -n $SHARED ]]; then
  MODEL=${MODEL:-$(sed -n 's/^ *c\.model\.path *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$CONFIG" | tail -n 1)}
  for arg in "${EXTRA[@]}"; do [[ $arg == --config.model.path=* ]] && MODEL=none; done  # the user's own wins
  if [[ -n $MODEL && $MODEL != none && ! -d $MODEL ]]; then
    say "downloading $MODEL once into $SHARED/models/$MODEL (worker 0)"
    tpu ssh "$NAME" --worker=0 --command \
      "\$([ -x $VENV/bin/hf ] && echo $VENV/bin/hf || echo $VENV/bin/huggingface-cli) download $(quote "$MODEL") --local-dir $(quote "$SHARED/models/$MODEL")"
    MODEL_ARG="--config.model.path=$SHARED/models/$MODEL"
  fi
fi

say "starting $CONFIG on all workers (detached; log: ~/ssb_run.log on each)"
ARGS=$(quote --config "$CONFIG" "--config.workdir=$WORKDIR" ${MODEL_ARG:+"$MODEL_ARG"} "${EXTRA[@]}")
tpu ssh "$NAME" --worker=all --command "cd $REMOTE_DIR && rm -f \$HOME/ssb_run.rc && echo $REMOTE_WORKDIR > \$HOME/ssb_run.workdir \
&& (setsid nohup bash -c \"$VENV/bin/python -m ssb_jax.main $ARGS; echo \\\$? > \$HOME/ssb_run.rc\" > $LOG 2>&1 < /dev/null & \
echo \$! > \$HOME/ssb_run.pid)"

follow
fetch
say "done (delete the slice with: gcloud compute tpus tpu-vm delete $NAME --zone $ZONE)"
