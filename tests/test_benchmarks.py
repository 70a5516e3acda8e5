"""Benchmarks run where TensorFlow is absent (the GPU image)."""
import json
import os
import subprocess
import sys

import pytest
import xla_env
from conftest import blocked_modules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes `import tensorflow` (and so seqio, clu's summary writer) fail.
NO_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; "
         "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_train_throughput_runs_without_tensorflow():
  env = xla_env.subprocess_env(2)
  result = subprocess.run(
      [sys.executable, "-c", NO_TF, "benchmarks/train_throughput.py", "--sizes", "tiny",
       "--steps", "2", "--warmup", "0", "--length", "32", "--batch_size", "4",
       "--dtype", "float32"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert "error" not in row, row
  assert row["size"] == "tiny" and row["num_devices"] == 2 and row["dtype"] == "float32"
  assert row["tokens_per_sec"] > 0 and row["step_ms"] > 0
  assert row["mfu"] is None  # no known peak FLOP/s for a CPU
  # tiny: 2 layers of (4*64*64 + 3*64*256) + unembedding 64*25728 matmul params.
  matmul_params = 2 * (4 * 64 * 64 + 3 * 64 * 256) + 64 * 25728
  expected_flops = 6 * matmul_params * 4 * 32 + 4 * 4 * 32**2 * 64 * 3 / 2 * 2
  achieved = row["tflops_per_device"] * 1e12 * 2 * row["step_ms"] / 1e3
  assert abs(achieved - expected_flops) / expected_flops < 0.05


def test_sample_speed_runs_without_tensorflow():
  env = xla_env.subprocess_env(1)
  result = subprocess.run(
      [sys.executable, "-c", NO_TF, "benchmarks/sample_speed.py", "--sizes", "tiny",
       "--stages", "fine", "--batches", "1", "--max_targets", "8", "--repeats", "2",
       "--dtype", "float32"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
  step = [r for r in rows if r.get("benchmark") == "sample_speed"]
  assert len(step) == 1 and step[0]["stage"] == "fine" and step[0]["targets"] == 8
  assert step[0]["prefix_length"] == 600 and step[0]["total_ms"] > 0 and step[0]["prefill_ms"] > 0
  # The per-step figure is the two timings' difference over the 7 extra steps
  # (its sign is up to the machine's load, so it is not asserted).
  expected = (step[0]["total_ms"] - step[0]["prefill_ms"]) / 7
  assert abs(step[0]["ms_per_step"] - expected) < 1e-3


def test_semantic_speed_reads_gin_files_with_includes_without_tensorflow():
  env = xla_env.subprocess_env(1)
  result = subprocess.run(
      [sys.executable, "-c", NO_TF, "benchmarks/semantic_speed.py", "--sizes", "tiny,cpu",
       "--batch_size", "1", "--seconds", "1", "--repeats", "1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r["size"]: r for r in map(json.loads, result.stdout.strip().splitlines())}
  # w2v_bert_cpu.gin includes the tiny file and overrides its semantic layer.
  assert (rows["tiny"]["mlm_layer"], rows["cpu"]["mlm_layer"]) == (1, 2)
  for row in rows.values():
    assert row["audio_s_per_sec"] == pytest.approx(1.0 / (row["batch_ms"] / 1000))


def test_gpu_checks_stops_before_measuring_when_gin_is_missing(tmp_path):
  """benchmarks/gpu_checks.sh where gin is not installed (the GPU image) and no
  wheels were carried: a clear error, nothing measured; no OUT_DIR: usage; a
  hierarchy step without tokenizer runs and an unknown step: skipped, counted."""
  (tmp_path / "no_gin").mkdir()
  (tmp_path / "no_gin" / "gin.py").write_text("raise ImportError('gin is hidden')\n")
  python = tmp_path / "bin" / "python3"
  python.parent.mkdir()
  python.write_text(f'#!/bin/bash\nexport PYTHONPATH="{tmp_path / "no_gin"}"\n'
                    f'exec {sys.executable} "$@"\n')
  python.chmod(0o755)
  env = dict(os.environ, PATH=f"{python.parent}:{os.environ['PATH']}",
             WHEELS=str(tmp_path / "wheels"))
  result = subprocess.run(["bash", "benchmarks/gpu_checks.sh", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert "gin, soundfile, soxr or google_crc32c is not installed" in result.stderr
  assert "--prepare" in result.stderr
  assert os.listdir(tmp_path / "out") == []
  usage = subprocess.run(["bash", "benchmarks/gpu_checks.sh"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
  assert usage.returncode != 0 and "usage: gpu_checks.sh OUT_DIR" in usage.stderr
  skipped = subprocess.run(["bash", "benchmarks/gpu_checks.sh", str(tmp_path / "out2")],
                           cwd=REPO, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, STEPS="hierarchy_speed no_such_step",
                                    RUNS=str(tmp_path / "no_runs")))
  assert skipped.returncode == 1
  assert "hierarchy_speed skipped: no tokenizer runs" in skipped.stdout
  assert "unknown step 'no_such_step'" in skipped.stderr
  assert "2 of 2 steps failed, ran out of time or were skipped" in skipped.stdout
  assert sorted(os.listdir(tmp_path / "out2")) == ["device.txt", "gpu_checks.log"]


def test_generation_imports_without_what_the_gpu_image_lacks(tmp_path):
  """hierarchy_speed.py, `musiclm generate` and `infer` on the GPU image: with
  the wheels gpu_checks.sh carries (gin, soundfile, soxr, google_crc32c) and nothing of
  TensorFlow, SeqIO, Beam, clu, librosa, pretty_midi or music21."""
  code = ("import sys; import musiclm_jax.sampling.hierarchy, musiclm_jax.sampling.infer; "
          "from musiclm_jax import main; [main.import_configurables(c) for c in "
          "('generate', 'infer', 'export', 'train')]; print('imported')")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=blocked_modules(tmp_path)))
  assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]
