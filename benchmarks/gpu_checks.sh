#!/usr/bin/env bash
# The GPU measurements that benchmarks/RESULTS.md still lacks, in one run of
# under 10 minutes on one GPU, issue 8's targets first:
#   1. sample_speed     base decoders, batch 1 and 64: ms per decode step per
#                       stage and the derived real-time factor of the decoders
#   2. hierarchy_speed  text to waveform, base stages (randomly initialised) with
#                       the tokenizer runs carried in .gpu_runs/, batch 1 and 64:
#                       wall seconds per second of audio (online and offline)
#   3. train_throughput tiny, small, base; bf16, batch 16 x 2048: tokens/s, MFU
# and, in a second call if device time is left (STEPS="codec_speed semantic_speed
# mulan_speed", about 3 minutes), the tokenizers' speeds:
#   4. codec_speed      SoundStream base: encode / decode x real time
#   5. semantic_speed   w2v-BERT small and base: audio seconds per wall second
#   6. mulan_speed      MuLan small, batch 64: embeddings per second
# Each step has its own time limit (STEP_LIMITS below), so one slow step
# cannot take the others' time; a step cut short leaves its rows so far.
# Rows go to OUT_DIR/<step>.jsonl (JSON lines, each with the device), the
# whole output to OUT_DIR/gpu_checks.log, the GPU's name to OUT_DIR/device.txt.
#
# The GPU image has jax, flax, optax, orbax and numpy but neither TensorFlow
# (no step needs it) nor gin, soundfile, soxr and google-crc32c. Those travel
# as wheels in .whl/, and the hierarchy's tokenizer runs (their weights do not
# change its cost) in .gpu_runs/, both ignored by git:
#   bash benchmarks/gpu_checks.sh --prepare [RUNS]     # here, once (PyPI): the wheels,
#                                                      # and the soundstream, w2v_bert
#                                                      # and mulan runs of RUNS (default
#                                                      # runs/quickstart/runs)
#   bash benchmarks/gpu_checks.sh OUT_DIR               # on the GPU machine, carrying
#                                                       # .whl and .gpu_runs
#   QUICK=1 bash benchmarks/gpu_checks.sh /tmp/checks   # all six steps at tiny sizes:
#                                                       # checks the script on a CPU
# Not here: the token cache job (needs TensorFlow and Beam).
set -uo pipefail
ARG=${1:-}
[[ -n "$ARG" && "$ARG" != --prepare ]] && ARG=$(realpath -m -- "$ARG")  # before the cd
PREPARE_RUNS=$(realpath -m -- "${2:-runs/quickstart/runs}")
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}  # where the carried wheels are (relative to the repository)
RUNS=${RUNS:-.gpu_runs}  # where the carried tokenizer runs are
TOKENIZERS=(soundstream w2v_bert mulan)

if [[ "$ARG" == --prepare ]]; then
  for name in gin-config soundfile soxr cffi pycparser google-crc32c; do
    version=$(sed -n "s/^${name}==//p" constraints.txt)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --abi cp312 --abi abi3 --abi none \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${name}==${version}" \
      || exit 1
  done
  for name in "${TOKENIZERS[@]}"; do
    if [[ ! -d "$PREPARE_RUNS/$name/checkpoints" ]]; then
      echo "gpu_checks: no $name run in $PREPARE_RUNS (train the tokenizers first, e.g." \
           "'musiclm quickstart --until=mulan'); the wheels are in $WHEELS/" >&2
      exit 1
    fi
    rm -rf "${RUNS:?}/$name" && mkdir -p "$RUNS"
    cp -r "$PREPARE_RUNS/$name" "$RUNS/$name" || exit 1
    rm -f "$RUNS/$name"/events.out.tfevents.*  # TensorBoard logs: not needed there
  done
  echo "gpu_checks: wheels in $WHEELS/, tokenizer runs in $RUNS/ ($(du -sh "$RUNS" | cut -f1))"
  exit 0
fi
OUT_DIR=${ARG:?usage: gpu_checks.sh OUT_DIR | --prepare [RUNS]}
mkdir -p "$OUT_DIR"

if ! python3 -c "import gin, soundfile, soxr, google_crc32c" 2>/dev/null; then
  if ! ls "$WHEELS"/gin_config-*.whl >/dev/null 2>&1; then
    echo "gpu_checks: gin, soundfile, soxr or google_crc32c is not installed and $WHEELS/ holds no wheels;" \
         "run 'bash benchmarks/gpu_checks.sh --prepare' where PyPI is reachable" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_checks_site \
    "$WHEELS"/*.whl || exit 2
  export PYTHONPATH=/tmp/gpu_checks_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

if [[ -n "${QUICK:-}" ]]; then  # the same steps, tiny and short: checks the script
  SAMPLE=(--sizes tiny --batches 1,2 --max_targets 4 --repeats 1)
  HIERARCHY=(--size tiny --seconds 1 --batches 1)
  TRAIN=(--sizes tiny --batch_size 2 --length 64 --steps 2 --warmup 0)
  CODEC=(--sizes tiny --seconds 1 --batch_size 1 --repeats 1 --threads 1)
  SEMANTIC=(--sizes tiny --batch_size 1 --seconds 1 --repeats 1)
  MULAN=(--sizes tiny --batch_size 2 --repeats 1 --threads 1)
else
  SAMPLE=(--sizes base --batches 1,64 --max_targets 64 --repeats 3)
  HIERARCHY=(--size base --seconds 10 --batches 1,64)
  TRAIN=(--sizes tiny,small,base --batch_size 16 --length 2048 --remat_policy none)
  CODEC=(--sizes base --threads 0 --batch_size 4 --seconds 10)
  SEMANTIC=(--sizes small,base --batch_size 4 --seconds 10)
  MULAN=(--sizes small --threads 0 --batch_size 64)
fi
# Seconds per step: the default three take 560 together, inside a 10-minute
# device call. sample_speed compiles two loops per stage and batch (the timed
# one and the prefill), 12 in all; hierarchy_speed one generation per batch size.
declare -A STEP_LIMITS=([sample_speed]=210 [hierarchy_speed]=200 [train_throughput]=150
                        [codec_speed]=70 [semantic_speed]=60 [mulan_speed]=60)
ALL_STEPS="sample_speed hierarchy_speed train_throughput codec_speed semantic_speed mulan_speed"
if [[ -n "${QUICK:-}" ]]; then STEPS=${STEPS:-$ALL_STEPS}; fi
STEPS=${STEPS:-sample_speed hierarchy_speed train_throughput}

LOG="$OUT_DIR/gpu_checks.log"
{ nvidia-smi -L 2>/dev/null || python3 -c "import jax; print(jax.devices())"; } \
  > "$OUT_DIR/device.txt"
echo "gpu_checks: device $(head -1 "$OUT_DIR/device.txt")" | tee "$LOG"
failed=0
run_step() {  # run_step NAME ARGS...: one benchmark, its rows to NAME.jsonl
  local name=$1; shift
  local start=$SECONDS
  echo "gpu_checks: $name (limit ${STEP_LIMITS[$name]} s): $*" | tee -a "$LOG"
  timeout "${STEP_LIMITS[$name]}" python3 "benchmarks/$name.py" "$@" \
    > "$OUT_DIR/$name.jsonl" 2>> "$LOG"
  local status=$?
  cat "$OUT_DIR/$name.jsonl" >> "$LOG"
  echo "gpu_checks: $name exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
  [[ $status -eq 0 ]] || failed=$((failed + 1))
}
tokenizer_flags=(--soundstream "$RUNS/soundstream" --semantic "$RUNS/w2v_bert"
                 --mulan "$RUNS/mulan")
declare -A STEP_ARGS=([sample_speed]="${SAMPLE[*]}" [train_throughput]="${TRAIN[*]}"
                      [hierarchy_speed]="${tokenizer_flags[*]} ${HIERARCHY[*]}"
                      [codec_speed]="${CODEC[*]}" [semantic_speed]="${SEMANTIC[*]}"
                      [mulan_speed]="${MULAN[*]}")
ran=0
for step in $STEPS; do
  if [[ -z "${STEP_LIMITS[$step]:-}" ]]; then
    echo "gpu_checks: unknown step '$step'; steps: $ALL_STEPS" | tee -a "$LOG" >&2
    failed=$((failed + 1))
    continue
  fi
  if [[ $step == hierarchy_speed && ! -d "$RUNS/mulan" ]]; then
    echo "gpu_checks: hierarchy_speed skipped: no tokenizer runs in $RUNS/ (--prepare)" \
      | tee -a "$LOG"
    failed=$((failed + 1))
    continue
  fi
  # shellcheck disable=SC2086  # the arguments are words without spaces
  run_step "$step" ${STEP_ARGS[$step]}
  ran=$((ran + 1))
done
echo "gpu_checks: $failed of $((ran + failed)) steps failed, ran out of time or were" \
     "skipped; rows in $OUT_DIR" | tee -a "$LOG"
exit $((failed > 0))
