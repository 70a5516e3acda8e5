"""`musiclm` as a user runs it: in a subprocess, configured by gin."""
import json
import os
import subprocess
import sys

import pytest

from musiclm_jax import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def musiclm(*args, cwd=REPO):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "musiclm_jax.main", *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def test_train_runs_and_resumes_from_any_directory(tmp_path):
  args = ["train", "--gin_file=gin/runs/synthetic_tiny.gin",
          f"--gin_bindings=MODEL_DIR='{tmp_path}'", "--gin_bindings=train.num_steps=20",
          "--gin_bindings=train.log_every_steps=10",
          "--gin_bindings=train.eval_every_steps=0"]
  first = musiclm(*args, cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "step 20/20 (100%)" in first.stdout and "ETA" in first.stdout
  second = musiclm(*args[:-2], "--gin_bindings=train.num_steps=30",
                   "--gin_bindings=train.eval_every_steps=0", cwd=tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resuming from checkpoint step 20" in second.stdout
  assert "step 30/30" in second.stdout and "step 10/" not in second.stdout
  manifest_path = tmp_path / "checkpoints" / "30" / "manifest" / "metadata"
  manifest = json.loads(manifest_path.read_text())
  assert manifest["token_layout"]["vocab_size"] == 25728
  assert "SyntheticTokenTask" in manifest["gin_config"]


def test_missing_model_dir_is_a_clear_error():
  result = musiclm("train", "--gin_file=gin/runs/synthetic_tiny.gin")
  assert result.returncode == 2
  assert "MODEL_DIR is not set" in result.stderr


def test_unknown_subcommand_is_a_usage_error():
  result = musiclm("fly")
  assert result.returncode != 0 and "usage: musiclm {train}" in result.stderr


@pytest.mark.parametrize("files, bindings, message", [
    (["gin/runs/no_such_run.gin"], [], "gin file 'gin/runs/no_such_run.gin': Unable to open"),
    (["gin/runs/synthetic_tiny.gin"], ["DecoderConfig.num_layerz = 3"],
     "No configurable matching|num_layerz"),
    (["gin/runs/synthetic_tiny.gin"], ["train.num_steps = )"], "gin binding"),
    (["gin/runs/synthetic_tiny.gin"], ["NoSuchThing.x = 1"], "NoSuchThing"),
])
def test_bad_gin_is_a_clear_error(files, bindings, message):
  with pytest.raises(cli.GinConfigError, match=message):
    cli.parse_gin(files, bindings)


def test_bad_gin_file_content_names_the_file(tmp_path):
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'sizes/tiny.gin'\nDecoderConfig.num_heads = @not_registered()\n")
  with pytest.raises(cli.GinConfigError, match=f"gin file '{bad}'.*not_registered"):
    cli.parse_gin([str(bad)], [])
