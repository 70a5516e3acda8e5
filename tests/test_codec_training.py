"""SoundStream as users train and use it: GAN steps, `musiclm train`, `musiclm
codec`, `musiclm eval codec`, on the tiny corpus."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile
import xla_env

from musiclm_jax import audio
from musiclm_jax.eval import codec as codec_eval
from musiclm_jax.tokenizers import codec_files
from musiclm_jax.tokenizers import soundstream
from musiclm_jax.training.checkpoints import load_trained_variables
from musiclm_jax.training.metrics import read_jsonl_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def musiclm(*args, devices=1):
  env = xla_env.subprocess_env(devices)
  return subprocess.run([sys.executable, "-m", "musiclm_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_codec(tiny_gm_corpus, tmp_path_factory):
  """A codec trained for 4 GAN steps (2 of warm-up) by `musiclm train` with the
  tiny gin file, its parameters sharded over a (1, 2, 2) mesh of 4 CPU devices (fsdp
  and tensor axes; a step on 8 virtual devices of 2 cores costs half as much again),
  saving every step."""
  model_dir = tmp_path_factory.mktemp("codec")
  result = musiclm("train", "--gin_file=gin/tokenizers/soundstream_tiny.gin",
                   f"--gin_bindings=MODEL_DIR='{model_dir}'",
                   f"--gin_bindings=CORPUS_DIR='{tiny_gm_corpus}'",
                   "--gin_bindings=train.num_steps=4", "--gin_bindings=train.batch_size=8",
                   "--gin_bindings=AudioClipTask.segment_seconds=0.16",
                   "--gin_bindings=train.log_every_steps=1",
                   "--gin_bindings=train.eval_every_steps=4",
                   "--gin_bindings=train.eval_batches=1",
                   "--gin_bindings=Partitioner.mesh_shape=(1, 2, 2)",
                   "--gin_bindings=Checkpointer.save_every_steps=1",
                   "--gin_bindings=Checkpointer.max_to_keep=4",
                   "--gin_bindings=CodecModel.adversarial_warmup_steps=2",
                   "--gin_bindings=generator/warmup_cosine.warmup_steps=1",
                   "--gin_bindings=discriminator/warmup_cosine.warmup_steps=1",
                   devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 4/4 (100%)" in result.stdout and "audio_seconds/s" in result.stdout
  return str(model_dir)


def test_gan_steps_log_finite_metrics_and_save_the_codebooks(trained_codec):
  rows = [r for r in read_jsonl_metrics(trained_codec) if "train/loss" in r]
  assert [r["train/adversarial_on"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
  assert all(np.isfinite(v) for r in rows for v in r.values())
  assert rows[0]["train/quantizer/perplexity"] > 1.0  # codebooks fitted by k-means
  assert rows[2]["train/adversarial_loss"] > 0 and rows[2]["train/feature_matching_loss"] > 0
  variables, manifest = load_trained_variables(trained_codec)
  assert manifest["model"] == "CodecModel"
  assert manifest["model_config"]["num_levels"] == 12
  assert variables["quantizer"]  # the EMA codebooks are part of the checkpoint
  eval_rows = [r for r in read_jsonl_metrics(trained_codec) if "eval/mel_distance" in r]
  assert eval_rows and np.isfinite(eval_rows[0]["eval/mel_distance"])
  events = b"".join(open(os.path.join(trained_codec, f), "rb").read()
                    for f in os.listdir(trained_codec) if f.startswith("events.out"))
  for tag in (b"codec/original", b"codec/reconstruction", b"codec/original_log_mel",
              b"codec/reconstruction_log_mel"):
    assert tag in events  # TensorBoard audio and spectrograms of validation clips


def test_discriminator_is_frozen_during_warm_up_only(trained_codec):
  params = {s: load_trained_variables(trained_codec, s)[0]["params"] for s in (1, 2, 4)}
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))
  assert same(params[1]["discriminator"], params[2]["discriminator"])  # warm-up
  assert not same(params[2]["discriminator"], params[4]["discriminator"])  # adversarial
  assert not same(params[1]["generator"], params[2]["generator"])


def test_codec_cli_roundtrip_encode_decode(trained_codec, tmp_path):
  source = tmp_path / "in.ogg"  # any format, rate and channel count
  t = np.arange(int(1.3 * 32000)) / 32000
  stereo = 0.3 * np.stack([np.sin(2 * np.pi * 330 * t), np.sin(2 * np.pi * 440 * t)], 1)
  soundfile.write(source, stereo.astype(np.float32), 32000)
  result = musiclm("codec", "roundtrip", f"--checkpoint={trained_codec}", str(source),
                   str(tmp_path / "out.wav"), "--num_levels=4")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["levels"] == 4 and summary["bitrate"] == 2000
  out, rate = audio.read(str(tmp_path / "out.wav"))
  assert rate == 24000 and out.shape == (1, int(1.3 * 24000))

  codec, variables = soundstream.load_codec(trained_codec)
  encoded = codec_files.encode_file(codec, variables, str(source), str(tmp_path / "c.npz"))
  assert encoded["frames"] == 65 and encoded["levels"] == 12 and encoded["bitrate"] == 6000
  codes, num_samples = codec_files.read_codes(codec, str(tmp_path / "c.npz"))
  assert codes.shape == (65, 12) and num_samples == 31200
  assert codes.min() >= 0 and codes.max() < 1024
  codec_files.decode_file(codec, variables, str(tmp_path / "c.npz"), str(tmp_path / "d.wav"))
  decoded, _ = audio.read(str(tmp_path / "d.wav"))
  wav, _ = audio.load(str(source))
  offline = np.asarray(codec.decode(variables, codec.encode(variables, wav[None])))[0]
  np.testing.assert_allclose(decoded[0], np.clip(offline[:num_samples], -1, 1), atol=1e-3)

  other = soundstream.SoundStreamCodec(soundstream.SoundStreamConfig(channels=4, embedding_dim=16))
  with pytest.raises(codec_files.CodesFileError, match="written by a codec"):
    codec_files.read_codes(other, str(tmp_path / "c.npz"))


def test_codec_cli_errors_are_clear(tmp_path):
  missing = musiclm("codec", "roundtrip", f"--checkpoint={tmp_path}", "a.wav", "b.wav")
  assert missing.returncode == 1 and "train the model first" in missing.stderr
  usage = musiclm("codec", "squash", "a", "b")
  assert usage.returncode == 2 and "usage: musiclm codec" in usage.stderr


def test_eval_codec_reports_every_level_beside_opus(trained_codec, tiny_gm_corpus, tmp_path):
  result = musiclm("eval", "codec", f"--checkpoint={trained_codec}",
                   f"--corpus_dir={tiny_gm_corpus}", "--num_clips=2", "--seconds=1",
                   f"--output={tmp_path / 'report.json'}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert [r["levels"] for r in report["codec"]] == list(range(1, 13))
  assert [r["bitrate"] for r in report["codec"]] == [500 * q for q in range(1, 13)]
  assert [r["bitrate"] for r in report["opus"]] == [6000]
  opus = report["opus"][0]
  assert opus["file_bitrate"] > 4000  # hard CBR at 6 kbit/s, plus ~1 kB of Ogg headers
  assert opus["mel_distance"] < 2.0 and opus["si_snr"] > -5  # Opus is a working codec
  assert "SoundStream q=12" in result.stdout and "Opus" in result.stdout


def test_opus_roundtrip_measures_a_real_codec(tmp_path):
  t = np.arange(24000) / 24000
  wav = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
  coded, bitrate = codec_eval.opus_roundtrip(wav, 6000, str(tmp_path))
  assert coded.shape == wav.shape and 4000 < bitrate < 20000  # 1 s: Ogg headers count
  clean = codec_eval._quality(wav[None], coded[None])  # pylint: disable=protected-access
  noisy = codec_eval._quality(wav[None], (wav + 0.3 * np.random.default_rng(0).standard_normal(  # pylint: disable=protected-access
      wav.size)).astype(np.float32)[None])
  assert clean["mel_distance"] < noisy["mel_distance"]
