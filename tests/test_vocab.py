import numpy as np
import pytest

from musiclm_jax import vocab
from musiclm_jax.vocab import LAYOUT, TokenLayout


def test_offsets_and_size_follow_the_design():
  assert LAYOUT.mulan_offset == 1
  assert LAYOUT.semantic_offset == 1 + 12 * 1024
  assert LAYOUT.acoustic_offset == 1 + 12 * 1024 + 1024
  assert LAYOUT.num_used_ids == 1 + 25 * 1024
  assert LAYOUT.vocab_size % 128 == 0
  assert LAYOUT.num_used_ids <= LAYOUT.vocab_size < LAYOUT.num_used_ids + 128


def test_families_do_not_overlap_and_cover_every_used_id():
  ranges = ([LAYOUT.mulan_range(q) for q in range(12)] + [LAYOUT.semantic_range()]
            + [LAYOUT.acoustic_range(q) for q in range(12)])
  covered = np.zeros(LAYOUT.num_used_ids, int)
  for lo, hi in ranges:
    covered[lo:hi] += 1
  assert covered[vocab.PAD_ID] == 0
  np.testing.assert_array_equal(covered[1:], 1)


def test_round_trips():
  rng = np.random.default_rng(0)
  m = rng.integers(0, 1024, (3, 12))
  np.testing.assert_array_equal(LAYOUT.mulan_codes(LAYOUT.mulan_tokens(m)), m)
  s = rng.integers(0, 1024, (3, 50))
  np.testing.assert_array_equal(LAYOUT.semantic_codes(LAYOUT.semantic_tokens(s)), s)
  a = rng.integers(0, 1024, (3, 50, 8))
  tokens = LAYOUT.acoustic_tokens(a, first_level=4)
  np.testing.assert_array_equal(LAYOUT.acoustic_codes(tokens, first_level=4), a)
  lo, hi = LAYOUT.acoustic_range(4)
  assert lo <= tokens[..., 0].min() and tokens[..., 0].max() < hi


def test_acoustic_position_ranges_are_frame_major():
  lo, hi = LAYOUT.acoustic_position_ranges(9, first_level=0, num_levels=4)
  expected_levels = [0, 1, 2, 3, 0, 1, 2, 3, 0]
  np.testing.assert_array_equal(lo, [LAYOUT.acoustic_range(q)[0] for q in expected_levels])
  np.testing.assert_array_equal(hi - lo, 1024)
  # Tokens of a flattened [frames, 4] window sit inside their position's range.
  codes = np.random.default_rng(1).integers(0, 1024, (3, 4))
  flat = LAYOUT.acoustic_tokens(codes).reshape(-1)
  LAYOUT.check_tokens(flat, *LAYOUT.acoustic_position_ranges(12, 0, 4), "coarse")
  with pytest.raises(ValueError, match="outside"):
    LAYOUT.acoustic_position_ranges(4, first_level=10, num_levels=4)


def test_check_tokens_names_the_offender():
  lo, hi = LAYOUT.semantic_range()
  with pytest.raises(ValueError, match=r"token 5 at index \(2,\)"):
    LAYOUT.check_tokens(np.array([lo, lo + 1, 5]), lo, hi, "semantic")
  with pytest.raises(ValueError, match="level 12"):
    LAYOUT.mulan_range(12)


def test_serialisation_round_trip_and_mismatch():
  d = LAYOUT.to_dict()
  assert TokenLayout.from_dict(d) == LAYOUT
  d["semantic_offset"] += 1
  with pytest.raises(ValueError, match="inconsistent"):
    TokenLayout.from_dict(d)
  other = TokenLayout(semantic_codebook_size=512)
  assert other.acoustic_offset == LAYOUT.acoustic_offset - 512
