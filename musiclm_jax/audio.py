"""Audio in and out: read any common file, repair what is sound to repair,
refuse the rest with a reason.

Every corpus stores mono float32 at `SAMPLE_RATE` (24 kHz, SoundStream's
rate); consumers at other rates (w2v-BERT and MuLan at 16 kHz) call
`resample` on the fly. No TensorFlow here.

Repairs (named in `Repairs`, counted in build reports): downmix to mono,
resample, scale down a peak above full scale, zero a few non-finite samples,
pad a short clip, crop a long one. Refusals (`AudioError.reason`): the file is
unreadable or empty, mostly non-finite, silent, heavily clipped, or too short.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 24000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


class AudioError(ValueError):
  """Audio that cannot be used. `reason` is a short code for build reports."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class QualityLimits:
  """When audio is refused rather than repaired.

  silence_dbfs: RMS below this (dB full scale) is silent.
  max_clipped_fraction: more samples than this at full scale is clipped.
  max_non_finite_fraction: up to this fraction of NaN/Inf samples is zeroed;
    more is refused.
  """
  silence_dbfs: float = -60.0
  max_clipped_fraction: float = 0.01
  max_non_finite_fraction: float = 0.001


def read(path: str) -> tuple[np.ndarray, int]:
  """Decodes a file. Returns (float32 [channels, samples], sample rate).

  wav, flac, ogg/vorbis, opus, mp3 and aiff are read by libsndfile; anything
  else falls back to librosa's decoders (audioread/ffmpeg).
  """
  if not os.path.isfile(path):
    raise AudioError("missing", f"{path}: no such file")
  if os.path.getsize(path) == 0:
    raise AudioError("empty", f"{path}: the file is empty (0 bytes)")
  try:
    wav, rate = soundfile.read(path, dtype="float32", always_2d=True)
    wav = wav.T
  except (soundfile.LibsndfileError, RuntimeError, TypeError) as sf_error:
    try:
      import librosa  # pylint: disable=g-import-not-at-top
      with warnings.catch_warnings():  # librosa warns that it falls back to audioread
        warnings.simplefilter("ignore")
        wav, rate = librosa.load(path, sr=None, mono=False)
    except Exception as e:  # librosa/audioread raise many types
      raise AudioError("corrupt", f"{path}: cannot decode ({sf_error}; {e})") from e
    wav = np.atleast_2d(wav).astype(np.float32)
  if wav.shape[1] == 0:
    raise AudioError("empty", f"{path}: no samples")
  return wav, int(rate)


@dataclasses.dataclass
class Repairs:
  """What was done to make a signal usable, for build reports."""
  done: list[str] = dataclasses.field(default_factory=list)

  def add(self, name: str) -> None:
    if name not in self.done:
      self.done.append(name)


def to_mono(wav: np.ndarray, repairs: Repairs) -> np.ndarray:
  """[channels, samples] or [samples] -> [samples], averaging channels."""
  if wav.ndim == 1:
    return wav
  if wav.shape[0] > 1:
    repairs.add("downmixed")
  return wav.mean(axis=0)


def resample(wav: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
  """Band-limited resampling (soxr, high quality) along the last axis."""
  if rate == target_rate:
    return wav
  if rate <= 0:
    raise AudioError("bad_rate", f"sample rate {rate} Hz is not positive")
  resampled = soxr.resample(np.moveaxis(wav, -1, 0), rate, target_rate, quality="HQ")
  return np.moveaxis(resampled, 0, -1).astype(np.float32)


def rms_dbfs(wav: np.ndarray) -> float:
  """Root-mean-square level in dB relative to full scale."""
  rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
  return 20.0 * np.log10(max(rms, 1e-10))


def check_and_repair(wav: np.ndarray, repairs: Repairs,
                     limits: QualityLimits = QualityLimits(), name: str = "audio") -> np.ndarray:
  """Zeroes a few non-finite samples, refuses silence and heavy clipping,
  scales a peak above full scale down to 0.99. [samples] -> [samples]."""
  finite = np.isfinite(wav)
  if not finite.all():
    fraction = 1.0 - finite.mean()
    if fraction > limits.max_non_finite_fraction:
      raise AudioError("non_finite", f"{name}: {fraction:.2%} of samples are NaN/Inf")
    wav = np.where(finite, wav, 0.0).astype(np.float32)
    repairs.add("zeroed_non_finite")
  level = rms_dbfs(wav)
  if level < limits.silence_dbfs:
    raise AudioError("silent", f"{name}: silent (RMS {level:.1f} dBFS < "
                     f"{limits.silence_dbfs:.0f} dBFS)")
  peak = float(np.max(np.abs(wav)))
  clipped = float(np.mean(np.abs(wav) >= min(peak, 1.0) * 0.999)) if peak >= 0.99 else 0.0
  if clipped > limits.max_clipped_fraction:
    raise AudioError("clipped", f"{name}: {clipped:.2%} of samples sit at full scale "
                     f"(limit {limits.max_clipped_fraction:.2%})")
  if peak > 1.0:
    wav = wav * np.float32(0.99 / peak)
    repairs.add("rescaled_peak")
  return wav


def fit_length(wav: np.ndarray, num_samples: int, repairs: Repairs) -> np.ndarray:
  """Zero-pads or crops [samples] to exactly `num_samples`."""
  if len(wav) < num_samples:
    repairs.add("padded")
    return np.pad(wav, (0, num_samples - len(wav)))
  if len(wav) > num_samples:
    repairs.add("cropped")
  return wav[:num_samples]


def load(path: str, sample_rate: int = SAMPLE_RATE,
         limits: QualityLimits = QualityLimits()) -> tuple[np.ndarray, Repairs]:
  """Reads, downmixes, resamples and checks a file. Returns (float32 [samples], repairs)."""
  repairs = Repairs()
  wav, rate = read(path)
  wav = to_mono(wav, repairs)
  if rate != sample_rate:
    wav = resample(wav, rate, sample_rate)
    repairs.add("resampled")
  return check_and_repair(wav, repairs, limits, name=path), repairs


def write_wav(path: str, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
  """Writes mono float32 [samples] as 16-bit PCM wav (atomically)."""
  tmp = f"{path}.tmp.wav"
  soundfile.write(tmp, np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16")
  os.replace(tmp, path)
