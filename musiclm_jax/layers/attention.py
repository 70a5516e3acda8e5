"""Multi-head self-attention with relative bias, prefix-LM masks and a KV cache."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax.layers.projection import Projection

# Logical axes of attention activations.
QKV_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
CACHE_AXES = ("cache_batch", "cache_length", "heads", "kv")


def prefix_lm_mask(query_positions: jax.Array, key_positions: jax.Array,
                   query_in_prefix: jax.Array, key_in_prefix: jax.Array) -> jax.Array:
  """Causal mask, bidirectional inside the prefix.

  A query attends to keys at or before its position, and a prefix query to
  every prefix key.

  Args:
    query_positions: int `[q_len]`.
    key_positions: int `[k_len]`.
    query_in_prefix: bool `[batch, q_len]`.
    key_in_prefix: bool `[batch, k_len]`.
  Returns:
    bool `[batch, 1, q_len, k_len]`, True where attention is allowed.
  """
  causal = key_positions[None, :] <= query_positions[:, None]
  both_prefix = query_in_prefix[:, :, None] & key_in_prefix[:, None, :]
  return (causal[None] | both_prefix)[:, None]


class SelfAttention(nn.Module):
  """Fused-QKV multi-head attention through `jax.nn.dot_product_attention`.

  In `decode` mode keys and values are written into the `cache` collection
  at `start .. start+len-1` and attention runs over the whole cache (the
  mask hides what is not written yet).
  """
  num_heads: int
  head_dim: int
  dtype: Any = jnp.bfloat16
  implementation: str | None = None  # None: cuDNN where it applies, else XLA.
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array,
               start: jax.Array) -> jax.Array:
    """Attends `x` to itself (and, when decoding, to the cache).

    Args:
      x: `[batch, length, embed]`.
      bias: `[1, heads, length, keys]` relative position bias.
      mask: bool `[batch, 1, length, keys]`.
      start: int scalar, absolute position of `x[:, 0]` (decode mode).
    Returns:
      `[batch, length, embed]`.
    """
    qkv = Projection((3, self.num_heads, self.head_dim), ("embed", "qkv", "heads", "kv"),
                     dtype=self.dtype, name="qkv")(x)
    query, key, value = (nn.with_logical_constraint(qkv[:, :, i], QKV_AXES)
                         for i in range(3))
    if self.decode:
      key, value = self._update_cache(key, value, start)
    out = jax.nn.dot_product_attention(
        query, key, value, bias=bias.astype(self.dtype), mask=mask,
        scale=self.head_dim**-0.5, implementation=self.implementation)
    out = nn.with_logical_constraint(out, QKV_AXES)
    return Projection((x.shape[-1],), ("heads", "kv", "embed"), num_contracted=2,
                      dtype=self.dtype, name="out")(out)

  def _update_cache(self, key: jax.Array, value: jax.Array,
                    start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes `[batch, length, heads, kv]` at `start`; returns the whole cache.

    At initialisation the cache is created with the input's length, which is
    the cache length for all later calls.
    """
    zeros = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
    cached_key = self.variable("cache", "key", zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "value", zeros, value.shape, value.dtype)
    if self.is_initializing():
      return key, value
    at = (0, start, 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, at)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, at)
    return cached_key.value, cached_value.value
