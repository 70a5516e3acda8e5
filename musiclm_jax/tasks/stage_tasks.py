"""SeqIO stage tasks `<corpus>_{semantic,coarse,fine}`, their mixtures, and the
`seqio` reader of the trainer's `stage_task.StageTask`.

A stage task reads the token cache written by `musiclm tokenize` (SeqIO's
TFRecords of `<corpus>_tokens`), drops the clips the cache job skipped, cuts
windows (`stages.Stage`: a random window per clip for `train`, consecutive
fixed windows for other splits; lengths from gin `StageWindows`) and emits
`inputs` (the prefix) and `targets` in the token space of the tokenizers
that made the cache. With `melody_conditioning` (a cache tokenized with a
melody encoder, `TokenizerDirs.melody`) the semantic and coarse prefixes
hold each window's melody tokens of the clip itself after M (`stages.Stage`).
With several corpora the stage reads a SeqIO mixture sampled at the given
rates. `Stage.decoder_features` turns each example into the decoder
features the models train on (as SeqIO's `PrefixLMFeatureConverter` would,
but weighting targets by the window's lengths, not by which ids are PAD).

Reading is deterministic for a seed and host-sharded (`seqio.ShardInfo`
from the process index), so `StageTask.iterator` resumes by skipping the
batches a checkpoint says were read.
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from musiclm_jax import stage_task
from musiclm_jax import stages
from musiclm_jax import token_cache
from musiclm_jax.tasks import token_tasks

SHUFFLE_BUFFER = 1024


def _tokenized_only(ds: tf.data.Dataset) -> tf.data.Dataset:
  return ds.filter(lambda ex: tf.equal(ex["skip_reason"], ""))


class CutWindows:
  """Preprocessor: each clip -> its windows' prefix and target ids, one example each.

  `conditioning_dropout` (training split only) drops the MuLan (and melody)
  prefix of that fraction of windows, for classifier-free guidance;
  `melody_dropout` the melody tokens alone of a fraction of the others
  (`Stage.examples`). A melody-conditioned stage also reads the clip's
  `melody` codes.
  """

  def __init__(self, stage: stages.Stage, conditioning_dropout: float = 0.0,
               melody_dropout: float = 0.0):
    self.stage = stage
    self.conditioning_dropout = conditioning_dropout
    self.melody_dropout = melody_dropout

  def __call__(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    stage, dropout, melody_dropout = self.stage, self.conditioning_dropout, self.melody_dropout

    def windows(mulan, semantic, acoustic, split, seed, melody=None):
      train = split == b"train"
      rng = np.random.default_rng(seed.astype(np.int64).view(np.uint64)) if train else None
      clip = stages.ClipTokens(mulan=mulan, semantic=semantic, acoustic=acoustic, melody=melody)
      return stage.examples(clip, rng, dropout, melody_dropout)

    @seqio.map_over_dataset(num_seeds=1)
    def cut(ex, seed):
      codes = [ex["mulan"], ex["semantic"], ex["acoustic"], ex["split"], seed]
      if stage.melody_conditioning:
        codes.append(ex["melody"])
      prefix, targets = tf.numpy_function(windows, codes, [tf.int32, tf.int32], stateful=False)
      return {"inputs": tf.ensure_shape(prefix, [None, None]),
              "targets": tf.ensure_shape(targets, [None, None])}
    return cut(ds).unbatch()


def register_stage_task(cache_dir: str, corpus: str, stage: stages.Stage,
                        conditioning_dropout: float = 0.0, melody_dropout: float = 0.0
                        ) -> seqio.Task:
  """(Re-)registers `<corpus>_<stage>` on the completed token cache of `corpus`,
  whose stage `stage_task.cache_stage` gives `stage`."""
  task_dir = token_cache.task_cache_dir(cache_dir, corpus)
  codes = ("semantic", "acoustic", "mulan") + ("melody",) * stage.melody_conditioning
  source = seqio.TFExampleDataSource(
      {split: token_tasks.cached_file_pattern(task_dir, split)
       for split in token_cache.cached_splits(task_dir)},
      feature_description=token_tasks.feature_description(
          stage.layout.acoustic_levels, stage.layout.melody_levels * stage.melody_conditioning))
  feature = seqio.Feature(seqio.PassThroughVocabulary(stage.layout.vocab_size), add_eos=False,
                          dtype=tf.int32)

  def cast_codes(ds):
    def cast(ex):
      return dict(ex, **{k: tf.cast(ex[k], tf.int32) for k in codes})
    return ds.map(cast, num_parallel_calls=tf.data.AUTOTUNE)

  name = stage_task.stage_task_name(corpus, stage.name, stage.melody_conditioning)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[cast_codes, _tokenized_only,
                     CutWindows(stage, conditioning_dropout, melody_dropout)],
      output_features={"inputs": feature, "targets": feature},
      shuffle_buffer_size=SHUFFLE_BUFFER)


def register_stage(cache_dir: str, corpora: Mapping[str, float], stage: stages.Stage,
                   conditioning_dropout: float = 0.0, melody_dropout: float = 0.0) -> str:
  """Registers the stage task of every corpus, and their mixture when there are
  several; returns the name to read (task or mixture)."""
  for corpus in corpora:
    register_stage_task(cache_dir, corpus, stage, conditioning_dropout, melody_dropout)
  melody = stage.melody_conditioning
  name = stage_task.stage_task_name("__".join(sorted(corpora)), stage.name, melody)
  if len(corpora) == 1:
    return name
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(stage_task.stage_task_name(c, stage.name, melody),
                                    float(rate)) for c, rate in sorted(corpora.items())])
  return name


class SeqioStageReader:
  """`stage_task.StageTask`'s `seqio` reader: the stage's SeqIO task or mixture.

  Args:
    stage: the stage of every cache read.
    cache_dir, corpora: the caches and their mixing rates.
    conditioning_dropout, melody_dropout, seed: see `StageTask`.
  """

  def __init__(self, stage: stages.Stage, cache_dir: str, corpora: Mapping[str, float],
               conditioning_dropout: float = 0.0, melody_dropout: float = 0.0, seed: int = 0):
    self.stage = stage
    self.seed = seed
    self.name = register_stage(cache_dir, corpora, stage, conditioning_dropout, melody_dropout)
    self.feature_lengths = dict(zip(("inputs", "targets"), stage.lengths()))

  def dataset(self, split: str, batch_size: int, first_frame_weight: float
              ) -> tf.data.Dataset:
    """Endless batches of the four decoder features `[batch_size, length]`."""
    provider = seqio.get_mixture_or_task(self.name)
    ds = provider.get_dataset(
        sequence_length=self.feature_lengths, split=split, shuffle=split == "train",
        seed=self.seed, num_epochs=None,
        shard_info=seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count()))
    stage, length = self.stage, sum(self.feature_lengths.values())
    names = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
             "decoder_causal_attention")

    def features(prefix, targets):
      made = stage.decoder_features(prefix, targets, first_frame_weight)
      return [made[name] for name in names]

    def to_features(ex):
      made = tf.numpy_function(features, [ex["inputs"], ex["targets"]],
                               [tf.int32, tf.int32, tf.float32, tf.bool], stateful=False)
      return {name: tf.ensure_shape(value, [length]) for name, value in zip(names, made)}
    ds = ds.map(to_features, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)

  def batches(self, split: str, batch_size: int, first_frame_weight: float, skip: int):
    """`NumpyStageReader.batches` through tf.data."""
    return self.dataset(split, batch_size, first_frame_weight).skip(skip).as_numpy_iterator()

  def eval_windows(self, split: str, max_windows: int
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`StageTask.eval_windows`: one unshuffled pass of the task or mixture."""
    provider = seqio.get_mixture_or_task(self.name)
    if split not in provider.splits:
      raise ValueError(f"the token cache of {self.name!r} has no split {split!r}; it has "
                       f"{', '.join(sorted(provider.splits))}")
    ds = provider.get_dataset(sequence_length=self.feature_lengths, split=split,
                              shuffle=False, num_epochs=1)
    if max_windows:
      ds = ds.take(max_windows)
    prefixes, targets = [], []
    for example in ds.as_numpy_iterator():
      prefixes.append(example["inputs"])
      targets.append(example["targets"])
    return prefixes, targets
