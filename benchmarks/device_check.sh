#!/usr/bin/env bash
# The accelerator check of ssb_jax, as one prepared run (under 8 minutes on one H200, offline). The numbers
# come first, each benchmark row written to its JSON as it finishes (a timeout keeps the rows done):
#   1. environment: versions, the GPU, which modules the image lacks (aborts if JAX sees no GPU);
#   2. sampling at the Qwen2.5 0.5B and 3B shapes, bf16, batch 1 and 64, random weights, EOS
#      suppressed: tokens/s, decode HBM-roofline fraction, prefill MFU, peak device memory;
#   3. decode_layout_3b: the 3B batch-1 row again with unrolled layers (sampling_3b runs the layer scan);
#   4. the distillation train step at the 3B shape, bf16, sequence 1024, batch 1 and 8, remat:
#      step time, tokens/s, MFU, peak device memory, XLA's memory analysis;
#   5. rollout_3b: the rollout engine (benchmarks/rollout.py; skipped, saying so, where it is absent);
#   6. parity_tests: cuDNN attention against the XLA reference (tests/accelerators/test_gpu_attention.py), the
#      in-place cache update and the HF-parity tests (tests/model/test_model.py, ...) on the GPU, JAX's backend
#      started before any test imports torch; skipped, with the reason, where torch / transformers / peft /
#      pytest are missing.
# Each step has its own timeout; they add up to less than the total budget, so none is cut for lack of it.
#
#   bash benchmarks/device_check.sh             # on the GPU machine, from the repo root
#   bash benchmarks/device_check.sh --dry-run   # print the steps and their commands, run nothing
#   SMOKE=1 bash benchmarks/device_check.sh     # the same steps at tiny shapes on the CPU (a minute or two)
#
# Uses the image's own jax (nothing is installed: the checkout goes on PYTHONPATH).
# Writes under $OUT (default ./device_check_out), at most 9 files: summary.txt, log.txt, parity_junit.xml,
# sampling_<shape>_<dtype>.json (2), sampling_3b_unrolled_<dtype>.json, train_step_<shape>_b<batch>.json (2),
# the rollout benchmark's JSON.
# Knobs (environment): PY (python3), TOTAL_S (450: the whole budget, seconds), ONLY (comma-separated step
# names to run), PEER=1 (time transformers generate on the GPU too), REMAT (full), MODES (sampling),
# SSB_PEAK_TFLOPS / SSB_HBM_GBS (override the device table: dense bf16 TFLOP/s, HBM GB/s).
set -uo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
[[ -f setup.py && -d ssb_jax && -d benchmarks ]] || { echo "not an ssb_jax checkout: $ROOT" >&2; exit 2; }

PY=${PY:-python3}
OUT=${OUT:-$ROOT/device_check_out}
TOTAL_S=${TOTAL_S:-450}
ONLY=${ONLY:-}
PEER=${PEER:-0}
MODES=${MODES:-sampling}
REMAT=${REMAT:-full}
RESERVE_S=15     # kept back for the summary at the end
MIN_STEP_S=20    # a step with less time than this left is skipped

if [[ ${SMOKE:-0} == 1 ]]; then
  PLATFORM=cpu BACKEND=cpu DTYPE=float32
  SAMPLE_SHAPES=(tiny) SAMPLE_BATCHES=(2) PROMPT=8 NEW_TOKENS=32 REPEATS=3 COPY_MB=16
  TRAIN_SHAPE=tiny TRAIN_BATCHES=(1 2) SEQ=32 TEACHER_PROMPT=8 STUDENT_PROMPT=4 RANK=4 CHUNK=8 STEPS=1
  PARITY_SELECT="logits_match_transformers and not untied and right_padded"
  LAYOUT_SHAPE=tiny ROLLOUT_SHAPE=tiny
  T_ENV=120 T_PARITY=300 T_SAMPLING=(300) T_LAYOUT=300 T_TRAIN=(300 300) T_ROLLOUT=300  # a shared CPU can be slow
else
  PLATFORM=cuda BACKEND=gpu DTYPE=bfloat16
  SAMPLE_SHAPES=(0.5b 3b) SAMPLE_BATCHES=(1 64) PROMPT=128 NEW_TOKENS=256 REPEATS=2 COPY_MB=512
  TRAIN_SHAPE=3b TRAIN_BATCHES=(1 8) SEQ=1024 TEACHER_PROMPT=256 STUDENT_PROMPT=128 RANK=32 CHUNK=128 STEPS=3
  # HF parity of what runs on the GPU (forward, cached decode, scanned sampling, LoRA, loss, gradients);
  # the CPU decode layout, PEFT export and sampler-only tests stay with the CPU suite
  # cuDNN against the XLA reference, the in-place cache update, and HF parity of what runs on the GPU (forward,
  # cached decode, scanned sampling, LoRA, loss, gradients); the CPU decode layout, PEFT export and sampler-only
  # tests stay with the CPU suite. Every term names a test that exists (tests/test_benchmarks.py checks it).
  PARITY_SELECT="cudnn_equals_reference or auto_runs_cudnn or decode_updates_the_cache_in_place"
  PARITY_SELECT+=" or logits_match_transformers or prefill_then_decode or bf16_params_close"
  PARITY_SELECT+=" or remat_policies_and_attention_kernels or (greedy_matches_transformers and scan)"
  PARITY_SELECT+=" or merge_equals_forward or loss_matches_torch or chunked_equals_unchunked"
  PARITY_SELECT+=" or (lora_grads_match_finite and online) or online_teacher_and_student"
  PARITY_SELECT+=" or gpu_paged_kernel_gives_the_same_tokens"  # the engine's Triton paged attention
  LAYOUT_SHAPE=3b ROLLOUT_SHAPE=3b
  # seconds per step, 410 in all: under TOTAL_S - RESERVE_S, so the budget never cuts a step short
  T_ENV=20 T_SAMPLING=(45 75) T_LAYOUT=45 T_TRAIN=(55 65) T_ROLLOUT=45 T_PARITY=60
fi
PARITY_FILES=(tests/accelerators/test_gpu_attention.py tests/model/test_kv_cache.py tests/model/test_model.py
              tests/sampling/test_sampling.py tests/model/test_lora.py tests/distill/test_distill_loss.py
              tests/distill/test_distill_grad.py tests/distill/test_distill_batch.py tests/engine/test_engine.py)
PEER_FLAG=--no-peer
[[ $PEER == 1 ]] && PEER_FLAG=--peer

# tests/conftest.py only sets these when unset: the real backend, and no fake CPU devices
export JAX_PLATFORMS=$PLATFORM
read -ra xla_flags <<<"${XLA_FLAGS:-}"
kept_flags=()
for flag in "${xla_flags[@]}"; do
  [[ $flag == --xla_force_host_platform_device_count* ]] || kept_flags+=("$flag")
done
export XLA_FLAGS="${kept_flags[*]}"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SSB_TEST_START_BACKEND=1  # tests/conftest.py starts JAX's backend (its cuDNN) before a test imports torch

SUMMARY=$OUT/summary.txt LOG=$OUT/log.txt
START=$SECONDS

# note VERDICT NAME SECONDS [DETAIL]: one line of the summary
note() { printf '%-7s %-18s %4ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY"; }

selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

# step NAME TIMEOUT_S COMMAND...: runs COMMAND (its output to the log) within its own timeout and what
# is left of the total budget; timeout signals the whole process group, worker subprocesses included
step() {
  local name=$1 limit=$2
  shift 2
  selected "$name" || return 0
  if (( DRY_RUN )); then
    printf '%-18s %4ss  ' "$name" "$limit"; printf '%q ' "$@"; printf '\n'
    return 0
  fi
  local left=$(( TOTAL_S - (SECONDS - START) - RESERVE_S ))
  (( left < limit )) && limit=$left
  if (( limit < MIN_STEP_S )); then note SKIP "$name" 0 "the total budget of ${TOTAL_S}s is spent"; return 0; fi
  printf '\n===== %s (timeout %ss): %s\n' "$name" "$limit" "$*" >>"$LOG"
  local began=$SECONDS rc=0
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  local took=$(( SECONDS - began ))
  case $rc in
    0) note ok "$name" "$took" ;;
    124|137) note TIMEOUT "$name" "$took" "after ${limit}s" ;;
    *) note FAIL "$name" "$took" "exit status $rc (see log.txt)" ;;
  esac
  return "$rc"
}

# skip NAME REASON: a step that cannot run here, said so in the summary
skip() {
  selected "$1" || return 0
  if (( DRY_RUN )); then printf '%-18s  skipped: %s\n' "$1" "$2"; else note SKIP "$1" 0 "$2"; fi
}

if (( ! DRY_RUN )); then
  mkdir -p "$OUT"
  : >"$SUMMARY"
  : >"$LOG"
  echo "ssb_jax device check $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
       "SMOKE=${SMOKE:-0}, budget ${TOTAL_S}s" | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------- 1. environment
if ! step environment "$T_ENV" "$PY" -m benchmarks.device_report environment --expect-backend "$BACKEND"; then
  if (( ! DRY_RUN )) && selected environment; then
    grep -E '^(JAX|benchmarks|parity_tests|jax backend)' "$LOG" | sed 's/^/    /' | tee -a "$SUMMARY"
    echo "stopping: the benchmarks need JAX on $BACKEND" | tee -a "$SUMMARY"
    exit 1
  fi
fi
(( DRY_RUN )) || grep -E '^(nvidia-smi|versions|benchmarks|parity_tests|jax backend)' "$LOG" | sed 's/^/    /' >>"$SUMMARY"

# ---------------------------------------------------------------- 2. sampling
for i in "${!SAMPLE_SHAPES[@]}"; do
  shape=${SAMPLE_SHAPES[$i]}
  # shellcheck disable=SC2086  # MODES is a list of words
  step "sampling_$shape" "${T_SAMPLING[$i]}" "$PY" -m benchmarks.sampling --shape "$shape" --dtype "$DTYPE" \
    --batches "${SAMPLE_BATCHES[@]}" --modes $MODES --prompt "$PROMPT" --new-tokens "$NEW_TOKENS" \
    --repeats "$REPEATS" --copy-mb "$COPY_MB" "$PEER_FLAG" --out-dir "$OUT" --name "sampling_${shape}_$DTYPE"
done

# ---------------------------------------------------------------- 3. the layer scan against unrolled layers
# the batch-1 row of sampling_3b with the layers unrolled (one weight slice per layer, no dynamic slicing)
step "decode_layout_$LAYOUT_SHAPE" "$T_LAYOUT" "$PY" -m benchmarks.sampling --shape "$LAYOUT_SHAPE" --dtype "$DTYPE" \
  --batches "${SAMPLE_BATCHES[0]}" --modes "${MODES%% *}" --prompt "$PROMPT" --new-tokens "$NEW_TOKENS" \
  --repeats "$REPEATS" --copy-mb "$COPY_MB" --layers-layout unrolled --no-peer --out-dir "$OUT" \
  --name "sampling_${LAYOUT_SHAPE}_unrolled_$DTYPE"

# ---------------------------------------------------------------- 4. distillation train step
for i in "${!TRAIN_BATCHES[@]}"; do
  batch=${TRAIN_BATCHES[$i]}
  step "train_${TRAIN_SHAPE}_b$batch" "${T_TRAIN[$i]}" "$PY" benchmarks/train_step.py --shape "$TRAIN_SHAPE" \
    --dtype "$DTYPE" --seq "$SEQ" --teacher-prompt "$TEACHER_PROMPT" --student-prompt "$STUDENT_PROMPT" \
    --batch "$batch" --rank "$RANK" --chunk "$CHUNK" --remat "$REMAT" --steps "$STEPS" --variants jax_chunked \
    --out "$OUT/train_step_${TRAIN_SHAPE}_b$batch.json"
done

# ---------------------------------------------------------------- 5. the rollout engine
if [[ -f benchmarks/rollout.py ]]; then
  step "rollout_$ROLLOUT_SHAPE" "$T_ROLLOUT" "$PY" -m benchmarks.rollout --shape "$ROLLOUT_SHAPE" --dtype "$DTYPE" \
    --out-dir "$OUT"
else
  skip "rollout_$ROLLOUT_SHAPE" "benchmarks/rollout.py is not in this checkout"
fi

# ---------------------------------------------------------------- 6. GPU attention, cache and HF-parity tests
missing=$( (( DRY_RUN )) || "$PY" -m benchmarks.device_report environment --need parity_tests 2>/dev/null)
if [[ -n $missing ]]; then
  skip parity_tests "missing on this image: $missing (the tests compare with transformers on torch)"
else
  timeout_flag=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout=90)
  # -v: one line per test as it ends, so a timed-out run still says how far it got
  step parity_tests "$T_PARITY" "$PY" -m pytest -v -p no:cacheprovider -rfEs "${timeout_flag[@]}" \
    --junitxml="$OUT/parity_junit.xml" "${PARITY_FILES[@]}" -k "$PARITY_SELECT"
  if (( ! DRY_RUN )) && selected parity_tests; then
    {
      for verdict in PASSED FAILED ERROR SKIPPED; do
        printf '    %s %s' "$(grep -cE "^tests/.* $verdict" "$LOG")" "$verdict"
      done
      echo
      grep -E '^(FAILED|ERROR) ' "$LOG" | head -n 12 | sed 's/^/    /'
    } >>"$SUMMARY"
  fi
fi


# ---------------------------------------------------------------- summary
(( DRY_RUN )) && exit 0
{
  echo
  "$PY" -m benchmarks.device_report summary "$OUT" 2>>"$LOG" || echo "(no results table: see log.txt)"
  echo "total $(( SECONDS - START ))s"
} | tee -a "$SUMMARY"
# the log must come back: at most 16 MiB per file (keep its head and tail)
if (( $(wc -c <"$LOG") > 15 * 2**20 )); then
  { head -c $(( 4 * 2**20 )) "$LOG"; printf '\n[... log cut to fit ...]\n'; tail -c $(( 10 * 2**20 )) "$LOG"; } >"$LOG.cut"
  mv "$LOG.cut" "$LOG"
fi
grep -qE '^(FAIL|TIMEOUT) ' "$SUMMARY" && exit 1
exit 0
