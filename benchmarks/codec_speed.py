"""SoundStream encode and decode speed as a real-time factor, per gin size.

For each size (`gin/sizes/soundstream_<size>.gin`) the jitted offline
`SoundStreamCodec.encode` and `.decode` run on `--seconds` of audio per clip
at `--batch_size` clips (all 12 levels), timed to completion after one
compile-and-warm-up call; one JSON object per size and thread count:

  encode_rtf, decode_rtf   seconds of audio processed per wall second
                           (x real time; 50 means 1 s of audio in 20 ms)
  encode_ms, decode_ms     median wall time of one call

CPU thread counts are set by pinning a child process to that many cores
(`os.sched_setaffinity`, before jax starts), so `--threads 1,2` measures
one core and two. Weights are random (speed does not depend on them).
Needs only jax, flax, numpy and gin-config (no TensorFlow):

  python3 benchmarks/codec_speed.py --sizes tiny,small,base --threads 1,2
  python3 benchmarks/codec_speed.py --sizes base --batch_size 64 --threads 0   # GPU
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


def measure(size: str, seconds: float, batch_size: int, repeats: int) -> dict:
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from musiclm_jax.tokenizers import soundstream  # pylint: disable=g-import-not-at-top

  gin.parse_config_file(os.path.join(REPO, "gin", "sizes", f"soundstream_{size}.gin"))
  codec = soundstream.SoundStreamCodec(soundstream.SoundStreamConfig())  # pylint: disable=no-value-for-parameter
  num_samples = int(seconds * soundstream.SAMPLE_RATE)
  variables = codec.init(jax.random.key(0), num_samples)
  rng = np.random.default_rng(0)
  wav = (0.1 * rng.standard_normal((batch_size, num_samples))).astype(np.float32)

  def timed(fn, arg):
    jax.block_until_ready(fn(variables, arg))  # compile and warm up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      out = jax.block_until_ready(fn(variables, arg))
      times.append(time.perf_counter() - start)
    return statistics.median(times), out

  encode_s, codes = timed(codec.encode, wav)
  decode_s, _ = timed(codec.decode, codes)
  audio_seconds = batch_size * seconds
  params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  return {"size": size, "params": int(params), "device": jax.devices()[0].device_kind,
          "platform": jax.devices()[0].platform, "batch_size": batch_size,
          "seconds": seconds, "encode_ms": 1e3 * encode_s, "decode_ms": 1e3 * decode_s,
          "encode_rtf": audio_seconds / encode_s, "decode_rtf": audio_seconds / decode_s}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="tiny,small,base")
  parser.add_argument("--threads", default="1,2",
                      help="CPU cores per measurement (0: all, e.g. on a GPU machine)")
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:  # one measurement, in a process pinned by the parent
    size, threads = args.child.split(":")
    if int(threads):
      os.sched_setaffinity(0, range(int(threads)))
    row = measure(size, args.seconds, args.batch_size, args.repeats)
    print(json.dumps({**row, "threads": int(threads) or os.cpu_count()}), flush=True)
    return
  for size in args.sizes.split(","):
    for threads in args.threads.split(","):
      child = subprocess.run(
          [sys.executable, __file__, "--child", f"{size}:{threads}", "--seconds",
           str(args.seconds), "--batch_size", str(args.batch_size), "--repeats",
           str(args.repeats)], capture_output=True, text=True, check=False)
      if child.returncode:
        print(json.dumps({"size": size, "threads": threads,
                          "error": child.stderr.strip().splitlines()[-1:]}), flush=True)
      else:
        print(child.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
