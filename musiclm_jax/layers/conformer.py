"""Conformer blocks (Gulati et al. 2020) with logical axis names.

A block is `x + FF/2 -> x + relative-bias self-attention -> x + convolution
module -> x + FF/2 -> LayerNorm` (the macaron feed-forward halves around
attention and convolution). Attention reuses the decoder's `SelfAttention`
with a bidirectional T5-style relative position bias (computed once per
stack, shared by its layers) in place of Transformer-XL's sinusoidal
relative encoding. The convolution module's normalisation is a LayerNorm
(not BatchNorm), so that a block has no batch statistics and behaves the
same in training and inference. Stacks run under `nn.scan` like the decoder.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax.layers.attention import SelfAttention
from musiclm_jax.layers.projection import Projection
from musiclm_jax.layers.transformer import HIDDEN_AXES, REMAT_POLICIES

MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")


def layer_norm(dtype: Any, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over `embed`, float32 scale and bias with logical names."""
  return nn.LayerNorm(
      epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class FeedForward(nn.Module):
  """`LayerNorm -> d_ff (swish) -> dropout -> embed -> dropout`."""
  d_ff: int
  dropout_rate: float
  dtype: Any
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: `[batch, frames, embed]` -> same shape."""
    h = layer_norm(self.dtype, "norm")(x)
    h = Projection((self.d_ff,), ("embed", "mlp"), dtype=self.dtype, name="wi")(h)
    h = nn.with_logical_constraint(nn.swish(h), MLP_AXES)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
    h = Projection((x.shape[-1],), ("mlp", "embed"), dtype=self.dtype, name="wo")(h)
    return nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)


class ConvolutionModule(nn.Module):
  """`LayerNorm -> pointwise (2x) -> GLU -> depthwise conv -> LayerNorm -> swish -> pointwise`.

  The depthwise convolution is centred ('SAME' padding): each frame sees
  `kernel_size // 2` frames on either side.
  """
  kernel_size: int
  dropout_rate: float
  dtype: Any
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: `[batch, frames, embed]` -> same shape."""
    d_model = x.shape[-1]
    h = layer_norm(self.dtype, "norm")(x)
    h = Projection((2 * d_model,), ("embed", "mlp"), dtype=self.dtype,
                   name="pointwise_in")(h)
    h = nn.glu(h, axis=-1)
    h = nn.Conv(d_model, (self.kernel_size,), padding="SAME",
                feature_group_count=d_model, dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, "embed")),
                bias_init=nn.with_logical_partitioning(
                    nn.initializers.zeros, ("embed",)),
                name="depthwise")(h)
    h = nn.with_logical_constraint(h, HIDDEN_AXES)
    h = nn.swish(layer_norm(self.dtype, "conv_norm")(h))
    h = Projection((d_model,), ("mlp", "embed"), dtype=self.dtype,
                   name="pointwise_out")(h)
    return nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)


class ConformerLayer(nn.Module):
  """One Conformer block; returns `(x, x)`: the carry and the output that `nn.scan` stacks.

  Attributes:
    num_heads, head_dim: attention size.
    d_ff: hidden width of each feed-forward half.
    kernel_size: depthwise convolution width in frames.
    dropout_rate: on residual branches and hidden units.
    dtype: compute dtype.
    attention_implementation: see `SelfAttention`.
    deterministic: disables dropout.
  """
  num_heads: int
  head_dim: int
  d_ff: int
  kernel_size: int
  dropout_rate: float
  dtype: Any
  attention_implementation: str | None
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array):
    """x: `[batch, frames, embed]`; bias `[1, heads, frames, frames]`; mask bool `[batch, 1, frames, frames]`."""
    dropout = nn.Dropout(self.dropout_rate)
    x = nn.with_logical_constraint(x, HIDDEN_AXES)
    x = x + 0.5 * FeedForward(self.d_ff, self.dropout_rate, self.dtype, self.deterministic,
                              name="ff_in")(x)
    h = layer_norm(self.dtype, "attention_norm")(x)
    h = SelfAttention(self.num_heads, self.head_dim, self.dtype,
                      self.attention_implementation, name="attention")(
                          h, bias, mask, jnp.zeros((), jnp.int32))
    x = x + dropout(h, deterministic=self.deterministic)
    x = x + ConvolutionModule(self.kernel_size, self.dropout_rate, self.dtype,
                              self.deterministic, name="conv")(x)
    x = x + 0.5 * FeedForward(self.d_ff, self.dropout_rate, self.dtype, self.deterministic,
                              name="ff_out")(x)
    x = layer_norm(self.dtype, "final_norm")(x)
    x = nn.with_logical_constraint(x, HIDDEN_AXES)
    return x, x


def conformer_stack(num_layers: int, remat_policy: str) -> type[nn.Module]:
  """`num_layers` Conformer blocks under `nn.scan` (parameters get a `layers` axis).

  Instantiate the result with `ConformerLayer`'s attributes and call it with
  `(x, bias, mask)`; it returns `(x, outputs)`: the last layer's output
  `[batch, frames, embed]` and every layer's, `[layers, batch, frames, embed]`
  (dropped by the compiler where unused).
  """
  layer = ConformerLayer
  if remat_policy != "none":
    layer = nn.remat(layer, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  return nn.scan(layer, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast, nn.broadcast), length=num_layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})
