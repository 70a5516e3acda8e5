"""Generated audio files for tests: good ones in several formats and broken ones."""
from __future__ import annotations

import json
import os

import numpy as np
import soundfile


def tone(seconds: float, rate: int, freqs=(220.0, 277.2, 329.6), level: float = 0.3,
         channels: int = 1) -> np.ndarray:
  """A chord with a little vibrato and decay, [samples, channels] float32."""
  t = np.arange(int(seconds * rate)) / rate
  wav = sum(np.sin(2 * np.pi * f * t + 0.3 * np.sin(2 * np.pi * 5 * t)) for f in freqs)
  wav = level * wav / len(freqs) * (0.6 + 0.4 * np.exp(-(t % 1.0) * 3))
  return np.stack([wav * (0.8 + 0.2 * c) for c in range(channels)], axis=1).astype(np.float32)


def tune(pitches, step=0.25, shift=0, harmonics=(1.0,), rate=16000) -> np.ndarray:
  """A played melody: one note of MIDI pitch p + shift per `step` seconds."""
  notes = []
  for p in pitches:
    f = 440.0 * 2.0 ** ((p + shift - 69) / 12)
    t = np.arange(int(step * rate)) / rate
    envelope = np.minimum(1.0, np.minimum(t, step - t) * 50)
    notes.append(envelope * sum(a * np.sin(2 * np.pi * f * (k + 1) * t)
                                for k, a in enumerate(harmonics)))
  return (0.3 * np.concatenate(notes)).astype(np.float32)


TUNE_A = [60, 62, 64, 65, 67, 65, 64, 62, 60, 67, 64, 60, 62, 64, 62, 60]
TUNE_B = [64, 64, 71, 69, 60, 72, 62, 62, 66, 61, 70, 63, 67, 67, 59, 65]


def write_audio_folder(directory: str, seconds: float = 2.0) -> dict[str, str]:
  """Writes a folder with good and bad files and captions.jsonl.

  Returns file name -> expected outcome: 'ok', 'ok:<n clips>' or the skip reason.
  """
  os.makedirs(os.path.join(directory, "sub"), exist_ok=True)
  expected = {}

  def put(name, data, rate, outcome, **kwargs):
    soundfile.write(os.path.join(directory, name), data, rate, **kwargs)
    expected[name] = outcome

  put("mono_24k.wav", tone(seconds, 24000), 24000, "ok")
  put("stereo_44k.flac", tone(seconds, 44100, channels=2), 44100, "ok")
  put("sub/ogg_48k.ogg", tone(seconds, 48000, channels=2), 48000, "ok")
  put("mp3_22k.mp3", tone(seconds, 22050), 22050, "ok", format="MP3")
  put("six_channels_16k.wav", tone(seconds, 16000, channels=6), 16000, "ok")
  put("long_8k.wav", tone(3.2 * seconds, 8000), 8000, "ok:3")
  put("short_tail.wav", tone(0.7 * seconds, 24000), 24000, "ok")  # padded
  put("silent.wav", np.zeros((int(seconds * 24000), 1), np.float32), 24000, "silent")
  put("too_short.wav", tone(0.2 * seconds, 24000), 24000, "too_short")
  clipped = np.clip(tone(seconds, 24000, level=3.0), -1.0, 1.0)
  put("clipped.wav", clipped, 24000, "clipped")
  nans = tone(seconds, 24000)
  nans[::7] = np.nan
  put("nan.wav", nans, 24000, "non_finite", subtype="FLOAT")
  few_nans = tone(seconds, 24000)
  few_nans[100:103] = np.nan
  put("few_nan.wav", few_nans, 24000, "ok", subtype="FLOAT")  # zeroed
  loud = tone(seconds, 24000, level=1.6)
  put("hot_float.wav", loud / 1.0, 24000, "ok", subtype="FLOAT")  # peak > 1: rescaled
  with open(os.path.join(directory, "corrupt.wav"), "wb") as f:
    f.write(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" + os.urandom(500))
  expected["corrupt.wav"] = "corrupt"
  open(os.path.join(directory, "empty.flac"), "wb").close()
  expected["empty.flac"] = "empty"
  expected["not_there.wav"] = "missing"
  with open(os.path.join(directory, "captions.jsonl"), "w") as f:
    for i, name in enumerate(sorted(expected)):
      row = {"file": name, "caption": f"Test clip {i}: a soft chord from {name}.",
             "aspect_list": "soft, chord, test", "genre": "test tone"}
      if name == "mono_24k.wav":
        row["tempo_bpm"] = 100
      f.write(json.dumps(row) + "\n")
  return expected
