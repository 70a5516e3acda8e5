"""Stage layouts and windows (`musiclm_jax/stages.py`): lengths, legal ranges,
round trips from ids back to codes, and S/A alignment of every window."""
import numpy as np
import pytest

from musiclm_jax import stages
from musiclm_jax import vocab

LAYOUT = vocab.TokenLayout(mulan_levels=12, mulan_codebook_size=4, semantic_codebook_size=16,
                           acoustic_levels=12, acoustic_codebook_size=64)


def make_clip(rng, frames_s, layout=LAYOUT):
  return stages.ClipTokens(
      mulan=rng.integers(0, layout.mulan_codebook_size, layout.mulan_levels),
      semantic=rng.integers(0, layout.semantic_codebook_size, frames_s),
      acoustic=rng.integers(0, layout.acoustic_codebook_size,
                            (2 * frames_s, layout.acoustic_levels)))


def stage(name, seconds, **kw):
  return stages.Stage(name=name, window_seconds=seconds, layout=LAYOUT, **kw)


def test_paper_windows_give_the_paper_lengths():
  windows = stages.StageWindows()
  lengths = {name: stages.make_stage(name, windows, vocab.LAYOUT, 25, 50).lengths()
             for name in stages.STAGE_NAMES}
  assert lengths == {"semantic": (12, 750), "coarse": (12 + 250, 500 * 4),
                     "fine": (150 * 4, 150 * 8)}


@pytest.mark.parametrize("name", stages.STAGE_NAMES)
def test_sequences_are_legal_and_decode_back_to_the_codes(name):
  rng = np.random.default_rng(0)
  clip = make_clip(rng, 10)
  s = stage(name, 0.4)
  prefix, targets = s.sequences(clip)
  assert (len(prefix), len(targets)) == s.lengths(10)
  s.check_targets(targets)
  assert np.all((prefix > 0) & (prefix < LAYOUT.num_used_ids))
  codes = s.codes(prefix, targets)
  coarse = s.coarse_levels
  if name in ("semantic", "coarse"):
    np.testing.assert_array_equal(codes["mulan"], clip.mulan)
    np.testing.assert_array_equal(codes["semantic"], clip.semantic)
  if name == "coarse":
    np.testing.assert_array_equal(codes["acoustic"], clip.acoustic[:, :coarse])
  if name == "fine":
    np.testing.assert_array_equal(codes["acoustic"], clip.acoustic)


def test_acoustic_targets_are_frame_major_with_the_level_cycling():
  rng = np.random.default_rng(1)
  clip = make_clip(rng, 2)
  _, targets = stage("coarse", 0.08).sequences(clip)
  levels = (targets - LAYOUT.acoustic_offset) // LAYOUT.acoustic_codebook_size
  np.testing.assert_array_equal(levels, np.tile(np.arange(4), 4))
  np.testing.assert_array_equal((targets - LAYOUT.acoustic_offset)
                                % LAYOUT.acoustic_codebook_size, clip.acoustic[:, :4].reshape(-1))
  fine_prefix, fine_targets = stage("fine", 0.08).sequences(clip)
  np.testing.assert_array_equal(fine_prefix, targets)
  fine_levels = (fine_targets - LAYOUT.acoustic_offset) // LAYOUT.acoustic_codebook_size
  np.testing.assert_array_equal(fine_levels, np.tile(np.arange(4, 12), 4))


def test_out_of_range_ids_are_named():
  s = stage("semantic", 0.4)
  prefix, targets = s.sequences(make_clip(np.random.default_rng(2), 10))
  bad = targets.copy()
  bad[3] = LAYOUT.acoustic_offset
  with pytest.raises(ValueError, match="semantic targets: token .* at index \\(3,\\)"):
    s.codes(prefix, bad)


def test_training_windows_are_random_aligned_and_reproducible():
  rng = np.random.default_rng(3)
  clip = make_clip(rng, 100)
  s = stage("coarse", 0.4)  # 10 semantic frames, 20 acoustic frames
  starts = [s.window_starts(100, np.random.default_rng(seed))[0] for seed in range(200)]
  assert min(starts) == 0 and max(starts) == 90 and len(set(starts)) > 50
  assert s.window_starts(100, np.random.default_rng(7)) == s.window_starts(
      100, np.random.default_rng(7))
  for start in (0, 37, 90):
    window = s.window(clip, start)
    np.testing.assert_array_equal(window.semantic, clip.semantic[start:start + 10])
    np.testing.assert_array_equal(window.acoustic, clip.acoustic[2 * start:2 * start + 20])
  prefix, targets = s.examples(clip, np.random.default_rng(5))
  assert prefix.shape == (1, 12 + 10) and targets.shape == (1, 80)


def test_evaluation_windows_tile_the_clip_and_short_clips_give_one_window():
  s = stage("semantic", 0.4)
  assert s.window_starts(35) == [0, 10, 20]
  assert s.window_starts(30) == [0, 10, 20]
  assert s.window_starts(7) == [0]
  assert s.window_starts(7, np.random.default_rng(0)) == [0]
  clip = make_clip(np.random.default_rng(4), 7)
  prefix, targets = s.examples(clip)
  assert prefix.shape == (1, 12) and targets.shape == (1, 7)
  prefix, targets = s.examples(make_clip(np.random.default_rng(4), 35))
  assert targets.shape == (3, 10)


def test_bad_configurations_and_clips_are_clear_errors():
  with pytest.raises(ValueError, match="unknown stage"):
    stages.Stage(name="medium", window_seconds=1.0)
  with pytest.raises(ValueError, match="whole number"):
    stages.Stage(name="fine", window_seconds=0.03)
  with pytest.raises(ValueError, match="coarse_levels"):
    stages.Stage(name="coarse", window_seconds=1.0, coarse_levels=12)
  clip = make_clip(np.random.default_rng(5), 10)
  misaligned = stages.ClipTokens(clip.mulan, clip.semantic, clip.acoustic[:-1])
  with pytest.raises(ValueError, match="same span"):
    stage("coarse", 0.4).examples(misaligned)


def test_conditioning_dropout_pads_the_mulan_prefix_of_that_fraction_of_windows():
  clip = make_clip(np.random.default_rng(6), 10)
  s = stage("coarse", 0.4)
  prefix, _ = s.sequences(clip)
  dropped = s.unconditional(prefix)
  assert np.all(dropped[:12] == vocab.PAD_ID)
  np.testing.assert_array_equal(dropped[12:], prefix[12:])
  rng = np.random.default_rng(7)
  firsts = [s.examples(clip, rng, conditioning_dropout=0.3)[0][0, 0] for _ in range(400)]
  assert 0.22 < np.mean(np.equal(firsts, vocab.PAD_ID)) < 0.38
  no_rng = s.examples(clip, None, conditioning_dropout=0.9)[0]
  assert np.all(no_rng[:, :12] != vocab.PAD_ID)  # evaluation windows keep the conditioning
  with pytest.raises(ValueError, match="no MuLan conditioning"):
    stage("fine", 0.4).unconditional(prefix)
