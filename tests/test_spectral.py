"""Spectral features agree with librosa's definitions."""
import librosa
import numpy as np
import pytest

from musiclm_jax.layers import spectral


def _signal(seconds=0.5, rate=16000, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(t.size)).astype(
      np.float32)


@pytest.mark.parametrize("n_fft,hop,win", [(512, 128, None), (400, 160, 320), (64, 16, None)])
def test_stft_matches_librosa(n_fft, hop, win):
  wav = _signal()
  ours = np.asarray(spectral.stft(wav[None], n_fft, hop, win))[0]
  theirs = librosa.stft(wav, n_fft=n_fft, hop_length=hop, win_length=win,
                        center=True, pad_mode="reflect").T
  assert ours.shape == theirs.shape == (wav.size // hop + 1, n_fft // 2 + 1)
  np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=1e-3)


def test_mel_filterbank_matches_librosa():
  ours = spectral.mel_filterbank(24000, 1024, 80, 20.0, 11000.0)
  theirs = librosa.filters.mel(sr=24000, n_fft=1024, n_mels=80, fmin=20.0, fmax=11000.0).T
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


def test_log_mel_matches_librosa():
  wav = _signal()
  ours = np.asarray(spectral.log_mel_spectrogram(wav[None], 16000, 400, 160, 64))[0]
  mel = librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=400, hop_length=160,
                                       n_mels=64, power=2.0, pad_mode="reflect").T
  np.testing.assert_allclose(ours, np.log(np.maximum(mel, 1e-5)), atol=2e-3)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="too short"):
    spectral.stft(np.zeros((1, 100), np.float32), 512, 128)
  with pytest.raises(ValueError, match="fmax"):
    spectral.mel_filterbank(16000, 512, 40, 0.0, 9000.0)
