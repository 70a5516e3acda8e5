"""Whole-hierarchy real-time factor: wall seconds per second of generated audio.

Times `Generator.generate` (MuLan text tokens, the three stages with their
windows, SoundStream decoding) for `--seconds` of audio at each batch size,
after one untimed call that compiles every shape. The tokenizers are trained
runs (their weights do not change the cost); the three stage decoders are
randomly initialised at a gin size (`gin/sizes/<size>.gin`) with the windows
of `gin/stages/<size>.gin`. Prints one JSON object per batch size:

  wall_s             median time of one generate call
  real_time_factor   wall_s / (batch * seconds); < 1 is faster than real time
  phase_s            time per phase (mulan, semantic, coarse, fine, decode)

  python3 benchmarks/hierarchy_speed.py --soundstream runs/soundstream \
      --semantic runs/w2v --mulan runs/mulan --size tiny --seconds 10 --batches 1,8
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from musiclm_jax import stages as stages_lib
from musiclm_jax.layers.transformer import DecoderConfig
from musiclm_jax.models import DecoderOnlyModel
from musiclm_jax.sampling import bundle as bundle_lib
from musiclm_jax.sampling import hierarchy
from musiclm_jax.tokenizers import frozen

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def random_bundle(dirs: frozen.TokenizerDirs, size: str, dtype: str) -> bundle_lib.Bundle:
  tokenizers = frozen.FrozenTokenizers.load(dirs)
  gin.clear_config()
  gin.parse_config_file(os.path.join(GIN_DIR, "sizes", f"{size}.gin"))
  with open(os.path.join(GIN_DIR, "stages", f"{size}.gin"), encoding="utf-8") as f:
    window_lines = [line for line in f if line.startswith("StageWindows.")]
  gin.parse_config("".join(window_lines) + f"\nDecoderConfig.dtype = '{dtype}'")
  windows, config = stages_lib.StageWindows(), DecoderConfig()
  loaded = {}
  for i, name in enumerate(stages_lib.STAGE_NAMES):
    stage = stages_lib.make_stage(name, windows, tokenizers.layout, tokenizers.semantic_rate,
                                  tokenizers.acoustic_rate)
    model = DecoderOnlyModel(config)
    params = jax.jit(lambda rng, m=model: m.init_params(rng, 8))(jax.random.key(i))
    loaded[name] = bundle_lib.StageModel(stage, model, params)
  return bundle_lib.Bundle("random", {}, tokenizers, loaded)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--soundstream", required=True)
  parser.add_argument("--semantic", required=True)
  parser.add_argument("--mulan", required=True)
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--batches", default="1")
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  loaded = random_bundle(frozen.TokenizerDirs(args.soundstream, args.semantic, args.mulan),
                         args.size, args.dtype)
  generator = hierarchy.Generator(loaded)
  for batch in (int(b) for b in args.batches.split(",")):
    rows = [[(f"a calm piano waltz number {i}", args.seconds)] for i in range(batch)]
    seeds = list(range(batch))
    generator.generate(rows, seeds)  # compiles every shape
    times, phases = [], {}
    for _ in range(args.repeats):
      start = time.perf_counter()
      result = generator.generate(rows, seeds)
      times.append(time.perf_counter() - start)
      phases = result.seconds
    wall = statistics.median(times)
    print(json.dumps({
        "benchmark": "hierarchy_speed", "size": args.size, "dtype": args.dtype,
        "device": jax.devices()[0].device_kind, "batch_size": batch,
        "audio_seconds": args.seconds,
        "windows_s": {s.stage.name: s.stage.window_seconds for s in loaded.stages.values()},
        "wall_s": round(wall, 3), "real_time_factor": round(wall / (batch * args.seconds), 4),
        "phase_s": {k: round(v, 3) for k, v in phases.items()}}), flush=True)


if __name__ == "__main__":
  main()
