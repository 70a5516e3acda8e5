"""Corpora as TFDS datasets, built by `musiclm prepare CORPUS`.

Every corpus has the same features (one clip per example):

    audio        float32 [samples], mono 24 kHz (padded to the clip length)
    duration_s   float32, seconds of real audio before padding
    caption      text
    aspect_list  [text], MusicCaps-style keywords
    metadata     tempo_bpm (0: unknown), key, mode, time_signature,
                 instruments [text] (General MIDI names), genre, mood, source_id
    midi         bytes, the score as a standard MIDI file (empty if none)
    clip_id      text, unique and stable

Splits train / validation / test are made by source id, so that clips of
one piece never straddle two splits. Next to the TFDS files the build writes
`build_report.json` (clips per split; skipped items by reason, with
examples; repairs by kind) and `test_prompts.jsonl` (captions and labelled
attributes of the test split, for the adherence evaluation).

Read a built corpus with `load(corpus_dir, split)`; `corpus_dir` is what
`prepare` prints, `DATA_DIR/<corpus>/<config>/<version>`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from musiclm_jax import audio
from musiclm_jax.corpora import base

VERSION = "1.0.0"
RELEASE_NOTES = {"1.0.0": "Clips with caption, aspects, metadata and MIDI."}
REPORT_FILE = "build_report.json"
PROMPTS_FILE = "test_prompts.jsonl"


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "audio": tfds.features.Audio(shape=(None,), dtype=np.float32,
                                   sample_rate=audio.SAMPLE_RATE),
      "duration_s": np.float32,
      "caption": tfds.features.Text(),
      "aspect_list": tfds.features.Sequence(tfds.features.Text()),
      "metadata": {
          "tempo_bpm": np.float32,
          "key": tfds.features.Text(),
          "mode": tfds.features.Text(),
          "time_signature": tfds.features.Text(),
          "instruments": tfds.features.Sequence(tfds.features.Text()),
          "genre": tfds.features.Text(),
          "mood": tfds.features.Text(),
          "source_id": tfds.features.Text(),
      },
      "midi": tfds.features.Tensor(shape=(), dtype=np.object_),
      "clip_id": tfds.features.Text(),
  })


def example(clip: base.Clip) -> dict:
  meta = dataclasses.asdict(clip.metadata)
  meta["instruments"] = list(meta["instruments"])
  return {"audio": clip.audio, "duration_s": clip.duration_s, "caption": clip.caption,
          "aspect_list": list(clip.aspect_list), "metadata": meta, "midi": clip.midi,
          "clip_id": clip.key}


class CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the clips of a `Source` that `base.build_clips` has cached.

  Not registered with TFDS by name: its datasets are read back from their
  directory (`load`), which needs no builder code at all.
  """
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = RELEASE_NOTES

  def __init__(self, *, source: base.Source, spec: base.BuildSpec, cache_dir: str,
               chosen: dict[str, list[tuple[base.Item, int]]], data_dir: str):
    self.name = source.name  # the dataset directory's name
    self._source, self._spec = source, spec
    self._cache_dir, self._chosen = cache_dir, chosen
    config = tfds.core.BuilderConfig(name=spec.config_name,
                                     description=json.dumps(dataclasses.asdict(spec)))
    super().__init__(data_dir=data_dir, config=config)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(),
        description=f"musiclm_jax corpus {self._source.name!r}: 24 kHz clips with captions.",
        metadata=tfds.core.MetadataDict(spec=dataclasses.asdict(self._spec)))

  def _split_generators(self, dl_manager):
    del dl_manager
    # TFDS cannot write an empty split; a tiny corpus may leave one empty.
    return {split: self._generate_examples(self._chosen[split])
            for split in base.SPLITS if self._chosen.get(split)}

  def _generate_examples(self, chosen):
    cache = base.ClipCache(self._cache_dir)
    by_item: dict[base.Item, list[int]] = {}
    for item, index in chosen:
      by_item.setdefault(item, []).append(index)
    for item, indices in by_item.items():
      clips, _ = cache.get(item)
      for index in indices:
        yield clips[index].key, example(clips[index])


def dataset_dir(data_dir: str, corpus: str, spec: base.BuildSpec) -> str:
  return os.path.join(data_dir, corpus, spec.config_name, VERSION)


def prepare(source: base.Source, spec: base.BuildSpec, data_dir: str,
            workers: int = 0, split_fractions=(0.8, 0.1, 0.1)) -> str:
  """Builds (or resumes building) a corpus. Returns its dataset directory.

  Phase 1 makes every item's clips in `workers` processes into
  DATA_DIR/build_cache/<corpus>/<config>/ (resumable); phase 2 writes the
  TFDS dataset, the build report and the test prompts, then drops the cache.
  A corpus that is already complete is left as it is.
  """
  target = dataset_dir(data_dir, source.name, spec)
  if os.path.isfile(os.path.join(target, REPORT_FILE)):
    print(f"prepare {source.name}: {target} is already built; nothing to do", flush=True)
    return target
  source.check(spec)
  start = time.time()
  items = source.items(spec)
  if not items:
    raise ValueError(f"{source.name}: the source lists no items for {spec}")
  splits = base.assign_splits([item.source_id for item in items], spec.seed, split_fractions)
  cache_dir = os.path.join(data_dir, "build_cache", source.name, spec.config_name)
  print(f"prepare {source.name}: {len(items)} items -> {target}", flush=True)
  tfds.display_progress_bar(False)  # build_clips prints its own progress
  report = base.BuildReport(corpus=source.name, spec=dataclasses.asdict(spec))
  report.resumed_items = base.build_clips(source, spec, items, cache_dir, workers)
  chosen = base.collect(source, spec, items, cache_dir, splits, report)
  empty = [split for split in base.SPLITS if not chosen.get(split)]
  if not any(chosen.values()):
    raise ValueError(f"{source.name}: no usable clips; see the reasons in {cache_dir}/*.skip.json")
  if empty:
    print(f"prepare {source.name}: warning: no clips for split(s) {', '.join(empty)}; "
          f"build more examples to fill them", flush=True)
  builder = CorpusBuilder(source=source, spec=spec, cache_dir=cache_dir, chosen=chosen,
                          data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  report.seconds_elapsed = time.time() - start
  _write_test_prompts(target, cache_dir, chosen.get("test", []), spec)
  with open(os.path.join(target, REPORT_FILE + ".tmp"), "w") as f:
    json.dump(dataclasses.asdict(report), f, indent=1)
  os.replace(os.path.join(target, REPORT_FILE + ".tmp"), os.path.join(target, REPORT_FILE))
  shutil.rmtree(cache_dir, ignore_errors=True)
  for parent in (os.path.dirname(cache_dir), os.path.dirname(os.path.dirname(cache_dir))):
    if os.path.isdir(parent) and not os.listdir(parent):
      os.rmdir(parent)
  print(f"prepare {report.summary()}; {report.seconds_elapsed:.0f}s", flush=True)
  return target


def _write_test_prompts(target: str, cache_dir: str, test: list[tuple[base.Item, int]],
                        spec: base.BuildSpec) -> None:
  """The test split's captions with their labelled attributes, one JSON per line."""
  cache = base.ClipCache(cache_dir)
  with open(os.path.join(target, PROMPTS_FILE), "w") as f:
    for item, index in test:
      record = cache.records(item)[0][index]
      f.write(json.dumps({"prompt": record["caption"], "seconds": spec.seconds,
                          "clip_id": record["key"], "attributes": record["metadata"]}) + "\n")


def open_builder(corpus_dir: str) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a built corpus, read from its directory."""
  if not os.path.isfile(os.path.join(corpus_dir, "dataset_info.json")):
    raise FileNotFoundError(f"{corpus_dir} is not a built corpus (no dataset_info.json); "
                            f"build one with `musiclm prepare`")
  return tfds.builder_from_directory(corpus_dir)


def load(corpus_dir: str, split: str, sample_rate: Optional[int] = None,
         shuffle_files: bool = False) -> tf.data.Dataset:
  """A built corpus' split as a tf.data.Dataset of feature dicts.

  sample_rate: resample `audio` on the fly (e.g. 16000 for w2v-BERT and
  MuLan); None keeps 24 kHz.
  """
  builder = open_builder(corpus_dir)
  if split not in builder.info.splits:
    raise ValueError(f"{corpus_dir} has no split {split!r}; it has {list(builder.info.splits)}")
  # No auto-caching: audio corpora do not belong in memory.
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_files,
                          read_config=tfds.ReadConfig(try_autocache=False))
  if sample_rate is None or sample_rate == audio.SAMPLE_RATE:
    return ds

  def resample(features):
    wav = tf.numpy_function(lambda w: audio.resample(w, audio.SAMPLE_RATE, sample_rate),
                            [features["audio"]], tf.float32, stateful=False)
    wav.set_shape([None])
    return dict(features, audio=wav)
  return ds.map(resample, num_parallel_calls=tf.data.AUTOTUNE)


def read_report(corpus_dir: str) -> dict:
  with open(os.path.join(corpus_dir, REPORT_FILE)) as f:
    return json.load(f)
