"""The trainer's `StageTask`: one MusicLM stage's decoder batches from token caches.

    train.task = @StageTask()
    StageTask.stage = 'coarse'
    StageTask.cache_dir = %TOKENS_DIR
    StageTask.corpora = {'gm_synth': 1.0, 'music21_gm': 0.5}   # mixture rates
    StageTask.melody_conditioning = True   # semantic/coarse: prefix M + T_mel (optional)
    StageTask.reader = 'numpy'             # a host without TensorFlow

Two readers give the same windows and features, from the same numpy code
(`stages.Stage`: windows, conditioning dropout, decoder features):

- `seqio` (default): the SeqIO stage task or mixture (`tasks/stage_tasks.py`)
  through tf.data, the T5X way;
- `numpy`: `NumpyStageReader`, straight from the cache's TFRecords with
  protobuf and numpy (`token_cache`), for hosts without TensorFlow, such as
  GPU images that carry only JAX. It reads evaluation splits in SeqIO's
  order, so both readers give identical evaluation batches; training windows
  are drawn by its own seeded order (deterministic and resumable too).

This module imports no TensorFlow; the `seqio` reader imports it when built.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Mapping, Optional

import gin
import jax
import numpy as np

from musiclm_jax import stages
from musiclm_jax import token_cache
from musiclm_jax import vocab
from musiclm_jax.training import resumable

READERS = ("seqio", "numpy")
Batch = dict[str, np.ndarray]


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


def cache_stage(cache_dir: str, corpus: str, stage_name: str, windows: stages.StageWindows,
                melody_conditioning: bool = False) -> stages.Stage:
  """The `Stage` of the completed token cache of `corpus` in `cache_dir`."""
  task_dir = token_cache.task_cache_dir(cache_dir, corpus)
  if not token_cache.is_complete(task_dir):
    raise FileNotFoundError(f"no completed token cache of {corpus!r} in {cache_dir} "
                            f"({task_dir}); run `musiclm tokenize` first")
  return stage_from_manifest(token_cache.read_manifest(task_dir), stage_name, windows,
                             melody_conditioning)


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
    reader: "seqio" (SeqIO tasks and mixtures through tf.data) or "numpy"
      (the cache's files read without TensorFlow).
  """

  def __init__(self, stage: str = gin.REQUIRED, cache_dir: str = gin.REQUIRED,
               corpora: Mapping[str, float] = gin.REQUIRED,
               windows: Optional[stages.StageWindows] = None,
               conditioning_dropout: float = 0.0, seed: int = 0,
               melody_conditioning: bool = False, melody_dropout: float = 0.0,
               first_frame_weight: float = 1.0, reader: str = "seqio"):
    for name, value in (("conditioning_dropout", conditioning_dropout),
                        ("melody_dropout", melody_dropout)):
      if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {value}")
    if not first_frame_weight > 0.0:
      raise ValueError(f"first_frame_weight must be positive; got {first_frame_weight}")
    if reader not in READERS:
      raise ValueError(f"unknown reader {reader!r}; expected one of {READERS}")
    if not corpora:
      raise ValueError("no corpora given for the stage task")
    windows = windows or stages.StageWindows()
    melody_conditioning = melody_conditioning and stage != "fine"
    corpora = dict(sorted(corpora.items()))
    by_corpus = {c: cache_stage(cache_dir, c, stage, windows, melody_conditioning)
                 for c in corpora}
    self.stage = next(iter(by_corpus.values()))
    for corpus, other in by_corpus.items():
      if other != self.stage:
        raise ValueError(f"the token cache of {corpus!r} was made by other tokenizers: its "
                         f"layout or rates differ from {next(iter(by_corpus))!r}'s")
    self.name = stage_task_name("__".join(corpora), stage, melody_conditioning)
    self.seed = seed
    self.first_frame_weight = first_frame_weight
    self.reader = reader
    if reader == "seqio":
      from musiclm_jax.tasks import stage_tasks  # pylint: disable=g-import-not-at-top
      self._reader = stage_tasks.SeqioStageReader(
          self.stage, cache_dir, corpora, conditioning_dropout, melody_dropout, seed)
    else:
      self._reader = NumpyStageReader(self.stage, cache_dir, corpora, conditioning_dropout,
                                      melody_dropout, seed)

  @property
  def layout(self) -> vocab.TokenLayout:
    """The token space of the cache (the trainer records it in the checkpoint)."""
    return self.stage.layout

  def describe(self) -> dict[str, Any]:
    """What the examples are, for the checkpoint manifest (and bundles); the
    same for both readers."""
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

  def iterator(self, split: str, global_batch_size: int) -> resumable.BatchCountIterator:
    """This process' rows of each global batch (the four decoder features,
    `[local_batch, length]`), endless and resumable by batch count."""
    local = resumable.local_batch_size(global_batch_size)
    weight = self.first_frame_weight if split == "train" else 1.0
    return resumable.BatchCountIterator(
        lambda skip: self._reader.batches(split, local, weight, skip))

  def eval_windows(self, split: str, max_windows: int
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first `max_windows` windows of `split` (0: all), in reading order, as
    (prefixes `[P_i]`, targets `[T_i]`) ids: one pass, no shuffling, no dropout."""
    return self._reader.eval_windows(split, max_windows)


class NumpyStageReader:
  """A stage's windows and decoder batches read from token caches with numpy.

  Training (`train`): each example is one random window of one clip with
  conditioning dropout (`Stage.examples`). Each corpus' clips go in a fresh
  permutation per epoch; with several corpora each example's corpus is drawn
  at the mixing rates. Example n's clip, window and dropout depend only on
  (seed, process, n), so skipping batches reads nothing.
  Other splits: the consecutive windows of every clip, the clips in SeqIO's
  unshuffled order, repeated; with several corpora each window's corpus is
  drawn at the mixing rates from a fixed seed. Each process reads the clips
  SeqIO would give it (`token_cache.CachedSplit`).

  Args:
    stage: the stage of every cache read.
    cache_dir, corpora: the caches and their (positive) mixing rates.
    conditioning_dropout, melody_dropout, seed: see `StageTask`.
  """

  _CHOICE_CHUNK = 4096

  def __init__(self, stage: stages.Stage, cache_dir: str, corpora: Mapping[str, float],
               conditioning_dropout: float = 0.0, melody_dropout: float = 0.0, seed: int = 0):
    self.stage = stage
    self.cache_dir = cache_dir
    self.corpora = sorted(corpora)
    rates = np.array([float(corpora[c]) for c in self.corpora])
    if len(rates) > 1 and not np.all(rates > 0):
      raise ValueError(f"mixing rates must be positive; got {dict(corpora)}")
    self.rates = rates / rates.sum()
    self.conditioning_dropout = conditioning_dropout
    self.melody_dropout = melody_dropout
    self.seed = seed
    self._splits: dict[tuple[str, str, int, int], token_cache.CachedSplit] = {}

  def _split(self, corpus: str, split: str, shard_index: int = 0, num_shards: int = 1
             ) -> token_cache.CachedSplit:
    key = (corpus, split, shard_index, num_shards)
    if key not in self._splits:
      layout = self.stage.layout
      task_dir = token_cache.task_cache_dir(self.cache_dir, corpus)
      if split not in token_cache.cached_splits(task_dir):
        raise ValueError(f"the token cache of {corpus!r} has no split {split!r}; it has "
                         f"{', '.join(token_cache.cached_splits(task_dir))}")
      self._splits[key] = token_cache.CachedSplit(
          task_dir, split, layout.acoustic_levels,
          layout.melody_levels if self.stage.melody_conditioning else 0,
          shard_index, num_shards)
    return self._splits[key]

  def _clip(self, split: token_cache.CachedSplit, ref: token_cache.RecordRef
            ) -> stages.ClipTokens:
    record = split.read(ref)
    return stages.ClipTokens(mulan=record["mulan"], semantic=record["semantic"],
                             acoustic=record["acoustic"], melody=record.get("melody"))

  def _host_refs(self, split: str) -> list[tuple[token_cache.CachedSplit,
                                                 list[token_cache.RecordRef]]]:
    """Per corpus, this process' split and its tokenized clips in SeqIO's order."""
    out = []
    for corpus in self.corpora:
      cached = self._split(corpus, split, jax.process_index(), jax.process_count())
      refs = cached.records
      if not refs:
        raise ValueError(f"process {jax.process_index()} has no tokenized clips of "
                         f"{corpus!r} in split {split!r} of {self.cache_dir}")
      out.append((cached, refs))
    return out

  def _corpus_choices(self, seed: Any) -> Iterator[int]:
    """Each example's corpus, drawn at the mixing rates."""
    if len(self.corpora) == 1:
      return itertools.repeat(0)
    return itertools.chain.from_iterable(
        np.random.default_rng([*seed, chunk]).choice(len(self.corpora), self._CHOICE_CHUNK,
                                                     p=self.rates)
        for chunk in itertools.count())

  def _train_windows(self, skip: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(prefix, targets) of training example `skip` on."""
    hosts = self._host_refs("train")
    process = jax.process_index()
    taken = [0] * len(hosts)
    order: dict[int, tuple[int, np.ndarray]] = {}  # corpus -> (epoch, its clip order)
    for n, corpus in enumerate(self._corpus_choices((self.seed, process, 0))):
      position = taken[corpus]
      taken[corpus] += 1
      if n < skip:
        continue
      cached, refs = hosts[corpus]
      epoch = position // len(refs)
      if order.get(corpus, (None,))[0] != epoch:
        order[corpus] = (epoch, np.random.default_rng(
            [self.seed, process, 1, corpus, epoch]).permutation(len(refs)))
      ref = refs[order[corpus][1][position % len(refs)]]
      rng = np.random.default_rng([self.seed, process, 2, corpus, position])
      prefixes, targets = self.stage.examples(self._clip(cached, ref), rng,
                                              self.conditioning_dropout, self.melody_dropout)
      yield prefixes[0], targets[0]

  def _clip_windows(self, cached: token_cache.CachedSplit,
                    refs: Iterator[token_cache.RecordRef]
                    ) -> Iterator[tuple[token_cache.CachedSplit, token_cache.RecordRef, int]]:
    """(split, clip, start frame) of the consecutive windows of each clip of `refs`."""
    for ref in refs:
      for start in self.stage.window_starts(ref.semantic_frames):
        yield cached, ref, start

  def _window_ids(self, read: dict[int, tuple[token_cache.RecordRef, stages.ClipTokens]],
                  corpus: int, cached: token_cache.CachedSplit, ref: token_cache.RecordRef,
                  start: int) -> tuple[np.ndarray, np.ndarray]:
    """(prefix, targets) of the window at `start` of clip `ref`; `read` keeps each
    corpus' last clip, so consecutive windows of a clip read it once."""
    if corpus not in read or read[corpus][0] is not ref:
      read[corpus] = (ref, self._clip(cached, ref))
    return self.stage.sequences(self.stage.window(read[corpus][1], start))

  def _eval_windows(self, split: str, skip: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(prefix, targets) of evaluation window `skip` on, endlessly; a clip is
    read once for all its windows, and not at all when they are skipped."""
    streams = [self._clip_windows(cached, itertools.cycle(refs))
               for cached, refs in self._host_refs(split)]
    read: dict[int, tuple[token_cache.RecordRef, stages.ClipTokens]] = {}
    for n, corpus in enumerate(self._corpus_choices((0, jax.process_index(), 3))):
      cached, ref, start = next(streams[corpus])
      if n >= skip:
        yield self._window_ids(read, corpus, cached, ref, start)

  def batches(self, split: str, batch_size: int, first_frame_weight: float, skip: int
              ) -> Iterator[Batch]:
    """Endless batches of the decoder features `[batch_size, length]` (this
    process' share), from batch `skip` on."""
    if split == "train":
      windows = self._train_windows(skip * batch_size)
    else:
      windows = self._eval_windows(split, skip * batch_size)
    while True:
      rows = [self.stage.decoder_features(prefix, targets, first_frame_weight)
              for prefix, targets in itertools.islice(windows, batch_size)]
      yield {name: np.stack([row[name] for row in rows]) for name in rows[0]}

  def eval_windows(self, split: str, max_windows: int
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`StageTask.eval_windows`: every process reads all files; the corpora's
    windows alternate, each corpus' in SeqIO's order."""
    streams = []
    for corpus in self.corpora:
      cached = self._split(corpus, split)
      streams.append(self._clip_windows(cached, iter(cached.records)))
    prefixes, targets = [], []
    read: dict[int, tuple[token_cache.RecordRef, stages.ClipTokens]] = {}
    for corpus, item in _round_robin(streams):
      if max_windows and len(prefixes) == max_windows:
        break
      prefix, target = self._window_ids(read, corpus, *item)
      prefixes.append(prefix)
      targets.append(target)
    return prefixes, targets


def _round_robin(streams: list[Iterator[Any]]) -> Iterator[tuple[int, Any]]:
  """(stream index, item) taking one item of each stream in turn until all end."""
  live = list(enumerate(streams))
  while live:
    still = []
    for index, stream in live:
      item = next(stream, None)  # items are tuples, never None
      if item is not None:
        still.append((index, stream))
        yield index, item
    live = still
