"""Semantic tokenisation speed: seconds of 16 kHz audio tokenised per second.

Times `SemanticTokenizer.semantic_tokens` (log-mel, w2v-BERT up to the
semantic MLM layer, nearest of 1024 centroids) with randomly initialised
weights and random centroids of each gin size (speed does not depend on the
values), on the first device found (CPU, or the GPU when there is one). One
JSON object per size:

  batch_ms              median wall time of one batch (each timed to completion)
  audio_s_per_sec       batch * seconds / batch time
  real_time_factor      batch time / (batch * seconds)

Needs only jax, flax, optax, numpy and gin-config (no TensorFlow):

  python3 benchmarks/semantic_speed.py --sizes tiny,cpu,small --batch_size 8 --seconds 10

(each size is a `gin/tokenizers/w2v_bert_<size>.gin` file).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import gin
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from musiclm_jax.tokenizers import semantic  # pylint: disable=wrong-import-position
from musiclm_jax.tokenizers import w2v_bert  # pylint: disable=wrong-import-position

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "gin", "tokenizers")


def config_of_size(size: str, dtype: str) -> w2v_bert.W2vBertConfig:
  gin.clear_config()
  gin.add_config_file_search_path(os.path.dirname(GIN_DIR))  # for includes (cpu: tiny)
  gin.parse_config_file(os.path.join(GIN_DIR, f"w2v_bert_{size}.gin"), skip_unknown=True)
  gin.parse_config(f"W2vBertConfig.dtype = '{dtype}'")
  return w2v_bert.W2vBertConfig()


def measure(size: str, batch_size: int, seconds: float, repeats: int, dtype: str) -> dict:
  model = w2v_bert.W2vBertModel(config_of_size(size, dtype))
  audio = (0.1 * np.random.default_rng(0).standard_normal(
      (batch_size, int(seconds * w2v_bert.SAMPLE_RATE)))).astype(np.float32)
  params = jax.jit(lambda r: jax.tree.map(
      lambda x: x.unbox() if hasattr(x, "unbox") else x,
      model.init_variables(r, {"audio": audio[:1]})["params"],
      is_leaf=lambda x: hasattr(x, "unbox")))(jax.random.PRNGKey(0))
  d = model.config.d_model
  fitted = semantic.SemanticKMeans(
      centroids=np.random.default_rng(1).standard_normal((1024, d)).astype(np.float32),
      mean=np.zeros(d, np.float32), std=np.ones(d, np.float32))
  tokenizer = semantic.SemanticTokenizer(semantic.FeatureExtractor(model, params, dtype=dtype),
                                         fitted)
  jax.block_until_ready(tokenizer.semantic_tokens(audio))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(tokenizer.semantic_tokens(audio))
    times.append(time.perf_counter() - start)
  batch_s = statistics.median(times)
  return {"benchmark": "semantic_speed", "size": size, "dtype": dtype,
          "device": jax.devices()[0].device_kind, "batch_size": batch_size,
          "seconds": seconds, "mlm_layer": model.config.semantic_layer,
          "batch_ms": 1000 * batch_s,
          "audio_s_per_sec": batch_size * seconds / batch_s,
          "real_time_factor": batch_s / (batch_size * seconds)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny,small")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  for size in args.sizes.split(","):
    print(json.dumps(measure(size, args.batch_size, args.seconds, args.repeats, args.dtype)),
          flush=True)


if __name__ == "__main__":
  main()
