"""Audio reading and repair: every broken kind of file is named or repaired."""
import numpy as np
import pytest

from musiclm_jax import audio
import audio_fixtures


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  directory = tmp_path_factory.mktemp("audio_folder")
  return str(directory), audio_fixtures.write_audio_folder(str(directory))


def test_every_file_is_loaded_or_refused_with_its_reason(folder):
  directory, expected = folder
  for name, outcome in expected.items():
    path = f"{directory}/{name}"
    if outcome == "too_short":  # a clip-level decision: see test_corpora
      continue
    if outcome.startswith("ok"):
      wav, _ = audio.load(path)
      assert wav.ndim == 1 and wav.dtype == np.float32 and np.isfinite(wav).all(), name
      assert np.abs(wav).max() <= 1.0, name
    else:
      with pytest.raises(audio.AudioError) as error:
        audio.load(path)
      assert error.value.reason == outcome, (name, str(error.value))
      assert name in str(error.value)


@pytest.mark.parametrize("name, repairs", [
    ("stereo_44k.flac", ["downmixed", "resampled"]),
    ("six_channels_16k.wav", ["downmixed", "resampled"]),
    ("mp3_22k.mp3", ["resampled"]),
    ("few_nan.wav", ["zeroed_non_finite"]),
    ("hot_float.wav", ["rescaled_peak"]),
    ("mono_24k.wav", []),
])
def test_repairs_are_named(folder, name, repairs):
  directory, _ = folder
  _, done = audio.load(f"{directory}/{name}")
  assert done.done == repairs


def test_resampling_keeps_duration_and_pitch():
  rate = 44100
  t = np.arange(rate * 2) / rate
  wav = np.sin(2 * np.pi * 440.0 * t).astype(np.float32)
  out = audio.resample(wav, rate, 24000)
  assert out.shape == (48000,) and out.dtype == np.float32
  spectrum = np.abs(np.fft.rfft(out))
  assert abs(np.argmax(spectrum) * 24000 / len(out) - 440.0) < 1.0
  batched = audio.resample(np.stack([wav, wav]), rate, 16000)
  assert batched.shape == (2, 32000)


def test_fit_length_pads_and_crops():
  repairs = audio.Repairs()
  assert audio.fit_length(np.ones(5, np.float32), 8, repairs).tolist() == [1] * 5 + [0] * 3
  assert audio.fit_length(np.ones(9, np.float32), 8, repairs).shape == (8,)
  assert repairs.done == ["padded", "cropped"]


def test_write_then_read_round_trips(tmp_path):
  wav = audio_fixtures.tone(1.0, 24000)[:, 0]
  path = str(tmp_path / "x.wav")
  audio.write_wav(path, wav)
  back, _ = audio.load(path)
  np.testing.assert_allclose(back, wav, atol=1e-4)
