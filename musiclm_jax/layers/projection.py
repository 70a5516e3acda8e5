"""Linear projection with logical axis names on every kernel dimension."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Projection(nn.Module):
  """`x [..., *in] -> [..., *features]` through a kernel `[*in, *features]`.

  Unlike `nn.DenseGeneral` the kernel is created in its final shape, so its
  logical axes (`axes`, one name per kernel dimension) apply directly.
  Kernels are float32, initialised with variance 1/fan_in; the matmul runs
  in `dtype`.
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]
  num_contracted: int = 1
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.num_contracted:]
    if len(self.axes) != len(in_shape) + len(self.features):
      raise ValueError(f"{self.name}: {len(self.axes)} axis names for a kernel of shape "
                       f"{in_shape + tuple(self.features)}")
    init = nn.initializers.normal(math.prod(in_shape) ** -0.5)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        in_shape + tuple(self.features), jnp.float32)
    contracted = tuple(range(x.ndim - self.num_contracted, x.ndim))
    return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype),
                         axes=(contracted, tuple(range(self.num_contracted))))
