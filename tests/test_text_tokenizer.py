"""Tests of the SentencePiece caption tokenizer."""
import os

import numpy as np
import pytest

from musiclm_jax.music import captions, composer
from musiclm_jax.tokenizers import text


def _captions(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [captions.caption(composer.compose(rng, 2.0, f"piece{i}"), rng) for i in range(n)]


def test_training_is_deterministic(tmp_path):
  corpus = _captions(30)
  first = text.train_text_tokenizer(corpus, str(tmp_path / "a" / "tok"), vocab_size=200)
  second = text.train_text_tokenizer(corpus, str(tmp_path / "b" / "tok"), vocab_size=200)
  with open(first, "rb") as f, open(second, "rb") as g:
    assert f.read() == g.read()
  other = text.train_text_tokenizer(_captions(30, seed=1), str(tmp_path / "c" / "tok"),
                                    vocab_size=200)
  with open(first, "rb") as f, open(other, "rb") as g:
    assert f.read() != g.read()


def test_encode_pads_truncates_and_lowercases(tmp_path):
  corpus = _captions(30)
  tokenizer = text.TextTokenizer(
      text.train_text_tokenizer(corpus, str(tmp_path / "tok"), vocab_size=200))
  assert 10 < tokenizer.vocab_size <= 200
  ids = tokenizer.encode(["A JAZZ Tune at 120 BPM", "a jazz tune at 120 bpm"], 24)
  assert ids.shape == (2, 24) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0], ids[1])  # case-folded
  length = int(np.sum(ids[0] > 0))
  assert ids[0, length - 1] == text.EOS_ID and np.all(ids[0, length:] == 0)
  assert np.all(ids[0, :length] > 0)  # 0 is only padding
  assert tokenizer.decode(ids[:1]) == ["a jazz tune at 120 bpm"]
  cut = tokenizer.encode(corpus[0], 12)
  assert cut.shape == (1, 12) and cut[0, -1] == text.EOS_ID and np.all(cut > 0)
  assert np.all(cut < tokenizer.vocab_size)
  # digits are pieces of their own: '96' and '69' use the same ids in another order
  ninety_six, sixty_nine = (tokenizer.encode(t, 8)[0].tolist() for t in ("96", "69"))
  assert ninety_six != sixty_nine and sorted(ninety_six) == sorted(sixty_nine)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no text tokenizer model"):
    text.TextTokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="no non-empty captions"):
    text.train_text_tokenizer(["", "  "], str(tmp_path / "tok"))
  tokenizer = text.TextTokenizer(
      text.train_text_tokenizer(_captions(10), str(tmp_path / "tok"), vocab_size=100))
  with pytest.raises(ValueError, match="empty"):
    tokenizer.encode(["fine", "   "], 8)
  with pytest.raises(ValueError, match="max_length"):
    tokenizer.encode(["fine"], 1)
  assert os.path.isfile(tokenizer.model_path)
