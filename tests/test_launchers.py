"""launch/slurm_gpu.sbatch and launch/tpu_pod.sh against stand-ins for srun,
scontrol and gcloud: a 2-task SLURM job on this machine trains exactly like one
process of 4 devices, its tasks get their own process ids, and the pod launcher
hands gin bindings (quotes, parentheses, spaces) to the workers intact."""
import json
import os
import shlex
import socket
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_multiprocess  # pylint: disable=wrong-import-position

REPO = test_multiprocess.REPO
USER_FLAGS = ["--gin_file=gin/runs/synthetic_tiny.gin",
              "--gin_bindings=MODEL_DIR='gs://b/run'",
              "--gin_bindings=Partitioner.mesh_shape=(-1, 1, 1)"]

# srun on one machine: SLURM_NTASKS copies of the command, as a step's tasks on
# one-task nodes would get them, each with 2 virtual CPU devices.
FAKE_SRUN = """#!/usr/bin/env bash
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS \\
    SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST JAX_PLATFORMS=cpu \\
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; [[ $status -ne 0 ]] || status=$code; }
done
exit $status
"""
# The first host is the coordinator; the second must never be contacted.
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf '127.0.0.1\\nnode-b\\n'
"""
# python3 (or gcloud) that records its arguments, environment and directory.
RECORDER = """#!{python}
import json, os, sys
out = os.path.join(os.environ["RECORD_DIR"], os.environ.get("SLURM_PROCID", "calls") + ".jsonl")
with open(out, "a") as f:
  f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
"""


def write_executable(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


def recorded(record_dir, name):
  with open(os.path.join(record_dir, f"{name}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def slurm_env(tmp_path, job_id):
  """Fake srun and scontrol first on PATH and the variables sbatch sets."""
  write_executable(tmp_path / "bin" / "srun", FAKE_SRUN)
  write_executable(tmp_path / "bin" / "scontrol", FAKE_SCONTROL)
  return {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
          "SLURM_JOB_NODELIST": "127.0.0.1,node-b", "SLURM_NTASKS": "2",
          "SLURM_JOB_ID": str(job_id)}


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_slurm_job_of_two_tasks_trains_like_one_process_of_four(tmp_path, monkeypatch):
  one = test_multiprocess.one_process_of_four()
  for name, value in slurm_env(tmp_path, 4321).items():
    monkeypatch.setenv(name, value)
  monkeypatch.setenv("COORDINATOR_PORT", str(free_port()))
  two = test_multiprocess.train(["bash", "launch/slurm_gpu.sbatch"], tmp_path / "two", 0,
                                tmp_path)
  assert len(one) == len(two) == test_multiprocess.STEPS
  np.testing.assert_allclose(two, one, rtol=2e-5)
  assert one[-1] < one[0]


def test_slurm_tasks_get_their_process_id_and_the_flags_intact(tmp_path):
  """A virtualenv whose python3 records its call: VENV, MUSICLM_REPO, the
  coordinator from scontrol, the default port and per-task bindings."""
  venv = tmp_path / "venv"
  write_executable(venv / "bin" / "python3", RECORDER.format(python=sys.executable))
  (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
  (tmp_path / "repo").mkdir()
  flags = ["train", *USER_FLAGS, "--gin_bindings=train.num_steps = 3"]
  env = dict(os.environ, **slurm_env(tmp_path, 1234), VENV=str(venv),
             MUSICLM_REPO=str(tmp_path / "repo"), RECORD_DIR=str(tmp_path))
  env.pop("COORDINATOR_PORT", None)
  result = subprocess.run(["bash", os.path.join(REPO, "launch/slurm_gpu.sbatch"), *flags],
                          env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  for task in (0, 1):
    (call,) = recorded(tmp_path, str(task))
    assert call["argv"] == [
        "-m", "musiclm_jax.main", *flags,
        "--gin_bindings=initialize_distributed.coordinator_address='127.0.0.1:30734'",
        "--gin_bindings=initialize_distributed.num_processes=2",
        f"--gin_bindings=initialize_distributed.process_id={task}"]
    assert call["cwd"] == str(tmp_path / "repo")


def test_slurm_script_exits_with_the_failing_task_status(tmp_path):
  venv = tmp_path / "venv"
  write_executable(venv / "bin" / "python3",
                   "#!/usr/bin/env bash\n[[ $SLURM_PROCID == 1 ]] && exit 3\nexit 0\n")
  (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
  env = dict(os.environ, **slurm_env(tmp_path, 7), VENV=str(venv))
  result = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "train"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 3, result.stderr


def test_slurm_script_usage_errors_exit_2(tmp_path):
  env = dict(os.environ, **slurm_env(tmp_path, 7))
  result = subprocess.run(["bash", "launch/slurm_gpu.sbatch"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and result.stderr.startswith("usage: sbatch")
  del env["SLURM_JOB_NODELIST"]
  result = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "train"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and "not inside a Slurm allocation" in result.stderr


def run_tpu_pod(tmp_path, args, **extra_env):
  write_executable(tmp_path / "bin" / "gcloud", RECORDER.format(python=sys.executable))
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
             RECORD_DIR=str(tmp_path), **extra_env)
  for name in ("PROJECT", "REMOTE_REPO_DIR", "SETUP", "SETUP_COMMAND", "DRY_RUN"):
    if name not in extra_env:
      env.pop(name, None)
  return subprocess.run(["bash", "launch/tpu_pod.sh", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=30)


def run_on_worker(tmp_path, command, home):
  """The --command as a worker's shell runs it, with a recording python3."""
  write_executable(tmp_path / "worker_bin" / "python3",
                   RECORDER.format(python=sys.executable))
  env = dict(os.environ, HOME=str(home), RECORD_DIR=str(tmp_path),
             PATH=f"{tmp_path / 'worker_bin'}:{os.environ['PATH']}")
  subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
  return recorded(tmp_path, "calls")[-1]


def test_tpu_pod_runs_the_subcommand_on_all_workers_with_the_flags_intact(tmp_path):
  args = ["my-tpu", "us-central2-b", "train", *USER_FLAGS]
  result = run_tpu_pod(tmp_path, args)
  assert result.returncode == 0, result.stderr
  (call,) = recorded(tmp_path, "calls")
  argv = call["argv"]
  assert argv[:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b",
                      "--worker=all"]
  assert len(argv) == 8 and argv[7].startswith("--command=")
  command = argv[7][len("--command="):]
  assert shlex.split(command) == ["cd", "~/musiclm_jax", "&&", "python3", "-m",
                                  "musiclm_jax.main", "train", *USER_FLAGS]
  home = tmp_path / "home"
  (home / "musiclm_jax").mkdir(parents=True)
  worker = run_on_worker(tmp_path, command, home)
  assert worker["argv"] == ["-m", "musiclm_jax.main", "train", *USER_FLAGS]
  assert worker["cwd"] == str(home / "musiclm_jax")


def test_tpu_pod_setup_project_remote_dir_and_dry_run(tmp_path):
  repo_dir = tmp_path / "it's a repo"
  repo_dir.mkdir()
  args = ["my-tpu", "us-central2-b", "train", *USER_FLAGS]
  options = {"SETUP": "1", "PROJECT": "my-project", "REMOTE_REPO_DIR": str(repo_dir)}
  result = run_tpu_pod(tmp_path, args, **options)
  assert result.returncode == 0, result.stderr
  setup, main = [c["argv"] for c in recorded(tmp_path, "calls")]
  assert setup[:8] == main[:8] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                                   "--zone=us-central2-b", "--worker=all",
                                   "--project=my-project"]
  assert shlex.split(setup[8]) == ["--command=cd", str(repo_dir), "&&", "python3", "-m", "pip",
                                   "install", "-e", ".[data]", "jax[tpu]"]
  worker = run_on_worker(tmp_path, main[8][len("--command="):], tmp_path)
  assert worker["argv"] == ["-m", "musiclm_jax.main", "train", *USER_FLAGS]
  assert worker["cwd"] == str(repo_dir)

  os.remove(tmp_path / "calls.jsonl")
  dry = run_tpu_pod(tmp_path, args, DRY_RUN="1", **options)
  assert dry.returncode == 0, dry.stderr
  assert not os.path.exists(tmp_path / "calls.jsonl")  # gcloud was not called
  printed = [shlex.split(line) for line in dry.stdout.splitlines()]
  assert printed == [["gcloud", *setup], ["gcloud", *main]]


def test_tpu_pod_missing_arguments_exit_2(tmp_path):
  result = run_tpu_pod(tmp_path, ["my-tpu", "us-central2-b"])
  assert result.returncode == 2 and result.stderr.startswith("usage: launch/tpu_pod.sh")
  assert not os.path.exists(tmp_path / "calls.jsonl")
