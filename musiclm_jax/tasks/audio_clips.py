"""Audio segments cut from a built corpus: the input of tokenizer training.

    AudioClipTask.corpus_dir = %CORPUS_DIR
    AudioClipTask.sample_rate = 24000      # 16000 for w2v-BERT and MuLan
    AudioClipTask.segment_seconds = 1.0

Training batches are random crops of randomly ordered clips (the crop lies
inside the clip's real audio, not its padding); validation and test batches
are the middle of each clip, in corpus order, repeated as needed. Every
process reads its own share of the clips (`Dataset.shard` by process
index). The order, the crops and hence every batch are a pure function of
`seed` and the batch index, so `get_state()` (batches read) and
`set_state()` resume a run exactly; resuming re-reads the skipped records,
which costs a moment per thousand batches.
"""
from __future__ import annotations

import gin
import jax
import numpy as np
import tensorflow as tf

from musiclm_jax.tasks import corpora
from musiclm_jax.training import resumable

SHUFFLE_BUFFER = 1024


def _decode_text(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  for key in ("caption", "genre"):
    if key in batch:
      batch[key] = np.array([b.decode("utf-8") for b in batch[key]], dtype=object)
  return batch


@gin.configurable
class AudioClipTask:
  """Fixed-length mono segments of a corpus built by `musiclm prepare`.

  Args:
    corpus_dir: the built corpus (`DATA_DIR/<corpus>/<config>/<version>`).
    sample_rate: resample to this rate (the corpus is 24 kHz).
    segment_seconds: length of each segment; clips shorter than that are
      zero-padded at the end.
    seed: order and crops.
    with_captions: also yield `caption` and `genre` (object arrays of str).
  """

  def __init__(self, corpus_dir: str = gin.REQUIRED, sample_rate: int = 24000,
               segment_seconds: float = 1.0, seed: int = 0, with_captions: bool = False):
    self.corpus_dir = corpus_dir
    self.sample_rate = sample_rate
    self.segment_samples = int(round(segment_seconds * sample_rate))
    if self.segment_samples <= 0:
      raise ValueError(f"segment_seconds must be positive; got {segment_seconds}")
    self.seed = seed
    self.with_captions = with_captions
    corpora.load(corpus_dir, "train")  # fails early, naming the problem

  def dataset(self, split: str, local_batch_size: int) -> tf.data.Dataset:
    """Batches `{"audio": float32 [local_batch, segment_samples], ...}`, endless."""
    train = split == "train"
    num_clips = corpora.read_report(self.corpus_dir)["clips"].get(split, 0)
    if num_clips < jax.process_count():
      raise ValueError(f"the {split!r} split of {self.corpus_dir} has {num_clips} clips, "
                       f"fewer than the {jax.process_count()} reading processes; build a "
                       "larger corpus")
    ds = corpora.load(self.corpus_dir, split, sample_rate=self.sample_rate)
    ds = ds.shard(jax.process_count(), jax.process_index())
    ds = ds.repeat()
    if train:
      ds = ds.shuffle(SHUFFLE_BUFFER, seed=self.seed, reshuffle_each_iteration=True)
    segment, rate, seed = self.segment_samples, self.sample_rate, self.seed

    def crop(index, features):
      wav = features["audio"]
      valid = tf.minimum(tf.shape(wav)[0],
                         tf.cast(tf.round(features["duration_s"] * rate), tf.int32))
      room = tf.maximum(valid - segment, 0)
      if train:
        offset = tf.random.stateless_uniform(
            [], seed=tf.stack([tf.cast(seed, tf.int64), index]), maxval=room + 1,
            dtype=tf.int32)
      else:
        offset = room // 2
      piece = wav[offset:offset + tf.minimum(segment, valid)]
      piece = tf.pad(piece, [[0, segment - tf.shape(piece)[0]]])
      piece.set_shape([segment])
      out = {"audio": piece}
      if self.with_captions:
        out["caption"] = features["caption"]
        out["genre"] = features["metadata"]["genre"]
      return out

    ds = ds.enumerate().map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(local_batch_size, drop_remainder=True).prefetch(2)

  def iterator(self, split: str, global_batch_size: int) -> resumable.BatchCountIterator:
    """This process' rows of each global batch, resumable by batch count."""
    local = resumable.local_batch_size(global_batch_size)
    return resumable.BatchCountIterator(
        lambda skip: self.dataset(split, local).skip(skip).as_numpy_iterator(), _decode_text)


def read_segments(corpus_dir: str, split: str, num_clips: int, seconds: float,
                  sample_rate: int = 24000) -> np.ndarray:
  """The middle `seconds` of the first `num_clips` clips of a split (fewer if the
  split is smaller), for evaluation: float32 `[clips, seconds * sample_rate]`."""
  available = corpora.read_report(corpus_dir)["clips"].get(split, 0)
  if available == 0:
    raise ValueError(f"the {split!r} split of {corpus_dir} is empty")
  task = AudioClipTask(corpus_dir, sample_rate=sample_rate, segment_seconds=seconds)
  return next(task.dataset(split, min(num_clips, available)).as_numpy_iterator())["audio"]
