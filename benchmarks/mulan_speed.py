"""MuLan embedding speed: audio and text embeddings per second, per gin size.

For each size (`gin/tokenizers/mulan_<size>.gin`, only its `MulanConfig`
bindings) and audio encoder, the jitted clip embedding (`embed_clips`: one
window of `window_seconds` per clip) and text embedding run on
`--batch_size` inputs, timed to completion after one compile-and-warm-up
call; one JSON object per size, encoder and thread count:

  audio_per_sec      clip (window) embeddings per wall second
  audio_rtf          seconds of audio embedded per wall second
  text_per_sec       text embeddings per wall second (captions of
                     `max_text_length` ids, no padding)
  audio_ms, text_ms  median wall time of one batch

CPU thread counts are set by pinning a child process to that many cores
(`os.sched_setaffinity`, before jax starts). Weights are random (speed does
not depend on them). Needs only jax, flax, numpy and gin-config (no
TensorFlow):

  python3 benchmarks/mulan_speed.py --sizes tiny,small --threads 1,2 --dtype float32
  python3 benchmarks/mulan_speed.py --sizes small --batch_size 64 --threads 0   # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(size: str, encoder: str, batch_size: int, repeats: int, dtype: str | None) -> dict:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from musiclm_jax.tokenizers import mulan  # pylint: disable=g-import-not-at-top

  # The run config also names the trainer and task; only MulanConfig matters here.
  gin.parse_config_file(os.path.join(REPO, "gin", "tokenizers", f"mulan_{size}.gin"),
                        skip_unknown=True)
  overrides = {"dtype": dtype} if dtype else {}
  config = mulan.MulanConfig(audio_encoder=encoder, **overrides)  # pylint: disable=unexpected-keyword-arg
  model = mulan.MulanModel(config)
  rng = np.random.default_rng(0)
  wav = (0.1 * rng.standard_normal((batch_size, config.window_samples))).astype(np.float32)
  lengths = jnp.full((batch_size,), config.window_samples, jnp.int32)
  tokens = rng.integers(3, config.text_vocab_size,
                        (batch_size, config.max_text_length)).astype(np.int32)
  variables = model.init_variables(jax.random.key(0), {"audio": wav[:1],
                                                       "text_tokens": tokens[:1]})
  variables = nn.unbox(variables)
  embed_audio = jax.jit(model.embed_clips)
  embed_text = jax.jit(model.embed_text)

  def timed(fn, *args):
    jax.block_until_ready(fn(variables, *args))  # compile and warm up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(variables, *args))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  audio_s = timed(embed_audio, wav, lengths)
  text_s = timed(embed_text, tokens)
  params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  return {"size": size, "audio_encoder": encoder, "params": int(params),
          "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
          "dtype": config.dtype, "batch_size": batch_size,
          "window_seconds": config.window_seconds, "text_length": config.max_text_length,
          "audio_ms": 1e3 * audio_s, "text_ms": 1e3 * text_s,
          "audio_per_sec": batch_size / audio_s,
          "audio_rtf": batch_size * config.window_seconds / audio_s,
          "text_per_sec": batch_size / text_s}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="tiny,small")
  parser.add_argument("--encoders", default="cnn,transformer")
  parser.add_argument("--threads", default="1,2",
                      help="CPU cores per measurement (0: all, e.g. on a GPU machine)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default=None, help="compute dtype (default: the gin size's)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:  # one measurement, in a process pinned by the parent
    size, encoder, threads = args.child.split(":")
    if int(threads):
      os.sched_setaffinity(0, range(int(threads)))
    row = measure(size, encoder, args.batch_size, args.repeats, args.dtype)
    print(json.dumps({**row, "threads": int(threads) or os.cpu_count()}), flush=True)
    return
  for size in args.sizes.split(","):
    for encoder in args.encoders.split(","):
      for threads in args.threads.split(","):
        child = subprocess.run(
            [sys.executable, __file__, "--child", f"{size}:{encoder}:{threads}",
             "--batch_size", str(args.batch_size), "--repeats", str(args.repeats),
             *(["--dtype", args.dtype] if args.dtype else [])],
            capture_output=True, text=True, check=False)
        if child.returncode:
          print(json.dumps({"size": size, "audio_encoder": encoder, "threads": threads,
                            "error": child.stderr.strip().splitlines()[-1:]}), flush=True)
        else:
          print(child.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
