#!/usr/bin/env bash
# Run one `musiclm` subcommand on every worker of a Cloud TPU VM pod slice, from
# any machine with gcloud:
#
#   launch/tpu_pod.sh TPU_NAME ZONE SUBCOMMAND [FLAGS...]
#
# Each worker cds into the repository (REMOTE_REPO_DIR, default ~/musiclm_jax)
# and runs `python3 -m musiclm_jax.main SUBCOMMAND FLAGS...`; the flags arrive
# exactly as given here (gin bindings keep their quotes, parentheses and
# spaces). jax.distributed.initialize() finds the other workers by itself on
# TPU VMs (TPU_WORKER_HOSTNAMES), so no coordinator flags are added.
#
# Put the repository on every worker first (git pull is not assumed), then
# install it there once (SETUP=1; override the install with SETUP_COMMAND):
#
#   gcloud compute tpus tpu-vm scp --recurse --worker=all --zone=us-central2-b \
#       . my-tpu:~/musiclm_jax
#   SETUP=1 launch/tpu_pod.sh my-tpu us-central2-b train \
#       --gin_file=gin/runs/synthetic_tiny.gin \
#       --gin_bindings="MODEL_DIR='gs://my-bucket/runs/tiny'" \
#       --gin_bindings="Partitioner.mesh_shape=(-1, 1, 1)"
#
# MODEL_DIR must be storage that every worker sees (a gs:// bucket). Running
# the same command again resumes from the newest checkpoint there.
#
# Environment: PROJECT (adds --project=PROJECT), REMOTE_REPO_DIR, SETUP=1 (run
# SETUP_COMMAND on all workers before the subcommand; default
# `python3 -m pip install -e ".[data]" "jax[tpu]"` in REMOTE_REPO_DIR),
# DRY_RUN=1 (print the gcloud command(s) instead of running them).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE SUBCOMMAND [FLAGS...]" >&2
  exit 2
fi
tpu_name=$1
zone=$2
shift 2
remote_repo_dir=${REMOTE_REPO_DIR:-'~/musiclm_jax'}
default_setup_command='python3 -m pip install -e ".[data]" "jax[tpu]"'
setup_command=${SETUP_COMMAND:-$default_setup_command}

# One word for a POSIX shell: as it is when it holds no special characters,
# otherwise single-quoted with every ' written as '\''.
shell_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf "%s" "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The repository directory for the worker's shell; a leading ~ stays unquoted
# so that it expands to the worker's home directory.
remote_dir=$(shell_quote "$remote_repo_dir")
# shellcheck disable=SC2088  # the ~ is the worker's, not expanded here
if [[ $remote_repo_dir == "~" ]]; then
  remote_dir="~"
elif [[ $remote_repo_dir == "~/"* ]]; then
  remote_dir="~/$(shell_quote "${remote_repo_dir#"~/"}")"
fi

main_command="python3 -m musiclm_jax.main"
for arg in "$@"; do
  main_command+=" $(shell_quote "$arg")"
done

ssh_all() {  # ssh_all REMOTE_COMMAND: run it on every worker of the slice.
  local gcloud_args=(compute tpus tpu-vm ssh "$tpu_name" "--zone=$zone" --worker=all)
  if [[ -n ${PROJECT:-} ]]; then
    gcloud_args+=("--project=$PROJECT")
  fi
  gcloud_args+=("--command=$1")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf "gcloud"
    for arg in "${gcloud_args[@]}"; do
      printf " %s" "$(shell_quote "$arg")"
    done
    printf "\n"
  else
    gcloud "${gcloud_args[@]}"
  fi
}

if [[ ${SETUP:-0} == 1 ]]; then
  ssh_all "cd $remote_dir && $setup_command"
fi
ssh_all "cd $remote_dir && $main_command"
