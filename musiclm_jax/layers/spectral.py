"""Spectral features in JAX: STFT, mel filterbank, log-mel spectrogram.

Pure jnp/numpy (no librosa, no TensorFlow), so that models, losses and
benchmarks run on images that only have jax. Conventions follow librosa's
defaults: centered frames with reflect padding, periodic Hann window, Slaney
mel scale with area normalisation; `tests/test_spectral.py` checks them
against librosa.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def _hann(win_length: int) -> np.ndarray:
  """Periodic Hann window `[win_length]` (the STFT convention)."""
  return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)


def stft(wav: jnp.ndarray, n_fft: int, hop_length: int,
         win_length: int | None = None) -> jnp.ndarray:
  """Short-time Fourier transform of centered, reflect-padded frames.

  Args:
    wav: float `[batch, samples]`.
    n_fft: FFT size.
    hop_length: samples between frames.
    win_length: Hann window length (default `n_fft`), zero-padded to `n_fft`.
  Returns:
    complex64 `[batch, samples // hop_length + 1, n_fft // 2 + 1]`.
  """
  win_length = win_length or n_fft
  if win_length > n_fft:
    raise ValueError(f"win_length {win_length} exceeds n_fft {n_fft}")
  if wav.shape[-1] <= n_fft // 2:
    raise ValueError(f"signal of {wav.shape[-1]} samples is too short for reflect "
                     f"padding by n_fft // 2 = {n_fft // 2}")
  window = np.zeros(n_fft, np.float32)
  start = (n_fft - win_length) // 2
  window[start:start + win_length] = _hann(win_length)
  padded = jnp.pad(wav.astype(jnp.float32), ((0, 0), (n_fft // 2, n_fft // 2)),
                   mode="reflect")
  num_frames = wav.shape[-1] // hop_length + 1
  index = (np.arange(num_frames)[:, None] * hop_length + np.arange(n_fft)[None, :])
  frames = padded[:, index] * window  # [batch, frames, n_fft]
  return jnp.fft.rfft(frames, axis=-1).astype(jnp.complex64)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney mel scale: linear below 1 kHz, logarithmic above."""
  hz = np.asarray(hz, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
  return np.where(hz >= min_log_hz,
                  min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep,
                  hz / f_sp)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  mel = np.asarray(mel, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
  return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)),
                  f_sp * mel)


@functools.lru_cache(maxsize=64)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
  """Triangular Slaney mel filters with area normalisation.

  Returns:
    float32 `[n_fft // 2 + 1, n_mels]`, so that `power @ filters` is the mel
    power spectrum.
  """
  fmax = sample_rate / 2 if fmax is None else fmax
  if not 0 <= fmin < fmax <= sample_rate / 2:
    raise ValueError(f"need 0 <= fmin < fmax <= {sample_rate / 2}; got fmin={fmin}, "
                     f"fmax={fmax}")
  bin_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
  widths = np.diff(edges_hz)
  slopes = edges_hz[:, None] - bin_hz[None, :]  # [n_mels + 2, bins]
  lower = -slopes[:-2] / widths[:-1, None]
  upper = slopes[2:] / widths[1:, None]
  weights = np.maximum(0, np.minimum(lower, upper))
  weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
  return weights.T.astype(np.float32)


def log_mel_spectrogram(wav: jnp.ndarray, sample_rate: int, n_fft: int, hop_length: int,
                        n_mels: int, fmin: float = 0.0, fmax: float | None = None,
                        eps: float = 1e-5) -> jnp.ndarray:
  """Natural log of the mel power spectrogram, floored at `eps`.

  Args:
    wav: float `[batch, samples]`.
  Returns:
    float32 `[batch, samples // hop_length + 1, n_mels]`.
  """
  power = jnp.square(jnp.abs(stft(wav, n_fft, hop_length)))
  mel = power @ mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
  return jnp.log(jnp.maximum(mel, eps))
