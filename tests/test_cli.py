"""`musiclm` as a user runs it: in a subprocess, configured by gin."""
import json
import os
import subprocess
import sys

import pytest
import xla_env

from musiclm_jax import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def musiclm(*args, cwd=REPO):
  env = xla_env.subprocess_env(1)
  return subprocess.run([sys.executable, "-m", "musiclm_jax.main", *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def test_train_runs_and_resumes_from_any_directory(tmp_path):
  args = ["train", "--gin_file=gin/runs/synthetic_tiny.gin",
          f"--gin_bindings=MODEL_DIR='{tmp_path}'", "--gin_bindings=train.num_steps=4",
          "--gin_bindings=train.log_every_steps=2",
          "--gin_bindings=train.eval_every_steps=0"]
  first = musiclm(*args, cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "step 4/4 (100%)" in first.stdout and "ETA" in first.stdout
  second = musiclm(*args[:-2], "--gin_bindings=train.num_steps=6",
                   "--gin_bindings=train.eval_every_steps=0", cwd=tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resuming from checkpoint step 4" in second.stdout
  assert "step 6/6" in second.stdout and "step 2/" not in second.stdout
  manifest_path = tmp_path / "checkpoints" / "6" / "manifest" / "metadata"
  manifest = json.loads(manifest_path.read_text())
  assert manifest["token_layout"]["vocab_size"] == 25728
  assert "SyntheticTokenTask" in manifest["gin_config"]


def test_missing_model_dir_is_a_clear_error():
  result = musiclm("train", "--gin_file=gin/runs/synthetic_tiny.gin")
  assert result.returncode == 2
  assert "MODEL_DIR is not set" in result.stderr


def test_unknown_subcommand_is_a_usage_error():
  result = musiclm("fly")
  assert result.returncode != 0 and "usage: musiclm {train|prepare|codec|eval" in result.stderr


@pytest.mark.parametrize("files, bindings, message", [
    (["gin/runs/no_such_run.gin"], [], "gin file 'gin/runs/no_such_run.gin': Unable to open"),
    (["gin/runs/synthetic_tiny.gin"], ["DecoderConfig.num_layerz = 3"],
     "No configurable matching|num_layerz"),
    (["gin/runs/synthetic_tiny.gin"], ["train.num_steps = )"], "gin binding"),
    (["gin/runs/synthetic_tiny.gin"], ["NoSuchThing.x = 1"], "NoSuchThing"),
])
def test_bad_gin_is_a_clear_error(files, bindings, message):
  cli.import_configurables("train")
  with pytest.raises(cli.GinConfigError, match=message):
    cli.parse_gin(files, bindings)


@pytest.mark.parametrize("path", sorted(
    os.path.relpath(os.path.join(d, f), REPO) for d, _, files in os.walk(os.path.join(REPO, "gin"))
    for f in files if f.endswith(".gin")))
def test_every_gin_file_parses(path):
  """Every shipped recipe names configurables and parameters that exist."""
  for subcommand in cli.GIN_MODULES:
    cli.import_configurables(subcommand)
  cli.parse_gin([path], [])


def test_bad_gin_file_content_names_the_file(tmp_path):
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'sizes/tiny.gin'\nDecoderConfig.num_heads = @not_registered()\n")
  cli.import_configurables("train")
  with pytest.raises(cli.GinConfigError, match=f"gin file '{bad}'.*not_registered"):
    cli.parse_gin([str(bad)], [])


def test_prepare_builds_a_corpus_and_reports_it(tmp_path):
  args = ["prepare", "gm_synth", f"--data_dir={tmp_path}", "--num_examples=3",
          "--seconds=2", "--seed=5", "--workers=1",
          "--gin_bindings=GmSynthSource.soundfont='timgm6mb'"]
  first = musiclm(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  corpus_dir = tmp_path / "gm_synth" / "n3_2s_seed5" / "1.0.0"
  assert f"3 items -> {corpus_dir}" in first.stdout
  assert "gm_synth: 3 clips (train 1, validation 1, test 1)" in first.stdout
  report = json.loads((corpus_dir / "build_report.json").read_text())
  assert report["spec"]["seed"] == 5
  second = musiclm(*args)
  assert second.returncode == 0 and "already built; nothing to do" in second.stdout


@pytest.mark.parametrize("args, code, message", [
    (["prepare"], 2, "usage: musiclm prepare {gm_synth|music21_gm|audio_folder|musiccaps}"),
    (["prepare", "jamendo"], 2, "got jamendo"),
    (["prepare", "audio_folder", "--source_dir=/no/such/dir"], 1,
     "audio_folder needs --source_dir, a directory of audio files; got '/no/such/dir'"),
    (["prepare", "gm_synth", "--num_examples=2",
      "--gin_bindings=GmSynthSource.soundfont='/no/font.sf2'"], 1,
     "SoundFont '/no/font.sf2' is neither a file nor one of"),
])
def test_prepare_errors_are_clear(tmp_path, args, code, message):
  result = musiclm(*args, f"--data_dir={tmp_path}")
  assert result.returncode == code, result.stderr[-2000:]
  assert message in result.stderr
