"""SeqIO stage tasks `<corpus>_{semantic,coarse,fine}`, mixtures, and the trainer's `StageTask`.

    train.task = @StageTask()
    StageTask.stage = 'coarse'
    StageTask.cache_dir = %TOKENS_DIR
    StageTask.corpora = {'gm_synth': 1.0, 'music21_gm': 0.5}   # mixture rates
    StageTask.melody_conditioning = True   # semantic/coarse: prefix M + T_mel (optional)

A stage task reads the token cache written by `musiclm tokenize` (SeqIO's
TFRecords of `<corpus>_tokens`), drops the clips the cache job skipped, cuts
windows (`stages.Stage`: a random window per clip for `train`, consecutive
fixed windows for other splits; lengths from gin `StageWindows`) and emits
`inputs` (the prefix) and `targets` in the token space of the tokenizers
that made the cache. With `melody_conditioning` (a cache tokenized with a melody encoder,
`TokenizerDirs.melody`) the semantic and coarse prefixes hold each window's
melody tokens of the clip itself after M (`stages.Stage`). SeqIO's
`PrefixLMFeatureConverter` turns them into the
decoder features the models train on. With several corpora the stage reads
a SeqIO mixture sampled at the given rates.

Reading is deterministic for a seed and host-sharded (`seqio.ShardInfo`
from the process index); the iterator's `get_state()` is the number of
batches read (`resumable.BatchCountIterator`), so a run resumed from a
checkpoint sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from musiclm_jax import stages
from musiclm_jax import vocab
from musiclm_jax.tasks import resumable
from musiclm_jax.tasks import token_tasks

SHUFFLE_BUFFER = 1024


def stage_task_name(corpus: str, stage: str, melody_conditioning: bool = False) -> str:
  """`<corpus>_<stage>`, with `_melody` for a melody-conditioned stage (its own task)."""
  return f"{corpus}_{stage}" + ("_melody" if melody_conditioning else "")


def stage_from_manifest(manifest: Mapping[str, Any], name: str,
                        windows: stages.StageWindows, melody_conditioning: bool = False
                        ) -> stages.Stage:
  """The `Stage` of a token cache (its layout, frame rates and melody windows)."""
  if melody_conditioning and "melody_config" not in manifest:
    raise ValueError(f"melody conditioning needs a token cache with melody tokens; the cache of "
                     f"{manifest.get('corpus')!r} has none: tokenize it with "
                     "TokenizerDirs.melody set")
  hop = manifest["melody_config"]["hop_seconds"] if melody_conditioning else 0.0
  return stages.make_stage(name, windows, vocab.TokenLayout.from_dict(manifest["layout"]),
                           manifest["semantic_rate"], manifest["acoustic_rate"],
                           melody_conditioning=melody_conditioning, melody_hop_seconds=hop)


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


def register_stage_task(cache_dir: str, corpus: str, stage_name: str,
                        windows: stages.StageWindows, conditioning_dropout: float = 0.0,
                        melody_conditioning: bool = False, melody_dropout: float = 0.0
                        ) -> tuple[seqio.Task, stages.Stage]:
  """(Re-)registers `<corpus>_<stage>` on the completed token cache of `corpus`."""
  task_dir = token_tasks.task_cache_dir(cache_dir, corpus)
  if not token_tasks.is_complete(task_dir):
    raise FileNotFoundError(f"no completed token cache of {corpus!r} in {cache_dir} "
                            f"({task_dir}); run `musiclm tokenize` first")
  manifest = token_tasks.read_manifest(task_dir)
  stage = stage_from_manifest(manifest, stage_name, windows, melody_conditioning)
  codes = ("semantic", "acoustic", "mulan") + ("melody",) * stage.melody_conditioning
  source = seqio.TFExampleDataSource(
      {split: token_tasks.cached_file_pattern(task_dir, split)
       for split in token_tasks.cached_splits(task_dir)},
      feature_description=token_tasks.feature_description(
          stage.layout.acoustic_levels, stage.layout.melody_levels * stage.melody_conditioning))
  feature = seqio.Feature(seqio.PassThroughVocabulary(stage.layout.vocab_size), add_eos=False,
                          dtype=tf.int32)

  def cast_codes(ds):
    def cast(ex):
      return dict(ex, **{k: tf.cast(ex[k], tf.int32) for k in codes})
    return ds.map(cast, num_parallel_calls=tf.data.AUTOTUNE)

  name = stage_task_name(corpus, stage_name, stage.melody_conditioning)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[cast_codes, _tokenized_only,
                     CutWindows(stage, conditioning_dropout, melody_dropout)],
      output_features={"inputs": feature, "targets": feature},
      shuffle_buffer_size=SHUFFLE_BUFFER)
  return task, stage


def register_stage(cache_dir: str, corpora: Mapping[str, float], stage_name: str,
                   windows: stages.StageWindows, conditioning_dropout: float = 0.0,
                   melody_conditioning: bool = False, melody_dropout: float = 0.0
                   ) -> tuple[str, stages.Stage]:
  """Registers the stage task of every corpus, and their mixture when there are several.

  Returns the name to read (task or mixture) and the stage. All corpora must
  share one token layout and frame rates (the same tokenizers).
  """
  if not corpora:
    raise ValueError("no corpora given for the stage task")
  registered = {c: register_stage_task(cache_dir, c, stage_name, windows, conditioning_dropout,
                                       melody_conditioning, melody_dropout)
                for c in corpora}
  stage = next(iter(registered.values()))[1]
  for corpus, (_, other) in registered.items():
    if other != stage:
      raise ValueError(f"the token cache of {corpus!r} was made by other tokenizers: its "
                       f"layout or rates differ from {next(iter(registered))!r}'s")
  melody = stage.melody_conditioning
  if len(corpora) == 1:
    return stage_task_name(next(iter(corpora)), stage_name, melody), stage
  name = stage_task_name("__".join(sorted(corpora)), stage_name, melody)
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(stage_task_name(c, stage_name, melody), float(rate))
                                   for c, rate in sorted(corpora.items())])
  return name, stage


@gin.configurable
class StageTask:
  """One MusicLM stage's prefix-LM examples from token caches, for `musiclm train`.

  Args:
    stage: "semantic", "coarse" or "fine".
    cache_dir: the `musiclm tokenize` cache directory (`TOKENS_DIR`).
    corpora: corpus name -> mixing rate (one corpus: rate ignored).
    windows: window seconds per stage.
    conditioning_dropout: fraction of training windows whose MuLan (and melody)
      prefix is replaced by pad (classifier-free guidance); 0 turns it off.
    melody_dropout: with melody conditioning, the fraction of the other training
      windows whose melody tokens alone are replaced by pad, so that a text
      prompt without a recording is a prefix the model has seen; ignored
      without melody conditioning.
    seed: shuffling, windows and mixture sampling.
    melody_conditioning: the semantic and coarse prefixes also hold the
      clip's melody tokens (the cache must have them); the fine stage ignores it.
    first_frame_weight: the loss weight, in training windows, of the targets
      of the window's first semantic frame (`Stage.lengths(1)`), which only
      the prefix predicts (later targets lean on the ones before them); above
      1 the stage learns sooner to read its conditioning (README, "Melody
      conditioning"). Evaluation splits weigh every target 1.
  """

  def __init__(self, stage: str = gin.REQUIRED, cache_dir: str = gin.REQUIRED,
               corpora: Mapping[str, float] = gin.REQUIRED,
               windows: Optional[stages.StageWindows] = None,
               conditioning_dropout: float = 0.0, seed: int = 0,
               melody_conditioning: bool = False, melody_dropout: float = 0.0,
               first_frame_weight: float = 1.0):
    for name, value in (("conditioning_dropout", conditioning_dropout),
                        ("melody_dropout", melody_dropout)):
      if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {value}")
    if not first_frame_weight > 0.0:
      raise ValueError(f"first_frame_weight must be positive; got {first_frame_weight}")
    self.name, self.stage = register_stage(cache_dir, dict(corpora), stage,
                                           windows or stages.StageWindows(),
                                           conditioning_dropout,
                                           melody_conditioning and stage != "fine",
                                           melody_dropout)
    self.seed = seed
    self.first_frame_weight = first_frame_weight

  @property
  def layout(self) -> vocab.TokenLayout:
    """The token space of the cache (the trainer records it in the checkpoint)."""
    return self.stage.layout

  def describe(self) -> dict[str, Any]:
    """What the examples are, for the checkpoint manifest (and bundles)."""
    stage = self.stage
    described = {"stage": stage.name, "window_seconds": stage.window_seconds,
                 "coarse_levels": stage.coarse_levels, "semantic_rate": stage.semantic_rate,
                 "acoustic_rate": stage.acoustic_rate, "read": self.name}
    if stage.melody_conditioning:
      described.update(melody_conditioning=True, melody_hop_seconds=stage.melody_hop_seconds,
                       melody_windows=stage.melody_windows)
    return described

  @property
  def feature_lengths(self) -> dict[str, int]:
    prefix, targets = self.stage.lengths()
    return {"inputs": prefix, "targets": targets}

  @property
  def length(self) -> int:
    """Decoder sequence length: prefix + targets of a full window."""
    return sum(self.feature_lengths.values())

  def dataset(self, split: str, local_batch_size: int) -> tf.data.Dataset:
    """Endless batches of the four decoder features `[local_batch, length]`."""
    provider = seqio.get_mixture_or_task(self.name)
    ds = provider.get_dataset(
        sequence_length=self.feature_lengths, split=split, shuffle=split == "train",
        seed=self.seed, num_epochs=None,
        shard_info=seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count()))
    ds = seqio.PrefixLMFeatureConverter(pack=False)(ds, self.feature_lengths)
    first_frame_weight = self.first_frame_weight if split == "train" else 1.0
    first_frame_targets = self.stage.lengths(1)[1]

    def types(ex):
      # The converter weights every non-pad target token outside `inputs`, taking
      # PAD_ID (0) for padding: a prefix whose conditioning dropout padded it would
      # be weighted as targets. Only positions from the first target on count.
      first_target = tf.reduce_sum(tf.cast(ex["decoder_causal_attention"], tf.int32)) - 1
      target_index = tf.range(tf.size(ex["decoder_loss_weights"])) - first_target
      weights = tf.cast(ex["decoder_loss_weights"], tf.float32) * tf.cast(
          target_index >= 0, tf.float32)
      weights *= tf.where(target_index < first_frame_targets, first_frame_weight, 1.0)
      return {"decoder_input_tokens": ex["decoder_input_tokens"],
              "decoder_target_tokens": ex["decoder_target_tokens"],
              "decoder_loss_weights": weights,
              "decoder_causal_attention": tf.cast(ex["decoder_causal_attention"], tf.bool)}
    ds = ds.map(types, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(local_batch_size, drop_remainder=True).prefetch(2)

  def eval_windows(self, split: str, max_windows: int
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first `max_windows` windows of `split` (0: all), in reading order, as
    (prefixes `[P_i]`, targets `[T_i]`) ids: one pass, no shuffling, no dropout."""
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

  def iterator(self, split: str, global_batch_size: int) -> resumable.BatchCountIterator:
    """This process' rows of each global batch, resumable by batch count."""
    local = resumable.local_batch_size(global_batch_size)
    return resumable.BatchCountIterator(lambda: self.dataset(split, local))
