"""SeqIO token tasks `<corpus>_tokens` and their Beam cache job (`musiclm tokenize`).

    musiclm tokenize --gin_file=gin/tokenize/gm_synth.gin \
        --gin_bindings="TOKENS_DIR='data/tokens'" ...

A token task reads a built corpus (`CorpusSource`, in shards of
`clips_per_shard` clips that Beam workers take in parallel) and runs the three
frozen tokenizers on it (`TokenizeClips`, a pre-cache preprocessor). Every
cached record is one clip:

    semantic     int32 [frames_s]            w2v-BERT k-means codes, 25 Hz
    acoustic     int32 [frames_a, levels]    SoundStream codes, 50 Hz, frames_a = 2 frames_s
    mulan        int32 [mulan_levels]        M_A, MuLan RVQ codes of the clip
    melody       int32 [windows, levels]     T_mel, melody RVQ codes per melody window
                                             (only when `TokenizerDirs.melody` is set)
    caption, clip_id, source_id, split       text
    duration_s   float32                     seconds of real audio in the corpus
    skip_reason  text, "" for a tokenized clip; else why not ("silent", "too_short", ...)

Skipped clips are cached too, with empty codes, so that the job never dies
on a bad clip and the manifest can count them; the stage tasks drop them.

`run_cache_job` builds the same Beam pipeline as SeqIO's `cache_tasks_main`,
from `seqio.beam_utils`' transforms, and writes SeqIO's cache layout
(`<split>.tfrecord-*-of-*`, info and stats files, `COMPLETED`). It does not
call `cache_tasks_main` because that registers tasks by importing modules,
while these tasks depend on gin (corpus and tokenizer directories): the
task's spec travels to the workers in PreprocessTask's `setup_fn`. A task
whose directory has no `COMPLETED` (an interrupted run) is deleted and
cached again from scratch, so a re-run neither duplicates nor loses clips.
After the job, `tokens_manifest.json` in the task directory records the
tokenizers, the token layout and the clips cached and skipped per split.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from musiclm_jax import audio
from musiclm_jax import token_cache
from musiclm_jax import vocab
from musiclm_jax.tasks import corpora
from musiclm_jax.tokenizers import frozen

DEFAULT_PIPELINE_OPTIONS = ("--runner=DirectRunner", "--direct_running_mode=multi_processing",
                            "--direct_num_workers=0", "--default_sdk_harness_log_level=WARNING")


@dataclasses.dataclass(frozen=True)
class TokenTaskSpec:
  """Everything a worker needs to register a token task.

  Attributes:
    corpus: short name, used in task names (`<corpus>_tokens`).
    corpus_dir: the corpus built by `musiclm prepare`.
    tokenizers: the three tokenizer runs.
    clips_per_shard: clips per input shard (Beam's unit of parallel work).
    batch_size: clips tokenized together.
    min_seconds: clips with less real audio are skipped as "too_short".
  """

  corpus: str
  corpus_dir: str
  tokenizers: frozen.TokenizerDirs
  clips_per_shard: int = 32
  batch_size: int = 8
  min_seconds: float = 1.0


class CorpusSource(seqio.DataSource):
  """The clips of a built corpus, in shards of `clips_per_shard` consecutive clips.

  Each example has `audio [samples]` (24 kHz, zero-padded), `num_samples`
  (real samples), `caption`, `clip_id`, `source_id` and `split`.
  """

  def __init__(self, corpus_dir: str, clips_per_shard: int = 32):
    if clips_per_shard < 1:
      raise ValueError(f"clips_per_shard must be positive; got {clips_per_shard}")
    self.corpus_dir = corpus_dir
    self.clips_per_shard = clips_per_shard
    self._builder = corpora.open_builder(corpus_dir)
    counts = {name: split.num_examples for name, split in self._builder.info.splits.items()}
    super().__init__(splits=sorted(counts), num_input_examples=counts)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> list[str]:
    count = self.num_input_examples(split)
    num_shards = max(1, math.ceil(count / self.clips_per_shard))
    return [_slice(split, count, i, num_shards) for i in range(num_shards)]

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None, shard_info: Optional[seqio.ShardInfo] = None,
                  *, sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # part of seqio's signature, unused
    instruction = split
    if shard_info is not None:
      instruction = _slice(split, self.num_input_examples(split), shard_info.index,
                           shard_info.num_shards)
    ds = self._builder.as_dataset(
        split=instruction, shuffle_files=shuffle,
        read_config=tfds.ReadConfig(try_autocache=False, shuffle_seed=seed))

    def select(ex):
      num_samples = tf.cast(tf.round(ex["duration_s"] * audio.SAMPLE_RATE), tf.int32)
      return {"audio": ex["audio"], "duration_s": ex["duration_s"],
              "num_samples": tf.minimum(num_samples, tf.shape(ex["audio"])[0]),
              "caption": ex["caption"], "clip_id": ex["clip_id"],
              "source_id": ex["metadata"]["source_id"], "split": tf.constant(split)}
    return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)


def _slice(split: str, count: int, index: int, num_shards: int) -> str:
  """TFDS split slice of shard `index` of `num_shards` near-equal parts."""
  return f"{split}[{count * index // num_shards}:{count * (index + 1) // num_shards}]"


# Loaded tokenizers per process, so that each Beam worker loads them once.
_LOADED: dict[tuple[frozen.TokenizerDirs, float], frozen.FrozenTokenizers] = {}


def load_tokenizers(dirs: frozen.TokenizerDirs, min_seconds: float
                    ) -> frozen.FrozenTokenizers:
  key = (dirs, min_seconds)
  if key not in _LOADED:
    _LOADED[key] = frozen.FrozenTokenizers.load(dirs, min_seconds)
  return _LOADED[key]


class TokenizeClips:
  """Pre-cache preprocessor: clips -> their codes (see the module docstring)."""

  def __init__(self, spec: TokenTaskSpec):
    self.spec = spec

  def __call__(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    spec = self.spec
    ds = ds.padded_batch(spec.batch_size)

    with_melody = spec.tokenizers.melody is not None

    def tokenize(wav, num_samples):
      started = time.time()
      tokenizers = load_tokenizers(spec.tokenizers, spec.min_seconds)
      out = tokenizers.tokenize_clips(wav, num_samples)
      skipped = sum(bool(r) for r in out.skip_reasons)
      print(f"tokenize {spec.corpus}: {len(wav) - skipped} clips "
            f"({np.sum(num_samples) / audio.SAMPLE_RATE:.1f} s of audio) tokenized, {skipped} "
            f"skipped in {time.time() - started:.1f} s [worker {os.getpid()}]", flush=True)
      frames = np.array([len(s) for s in out.semantic], np.int32)
      n = max(int(frames.max(initial=0)), 1)
      levels = tokenizers.codec.config.num_levels
      semantic = np.zeros([len(wav), n], np.int32)
      acoustic = np.zeros([len(wav), 2 * n, levels], np.int32)
      mulan = np.zeros([len(wav), tokenizers.layout.mulan_levels], np.int32)
      for i, k in enumerate(frames):
        semantic[i, :k] = out.semantic[i]
        acoustic[i, :2 * k] = out.acoustic[i]
        if k:
          mulan[i] = out.mulan[i]
      reasons = np.array([r.encode() for r in out.skip_reasons], dtype=object)
      if not with_melody:
        return semantic, acoustic, mulan, frames, reasons
      windows = np.array([len(t) for t in out.melody], np.int32)
      melody = np.zeros([len(wav), max(int(windows.max(initial=0)), 1),
                         tokenizers.layout.melody_levels], np.int32)
      for i, k in enumerate(windows):
        melody[i, :k] = out.melody[i]
      return semantic, acoustic, mulan, frames, reasons, melody, windows

    def tokenize_batch(batch):
      types = [tf.int32, tf.int32, tf.int32, tf.int32, tf.string]
      results = tf.numpy_function(tokenize, [batch["audio"], batch["num_samples"]],
                                  types + [tf.int32, tf.int32] * with_melody, stateful=False)
      out = {k: batch[k] for k in ("duration_s", "caption", "clip_id", "source_id", "split")}
      out.update(semantic=results[0], acoustic=results[1], mulan=results[2], frames=results[3],
                 skip_reason=results[4])
      if with_melody:
        out.update(melody=results[5], melody_windows=results[6])
      return out

    def trim(ex):
      frames = ex.pop("frames")
      skipped = tf.not_equal(ex["skip_reason"], "")
      ex["semantic"] = tf.ensure_shape(ex["semantic"][:frames], [None])
      ex["acoustic"] = tf.ensure_shape(ex["acoustic"][:2 * frames], [None, None])
      kept = tf.shape(ex["mulan"])[0] * tf.cast(tf.logical_not(skipped), tf.int32)
      ex["mulan"] = tf.ensure_shape(ex["mulan"][:kept], [None])
      if with_melody:
        ex["melody"] = tf.ensure_shape(ex["melody"][:ex.pop("melody_windows")], [None, None])
      return ex
    return ds.map(tokenize_batch).unbatch().map(trim)


def output_features(layout) -> dict[str, seqio.Feature]:
  """The token features, with pass-through vocabularies of the codebook sizes."""
  def feature(size, rank):
    return seqio.Feature(seqio.PassThroughVocabulary(size), add_eos=False, dtype=tf.int32,
                         rank=rank, required=False)
  features = {"semantic": feature(layout.semantic_codebook_size, 1),
              "acoustic": feature(layout.acoustic_codebook_size, 2),
              "mulan": feature(layout.mulan_codebook_size, 1)}
  if layout.melody_levels:
    features["melody"] = feature(layout.melody_codebook_size, 2)
  return features


def register_token_task(spec: TokenTaskSpec, layout_dict: Mapping[str, int]) -> seqio.Task:
  """(Re-)registers `<corpus>_tokens` for `spec`; idempotent."""
  name = token_cache.token_task_name(spec.corpus)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=CorpusSource(spec.corpus_dir, spec.clips_per_shard),
      preprocessors=[TokenizeClips(spec), seqio.CacheDatasetPlaceholder(required=True)],
      output_features=output_features(vocab.TokenLayout.from_dict(dict(layout_dict))))


def run_cache_job(specs: Sequence[TokenTaskSpec], cache_dir: str,
                  pipeline_options: Sequence[str] = DEFAULT_PIPELINE_OPTIONS,
                  num_shards: int = 0, overwrite: bool = False) -> dict[str, dict[str, Any]]:
  """Caches the token tasks of `specs` under `cache_dir` with Apache Beam.

  Tasks already cached (a `COMPLETED` file) are kept unless `overwrite`.
  Returns the manifest of every task, by corpus.

  Args:
    pipeline_options: Beam options, e.g. `--runner=DataflowRunner --project=...`.
    num_shards: output TFRecord shards per split (0: as many as input shards).
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from seqio import beam_utils  # pylint: disable=g-import-not-at-top

  if len({s.corpus for s in specs}) != len(specs):
    raise ValueError(f"corpus names repeat: {[s.corpus for s in specs]}")
  described = {}
  for spec in specs:  # fail early, in this process, on a bad directory
    tokenizers = load_tokenizers(spec.tokenizers, spec.min_seconds)
    described[spec.corpus] = tokenizers.describe()
  tf.io.gfile.makedirs(cache_dir)
  todo = []
  for spec in specs:
    task_dir = token_cache.task_cache_dir(cache_dir, spec.corpus)
    if token_cache.is_complete(task_dir) and not overwrite:
      print(f"tokenize {spec.corpus}: cached already in {task_dir}; kept", flush=True)
      continue
    if tf.io.gfile.exists(task_dir):
      print(f"tokenize {spec.corpus}: removing the {'old' if overwrite else 'incomplete'} "
            f"cache {task_dir}", flush=True)
      tf.io.gfile.rmtree(task_dir)
    todo.append(spec)

  started = time.time()
  if todo:
    with beam.Pipeline(options=PipelineOptions(list(pipeline_options))) as pipeline:
      for spec in todo:
        _add_task_to_pipeline(pipeline, beam, beam_utils, spec,
                              described[spec.corpus]["layout"], cache_dir, num_shards)
  seconds = time.time() - started
  manifests = {}
  for spec in specs:
    task_dir = token_cache.task_cache_dir(cache_dir, spec.corpus)
    manifest_path = os.path.join(task_dir, token_cache.MANIFEST_FILE)
    if spec in todo or not tf.io.gfile.exists(manifest_path):
      manifests[spec.corpus] = write_manifest(
          spec, described[spec.corpus], task_dir, seconds if spec in todo else None)
    else:
      manifests[spec.corpus] = token_cache.read_manifest(task_dir)
  return manifests


def _add_task_to_pipeline(pipeline, beam, beam_utils, spec: TokenTaskSpec,
                          layout_dict: Mapping[str, int], cache_dir: str,
                          num_shards: int) -> None:
  """The steps of SeqIO's cache job for one task: examples, TFRecords, info, stats."""
  task = register_token_task(spec, layout_dict)
  task_dir = token_cache.task_cache_dir(cache_dir, spec.corpus)
  setup = functools.partial(register_token_task, spec, dict(layout_dict))
  written = []
  for split in task.splits:
    label = f"{task.name}_{split}"
    preprocess = beam_utils.PreprocessTask(task, split, setup_fn=setup)
    shards = num_shards or len(preprocess.shards)
    print(f"tokenize {spec.corpus}/{split}: {task.source.num_input_examples(split)} clips in "
          f"{len(preprocess.shards)} input shards -> {shards} output shards", flush=True)
    examples = (pipeline | f"{label}_preprocess" >> preprocess
                | f"{label}_shuffle" >> beam.Reshuffle())
    written.append(examples | f"{label}_write" >> beam_utils.WriteExampleTfRecord(
        seqio.get_cached_tfrecord_prefix(task_dir, split), num_shards=shards))
    written.append(examples | f"{label}_info" >> beam_utils.GetInfo(shards)
                   | f"{label}_write_info" >> beam_utils.WriteJson(
                       seqio.get_cached_info_path(task_dir, split)))
    written.append(examples | f"{label}_stats" >> beam_utils.GetStats(task.output_features)
                   | f"{label}_write_stats" >> beam_utils.WriteJson(
                       seqio.get_cached_stats_path(task_dir, split)))
  _ = (written | f"{task.name}_flatten" >> beam.Flatten()
       | f"{task.name}_nothing" >> beam.Filter(lambda _: False)
       | f"{task.name}_completed" >> beam.io.textio.WriteToText(
           os.path.join(task_dir, token_cache.COMPLETED_FILE), num_shards=1,
           shard_name_template="", append_trailing_newlines=False))


# -- reading the cache ------------------------------------------------------------

def feature_description(acoustic_levels: int, melody_levels: int = 0) -> dict[str, Any]:
  """How to parse a cached record (tf.Example stores ints as int64); `melody`
  `[windows, melody_levels]` when `melody_levels` > 0."""
  desc = {name: tf.io.FixedLenFeature([], tf.string) for name in token_cache.TEXT_FEATURES}
  desc.update(
      semantic=tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True),
      acoustic=tf.io.FixedLenSequenceFeature([acoustic_levels], tf.int64, allow_missing=True),
      mulan=tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True),
      duration_s=tf.io.FixedLenFeature([], tf.float32))
  if melody_levels:
    desc["melody"] = tf.io.FixedLenSequenceFeature([melody_levels], tf.int64,
                                                   allow_missing=True)
  return desc


def cached_file_pattern(task_dir: str, split: str) -> str:
  with tf.io.gfile.GFile(seqio.get_cached_info_path(task_dir, split)) as f:
    num_shards = json.load(f)["num_shards"]
  return f"{seqio.get_cached_tfrecord_prefix(task_dir, split)}-*-of-{num_shards:05d}"


def read_cached(task_dir: str, split: str, acoustic_levels: int,
                melody_levels: int = 0) -> tf.data.Dataset:
  """Every cached record of a split (skipped clips included), int codes as int32
  (`melody` too when `melody_levels` > 0)."""
  ds = tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(cached_file_pattern(task_dir, split))))
  description = feature_description(acoustic_levels, melody_levels)

  def parse(record):
    ex = tf.io.parse_single_example(record, description)
    for name in ("semantic", "acoustic", "mulan", "melody")[:3 + bool(melody_levels)]:
      ex[name] = tf.cast(ex[name], tf.int32)
    return ex
  return ds.map(parse)


def write_manifest(spec: TokenTaskSpec, described: Mapping[str, Any], task_dir: str,
                   job_seconds: Optional[float]) -> dict[str, Any]:
  """Counts what the cache holds per split and writes `tokens_manifest.json`."""
  if not token_cache.is_complete(task_dir):
    raise RuntimeError(f"the cache job did not complete {task_dir} (no COMPLETED file)")
  levels = described["layout"]["acoustic_levels"]
  splits = {}
  for split in token_cache.cached_splits(task_dir):
    skipped = collections.Counter()
    clips = frames = 0
    audio_seconds = 0.0
    for ex in read_cached(task_dir, split, levels).as_numpy_iterator():
      reason = ex["skip_reason"].decode()
      if reason:
        skipped[reason] += 1
        continue
      clips += 1
      frames += len(ex["semantic"])
      audio_seconds += len(ex["semantic"]) / described["semantic_rate"]
    splits[split] = {"clips": clips, "skipped": dict(sorted(skipped.items())),
                     "semantic_frames": frames, "audio_seconds": round(audio_seconds, 3)}
  manifest = {"format": token_cache.MANIFEST_FORMAT,
              "task": token_cache.token_task_name(spec.corpus),
              "corpus": spec.corpus, "corpus_dir": spec.corpus_dir,
              "tokenizer_dirs": dataclasses.asdict(spec.tokenizers),
              "min_seconds": spec.min_seconds, **described, "splits": splits}
  if job_seconds is not None:
    manifest["job_seconds"] = round(job_seconds, 2)
  path = os.path.join(task_dir, token_cache.MANIFEST_FILE)
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    f.write(json.dumps(manifest, indent=1))
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
  return manifest


@gin.configurable
def tokenize(corpora_dirs: Mapping[str, str] = gin.REQUIRED, cache_dir: str = gin.REQUIRED,
             tokenizers: frozen.TokenizerDirs = gin.REQUIRED,
             pipeline_options: Sequence[str] = DEFAULT_PIPELINE_OPTIONS,
             num_shards: int = 0, overwrite: bool = False, clips_per_shard: int = 32,
             batch_size: int = 8, min_seconds: float = 1.0) -> dict[str, dict[str, Any]]:
  """`musiclm tokenize`: caches `<corpus>_tokens` for every corpus of `corpora_dirs`.

  Args:
    corpora_dirs: corpus name -> built corpus directory.
    cache_dir: where the SeqIO caches go (`TOKENS_DIR`).
    tokenizers: the three tokenizer runs.
    pipeline_options, num_shards, overwrite: see `run_cache_job`.
    clips_per_shard, batch_size, min_seconds: see `TokenTaskSpec`.
  """
  specs = [TokenTaskSpec(corpus=name, corpus_dir=path, tokenizers=tokenizers,
                         clips_per_shard=clips_per_shard, batch_size=batch_size,
                         min_seconds=min_seconds)
           for name, path in sorted(corpora_dirs.items())]
  return run_cache_job(specs, cache_dir, pipeline_options, num_shards, overwrite)
