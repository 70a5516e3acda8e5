"""SentencePiece text tokenizer for MuLan's text tower, trained on captions.

Ids: 0 is padding (SentencePiece's `<pad>`, never produced by encoding),
1 `<unk>`, 2 `</s>` (end of text, appended to every encoded text), then the
pieces. Text is NFKC-normalised and case-folded, so 'Jazz' and 'jazz' share
pieces; digits are single pieces, so '96 bpm' and '69 bpm' share them.
Training runs single-threaded on the captions in the given order, so the
same captions give a byte-identical model file.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2


def train_text_tokenizer(captions: Iterable[str], output_prefix: str, vocab_size: int = 1024,
                         model_type: str = "unigram") -> str:
  """Trains a SentencePiece model on `captions`; writes `output_prefix + '.model'`.

  Args:
    captions: training sentences (e.g. a corpus' train captions).
    output_prefix: path without the `.model` suffix; its directory is created.
    vocab_size: the most ids, padding and specials included. A small corpus
      may yield fewer (the limit is soft); `TextTokenizer.vocab_size` says
      how many.
    model_type: 'unigram' or 'bpe'.
  Returns:
    the path of the written model file.
  """
  sentences = [c.strip() for c in captions if c and c.strip()]
  if not sentences:
    raise ValueError("no non-empty captions to train the text tokenizer on")
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"model_type {model_type!r} must be 'unigram' or 'bpe'")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, hard_vocab_limit=False, normalization_rule_name="nmt_nfkc_cf",
      character_coverage=1.0, split_digits=True, pad_id=PAD_ID, unk_id=UNK_ID,
      eos_id=EOS_ID, bos_id=-1, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      minloglevel=2)
  path = output_prefix + ".model"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "wb") as f:
    f.write(model.getvalue())
  os.replace(temporary, path)
  return path


class TextTokenizer:
  """Encodes texts into padded id arrays with a trained SentencePiece model."""

  def __init__(self, model_path: str):
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"no text tokenizer model at {model_path}; train one with "
                              "`train_text_tokenizer` (MulanTask does so on first use)")
    self.model_path = model_path
    self._processor = spm.SentencePieceProcessor(model_file=model_path)

  @property
  def vocab_size(self) -> int:
    """Number of ids, padding included (ids are in [0, vocab_size))."""
    return self._processor.get_piece_size()

  def encode(self, texts: str | Sequence[str], max_length: int) -> np.ndarray:
    """int32 `[batch, max_length]`: pieces then `</s>`, zero-padded.

    A text longer than `max_length - 1` pieces is truncated; `</s>` always
    ends it.
    """
    if isinstance(texts, str):
      texts = [texts]
    if max_length < 2:
      raise ValueError(f"max_length {max_length} leaves no room for a piece and </s>")
    out = np.zeros((len(texts), max_length), np.int32)
    for i, text in enumerate(texts):
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text {i} is empty ({text!r}); a prompt needs some words")
      ids = self._processor.encode(text, out_type=int)[:max_length - 1] + [EOS_ID]
      out[i, :len(ids)] = ids
    return out

  def decode(self, ids: np.ndarray) -> list[str]:
    """Texts of `[batch, length]` ids (padding and `</s>` dropped)."""
    return [self._processor.decode([int(i) for i in row if i > EOS_ID or i == UNK_ID])
            for row in np.asarray(ids)]
