"""MuLan's training task: corpus audio windows at 16 kHz paired with caption ids.

    train.task = @MulanTask()
    MulanTask.corpus_dir = %CORPUS_DIR
    MulanTask.model_dir = %MODEL_DIR    # holds text_tokenizer.model

Wraps `AudioClipTask(..., sample_rate=16000, with_captions=True)` and turns
captions into ids with the SentencePiece tokenizer (`tokenizers/text.py`).
When the tokenizer file does not exist yet, it is trained on the corpus'
train captions first (and a line says so); later runs reuse it.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import gin
import numpy as np
import tensorflow_datasets as tfds

from musiclm_jax.tasks.audio_clips import AudioClipTask
from musiclm_jax.tasks import corpora
from musiclm_jax.tokenizers import text as text_lib
from musiclm_jax.tokenizers.mulan_tokens import TEXT_TOKENIZER_FILE

MULAN_SAMPLE_RATE = 16000


def corpus_captions(corpus_dir: str, split: str = "train") -> list[str]:
  """The captions of a built corpus' split, in storage order (audio not decoded)."""
  corpora.load(corpus_dir, split, shuffle_files=False)  # validates the directory and split
  builder = tfds.builder_from_directory(corpus_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"audio": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  return [c.decode("utf-8") for c in tfds.as_numpy(ds.map(lambda f: f["caption"]))]


def labelled_clip_batches(corpus_dir: str, split: str, batch_size: int,
                          max_clips: int | None = None,
                          sample_rate: int = MULAN_SAMPLE_RATE) -> Iterator[dict[str, Any]]:
  """Whole clips of a split with their labels, in corpus order, `batch_size` at a time.

  Yields:
    `audio` float32 `[clips, samples]` at `sample_rate` (zero-padded),
    `lengths` int32 `[clips]` (real samples, from `duration_s`), and lists
    `caption`, `genre`, `tempo_bpm`, `lead_instrument` (first General MIDI
    name; '' when none), `clip_id`.
  """
  ds = corpora.load(corpus_dir, split, sample_rate=sample_rate)
  if max_clips is not None:
    ds = ds.take(max_clips)
  rows: list[dict[str, Any]] = []
  for ex in tfds.as_numpy(ds):
    meta = ex["metadata"]
    instruments = [i.decode("utf-8") for i in meta["instruments"]]
    rows.append({"audio": ex["audio"].astype(np.float32),
                 "length": min(int(round(float(ex["duration_s"]) * sample_rate)),
                               len(ex["audio"])),
                 "caption": ex["caption"].decode("utf-8"),
                 "genre": meta["genre"].decode("utf-8"),
                 "tempo_bpm": float(meta["tempo_bpm"]),
                 "lead_instrument": instruments[0] if instruments else "",
                 "clip_id": ex["clip_id"].decode("utf-8")})
    if len(rows) == batch_size:
      yield _stack_clips(rows)
      rows = []
  if rows:
    yield _stack_clips(rows)


def _stack_clips(rows: list[dict[str, Any]]) -> dict[str, Any]:
  audio = np.zeros((len(rows), max(len(r["audio"]) for r in rows)), np.float32)
  for i, r in enumerate(rows):
    audio[i, :len(r["audio"])] = r["audio"]
  out = {k: [r[k] for r in rows] for k in ("caption", "genre", "tempo_bpm",
                                           "lead_instrument", "clip_id")}
  return dict(out, audio=audio, lengths=np.array([r["length"] for r in rows], np.int32))


def load_or_train_text_tokenizer(path: str, corpus_dir: str, vocab_size: int
                                 ) -> text_lib.TextTokenizer:
  """The tokenizer at `path`, trained first from the corpus' train captions if absent."""
  if not path.endswith(".model"):
    raise ValueError(f"text tokenizer path {path!r} must end with '.model'")
  if not os.path.isfile(path):
    captions = corpus_captions(corpus_dir, "train")
    print(f"Training the text tokenizer on {len(captions)} train captions of {corpus_dir} "
          f"(vocabulary up to {vocab_size}) -> {path}", flush=True)
    text_lib.train_text_tokenizer(captions, path[:-len(".model")], vocab_size=vocab_size)
  return text_lib.TextTokenizer(path)


class MulanBatches:
  """Iterator of `{"audio": [local_batch, samples], "text_tokens": [local_batch, L]}`.

  Resumable: `get_state`/`set_state` are the audio clip iterator's.
  """

  def __init__(self, clips: Iterator[dict[str, np.ndarray]], tokenizer: text_lib.TextTokenizer,
               max_text_length: int):
    self._clips = clips
    self._tokenizer = tokenizer
    self._max_text_length = max_text_length

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._clips)
    return {"audio": np.asarray(batch["audio"], np.float32),
            "text_tokens": self._tokenizer.encode([str(c) for c in batch["caption"]],
                                                  self._max_text_length)}

  def get_state(self) -> dict[str, Any]:
    return self._clips.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._clips.set_state(state)


@gin.configurable
class MulanTask:
  """Random (train) or fixed (validation/test) windows with their tokenized captions.

  Args:
    corpus_dir: a corpus built by `musiclm prepare`.
    model_dir: the run's directory; a relative `text_tokenizer` lies in it.
    text_tokenizer: path of the SentencePiece model (`.model`), relative to
      `model_dir` unless absolute; trained from the train captions when
      missing.
    segment_seconds: window length; must equal `MulanConfig.window_seconds`.
    max_text_length: ids per caption (`MulanConfig.max_text_length`).
    text_vocab_size: the tokenizer's vocabulary limit
      (`MulanConfig.text_vocab_size`).
    seed: random crops.
  """

  def __init__(self, corpus_dir: str = gin.REQUIRED, model_dir: str = gin.REQUIRED,
               text_tokenizer: str = TEXT_TOKENIZER_FILE, segment_seconds: float = 10.0,
               max_text_length: int = 64, text_vocab_size: int = 1024, seed: int = 0):
    self.clips = AudioClipTask(corpus_dir, sample_rate=MULAN_SAMPLE_RATE,
                               segment_seconds=segment_seconds, seed=seed, with_captions=True)
    text_tokenizer = os.path.join(model_dir, text_tokenizer)
    self.tokenizer = load_or_train_text_tokenizer(text_tokenizer, corpus_dir, text_vocab_size)
    if self.tokenizer.vocab_size > text_vocab_size:
      raise ValueError(f"the text tokenizer {text_tokenizer} has {self.tokenizer.vocab_size} "
                       f"ids, more than text_vocab_size {text_vocab_size}")
    self.max_text_length = max_text_length

  @property
  def segment_samples(self) -> int:
    return self.clips.segment_samples

  def iterator(self, split: str, global_batch_size: int) -> MulanBatches:
    return MulanBatches(self.clips.iterator(split, global_batch_size), self.tokenizer,
                        self.max_text_length)
