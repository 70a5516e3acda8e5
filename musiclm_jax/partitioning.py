"""T5X-style partitioning rebuilt on flax and `jax.sharding`.

Parameters carry logical axis names (`nn.with_logical_partitioning`) and
activations logical constraints (`nn.with_logical_constraint`). A rules table
(gin: `standard_logical_axis_rules`) maps logical names to the mesh axes
`data`, `fsdp` and `tensor`. `Partitioner` builds the mesh, turns logical
annotations into `NamedSharding`s (params, optimizer state, batches, caches)
and jits functions with them, tracing under the mesh and rules so that
activation constraints take effect.

Multi-host: `initialize_distributed` starts `jax.distributed`, and
`Partitioner.shard_batch` assembles a global batch from each process' local
rows.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import gin
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes a batch dimension is split over.
BATCH_MESH_AXES = ("data", "fsdp")

LogicalRules = Sequence[tuple[str, Any]]


@gin.configurable
def standard_logical_axis_rules(fsdp_params: bool = True,
                                tensor_parallel: bool = True) -> LogicalRules:
  """Logical axis name -> mesh axis (or axes, or None for replicated).

  Parameter axes: `embed`, `mlp`, `heads`, `kv`, `qkv`, `vocab`, `layers`,
  `relpos_buckets`. Activation axes carry an `activation_` prefix so that a
  parameter rule (`embed` -> `fsdp`) never collides with the batch split.
  flax uses a mesh axis at most once per array: later rules for a name are
  fallbacks when an earlier one's mesh axis is taken.

  Args:
    fsdp_params: shard the `embed` dimension of parameters (and optimizer
      state) over the `fsdp` axis (ZeRO-3 style).
    tensor_parallel: shard heads, MLP and vocabulary over the `tensor` axis
      (Megatron style).
  """
  tensor = "tensor" if tensor_parallel else None
  return (
      ("batch", BATCH_MESH_AXES),
      ("activation_batch", BATCH_MESH_AXES),
      ("activation_length", None),
      ("activation_embed", None),
      ("activation_heads", tensor),
      ("activation_kv", None),
      ("activation_mlp", tensor),
      ("activation_vocab", tensor),
      ("embed", "fsdp" if fsdp_params else None),
      ("mlp", tensor),
      ("heads", tensor),
      ("kv", None),
      ("qkv", None),
      ("vocab", tensor),
      ("layers", None),
      ("relpos_buckets", None),
      ("cache_batch", BATCH_MESH_AXES),
      ("cache_length", None),
  )


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills the single `-1` of `mesh_shape` so that the product is `num_devices`."""
  shape = tuple(int(d) for d in mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh_shape {shape} must have {len(MESH_AXES)} entries for "
                     f"the mesh axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh_shape {shape} may contain at most one -1")
  if any(d == 0 or d < -1 for d in shape):
    raise ValueError(f"mesh_shape {shape} entries must be positive or -1")
  known = math.prod(d for d in shape if d != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh_shape {shape}: {num_devices} devices are not divisible "
                       f"by {known}")
    shape = tuple(num_devices // known if d == -1 else d for d in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh_shape {shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return shape


@gin.configurable
class Partitioner:
  """Mesh + logical rules; derives shardings and jits functions with them.

  Attributes:
    mesh: the `jax.sharding.Mesh` over (`data`, `fsdp`, `tensor`).
    rules: the logical axis rules in force.
  """

  def __init__(self,
               mesh_shape: Sequence[int] = (-1, 1, 1),
               logical_axis_rules: LogicalRules | None = None,
               devices: Sequence[jax.Device] | None = None):
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    self.mesh = jax.make_mesh(shape, MESH_AXES,
                              axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                              devices=devices)
    self.rules = tuple(logical_axis_rules if logical_axis_rules is not None
                       else standard_logical_axis_rules())

  @property
  def data_parallel_size(self) -> int:
    """How many ways a batch is split (product of the batch mesh axes)."""
    return math.prod(self.mesh.shape[a] for a in BATCH_MESH_AXES)

  @contextlib.contextmanager
  def activate(self):
    """Mesh and rules under which traced logical constraints take effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  # -- shardings -------------------------------------------------------------
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def logical_shardings(self, boxed_tree: Any) -> Any:
    """`NamedSharding` per leaf of a tree of `nn.Partitioned` boxes (others replicated)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  def like_params_shardings(self, tree: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for a tree whose leaves mirror parameters (optimizer state).

    A leaf whose key path ends with a parameter's key path and whose shape
    equals that parameter's takes the parameter's sharding (Adam moments,
    EMA copies); any other leaf (step counts, factored second moments) is
    replicated.
    """
    by_path = {}
    for (path, value), sharding in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_leaves(param_shardings)):
      by_path[_path_keys(path)] = (np.shape(value), sharding)

    def sharding_for(path, leaf):
      keys = _path_keys(path)
      for start in range(len(keys)):
        match = by_path.get(keys[start:])
        if match is not None and match[0] == np.shape(leaf):
          return match[1]
      return self.replicated()

    return jax.tree_util.tree_map_with_path(sharding_for, tree)

  def batch_sharding(self, ndim: int = 1) -> NamedSharding:
    """Sharding of an array whose leading dimension is the global batch."""
    return NamedSharding(self.mesh, P(BATCH_MESH_AXES, *([None] * (ndim - 1))))

  def batch_shardings(self, batch: Any) -> Any:
    return jax.tree.map(lambda x: self.batch_sharding(np.ndim(x)), batch)

  def shard_batch(self, local_batch: Any) -> Any:
    """Global arrays from this process' rows `[local_batch, ...]`.

    Every process passes its own rows; the global batch is their
    concatenation in process order, split over the batch mesh axes.
    """
    def to_global(x):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(self.batch_sharding(x.ndim), x)

    return jax.tree.map(to_global, local_batch)

  def check_batch_size(self, global_batch_size: int) -> None:
    n = self.data_parallel_size
    if global_batch_size % n or global_batch_size % jax.process_count():
      raise ValueError(
          f"batch size {global_batch_size} must be divisible by the data-parallel "
          f"size {n} (mesh {dict(self.mesh.shape)}) and the process count "
          f"{jax.process_count()}")

  # -- jit -------------------------------------------------------------------
  def partition(self, fn: Callable[..., Any], in_shardings: Any, out_shardings: Any,
                donate_argnums: Sequence[int] = ()) -> Callable[..., Any]:
    """`jax.jit(fn)` with shardings, traced and run under `activate()`."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=tuple(donate_argnums))

    def call(*args):
      with self.activate():
        return jitted(*args)

    return call


def _path_keys(path) -> tuple[str, ...]:
  keys = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        keys.append(str(getattr(k, attr)))
        break
  return tuple(keys)


# Environment variables by which a launcher announces a multi-process job.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_STEP_NUM_TASKS")


@gin.configurable
def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts multi-host JAX when this is one process of several.

  With explicit arguments (gin or a launcher) they are used; otherwise
  `jax.distributed.initialize()` auto-detects TPU pods and SLURM jobs when
  their environment is present. A lone process does nothing.
  """
  explicit = coordinator_address is not None
  env = {k: os.environ[k] for k in _CLUSTER_ENV if k in os.environ}
  multi_task_slurm = int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
  if not explicit and not (multi_task_slurm or "JAX_COORDINATOR_ADDRESS" in env
                           or "TPU_WORKER_HOSTNAMES" in env):
    return
  if jax.distributed.is_initialized():
    return
  # Explicit arguments turn off JAX's cluster detection, which on SLURM would
  # also pin each process to the one GPU of its SLURM_LOCALID.
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             cluster_detection_method="deactivate" if explicit else None)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
