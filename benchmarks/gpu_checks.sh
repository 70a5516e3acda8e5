#!/usr/bin/env bash
# The GPU measurements that benchmarks/RESULTS.md still lacks, in one run of
# about 9 minutes on one GPU, the most wanted first (issue 8's targets):
#   1. sample_speed     base decoders, batch 1 and 64: ms per decode step per
#                       stage and the derived real-time factor of the decoders
#   2. train_throughput tiny, small, base; bf16, batch 16 x 2048: tokens/s, MFU
#   3. codec_speed      SoundStream base: encode / decode x real time
#   4. semantic_speed   w2v-BERT small and base: audio seconds per wall second
#   5. mulan_speed      MuLan small, batch 64: embeddings per second
# Each step has its own time limit (STEP_LIMITS below), so one slow step
# cannot take the others' time; a step cut short leaves its rows so far.
# Rows go to OUT_DIR/<step>.jsonl (JSON lines, each with the device), the
# whole output to OUT_DIR/gpu_checks.log, the GPU's name to OUT_DIR/device.txt.
#
# The GPU image has jax, flax, optax, orbax and numpy but neither gin nor
# TensorFlow (none of these steps needs TensorFlow). gin-config travels as a
# wheel in .whl/ (ignored by git):
#   bash benchmarks/gpu_checks.sh --fetch_wheels        # here, once (needs PyPI)
#   bash benchmarks/gpu_checks.sh OUT_DIR               # on the GPU machine
#   QUICK=1 bash benchmarks/gpu_checks.sh /tmp/checks   # the same steps at tiny sizes:
#                                                       # 2 min on 2 CPU cores
# Not here: the whole hierarchy (hierarchy_speed.py needs trained tokenizer
# runs) and the token cache job (needs TensorFlow and Beam).
set -uo pipefail
ARG=${1:-}
[[ -n "$ARG" && "$ARG" != --fetch_wheels ]] && ARG=$(realpath -m -- "$ARG")  # before the cd
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}  # where the carried wheels are (relative to the repository)

if [[ "$ARG" == --fetch_wheels ]]; then
  gin_version=$(sed -n 's/^gin-config==//p' constraints.txt)
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py -d "$WHEELS" "gin-config==${gin_version}"
fi
OUT_DIR=${ARG:?usage: gpu_checks.sh OUT_DIR | --fetch_wheels}
mkdir -p "$OUT_DIR"

if ! python3 -c "import gin" 2>/dev/null; then
  if ! ls "$WHEELS"/gin_config-*.whl >/dev/null 2>&1; then
    echo "gpu_checks: gin is not installed and $WHEELS/ holds no gin-config wheel;" \
         "run 'bash benchmarks/gpu_checks.sh --fetch_wheels' where PyPI is reachable" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_checks_site \
    "$WHEELS"/gin_config-*.whl || exit 2
  export PYTHONPATH=/tmp/gpu_checks_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

if [[ -n "${QUICK:-}" ]]; then  # the same steps, tiny and short: checks the script
  SAMPLE=(--sizes tiny --batches 1,2 --max_targets 4 --repeats 1)
  TRAIN=(--sizes tiny --batch_size 2 --length 64 --steps 2 --warmup 0)
  CODEC=(--sizes tiny --seconds 1 --batch_size 1 --repeats 1 --threads 1)
  SEMANTIC=(--sizes tiny --batch_size 1 --seconds 1 --repeats 1)
  MULAN=(--sizes tiny --batch_size 2 --repeats 1 --threads 1)
else
  SAMPLE=(--sizes base --batches 1,64 --max_targets 64 --repeats 3)
  TRAIN=(--sizes tiny,small,base --batch_size 16 --length 2048 --remat_policy none)
  CODEC=(--sizes base --threads 0 --batch_size 4 --seconds 10)
  SEMANTIC=(--sizes small,base --batch_size 4 --seconds 10)
  MULAN=(--sizes small --threads 0 --batch_size 64)
fi
# Seconds per step (560 together, inside a 10-minute device call). sample_speed
# compiles two loops per stage and batch (the timed one and the prefill), 12 in all.
declare -A STEP_LIMITS=([sample_speed]=220 [train_throughput]=150 [codec_speed]=70
                        [semantic_speed]=60 [mulan_speed]=60)

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
run_step sample_speed "${SAMPLE[@]}"
run_step train_throughput "${TRAIN[@]}"
run_step codec_speed "${CODEC[@]}"
run_step semantic_speed "${SEMANTIC[@]}"
run_step mulan_speed "${MULAN[@]}"
echo "gpu_checks: $failed of ${#STEP_LIMITS[@]} steps failed or ran out of time; rows in $OUT_DIR" | tee -a "$LOG"
exit $((failed > 0))
