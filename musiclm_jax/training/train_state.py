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
    model_state: the model's variable collections other than `params`, which
      its train step updates without the optimizer (e.g. EMA codebooks in
      `quantizer`); `{}` for models that have none.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  model_state: Any = flax.struct.field(default_factory=dict)


def partitioned_initializer(init_variables: Callable[[jax.Array], dict[str, Any]], tx,
                            partitioner: Partitioner
                            ) -> tuple[Callable[[int], TrainState], TrainState, TrainState]:
  """Builds a jitted `seed -> TrainState` that materialises state already sharded.

  Args:
    init_variables: `rng -> {collection: tree}`: `params` (trained by `tx`)
      and any other collections (the `model_state`); leaves boxed with
      logical axes (`nn.Partitioned`) are sharded by the rules, plain leaves
      are replicated.
    tx: the optax transformation.
    partitioner: mesh and rules.
  Returns:
    init: `seed -> TrainState`, sharded.
    abstract: the state's `ShapeDtypeStruct`s, each carrying its sharding
      (what a checkpoint restore needs).
    shardings: the state's `NamedSharding`s.
  """
  key = jax.random.PRNGKey(0)
  boxed = dict(jax.eval_shape(init_variables, key))
  if "params" not in boxed:
    raise ValueError(f"init_variables returned the collections {sorted(boxed)}; "
                     "it must return a dict with 'params'")
  boxed_params = boxed.pop("params")
  param_shardings = partitioner.logical_shardings(boxed_params)
  params = nn.unbox(boxed_params)
  opt_state = jax.eval_shape(tx.init, params)
  replicated = partitioner.replicated()
  shardings = TrainState(
      step=replicated, params=param_shardings,
      opt_state=partitioner.like_params_shardings(opt_state, params, param_shardings),
      rng=replicated, model_state=partitioner.logical_shardings(boxed))

  def init(seed):
    param_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = dict(nn.unbox(init_variables(param_key)))
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=dropout_key, model_state=variables)

  jitted = partitioner.partition(init, in_shardings=None, out_shardings=shardings)
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      jax.eval_shape(init, 0), shardings)
  return (lambda seed: jitted(jnp.asarray(seed, jnp.uint32))), abstract, shardings
