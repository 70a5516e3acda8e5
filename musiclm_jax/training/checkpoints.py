"""Self-describing orbax checkpoints of a training run.

Each step directory holds three items:
  state          the `TrainState` (params, optimizer state, step, RNG)
  data_iterator  the input pipeline's reading position (JSON)
  manifest       what the checkpoint is: gin config, token layout, package
                 version, model class (JSON), so that it can be read without
                 the code that wrote it at hand.

Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete, so a killed save never replaces the last good
checkpoint). Restoring takes an abstract state whose leaves carry the
*current* shardings, so a checkpoint restores onto any mesh.
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import gin
import jax
import orbax.checkpoint as ocp

STATE, DATA, MANIFEST = "state", "data_iterator", "manifest"
# What a file fitted on a run's features (semantic k-means, MuLan and melody
# RVQ) records in its JSON manifest: the checkpoint step it was fitted on,
# which its loaders and `musiclm export` then read instead of the newest.
FITTED_STEP = "checkpoint_step"
# Orbax's replica-parallel save has each replica of a replicated array write
# one slice of it, which compiles a slice program per array shape and replica
# at the first save. Below this many bytes per slice that costs more than it
# saves (the tiny codec on 8 CPU devices: 392 compiles, 35 s before its first
# checkpoint); bigger arrays keep it.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
  """jax.Array saves slice replicas only from REPLICA_PARALLEL_MIN_SLICE_BYTES.

  The handler keeps the default one's array-metadata store, read the way orbax
  itself reads it (`array_metadata_store.resolve_array_metadata_store`).
  """
  default = ocp.type_handlers.get_type_handler(jax.Array)
  try:
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES,
        array_metadata_store=getattr(default, "_array_metadata_store", None))
  except TypeError:  # an orbax (another machine's image) without the option: its default
    return
  absl_logger = logging.get_absl_logger()  # orbax warns of every override through it
  disabled, absl_logger.disabled = absl_logger.disabled, True
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.disabled = disabled


_register_array_handler()


@gin.configurable
class Checkpointer:
  """Keeps the newest `max_to_keep` checkpoints of a run in `directory`.

  Args:
    directory: where step directories live (usually `MODEL_DIR/checkpoints`).
    save_every_steps: interval of periodic saves (`should_save`); the trainer
      also saves at the end and on SIGTERM.
    max_to_keep: older checkpoints are deleted.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, save_every_steps: int = 1000, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every_steps = save_every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, DATA, MANIFEST))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `step` is due for a periodic save."""
    return step % self.save_every_steps == 0

  def save(self, step: int, state: Any, data_state: dict[str, Any],
           manifest: dict[str, Any]) -> None:
    """Starts saving step `step` (returns at once when async)."""
    self._manager.save(
        step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(data_state),
            MANIFEST: ocp.args.JsonSave(manifest)}),
        force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def restore(self, step: int, abstract_state: Any
              ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Restores `(state, data_state, manifest)` onto `abstract_state`'s shardings."""
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state),
        DATA: ocp.args.JsonRestore(),
        MANIFEST: ocp.args.JsonRestore()}))
    return restored[STATE], restored[DATA], restored[MANIFEST]

  def read_manifest(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(
        **{MANIFEST: ocp.args.JsonRestore()}))[MANIFEST]

  def read_data_state(self, step: int) -> dict[str, Any]:
    """The input pipeline's reading position saved with step `step`."""
    return self._manager.restore(step, args=ocp.args.Composite(
        **{DATA: ocp.args.JsonRestore()}))[DATA]

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class MissingCheckpointError(FileNotFoundError):
  """A directory that should hold a trained model holds no checkpoint."""


def load_trained_variables(model_dir: str, step: int | None = None
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The trained variables of a run, on the default device, for inference.

  Args:
    model_dir: a run's `MODEL_DIR` (holding `checkpoints/`).
    step: which checkpoint; default the newest.
  Returns:
    variables: `{"params": ..., <other collections of model_state>}` as
      `jax.Array`s on one device (optimizer state is not read).
    manifest: the checkpoint's manifest (config, token layout, gin config) and
      the `step` read.
  Raises:
    MissingCheckpointError: no checkpoint (or not that step) in `model_dir`.
  """
  directory = os.path.join(os.path.abspath(model_dir), "checkpoints")
  if not os.path.isdir(directory):
    raise MissingCheckpointError(f"no checkpoints in {model_dir!r} (expected "
                                 f"{directory}/<step>; train the model first)")
  # Orbax warns on every read-only manager that its directory is read only:
  # what was asked for, printed once per model a bundle or tokenizer loads.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                       DATA: ocp.JsonCheckpointHandler(),
                       MANIFEST: ocp.JsonCheckpointHandler()})
  finally:
    logging.set_verbosity(verbosity)
  try:
    steps = list(manager.all_steps())
    step = max(steps, default=None) if step is None else step
    if step is None or step not in steps:
      raise MissingCheckpointError(
          f"{directory} has no checkpoint {'at all' if step is None else f'of step {step}'}"
          f" (steps: {sorted(steps)})")
    metadata = manager.item_metadata(step)[STATE]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    wanted = {key: metadata[key] for key in ("params", "model_state") if key in metadata}
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), wanted)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(
            abstract, partial_restore=True,
            restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device),
                                      abstract)),
        MANIFEST: ocp.args.JsonRestore()}))
  finally:
    manager.close()
  state = restored[STATE]
  manifest = dict(restored[MANIFEST], step=step)
  return {"params": state["params"], **(state.get("model_state") or {})}, manifest


def fitted_step(fitted_manifest: str) -> int | None:
  """The checkpoint step recorded (as `FITTED_STEP`) by the JSON manifest of a
  file fitted on a run's features; None when the file or the entry is missing
  (files fitted before steps were recorded: the newest checkpoint)."""
  if not os.path.isfile(fitted_manifest):
    return None
  with open(fitted_manifest, encoding="utf-8") as f:
    return json.load(f).get(FITTED_STEP)

