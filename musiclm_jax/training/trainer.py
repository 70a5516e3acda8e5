"""The partitioned training loop (`musiclm train`), configured by gin.

    train.model_dir = %MODEL_DIR
    train.task = @SyntheticTokenTask()
    train.model = @DecoderOnlyModel()
    train.num_steps = 500
    train.batch_size = 32

It resumes from the newest checkpoint in `MODEL_DIR/checkpoints` (state,
RNG and input position, onto whatever mesh this run has), logs metrics to
`MODEL_DIR` (TensorBoard, `metrics.jsonl`) and a console line with ETA,
saves on SIGTERM (preemption) and stops on a non-finite loss without
writing a checkpoint of the broken state.

Any model family trains with this loop (stage decoders, SoundStream, MuLan,
w2v-BERT). The loop owns resumption, checkpoints, logging and evaluation;
the model owns its state and steps. A `model` provides:

  config                      a dataclass, stored in the checkpoint manifest
  init_variables(rng, batch)  `{"params": ..., <other collections>}` for one
                              example batch (leading dim 1); leaves boxed
                              with logical axes are sharded by the rules
  make_train_step(optimizer, num_microbatches)
                              `(TrainState, batch) -> (TrainState, metrics)`
  make_eval_step()            `(TrainState, batch) -> metric sums`
  eval_metrics(sums)          metrics from sums added over eval batches
  train_cost(batch_size, batch)
                              a `TrainCost` (units and FLOPs per step)
  write_summaries(writer, step, state, batch)
                              optional: audio/images at evaluation time

and a `task` provides `iterator(split, global_batch_size)`: this process'
rows of each global batch as a dict of numeric arrays, with JSON-able
`get_state()` / `set_state()` (splits `train` and `validation`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from typing import Any, Callable

from absl import logging
import gin
import jax
import numpy as np

import musiclm_jax
from musiclm_jax import vocab
from musiclm_jax.partitioning import Partitioner, initialize_distributed
from musiclm_jax.training import metrics as metrics_lib
from musiclm_jax.training.checkpoints import Checkpointer
from musiclm_jax.training.optimizers import Optimizer, make_optimizer
from musiclm_jax.training.train_state import partitioned_initializer

CHECKPOINT_FORMAT = "musiclm_jax.train_checkpoint/1"


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; the run stopped without saving that state."""


class IncompatibleCheckpointError(ValueError):
  """MODEL_DIR holds a checkpoint of a different model or token layout."""


@dataclasses.dataclass
class TrainResult:
  """What a finished (or preempted) run reached."""
  step: int
  metrics: dict[str, float]
  preempted: bool


@gin.configurable(denylist=["step_callback"])
def train(model_dir: str = gin.REQUIRED,
          task: Any = gin.REQUIRED,
          model: Any = gin.REQUIRED,
          num_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          optimizer: Optimizer | None = None,
          partitioner: Partitioner | None = None,
          checkpointer: Callable[[str], Checkpointer] = Checkpointer,
          num_microbatches: int = 1,
          seed: int = 0,
          log_every_steps: int = 50,
          eval_every_steps: int = 0,
          eval_batches: int = 4,
          step_callback: Callable[[int], None] | None = None) -> TrainResult:
  """Trains `model` on `task` for `num_steps` optimizer steps (in total, across resumes).

  Args:
    model_dir: run directory: `checkpoints/`, TensorBoard events, metrics.jsonl.
    task: has `iterator(split, global_batch_size)` returning a resumable
      iterator of `[local_batch, ...]` feature dicts (see the module doc), and
      optionally `layout`, the token space of its examples (default
      `vocab.LAYOUT`), and `describe()`, a JSON description of its examples;
      both go into the checkpoint manifest.
    model: the model to train (`DecoderOnlyModel`, `CodecModel`, ...; the
      interface is in the module doc).
    num_steps: stop once the state reaches this step. 0 saves the initialised
      model as step 0 without compiling a train step (to test a pipeline with
      untrained models, or to inspect an initialisation).
    batch_size: global batch size (all processes together).
    optimizer: default `make_optimizer()`.
    partitioner: default `Partitioner()` (all devices data-parallel).
    checkpointer: `directory -> Checkpointer` (gin-configured class).
    num_microbatches: gradient accumulation steps inside one optimizer step.
    seed: parameter initialisation and dropout.
    log_every_steps: metrics and console line interval.
    eval_every_steps: 0 disables evaluation on the `validation` split.
    eval_batches: batches per evaluation.
    step_callback: called with the step number after each step (tests).
  Returns:
    the final step, the last logged metrics and whether SIGTERM stopped it.
  """
  initialize_distributed()
  partitioner = partitioner or Partitioner()
  optimizer = optimizer or make_optimizer()
  partitioner.check_batch_size(batch_size)
  if batch_size % num_microbatches:
    raise ValueError(f"batch size {batch_size} is not divisible by num_microbatches "
                     f"{num_microbatches}")

  # A throw-away batch from a fresh iterator gives the features' shapes.
  example = next(task.iterator("train", batch_size))
  init_example = jax.tree.map(lambda x: np.asarray(x)[:1], example)
  init_state, abstract_state, state_shardings = partitioned_initializer(
      lambda rng: model.init_variables(rng, init_example), optimizer.tx, partitioner)
  train_iter = task.iterator("train", batch_size)
  ckpt = checkpointer(os.path.join(model_dir, "checkpoints"))
  layout = getattr(task, "layout", vocab.LAYOUT)
  _check_vocab_size(model, layout)
  manifest = _manifest(model, layout, task)
  state = _restore_or_init(ckpt, abstract_state, init_state, seed, train_iter, manifest)
  start_step = int(state.step)

  batch_shardings = partitioner.batch_shardings(example)
  train_step = partitioner.partition(
      model.make_train_step(optimizer, num_microbatches),
      in_shardings=(state_shardings, batch_shardings),
      out_shardings=(state_shardings, partitioner.replicated()), donate_argnums=(0,))
  eval_step = partitioner.partition(
      model.make_eval_step(), in_shardings=(state_shardings, batch_shardings),
      out_shardings=partitioner.replicated())

  writer = metrics_lib.create_writer(model_dir)
  cost = model.train_cost(batch_size, example)
  progress = metrics_lib.ProgressLine(num_steps, unit=cost.unit)
  mesh_devices = partitioner.mesh.devices
  throughput = metrics_lib.Throughput(
      cost, peak_flops=metrics_lib.peak_flops_per_device(mesh_devices.flat[0]),
      num_devices=mesh_devices.size)
  if jax.process_index() == 0:
    print(f"Training {type(model).__name__} from step {start_step} to {num_steps} on "
          f"mesh {dict(partitioner.mesh.shape)} ({mesh_devices.size} "
          f"{mesh_devices.flat[0].platform} devices); the first step compiles.", flush=True)

  last_metrics: dict[str, float] = {}
  preempted = False
  step = start_step
  with _sigterm_flag() as sigterm, contextlib.closing(writer):
    try:
      if num_steps == 0 and ckpt.latest_step() is None:
        ckpt.save(0, state, train_iter.get_state(), manifest)  # the untrained model
      while step < num_steps:
        batch = partitioner.shard_batch(next(train_iter))
        state, step_metrics = train_step(state, batch)
        step += 1
        if step == start_step + 1:  # first step includes compilation
          jax.block_until_ready(step_metrics)
          throughput.start(step)
        if step_callback:
          step_callback(step)
        preempted = sigterm.is_set()
        must_save = preempted or step == num_steps or ckpt.should_save(step)
        if must_save or step % log_every_steps == 0:
          last_metrics = metrics_lib.to_host(step_metrics)
          _check_finite(last_metrics, step, ckpt)
          if step % log_every_steps == 0 or step == num_steps:
            last_metrics.update(throughput.measure(step))
            writer.write_scalars(step, {f"train/{k}": v for k, v in last_metrics.items()})
            progress.show(step, last_metrics, last_metrics.get("steps_per_sec", 0.0))
        if eval_every_steps and (step % eval_every_steps == 0 or step == num_steps):
          eval_metrics = _evaluate(eval_step, state, model, task, batch_size,
                                   eval_batches, partitioner, writer, step)
          writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
          last_metrics.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        if must_save:
          ckpt.save(step, state, train_iter.get_state(), manifest)
        if preempted:
          print(f"SIGTERM received: checkpoint of step {step} saved; exiting.",
                flush=True)
          break
    finally:
      writer.flush()
      ckpt.close()
  return TrainResult(step=step, metrics=last_metrics, preempted=preempted)


def _manifest(model: Any, layout: vocab.TokenLayout, task: Any) -> dict[str, Any]:
  describe = getattr(task, "describe", None)
  return {"format": CHECKPOINT_FORMAT,
          "musiclm_jax_version": musiclm_jax.__version__,
          "model": type(model).__name__,
          "model_config": dataclasses.asdict(model.config),
          "token_layout": layout.to_dict(),
          "task": describe() if describe else None,
          "gin_config": gin.config_str()}


def _check_vocab_size(model: Any, layout: vocab.TokenLayout) -> None:
  """A token model must embed every id of the task's token space."""
  vocab_size = getattr(model.config, "vocab_size", None)
  if vocab_size is not None and vocab_size < layout.vocab_size:
    raise ValueError(f"the model's vocab_size {vocab_size} is smaller than the task's token "
                     f"space ({layout.vocab_size} ids); bind DecoderConfig.vocab_size = "
                     f"{layout.vocab_size} or more")


def _restore_or_init(ckpt: Checkpointer, abstract_state, init_state, seed: int,
                     train_iter, manifest: dict[str, Any]):
  step = ckpt.latest_step()
  if step is None:
    logging.info("no checkpoint in %s: initialising from seed %d", ckpt.directory, seed)
    return init_state(seed)
  _check_compatible(ckpt.read_manifest(step), manifest, ckpt.directory, step)
  state, data_state, _ = ckpt.restore(step, abstract_state)
  train_iter.set_state(data_state)
  print(f"Resuming from checkpoint step {step} in {ckpt.directory}", flush=True)
  return state


def _check_compatible(stored: dict[str, Any], current: dict[str, Any], directory: str,
                      step: int) -> None:
  for key in ("model", "model_config", "token_layout"):
    if stored.get(key) != current[key]:
      diff = current[key]
      if isinstance(diff, dict) and isinstance(stored.get(key), dict):
        diff = {k: (stored[key].get(k), v) for k, v in current[key].items()
                if stored[key].get(k) != v}
      raise IncompatibleCheckpointError(
          f"checkpoint step {step} in {directory} has a different {key} than this run "
          f"(stored, current): {diff}. Use a new MODEL_DIR or the original config.")


def _check_finite(metrics: dict[str, float], step: int, ckpt: Checkpointer) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    ckpt.wait()
    raise NonFiniteLossError(
        f"non-finite training metrics at step {step}: {bad}. Stopped without saving "
        f"this state; the last good checkpoint is step {ckpt.latest_step()} in "
        f"{ckpt.directory}. Lower the learning rate, enable gradient clipping or "
        "check the input data.")


def _evaluate(eval_step, state, model, task, batch_size: int, num_batches: int,
              partitioner: Partitioner, writer, step: int) -> dict[str, float]:
  """Metrics over the first `num_batches` validation batches; summaries of the first."""
  iterator = task.iterator("validation", batch_size)
  totals: dict[str, float] = {}
  for index in range(num_batches):
    batch = partitioner.shard_batch(next(iterator))
    sums = metrics_lib.to_host(eval_step(state, batch))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + v
    if index == 0 and hasattr(model, "write_summaries"):
      with partitioner.activate():
        model.write_summaries(writer, step, state, batch)
  return model.eval_metrics(totals)


@contextlib.contextmanager
def _sigterm_flag():
  """An Event set by SIGTERM while the block runs (main thread only)."""
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)
