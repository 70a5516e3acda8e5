"""Generation evaluation measures on signals whose answer is known."""
import numpy as np
import pytest

from musiclm_jax.eval import generation


def test_frechet_distance_is_zero_for_one_set_and_grows_with_the_shift():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((400, 4))
  assert generation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  b = rng.standard_normal((400, 4))
  near = generation.frechet_distance(a, b)
  far = generation.frechet_distance(a, b + 2.0)
  assert near < 0.2 and far == pytest.approx(near + 4 * 4.0, rel=0.05)
  with pytest.raises(ValueError, match="two sets"):
    generation.frechet_distance(a[:1], b)


def click_track(bpm, seconds=8.0, rate=24000):
  wav = np.zeros(int(seconds * rate), np.float32)
  period = int(round(60.0 / bpm * rate))
  t = np.arange(int(0.03 * rate)) / rate
  click = (np.sin(2 * np.pi * 1500 * t) * np.exp(-t * 120)).astype(np.float32)
  for start in range(0, len(wav) - len(click), period):
    wav[start:start + len(click)] += click
  return wav


@pytest.mark.parametrize("bpm", [90.0, 128.0])
def test_tempo_of_a_click_track(bpm):
  estimated = generation.estimate_tempo(click_track(bpm))
  assert generation.tempo_matches(estimated, bpm, octave=True), estimated
  assert not generation.tempo_matches(bpm * 1.3, bpm, octave=True)
  assert generation.tempo_matches(bpm * 2, bpm, octave=True)
  assert not generation.tempo_matches(bpm * 2, bpm)


def chord_progression(root_midi, minor, seconds=6.0, rate=24000):
  """I - IV - V - I triads (harmonic minor's V for minor keys)."""
  third = 3 if minor else 4
  chords = [(0, third, 7), (5, 5 + (3 if minor else 4), 12), (7, 11, 14), (0, third, 7)]
  wav, part = [], int(seconds * rate / 4)
  t = np.arange(part) / rate
  for chord in chords:
    wav.append(sum(np.sin(2 * np.pi * 440 * 2 ** ((root_midi + n - 69) / 12) * t)
                   for n in chord) / 3)
  return np.concatenate(wav).astype(np.float32)


@pytest.mark.parametrize("root, minor, expected", [(60, False, (0, "major")),
                                                   (57, True, (9, "minor")),
                                                   (62, False, (2, "major"))])
def test_key_of_a_cadence(root, minor, expected):
  assert generation.estimate_key(chord_progression(root, minor)) == expected
