#!/usr/bin/env bash
# Run a musiclm subcommand on this machine, optionally over N virtual CPU
# devices so that a mesh such as (data=2, fsdp=2, tensor=2) can be tried
# without accelerators:
#
#   launch/local.sh 8 train --gin_file=gin/runs/synthetic_tiny.gin \
#       --gin_bindings="MODEL_DIR='/tmp/mesh_try'" \
#       --gin_bindings="Partitioner.mesh_shape=(2, 2, 2)"
#
# With N = 0 the real devices (GPU/TPU/CPU) are used as they are.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: launch/local.sh NUM_VIRTUAL_CPU_DEVICES SUBCOMMAND [FLAGS...]" >&2
  exit 2
fi
num_devices=$1
shift
if [[ "$num_devices" -gt 0 ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${num_devices}"
fi
exec python3 -m musiclm_jax.main "$@"
