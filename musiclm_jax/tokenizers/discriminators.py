"""SoundStream's discriminators: an STFT discriminator and multi-scale waveform ones.

Every sub-discriminator returns a `DiscriminatorOutput`: its logits (one per
time position) and the feature maps of its hidden layers, which the
feature-matching loss compares between real and generated audio.
`CodecDiscriminator` runs them all on the same waveforms.

Discriminators are not causal (they only train the codec) and use
"SAME" padding.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.layers import spectral

LEAKY_SLOPE = 0.2


class DiscriminatorOutput(NamedTuple):
  """logits: `[batch, positions]`; features: hidden activations, each `[batch, ...]`."""
  logits: jax.Array
  features: list[jax.Array]


def _activation(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, LEAKY_SLOPE)


def _check_waveform(name: str, wav: jax.Array) -> None:
  if wav.ndim != 2:
    raise ValueError(f"{name}: expected a waveform [batch, samples], got shape {wav.shape}")


class _StridedResidualBlock2d(nn.Module):
  """3x3 conv, then a strided conv to `features`; a strided 1x1 conv on the skip path.

  The strided kernel is `(stride_t + 2) x (stride_f + 2)`: 3x4 for stride
  (1, 2) and 4x4 for stride (2, 2), as in SoundStream.
  """
  features: int
  strides: tuple[int, int]
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda features, kernel, strides, name: nn.Conv(  # pylint: disable=g-long-lambda
        features, kernel, strides, padding="SAME", dtype=self.dtype,
        param_dtype=jnp.float32, name=name)
    h = _activation(conv(x.shape[-1], (3, 3), (1, 1), "conv")(x))
    kernel = (self.strides[0] + 2, self.strides[1] + 2)
    h = conv(self.features, kernel, self.strides, "strided_conv")(h)
    skip = conv(self.features, (1, 1), self.strides, "skip")(x)
    return _activation(h + skip)


class STFTDiscriminator(nn.Module):
  """2-D convolutional discriminator on the complex STFT.

  Real and imaginary parts are 2 input channels of a `[frames, bins]`
  image, scaled so that white noise of unit variance gives bins of unit
  variance. A 7x7 conv, then 6 residual blocks whose strides alternate
  between (1, 2) and (2, 2) over (time, frequency) and whose channels
  grow as `channels * (1, 2, 4, 4, 8, 8)`; a final conv spans the remaining
  frequency bins, leaving one logit per (downsampled) frame.
  """
  channels: int = 32
  n_fft: int = 1024
  hop_length: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, wav: jax.Array) -> DiscriminatorOutput:
    """wav: `[batch, samples]` -> logits `[batch, frames / 8]` and 7 feature maps."""
    _check_waveform(self.name, wav)
    spec = spectral.stft(wav, self.n_fft, self.hop_length)
    spec = spec / np.sqrt(np.sum(np.square(np.hanning(self.n_fft + 1)[:-1])))
    x = jnp.stack([spec.real, spec.imag], axis=-1).astype(self.dtype)
    x = _activation(nn.Conv(self.channels, (7, 7), padding="SAME", dtype=self.dtype,
                            param_dtype=jnp.float32, name="conv_in")(x))
    features = [x]
    for i, multiplier in enumerate((1, 2, 4, 4, 8, 8)):
      strides = (1, 2) if i % 2 == 0 else (2, 2)
      x = _StridedResidualBlock2d(self.channels * multiplier, strides, self.dtype,
                                  name=f"block_{i}")(x)
      features.append(x)
    logits = nn.Conv(1, (1, x.shape[2]), padding="VALID", dtype=self.dtype,
                     param_dtype=jnp.float32, name="conv_out")(x)
    return DiscriminatorOutput(logits[:, :, 0, 0].astype(jnp.float32), features)


class WaveDiscriminator(nn.Module):
  """MelGAN's waveform discriminator: grouped strided 1-D convs.

  Conv(k=15, channels), then `num_downsamples` convs of kernel 41, stride 4
  and `in_channels / 4` groups, each multiplying the channels by 4 up to
  `max_channels`, then Conv(k=5) and a Conv(k=3) to one logit per position.
  """
  channels: int = 16
  max_channels: int = 1024
  num_downsamples: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, wav: jax.Array) -> DiscriminatorOutput:
    """wav: `[batch, samples]` -> logits `[batch, ceil(samples / 4^n)]`, n + 2 feature maps
    (n = `num_downsamples`)."""
    _check_waveform(self.name, wav)

    def conv(features, kernel, name, strides=1, groups=1):
      return nn.Conv(features, (kernel,), (strides,), padding="SAME",
                     feature_group_count=groups, dtype=self.dtype,
                     param_dtype=jnp.float32, name=name)

    x = _activation(conv(self.channels, 15, "conv_in")(wav[:, :, None].astype(self.dtype)))
    features = [x]
    for i in range(self.num_downsamples):
      in_channels = x.shape[-1]
      out_channels = min(4 * in_channels, self.max_channels)
      groups = max(in_channels // 4, 1)
      if out_channels % groups:
        raise ValueError(f"{self.name}: {out_channels} channels are not divisible by "
                         f"{groups} groups; use a power of 2 for channels and max_channels")
      x = _activation(conv(out_channels, 41, f"downsample_{i}", 4, groups)(x))
      features.append(x)
    x = _activation(conv(x.shape[-1], 5, "conv_mix")(x))
    features.append(x)
    logits = conv(1, 3, "conv_out")(x)
    return DiscriminatorOutput(logits[:, :, 0].astype(jnp.float32), features)


@gin.configurable
class CodecDiscriminator(nn.Module):
  """The STFT discriminator plus `wave_num_scales` waveform discriminators.

  Waveform scale `i` sees the signal average-pooled `i` times (window 4,
  stride 2): raw, 2x and 4x downsampled for 3 scales.
  """
  stft_channels: int = 32
  stft_n_fft: int = 1024
  stft_hop_length: int = 256
  wave_channels: int = 16
  wave_max_channels: int = 1024
  wave_num_scales: int = 3
  dtype: str = "float32"

  @nn.compact
  def __call__(self, wav: jax.Array) -> list[DiscriminatorOutput]:
    """wav: `[batch, samples]` -> `[stft, wave scale 0, 1, ...]` outputs."""
    _check_waveform(self.name, wav)
    dtype = jnp.dtype(self.dtype)
    outputs = [STFTDiscriminator(self.stft_channels, self.stft_n_fft, self.stft_hop_length,
                                 dtype, name="stft")(wav)]
    x = wav
    for scale in range(self.wave_num_scales):
      if scale:
        x = nn.avg_pool(x[:, :, None], (4,), (2,), padding="SAME",
                        count_include_pad=False)[:, :, 0]
      outputs.append(WaveDiscriminator(self.wave_channels, self.wave_max_channels,
                                       dtype=dtype, name=f"wave_{scale}")(x))
    return outputs
