"""Codec evaluation (`musiclm eval codec`): quality against bitrate, beside Opus.

For every number of RVQ levels q = 1..12 the clips are encoded, cut to the
first q levels and decoded; the multi-resolution mel distance and SI-SNR
against the originals are averaged over clips. Opus (`opusenc`/`opusdec`
from opus-tools, installed by `scripts/install_system_packages.sh`) codes
the same clips at every one of those bitrates that it supports (6 kbit/s
and up), in hard-CBR music mode, and is measured the same way. Lower mel
distance and higher SI-SNR are better.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from musiclm_jax import audio
from musiclm_jax.tokenizers import codec_losses
from musiclm_jax.tokenizers.soundstream import SAMPLE_RATE, SoundStreamCodec

OPUS_MIN_BITRATE = 6000


class OpusUnavailableError(FileNotFoundError):
  """opusenc/opusdec are not installed."""


def _quality(ref: np.ndarray, est: np.ndarray) -> dict[str, float]:
  ref, est = jnp.asarray(ref), jnp.asarray(est)
  return {"mel_distance": float(jnp.mean(codec_losses.mel_distance(ref, est))),
          "si_snr": float(jnp.mean(codec_losses.si_snr(ref, est)))}


def opus_roundtrip(wav: np.ndarray, bitrate: float, workdir: str) -> tuple[np.ndarray, float]:
  """Opus-coded version of mono 24 kHz `wav [samples]` and the file's real bitrate."""
  if not (shutil.which("opusenc") and shutil.which("opusdec")):
    raise OpusUnavailableError("opusenc/opusdec not found; run "
                               "scripts/install_system_packages.sh (opus-tools)")
  source, coded, decoded = (os.path.join(workdir, n) for n in ("in.wav", "x.opus", "out.wav"))
  audio.write_wav(source, wav, SAMPLE_RATE)
  subprocess.run(["opusenc", "--quiet", "--music", "--hard-cbr", "--bitrate",
                  f"{bitrate / 1000:.3f}", source, coded], check=True)
  subprocess.run(["opusdec", "--quiet", "--rate", str(SAMPLE_RATE), "--float", coded,
                  decoded], check=True)
  out, _ = audio.read(decoded)
  out = np.pad(out[0], (0, max(len(wav) - out.shape[1], 0)))[:len(wav)]
  return out, os.path.getsize(coded) * 8 / (len(wav) / SAMPLE_RATE)


def evaluate_codec(codec: SoundStreamCodec, variables: Any, clips: np.ndarray,
                   levels: Sequence[int] | None = None, with_opus: bool = True,
                   batch_size: int = 8) -> dict[str, Any]:
  """Quality per number of levels (and per Opus bitrate) on `clips [n, samples]`.

  Returns:
    `{"clips", "seconds", "codec": [{levels, bitrate, mel_distance, si_snr}],
    "opus": [{bitrate, file_bitrate, mel_distance, si_snr}]}`.
  """
  levels = list(levels or range(1, codec.config.num_levels + 1))
  codes = np.concatenate([np.asarray(codec.encode(variables, clips[i:i + batch_size]))
                          for i in range(0, len(clips), batch_size)])
  rows = []
  for q in levels:
    decoded = np.concatenate([
        np.asarray(codec.decode(variables, codes[i:i + batch_size, :, :q]))
        for i in range(0, len(clips), batch_size)])[:, :clips.shape[1]]
    rows.append({"levels": q, "bitrate": codec.bitrate(q), **_quality(clips, decoded)})
  report = {"clips": len(clips), "seconds": clips.shape[1] / SAMPLE_RATE, "codec": rows,
            "opus": []}
  if with_opus:
    with tempfile.TemporaryDirectory() as workdir:
      for bitrate in sorted({r["bitrate"] for r in rows if r["bitrate"] >= OPUS_MIN_BITRATE}):
        coded = [opus_roundtrip(clip, bitrate, workdir) for clip in clips]
        report["opus"].append({"bitrate": bitrate,
                               "file_bitrate": float(np.mean([b for _, b in coded])),
                               **_quality(clips, np.stack([w for w, _ in coded]))})
  return report


def format_report(report: dict[str, Any]) -> str:
  """A plain-text table of `evaluate_codec`'s report."""
  lines = [f"{report['clips']} clips of {report['seconds']:.2f} s",
           f"{'codec':<14}{'bit/s':>8}{'mel dist':>10}{'SI-SNR dB':>11}"]
  for row in report["codec"]:
    lines.append(f"{'SoundStream q=' + str(row['levels']):<14}{row['bitrate']:>8.0f}"
                 f"{row['mel_distance']:>10.3f}{row['si_snr']:>11.2f}")
  for row in report["opus"]:
    lines.append(f"{'Opus':<14}{row['bitrate']:>8.0f}{row['mel_distance']:>10.3f}"
                 f"{row['si_snr']:>11.2f}   (file: {row['file_bitrate']:.0f} bit/s)")
  return "\n".join(lines)
