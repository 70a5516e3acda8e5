"""Renders MIDI to a mono 24 kHz waveform with FluidSynth and a GM SoundFont.

FluidSynth and the SoundFonts are Debian packages that
`scripts/install_system_packages.sh` installs (`fluidsynth`,
`fluid-soundfont-gm`: FluidR3_GM, 141 MB; `timgm6mb-soundfont`: TimGM6mb,
6 MB, for tests).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np
import pretty_midi
import soundfile

SOUNDFONT_DIRS = ("/usr/share/sounds/sf2", "/usr/share/soundfonts", "/usr/local/share/soundfonts")
SOUNDFONTS = {"fluidr3": "FluidR3_GM.sf2", "timgm6mb": "TimGM6mb.sf2"}
INSTALL_HINT = "run `bash scripts/install_system_packages.sh` (Debian/Ubuntu) to install it"


class RenderError(RuntimeError):
  """FluidSynth is missing or failed on a piece."""


def find_soundfont(name_or_path: str = "fluidr3") -> str:
  """Path of a SoundFont given a path or a short name ('fluidr3', 'timgm6mb')."""
  if os.path.isfile(name_or_path):
    return name_or_path
  file_name = SOUNDFONTS.get(name_or_path.lower())
  if file_name is None:
    raise RenderError(f"SoundFont {name_or_path!r} is neither a file nor one of "
                      f"{sorted(SOUNDFONTS)}")
  for directory in SOUNDFONT_DIRS:
    path = os.path.join(directory, file_name)
    if os.path.isfile(path):
      return path
  raise RenderError(f"SoundFont {file_name} not found in {', '.join(SOUNDFONT_DIRS)}; "
                    + INSTALL_HINT)


def fluidsynth_binary() -> str:
  path = shutil.which("fluidsynth")
  if path is None:
    raise RenderError("the `fluidsynth` program is not installed; " + INSTALL_HINT)
  return path


def render_midi(midi: pretty_midi.PrettyMIDI, soundfont: str, sample_rate: int = 24000,
                gain: float = 0.5) -> np.ndarray:
  """Synthesizes `midi`, downmixed to mono. Returns float32 [samples].

  The result runs to the end of the last note plus the release/reverb tail;
  callers crop. Rendering is deterministic for a given SoundFont (FluidSynth
  has no random voices; its chorus and reverb are fixed filters).
  """
  with tempfile.TemporaryDirectory(prefix="musiclm_render_") as tmp:
    midi_path, wav_path = os.path.join(tmp, "piece.mid"), os.path.join(tmp, "piece.wav")
    midi.write(midi_path)
    command = [fluidsynth_binary(), "-n", "-i", "-q", "-g", str(gain),
               "-r", str(sample_rate), "-F", wav_path, soundfont, midi_path]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not os.path.isfile(wav_path):
      raise RenderError(f"fluidsynth failed (exit {result.returncode}): "
                        f"{(result.stderr or result.stdout).strip()[-500:]}")
    wav, rate = soundfile.read(wav_path, dtype="float32", always_2d=True)
  if rate != sample_rate:
    raise RenderError(f"fluidsynth wrote {rate} Hz, asked for {sample_rate} Hz")
  return wav.mean(axis=1)
