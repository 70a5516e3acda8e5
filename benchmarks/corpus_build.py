"""Build speed of the built-in corpora: clips per second of `musiclm prepare`.

Runs the whole build (compose or arrange, FluidSynth render, checks, TFDS
write) into a temporary directory and prints one JSON object per run:

  corpus, num_examples, seconds, workers, soundfont
  wall_s            the whole `prepare`, including worker start-up and the TFDS write
  clips_per_sec     clips written / wall_s
  audio_x_realtime  seconds of audio built per second of wall time

  python3 benchmarks/corpus_build.py --corpus gm_synth --num_examples 200 --workers 2
  python3 benchmarks/corpus_build.py --corpus music21_gm --num_examples 100
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

from musiclm_jax.corpora import registry
from musiclm_jax.corpora import base
from musiclm_jax.tasks import corpora


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--corpus", default="gm_synth", choices=["gm_synth", "music21_gm"])
  parser.add_argument("--num_examples", type=int, default=200)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--workers", type=int, default=0, help="0: one per CPU core")
  parser.add_argument("--soundfont", default="fluidr3")
  args = parser.parse_args()
  source = registry.SOURCES[args.corpus](soundfont=args.soundfont)
  spec = base.BuildSpec(num_examples=args.num_examples, seconds=args.seconds, seed=0)
  with tempfile.TemporaryDirectory(prefix="corpus_bench_") as data_dir:
    start = time.perf_counter()
    built = corpora.prepare(source, spec, data_dir, workers=args.workers)
    wall = time.perf_counter() - start
    clips = sum(corpora.read_report(built)["clips"].values())
  print(json.dumps({
      "corpus": args.corpus, "num_examples": args.num_examples, "seconds": args.seconds,
      "workers": args.workers or os.cpu_count(), "soundfont": args.soundfont,
      "clips": clips, "wall_s": round(wall, 2), "clips_per_sec": round(clips / wall, 3),
      "audio_x_realtime": round(clips * args.seconds / wall, 2),
      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
  }), flush=True)


if __name__ == "__main__":
  sys.exit(main())
