"""The training state, its shardings and its sharded initialisation."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from musiclm_jax.partitioning import Partitioner


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; a checkpoint stores exactly this.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: parameter tree (plain arrays).
    opt_state: optax state.
    rng: uint32 `[2]` base key; step `s` uses `fold_in(rng, s)` for dropout,
      so a resumed run draws the same randomness as an uninterrupted one.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def partitioned_initializer(init_params: Callable[[jax.Array], Any], tx,
                            partitioner: Partitioner
                            ) -> tuple[Callable[[int], TrainState], TrainState, TrainState]:
  """Builds a jitted `seed -> TrainState` that materialises state already sharded.

  Args:
    init_params: `rng -> params` boxed with logical axes (`nn.Partitioned`).
    tx: the optax transformation.
    partitioner: mesh and rules.
  Returns:
    init: `seed -> TrainState`, sharded.
    abstract: the state's `ShapeDtypeStruct`s, each carrying its sharding
      (what a checkpoint restore needs).
    shardings: the state's `NamedSharding`s.
  """
  key = jax.random.PRNGKey(0)
  boxed = jax.eval_shape(init_params, key)
  param_shardings = partitioner.logical_shardings(boxed)
  params = nn.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  replicated = partitioner.replicated()
  shardings = TrainState(
      step=replicated, params=param_shardings,
      opt_state=partitioner.like_params_shardings(opt_state, params, param_shardings),
      rng=replicated)

  def init(seed):
    param_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    params = nn.unbox(init_params(param_key))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=dropout_key)

  jitted = partitioner.partition(init, in_shardings=None, out_shardings=shardings)
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      jax.eval_shape(init, 0), shardings)
  return (lambda seed: jitted(jnp.asarray(seed, jnp.uint32))), abstract, shardings
