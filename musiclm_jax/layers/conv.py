"""Causal 1-D convolutions that also run in streaming mode.

Both layers see only the past: output frame `n` depends on input frames up
to the end of the stride it belongs to, never later. Offline, the left
context is zeros. In streaming mode (`streaming=True`, the `"stream"`
collection mutable) the left context is the tail of the previous chunk,
kept in the variable `stream/context`; feeding a signal chunk by chunk then
gives the offline output exactly. The first streaming call creates a zero
context; later calls pass the returned `"stream"` collection back in.
Chunks must be a multiple of the stride.

Kernels are float32 `[kernel, in, out]`, initialised with variance 1/fan_in,
and left without logical axis names (replicated): codec convolutions are
small next to the stage Transformers. The convolution runs in `dtype`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STREAM = "stream"


def _kernel_init(fan_in: int) -> nn.initializers.Initializer:
  return nn.initializers.normal(fan_in ** -0.5)


def _with_context(module: nn.Module, x: jax.Array, length: int,
                  streaming: bool) -> jax.Array:
  """`x [batch, time, channels]` preceded by `length` frames of left context.

  The context is zeros offline, the tail of the previous chunk when
  streaming (and then updated with the tail of this one).
  """
  if length == 0:
    return x
  shape = (x.shape[0], length, x.shape[2])
  if not streaming:
    return jnp.concatenate([jnp.zeros(shape, x.dtype), x], axis=1)
  context = module.variable(STREAM, "context", jnp.zeros, shape, x.dtype)
  extended = jnp.concatenate([context.value, x], axis=1)
  context.value = extended[:, extended.shape[1] - length:]
  return extended


def _check_stride(name: str, x: jax.Array, stride: int) -> None:
  if x.ndim != 3:
    raise ValueError(f"{name}: expected [batch, time, channels], got shape {x.shape}")
  if x.shape[1] % stride:
    raise ValueError(f"{name}: {x.shape[1]} input frames are not a multiple of the "
                     f"stride {stride}; pad the signal (or the chunk) first")


class CausalConv1d(nn.Module):
  """`x [batch, time, in] -> [batch, time / stride, features]`, causal.

  With span `(kernel_size - 1) * dilation + 1`, the input is padded on the
  left by `span - stride`, so output frame `n` covers input frames up to
  `(n + 1) * stride - 1`: the last frame of its stride.
  """
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  groups: int = 1
  dtype: Any = jnp.float32

  @property
  def context_length(self) -> int:
    """Frames of left context (the streaming state's length)."""
    return (self.kernel_size - 1) * self.dilation + 1 - self.stride

  @nn.compact
  def __call__(self, x: jax.Array, streaming: bool = False) -> jax.Array:
    _check_stride(self.name, x, self.stride)
    if self.context_length < 0:
      raise ValueError(f"{self.name}: kernel span {self.context_length + self.stride} is "
                       f"shorter than the stride {self.stride}")
    in_features = x.shape[-1]
    if in_features % self.groups or self.features % self.groups:
      raise ValueError(f"{self.name}: {in_features} input and {self.features} output "
                       f"channels are not divisible by {self.groups} groups")
    fan_in = self.kernel_size * in_features // self.groups
    kernel = self.param("kernel", _kernel_init(fan_in),
                        (self.kernel_size, in_features // self.groups, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x = _with_context(self, x.astype(self.dtype), self.context_length, streaming)
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(self.dtype), window_strides=(self.stride,), padding="VALID",
        rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=self.groups)
    return y + bias.astype(self.dtype)


class CausalConvTranspose1d(nn.Module):
  """`x [batch, frames, in] -> [batch, frames * stride, features]`, causal.

  A transposed convolution whose output is trimmed to `frames * stride`:
  output sample `t` depends on input frames up to `t // stride`. Each input
  frame `m` adds `x[m] @ kernel[j]` to output sample `m * stride + j`
  (`j < kernel_size`, which must be at least `stride`).

  Computed without zero-stuffing: output phase `r` of frame `n` is
  `sum_q x[n - q] @ kernel[q * stride + r]`, an ordinary causal convolution
  over frames with `stride * features` outputs, reshaped to samples. Its
  left context is the last `(kernel_size - 1) // stride` input frames.
  """
  features: int
  kernel_size: int
  stride: int
  dtype: Any = jnp.float32

  @property
  def context_length(self) -> int:
    return (self.kernel_size - 1) // self.stride

  @nn.compact
  def __call__(self, x: jax.Array, streaming: bool = False) -> jax.Array:
    _check_stride(self.name, x, 1)
    if self.kernel_size < self.stride:
      raise ValueError(f"{self.name}: kernel_size {self.kernel_size} is smaller than the "
                       f"stride {self.stride}")
    batch, frames, in_features = x.shape
    kernel = self.param("kernel", _kernel_init(in_features * self.kernel_size // self.stride),
                        (self.kernel_size, in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    taps = self.context_length + 1
    # [taps * stride, in, out] -> [taps, stride, in, out], tap q applies to x[n - q];
    # the convolution reads x[n - taps + 1 + i] with weight i, hence the flip.
    phases = jnp.pad(kernel, ((0, taps * self.stride - self.kernel_size), (0, 0), (0, 0)))
    phases = phases.reshape(taps, self.stride, in_features, self.features)[::-1]
    conv_kernel = phases.transpose(0, 2, 1, 3).reshape(
        taps, in_features, self.stride * self.features)
    x = _with_context(self, x.astype(self.dtype), self.context_length, streaming)
    y = jax.lax.conv_general_dilated(
        x, conv_kernel.astype(self.dtype), window_strides=(1,), padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"))
    y = y.reshape(batch, frames * self.stride, self.features)
    return y + bias.astype(self.dtype)
