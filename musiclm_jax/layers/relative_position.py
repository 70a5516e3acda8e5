"""T5-style bucketed relative position bias."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """Bucket of `relative_position = key_position - query_position`.

  Half of the buckets (all of them when not bidirectional) hold exact
  distances 0 .. n_exact-1; the rest grow logarithmically up to
  `max_distance`, beyond which everything shares the last bucket. When
  not bidirectional, keys after the query all fall in bucket 0 (they are
  masked anyway). When bidirectional, keys after the query use the upper
  half of the buckets.

  Args:
    relative_position: int array, any shape.
  Returns:
    int32 buckets in [0, num_buckets), same shape.
  """
  n = -relative_position
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  n_exact = num_buckets // 2
  is_small = n < n_exact
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / n_exact) / np.log(
      max_distance / n_exact)
  large = n_exact + (log_ratio * (num_buckets - n_exact)).astype(n.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return (bucket + jnp.where(is_small, n, large)).astype(jnp.int32)


class RelativePositionBias(nn.Module):
  """Learned per-head bias indexed by the relative-position bucket.

  Computed once per forward pass and shared by all layers (as in T5).
  """
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """Bias for every (query, key) pair.

    Args:
      query_positions: int `[q_len]` absolute positions of the queries.
      key_positions: int `[k_len]` absolute positions of the keys.
    Returns:
      `[1, heads, q_len, k_len]` bias in `dtype`.
    """
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.1),
                                     ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)
    buckets = relative_position_bucket(
        key_positions[None, :] - query_positions[:, None], bidirectional=True,
        num_buckets=self.num_buckets, max_distance=self.max_distance)
    bias = jnp.take(table, buckets, axis=1)  # [heads, q_len, k_len]
    return bias[None].astype(self.dtype)
