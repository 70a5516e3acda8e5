"""Clips rendered from symbolic `Piece`s: shared by gm_synth and music21_gm."""
from __future__ import annotations

import io

import numpy as np

from musiclm_jax import audio
from musiclm_jax.corpora import base
from musiclm_jax.music import captions
from musiclm_jax.music import piece as piece_lib
from musiclm_jax.music import render


def piece_metadata(piece: piece_lib.Piece) -> base.Metadata:
  return base.Metadata(tempo_bpm=float(piece.tempo_bpm), key=piece.key, mode=piece.mode,
                       time_signature=piece.time_signature, instruments=piece.instruments,
                       genre=piece.genre, mood=piece.mood, source_id=piece.source_id)


TARGET_RMS_DBFS = -20.0
MAX_PEAK = 0.95


def normalize_loudness(wav: np.ndarray) -> np.ndarray:
  """Scales [samples] to TARGET_RMS_DBFS, or less where the peak would pass MAX_PEAK.

  SoundFont presets differ by 10 dB and more (a solo flute against a full
  band); a common level keeps codec and MuLan training from learning loudness
  as a proxy for instrumentation.
  """
  gain = 10.0 ** ((TARGET_RMS_DBFS - audio.rms_dbfs(wav)) / 20.0)
  gain = min(gain, MAX_PEAK / max(float(np.max(np.abs(wav))), 1e-9))
  return (wav * gain).astype(np.float32)


def render_clip(piece: piece_lib.Piece, key: str, spec: base.BuildSpec, soundfont: str,
                rng: np.random.Generator, min_fraction: float = 0.5) -> base.Clip:
  """Renders a piece into one clip of spec.seconds at a common loudness.

  The render runs past the last note (release and reverb tails) and is cut to
  the clip; a piece shorter than the clip is zero-padded, and one shorter than
  `min_fraction` of it is refused as too short.
  """
  content_s = min(piece.midi.get_end_time(), spec.seconds)
  if content_s < min_fraction * spec.seconds:
    raise audio.AudioError("too_short", f"{key}: the piece lasts {content_s:.1f}s, less than "
                           f"{min_fraction:.0%} of a {spec.seconds:g}s clip")
  repairs = audio.Repairs()
  wav = render.render_midi(piece.midi, render.find_soundfont(soundfont), audio.SAMPLE_RATE)
  if len(wav) < spec.num_samples:
    repairs.add("padded")
  wav = np.pad(wav, (0, max(spec.num_samples - len(wav), 0)))[:spec.num_samples]
  wav = normalize_loudness(audio.check_and_repair(wav, repairs, name=key))
  midi_bytes = io.BytesIO()
  piece.midi.write(midi_bytes)
  return base.Clip(key=key, audio=wav, caption=captions.caption(piece, rng),
                   aspect_list=captions.aspect_list(piece), metadata=piece_metadata(piece),
                   duration_s=content_s, midi=midi_bytes.getvalue(), repairs=repairs.done)
