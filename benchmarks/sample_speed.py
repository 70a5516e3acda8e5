"""Sampling speed of the stage decoders: ms per KV-cached decode step.

For each gin size, stage and batch, samples the stage's paper window
(prefix and targets from `stages.make_stage(...).lengths()`; targets capped
by `--max_targets` so that CPU runs finish) with randomly initialised
weights (speed does not depend on the values) through
`sampling.decoding.sample`, on the first device found. Each call is the
whole jitted generation (prefill + `fori_loop` over targets); compilation is
excluded (one untimed call first). One JSON object per (size, stage, batch):

  total_ms          fastest of `--repeats` calls (prefill + all steps)
  prefill_ms        fastest of `--repeats` calls with 1 target (prefill + 1 step)
  ms_per_step       (total_ms - prefill_ms) / (targets - 1): one decode step
  cache_length      1 + prefix + targets (attention cost grows with it)

then one object per size labelled `"derived": true`: the real-time factor of
the whole hierarchy for `--seconds` of audio, estimated from those per-step
times (semantic and coarse one window of `--seconds`, fine
`ceil(seconds / fine window)` windows batched together), with no tokenizer,
MuLan or SoundStream time.

Needs only jax, flax, optax, numpy and gin-config (no TensorFlow):

  python3 benchmarks/sample_speed.py                      # CPU: tiny, batches 1,8
  python3 benchmarks/sample_speed.py --sizes tiny,small,base --batches 1,64 --max_targets 0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import flax.linen as nn
import gin
import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from musiclm_jax import stages  # pylint: disable=wrong-import-position
from musiclm_jax import vocab  # pylint: disable=wrong-import-position
from musiclm_jax.layers.transformer import DecoderConfig  # pylint: disable=wrong-import-position
from musiclm_jax.models import DecoderOnlyModel  # pylint: disable=wrong-import-position
from musiclm_jax.sampling import decoding  # pylint: disable=wrong-import-position

SEMANTIC_RATE, ACOUSTIC_RATE = 25, 50


def size_config(size: str, dtype: str | None) -> DecoderConfig:
  gin.clear_config()
  gin.parse_config_file(os.path.join(REPO, "gin", "sizes", f"{size}.gin"))
  if dtype is not None:
    gin.parse_config(f"DecoderConfig.dtype = {dtype!r}")
  return DecoderConfig()  # pylint: disable=no-value-for-parameter


def random_prefixes(stage: stages.Stage, batch: int) -> np.ndarray:
  """int32 `[batch, P]` prefixes of a full window of random codes."""
  rng = np.random.default_rng(0)
  layout = stage.layout
  rows = []
  for _ in range(batch):
    clip = stages.ClipTokens(
        mulan=rng.integers(0, layout.mulan_codebook_size, layout.mulan_levels),
        semantic=rng.integers(0, layout.semantic_codebook_size, stage.semantic_frames),
        acoustic=rng.integers(0, layout.acoustic_codebook_size,
                              (stage.acoustic_frames, layout.acoustic_levels)))
    rows.append(stage.sequences(clip)[0])
  return np.stack(rows)


def fastest_call_s(model, params, prefix, num_targets, stage, repeats) -> float:
  """Seconds of the fastest of `repeats` `sample` calls (after an untimed compiling call).

  The minimum, not the median: other load on the machine only ever adds time,
  and the per-step figure is a difference of two such timings.
  """
  lo, hi = stage.target_ranges(num_targets)
  seeds = np.arange(len(prefix))

  def call():
    return jax.block_until_ready(decoding.sample(model, params, prefix, lo, hi, seeds))

  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return min(times)


def measure(size, config, model, params, stage, batch, args) -> dict:
  prefix_len, num_targets = stage.lengths()
  if args.max_targets:
    num_targets = min(num_targets, args.max_targets)
  prefix = random_prefixes(stage, batch)
  total_s = fastest_call_s(model, params, prefix, num_targets, stage, args.repeats)
  prefill_s = fastest_call_s(model, params, prefix, 1, stage, args.repeats)
  return {"benchmark": "sample_speed", "size": size, "stage": stage.name,
          "device": jax.devices()[0].device_kind, "dtype": config.dtype,
          "batch_size": batch, "prefix_length": prefix_len, "targets": num_targets,
          "paper_targets": stage.lengths()[1], "cache_length": 1 + prefix_len + num_targets,
          "total_ms": round(1e3 * total_s, 3), "prefill_ms": round(1e3 * prefill_s, 3),
          "ms_per_step": round(1e3 * (total_s - prefill_s) / max(num_targets - 1, 1), 4)}


def hierarchy_estimate(size: str, rows: list[dict], seconds: float,
                       windows: stages.StageWindows) -> dict:
  """Derived real-time factor of semantic + coarse + fine for `seconds` of audio."""
  step_ms = {(r["stage"], r["batch_size"]): r["ms_per_step"] for r in rows}
  batches = sorted({r["batch_size"] for r in rows})
  semantic_frames = int(round(seconds * SEMANTIC_RATE))
  semantic_steps = stages.make_stage("semantic", windows, vocab.LAYOUT, SEMANTIC_RATE,
                                     ACOUSTIC_RATE).lengths(semantic_frames)[1]
  coarse_steps = stages.make_stage("coarse", windows, vocab.LAYOUT, SEMANTIC_RATE,
                                   ACOUSTIC_RATE).lengths(semantic_frames)[1]
  fine_steps = stages.make_stage("fine", windows, vocab.LAYOUT, SEMANTIC_RATE,
                                 ACOUSTIC_RATE).lengths()[1]
  fine_windows = math.ceil(seconds / windows.fine_seconds)
  out = {"benchmark": "sample_speed_hierarchy", "derived": True, "size": size,
         "device": rows[0]["device"], "audio_seconds": seconds,
         "steps": {"semantic": semantic_steps, "coarse": coarse_steps,
                   "fine": f"{fine_windows} windows x {fine_steps}"},
         "note": ("estimate from ms_per_step rows (per-step times at the measured, possibly "
                  "capped, cache lengths); decoders only, no MuLan/SoundStream")}
  for batch in batches:
    # The fine windows of a clip run as one batch: the smallest measured batch
    # that holds them all, else as many sequential batches as needed.
    fine_batch = next((b for b in batches if b >= batch * fine_windows), batch)
    fine_passes = math.ceil(batch * fine_windows / fine_batch)
    total_ms = (semantic_steps * step_ms[("semantic", batch)]
                + coarse_steps * step_ms[("coarse", batch)]
                + fine_passes * fine_steps * step_ms[("fine", fine_batch)])
    out[f"batch_{batch}"] = {
        "clips": batch, "fine_batch": fine_batch, "fine_passes": fine_passes,
        "seconds": round(total_ms / 1e3, 3),
        "real_time_factor": round(total_ms / 1e3 / (batch * seconds), 4)}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny")
  parser.add_argument("--stages", default=",".join(stages.STAGE_NAMES))
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--max_targets", type=int, default=64, help="0: the paper lengths")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default=None, help="default: DecoderConfig's (bfloat16)")
  parser.add_argument("--seconds", type=float, default=10.0, help="audio of the estimate")
  args = parser.parse_args()
  windows = stages.StageWindows()
  names = args.stages.split(",")
  for size in args.sizes.split(","):
    config = size_config(size, args.dtype)
    model = DecoderOnlyModel(config)
    params = nn.unbox(jax.jit(lambda rng: model.init_params(rng, 8))(jax.random.key(0)))  # pylint: disable=cell-var-from-loop
    rows = []
    for name in names:
      stage = stages.make_stage(name, windows, vocab.LAYOUT, SEMANTIC_RATE, ACOUSTIC_RATE)
      for batch in (int(b) for b in args.batches.split(",")):
        rows.append(measure(size, config, model, params, stage, batch, args))
        print(json.dumps(rows[-1]), flush=True)
    if set(names) == set(stages.STAGE_NAMES):
      print(json.dumps(hierarchy_estimate(size, rows, args.seconds, windows)), flush=True)


if __name__ == "__main__":
  main()
