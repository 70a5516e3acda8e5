"""Multi-host training, locally: 2 processes x 2 CPU devices with a local
coordinator (launch/local_multiprocess.sh) train exactly like 1 process x 4."""
import os
import subprocess

import numpy as np

import once_per_run
import xla_env
from musiclm_jax.training import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def train(command, model_dir, devices, log_dir):
  # Partitionable threefry: with the other one (tests/conftest.py) the sharded
  # initialisation holds independent collectives that the processes can issue
  # in different orders, and gloo aborts (about one run in four).
  # The launchers add their device count to these flags.
  env = dict(os.environ, XLA_FLAGS=xla_env.TEST_XLA_FLAGS, LOG_DIR=str(log_dir),
             JAX_THREEFRY_PARTITIONABLE="true")
  if devices:
    env["XLA_FLAGS"] = xla_env.xla_flags(devices)
  result = subprocess.run(
      [*command, "train", "--gin_file=gin/runs/synthetic_tiny.gin",
       f"--gin_bindings=MODEL_DIR='{model_dir}'", f"--gin_bindings=train.num_steps={STEPS}",
       "--gin_bindings=train.log_every_steps=1", "--gin_bindings=train.eval_every_steps=0",
       "--gin_bindings=DecoderConfig.dtype='float32'",
       "--gin_bindings=Partitioner.mesh_shape=(2, 2, 1)"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return [r["train/loss"] for r in metrics.read_jsonl_metrics(str(model_dir))]


def one_process_of_four() -> list[float]:
  """Losses of the reference run (1 process x 4 devices), trained once per test
  run for this file and tests/test_launchers.py."""
  directory = once_per_run.shared_directory(
      "one_process_of_four",
      lambda d: train(["python3", "-m", "musiclm_jax.main"], os.path.join(d, "run"), 4, d))
  return [r["train/loss"] for r in metrics.read_jsonl_metrics(os.path.join(directory, "run"))]


def test_two_processes_of_two_devices_train_like_one_process_of_four(tmp_path):
  one = one_process_of_four()
  two = train(["bash", "launch/local_multiprocess.sh", "2", "2"], tmp_path / "two", 0,
              tmp_path)
  assert len(one) == len(two) == STEPS
  np.testing.assert_allclose(two, one, rtol=2e-5)
  assert one[-1] < one[0]


def test_launcher_names_bad_counts():
  for counts in (["two", "2"], ["2", "0"]):
    result = subprocess.run(["bash", "launch/local_multiprocess.sh", *counts, "train"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "must be positive integers" in result.stderr and f"'{counts[0]}'" in result.stderr
