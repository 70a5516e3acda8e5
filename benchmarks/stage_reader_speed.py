"""Stage input speed: training windows per second of `StageTask`'s two readers.

Writes a token cache of random codes in the paper's token layout (30 s clips:
750 semantic frames, 1500 × 12 acoustic frames, 12 MuLan codes, codebooks of
1024) in the cache job's format, then reads `--batches` training batches of
each stage with each reader (`seqio` through tf.data, `numpy` without
TensorFlow) at the paper's windows (30 / 10 / 3 s) and prints one JSON line
per (stage, reader):

  windows_per_s        training windows (rows) per second, after a warm-up batch
  target_tokens_per_s  the target ids in them per second: what a stage's
                       trainer consumes (compare train_throughput.py's tokens/s)
  cpu_s_per_batch      this process' CPU time per batch (tf.data uses threads)
  first_batch_s        until the first batch: building the pipeline, or (numpy)
                       indexing the files and checking every record's checksums

Writing the cache needs TensorFlow (tf.train.Example, as the cache job);
`--cache_dir` reads an existing cache instead, where the numpy reader alone
runs without TensorFlow:

  python3 benchmarks/stage_reader_speed.py --clips 256 --batches 20 --batch_size 64
  python3 benchmarks/stage_reader_speed.py --cache_dir data/tokens --corpus gm_synth \
      --readers numpy
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from musiclm_jax import stage_task  # pylint: disable=wrong-import-position
from musiclm_jax import stages  # pylint: disable=wrong-import-position
from musiclm_jax import token_cache  # pylint: disable=wrong-import-position
from musiclm_jax import vocab  # pylint: disable=wrong-import-position

CLIP_SECONDS = 30


def write_random_cache(cache_dir: str, corpus: str, clips: int, num_shards: int) -> None:
  """A token cache of `clips` random 30 s clips in the cache job's layout (train split)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  layout = vocab.LAYOUT
  task_dir = token_cache.task_cache_dir(cache_dir, corpus)
  os.makedirs(task_dir)
  rng = np.random.default_rng(0)

  def ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values.reshape(-1)))

  def text(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))

  for shard in range(num_shards):
    path = os.path.join(task_dir, f"train.tfrecord-{shard:05d}-of-{num_shards:05d}")
    with tf.io.TFRecordWriter(path) as writer:
      for i in range(shard, clips, num_shards):
        frames = CLIP_SECONDS * 25
        features = {
            "semantic": ints(rng.integers(0, layout.semantic_codebook_size, frames)),
            "acoustic": ints(rng.integers(0, layout.acoustic_codebook_size,
                                          (2 * frames, layout.acoustic_levels))),
            "mulan": ints(rng.integers(0, layout.mulan_codebook_size, layout.mulan_levels)),
            "duration_s": tf.train.Feature(float_list=tf.train.FloatList(value=[CLIP_SECONDS])),
            "caption": text("random codes"), "clip_id": text(f"clip{i}"),
            "source_id": text(f"clip{i}"), "split": text("train"), "skip_reason": text("")}
        writer.write(tf.train.Example(
            features=tf.train.Features(feature=features)).SerializeToString())
  with open(os.path.join(task_dir, "info.train.json"), "w") as f:
    json.dump({"num_shards": num_shards}, f)
  with open(os.path.join(task_dir, token_cache.MANIFEST_FILE), "w") as f:
    json.dump({"format": token_cache.MANIFEST_FORMAT, "corpus": corpus,
               "layout": layout.to_dict(), "semantic_rate": 25, "acoustic_rate": 50}, f)
  open(os.path.join(task_dir, token_cache.COMPLETED_FILE), "w").close()


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(cache_dir: str, corpus: str, stage: str, reader: str, batches: int,
            batch_size: int) -> dict:
  task = stage_task.StageTask(stage=stage, cache_dir=cache_dir, corpora={corpus: 1.0},
                              windows=stages.StageWindows(), conditioning_dropout=0.1,
                              reader=reader)
  start = time.perf_counter()
  iterator = task.iterator("train", batch_size)
  next(iterator)  # warm-up: opening the files, building the pipeline
  first_batch_s = time.perf_counter() - start
  cpu0, wall0 = cpu_seconds(), time.perf_counter()
  targets = 0
  for _ in range(batches):
    targets += int(np.count_nonzero(next(iterator)["decoder_loss_weights"]))
  wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
  return {"benchmark": "stage_reader_speed", "stage": stage, "reader": reader,
          "batch_size": batch_size, "length": task.length, "batches": batches,
          "windows_per_s": round(batches * batch_size / wall, 1),
          "target_tokens_per_s": round(targets / wall),
          "cpu_s_per_batch": round(cpu / batches, 4), "first_batch_s": round(first_batch_s, 2)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cache_dir", help="an existing token cache (default: a random one)")
  parser.add_argument("--corpus", default="random")
  parser.add_argument("--clips", type=int, default=256)
  parser.add_argument("--num_shards", type=int, default=4)
  parser.add_argument("--stages", default="semantic,coarse,fine")
  parser.add_argument("--readers", default="seqio,numpy")
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=64)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as scratch:
    cache_dir = args.cache_dir
    if cache_dir is None:
      cache_dir = scratch
      write_random_cache(cache_dir, args.corpus, args.clips, args.num_shards)
    for stage in args.stages.split(","):
      for reader in args.readers.split(","):
        print(json.dumps(measure(cache_dir, args.corpus, stage, reader, args.batches,
                                 args.batch_size)), flush=True)


if __name__ == "__main__":
  main()
