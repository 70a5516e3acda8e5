"""Train and eval steps of a prefix-LM model (pure functions, jitted by the trainer).

`DecoderOnlyModel.make_train_step` / `make_eval_step` return these; the
model only needs `loss_sums(params, batch, rng) -> (loss_sum, sums)`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from musiclm_jax.training.optimizers import Optimizer
from musiclm_jax.training.train_state import TrainState

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """`[batch, ...]` -> `[num_microbatches, batch / num_microbatches, ...]`.

  Microbatch i takes rows i, i+n, i+2n, ... so that every microbatch stays
  spread over all data-parallel devices.
  """
  def split(x):
    b = x.shape[0]
    if b % num_microbatches:
      raise ValueError(f"batch size {b} is not divisible by num_microbatches "
                       f"{num_microbatches}")
    x = x.reshape(b // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(
        x, (None, "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def make_train_step(model: Any, optimizer: Optimizer,
                    num_microbatches: int = 1
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """`(state, batch) -> (state, metrics)`; gradients accumulated over microbatches.

  The loss is normalised by the total loss weight of the whole batch, so
  any `num_microbatches` gives the same gradient (up to float rounding).
  """
  def grads_and_sums(params, batch, rng):
    (_, sums), grads = jax.value_and_grad(model.loss_sums, has_aux=True)(
        params, batch, rng)
    return grads, sums

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if num_microbatches == 1:
      grads, sums = grads_and_sums(state.params, batch, rng)
    else:
      def accumulate(acc, micro_and_rng):
        out = grads_and_sums(state.params, *micro_and_rng)
        return jax.tree.map(jnp.add, acc, out), None

      zeros = jax.eval_shape(grads_and_sums, state.params,
                             jax.tree.map(lambda x: x[0], split_microbatches(
                                 batch, num_microbatches)), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, sums), _ = jax.lax.scan(
          accumulate, zeros,
          (split_microbatches(batch, num_microbatches),
           jax.random.split(rng, num_microbatches)))
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics = {"loss": sums["loss"] / weight, "z_loss": sums["z_loss"] / weight,
               "accuracy": sums["correct"] / weight,
               "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates),
               "learning_rate": optimizer.schedule(state.step)}
    return new_state, metrics

  return train_step


def make_eval_step(model: Any) -> Callable[[TrainState, Batch], Metrics]:
  """`(state, batch) -> sums` of loss, correct and weight (no dropout)."""
  def eval_step(state, batch):
    return model.loss_sums(state.params, batch)[1]
  return eval_step
