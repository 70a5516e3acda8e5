"""gin-configured optax optimizers and learning-rate schedules.

A run binds `make_optimizer.optimizer` to `@adamw` or `@adafactor` and
`make_optimizer.schedule` to `@warmup_cosine()` or `@warmup_rsqrt()`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import optax


@gin.configurable
def warmup_cosine(peak_value: float = 1e-3, warmup_steps: int = 100,
                  decay_steps: int = 10_000, end_value: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_value`, then cosine decay to `end_value`."""
  return optax.warmup_cosine_decay_schedule(0.0, peak_value, warmup_steps,
                                            max(decay_steps, warmup_steps + 1), end_value)


@gin.configurable
def warmup_rsqrt(peak_value: float = 1e-2, warmup_steps: int = 1000) -> optax.Schedule:
  """Linear warm-up, then `peak * sqrt(warmup_steps / step)` (T5's schedule)."""
  warmup = optax.linear_schedule(0.0, peak_value, warmup_steps)

  def rsqrt(step):
    return peak_value * jnp.sqrt(warmup_steps / jnp.maximum(step + warmup_steps, 1))

  return optax.join_schedules([warmup, rsqrt], [warmup_steps])


def _decay_mask(params):
  """Weight decay on matrices only, not on norm scales or 1-D parameters."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


@gin.configurable
def adamw(learning_rate: optax.Schedule, b1: float = 0.9, b2: float = 0.98,
          eps: float = 1e-9, weight_decay: float = 0.01) -> optax.GradientTransformation:
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=_decay_mask)


@gin.configurable
def adafactor(learning_rate: optax.Schedule, decay_rate: float = 0.8,
              multiply_by_parameter_scale: bool = False,
              weight_decay: float = 0.0) -> optax.GradientTransformation:
  return optax.adafactor(learning_rate, decay_rate=decay_rate,
                         multiply_by_parameter_scale=multiply_by_parameter_scale,
                         weight_decay_rate=weight_decay or None,
                         weight_decay_mask=_decay_mask)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The transformation to apply and the schedule it follows (for logging)."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule


@gin.configurable
def make_optimizer(
    optimizer: Callable[[optax.Schedule], optax.GradientTransformation] = adamw,
    schedule: optax.Schedule | None = None,
    clip_grad_norm: float | None = 1.0) -> Optimizer:
  """Global-norm clipping followed by `optimizer(schedule)`."""
  schedule = schedule if schedule is not None else warmup_cosine()
  parts = [optax.clip_by_global_norm(clip_grad_norm)] if clip_grad_norm else []
  return Optimizer(optax.chain(*parts, optimizer(schedule)), schedule)


@gin.configurable
def gan_optimizer(generator: Optimizer = gin.REQUIRED,
                  discriminator: Optimizer = gin.REQUIRED) -> Optimizer:
  """One optimizer over `{"generator": ..., "discriminator": ...}` parameters.

  Each half has its own transformation and schedule (bind them with gin
  scopes: `generator/make_optimizer.*`, `discriminator/make_optimizer.*`);
  the logged schedule is the generator's.
  """
  def labels(params):
    if set(params) != {"generator", "discriminator"}:
      raise ValueError(f"gan_optimizer expects parameters {{generator, discriminator}}; "
                       f"got {sorted(params)}")
    return {name: jax.tree.map(lambda _, n=name: n, tree) for name, tree in params.items()}

  return Optimizer(optax.multi_transform({"generator": generator.tx,
                                          "discriminator": discriminator.tx}, labels),
                   generator.schedule)
