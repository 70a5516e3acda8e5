"""Training throughput and MFU of the stage decoder, per gin size.

Measures full train steps (forward, backward, AdamW update, all parameters
and optimizer state sharded by the project's `Partitioner` over every device
found, data-parallel by default) on a fixed batch of random prefix-LM
examples, and prints one JSON object per size:

  step_ms           median wall time of one step (each timed to completion)
  tokens_per_sec    batch * length / step time
  tflops_per_device model FLOPs per step / step time / devices
  mfu               tflops_per_device / peak (null where the peak is unknown, e.g. CPU)

Model FLOPs follow MaxText's convention (`DecoderConfig.train_flops`):

  6 * N * tokens  +  4 * B * S^2 * H * D * 3 / 2 * layers

with N the parameters that take part in matmuls (attention and MLP kernels
and the unembedding), B batch, S length, H heads, D head size; the second
term is causal attention (QK^T and AV, x3 for forward + backward, halved for
the causal triangle). Remat recomputation is not counted. Peak: 989 TFLOP/s
per H100/H200 (bf16 dense), see `musiclm_jax/training/metrics.py`.

Needs only jax, flax, optax, numpy and gin-config (no TensorFlow):

  python3 benchmarks/train_throughput.py --sizes tiny,small,base
  python3 benchmarks/train_throughput.py --sizes base --batch_size 16 --length 2048 \
      --remat_policy none --json_out benchmarks/results.jsonl
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from musiclm_jax.layers.transformer import DecoderConfig  # pylint: disable=wrong-import-position
from musiclm_jax.models import DecoderOnlyModel, prefix_lm_example  # pylint: disable=wrong-import-position
from musiclm_jax.partitioning import Partitioner  # pylint: disable=wrong-import-position
from musiclm_jax.training.metrics import peak_flops_per_device  # pylint: disable=wrong-import-position
from musiclm_jax.training.optimizers import make_optimizer  # pylint: disable=wrong-import-position
from musiclm_jax.training.steps import make_train_step  # pylint: disable=wrong-import-position
from musiclm_jax.training.train_state import partitioned_initializer  # pylint: disable=wrong-import-position

DEFAULT_BATCH = {"tiny": 8, "small": 16, "base": 16}


def size_config(size: str, overrides: dict) -> DecoderConfig:
  gin.clear_config()
  gin.parse_config_file(os.path.join(REPO, "gin", "sizes", f"{size}.gin"))
  gin.parse_config([f"DecoderConfig.{k} = {v!r}" for k, v in overrides.items()])
  return DecoderConfig()  # pylint: disable=no-value-for-parameter


def random_batch(batch_size: int, length: int, vocab_size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  prefix_length = 12
  examples = [prefix_lm_example(rng.integers(1, vocab_size, prefix_length),
                                rng.integers(1, vocab_size, length - prefix_length), length)
              for _ in range(batch_size)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def measure(size: str, args: argparse.Namespace) -> dict:
  overrides = {k: getattr(args, k) for k in ("dtype", "remat_policy",
                                             "attention_implementation")
               if getattr(args, k) is not None}
  config = size_config(size, overrides)
  model = DecoderOnlyModel(config)
  batch_size = args.batch_size or DEFAULT_BATCH[size]
  length = args.length or (256 if jax.devices()[0].platform == "cpu" else 2048)
  partitioner = Partitioner(tuple(args.mesh_shape))
  optimizer = make_optimizer()
  init, _, shardings = partitioned_initializer(
      lambda rng: {"params": model.init_params(rng, length)}, optimizer.tx, partitioner)
  batch = random_batch(batch_size, length, config.vocab_size)
  step = partitioner.partition(
      make_train_step(model, optimizer, args.num_microbatches),
      in_shardings=(shardings, partitioner.batch_shardings(batch)),
      out_shardings=(shardings, partitioner.replicated()), donate_argnums=(0,))
  state = init(0)
  batch = partitioner.shard_batch(batch)

  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(args.warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)

  step_s = statistics.median(times)
  devices = jax.device_count()
  flops = model.train_flops(batch_size, length)
  peak = peak_flops_per_device()
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {
      "benchmark": "train_throughput", "size": size,
      "device_kind": jax.devices()[0].device_kind, "num_devices": devices,
      "mesh": dict(partitioner.mesh.shape), "jax": jax.__version__,
      "dtype": config.dtype, "remat_policy": config.remat_policy,
      "batch_size": batch_size, "length": length,
      "num_microbatches": args.num_microbatches, "params": params,
      "step_ms": round(1e3 * step_s, 3), "step_ms_mean": round(1e3 * statistics.mean(times), 3),
      "tokens_per_sec": round(batch_size * length / step_s, 1),
      "tflops_per_device": round(flops / step_s / devices / 1e12, 4),
      "mfu": round(flops / step_s / (peak * devices), 4) if peak else None,
      "compile_s": round(compile_s, 2), "final_loss": float(metrics["loss"]),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="tiny,small,base")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="global batch; default per size " + str(DEFAULT_BATCH))
  parser.add_argument("--length", type=int, default=None,
                      help="tokens per example; default 2048 (256 on CPU)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
  parser.add_argument("--dtype", default=None)
  parser.add_argument("--remat_policy", default=None)
  parser.add_argument("--attention_implementation", default=None)
  parser.add_argument("--num_microbatches", type=int, default=1)
  parser.add_argument("--mesh_shape", type=int, nargs=3, default=(-1, 1, 1))
  parser.add_argument("--json_out", default=None, help="also append JSON lines here")
  args = parser.parse_args()
  for size in args.sizes.split(","):
    try:
      result = measure(size, args)
    except Exception as e:  # e.g. out of memory: report and go on
      result = {"benchmark": "train_throughput", "size": size,
                "device_kind": jax.devices()[0].device_kind,
                "error": f"{type(e).__name__}: {str(e)[:500]}"}
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
      with open(args.json_out, "a", encoding="utf-8") as f:
        f.write(line + "\n")


if __name__ == "__main__":
  main()
