#!/usr/bin/env bash
# Run a musiclm subcommand as NUM_PROCESSES JAX processes on this machine, each
# with DEVICES_PER_PROCESS virtual CPU devices and a local coordinator: what a
# pod or a multi-node GPU job does, without the pod (for trying multi-host code):
#
#   launch/local_multiprocess.sh 2 4 train --gin_file=gin/runs/synthetic_tiny.gin \
#       --gin_bindings="MODEL_DIR='/tmp/two_hosts'"
#
# Process 0's output goes to the terminal, the others' to MODEL_DIR-less log
# files under ${LOG_DIR:-/tmp}/musiclm_process_<i>.log. Exits with the first
# non-zero status.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS SUBCOMMAND [FLAGS...]" >&2
  exit 2
fi
num_processes=$1
devices=$2
for count in "$num_processes" "$devices"; do
  if ! [[ $count =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/local_multiprocess.sh: NUM_PROCESSES and DEVICES_PER_PROCESS must be" \
         "positive integers; got '$num_processes' and '$devices'" >&2
    exit 2
  fi
done
shift 2
port=${COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
log_dir=${LOG_DIR:-/tmp}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
pids=()
for ((i = 0; i < num_processes; i++)); do
  flags=("$@"
         "--gin_bindings=initialize_distributed.coordinator_address='127.0.0.1:${port}'"
         "--gin_bindings=initialize_distributed.num_processes=${num_processes}"
         "--gin_bindings=initialize_distributed.process_id=${i}")
  if [[ $i -eq 0 ]]; then
    python3 -m musiclm_jax.main "${flags[@]}" &
  else
    python3 -m musiclm_jax.main "${flags[@]}" > "${log_dir}/musiclm_process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
