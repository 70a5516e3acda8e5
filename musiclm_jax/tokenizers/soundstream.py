"""SoundStream: a causal convolutional codec with residual vector quantization.

24 kHz mono in, 50 frames/s of `num_levels` codes out (12 x 1024 codes =
6 kbps), and back. As in Zeghidour et al. (2021):

  encoder  CausalConv(k=7, C) -> EncoderBlock(2C, s1) -> ... -> EncoderBlock(2^n C, sn)
           -> ELU -> CausalConv(k=3, D)
  block    3 ResidualUnits (dilations 1, 3, 9) -> ELU -> CausalConv(k=2s, stride s)
  unit     x + Conv(k=1)(ELU(Conv(k=7, dilation)(ELU(x))))
  RVQ      `layers.quantizers.ResidualVectorQuantizer` on the D-dim frames
  decoder  the mirror image: CausalConv(k=7, 2^n C), DecoderBlocks (ELU ->
           CausalConvTranspose(k=2s, stride s) -> 3 ResidualUnits) with the
           strides reversed, ELU -> CausalConv(k=7, 1)

Every layer is causal, so the codec also runs in streaming mode (see
`layers/conv.py`): chunk by chunk equals the whole signal. `SoundStream` is
the Flax module; `SoundStreamCodec` wraps it in jitted `encode`/`decode`
functions of waveforms and codes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.layers.conv import STREAM, CausalConv1d, CausalConvTranspose1d
from musiclm_jax.layers.quantizers import QuantizerOutput, ResidualVectorQuantizer

SAMPLE_RATE = 24000
HOP_LENGTH = 480  # samples per frame: 24 kHz -> 50 frames/s

Variables = dict[str, Any]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SoundStreamConfig:
  """Sizes and quantizer options; `gin/tokenizers/soundstream_*.gin` bind these.

  The encoder's strides must multiply to 480 (24 kHz -> 50 frames/s);
  block i has `channels * 2^(i+1)` output channels. The `quantizer_*` fields
  are those of `ResidualVectorQuantizer`.
  """
  channels: int = 8
  embedding_dim: int = 64
  strides: tuple[int, ...] = (2, 4, 6, 10)
  num_levels: int = 12
  codebook_size: int = 1024
  residual_kernel_size: int = 7
  dilations: tuple[int, ...] = (1, 3, 9)
  quantizer_decay: float = 0.99
  quantizer_kmeans_init: bool = True
  quantizer_kmeans_iters: int = 10
  quantizer_dead_code_threshold: float = 0.1
  quantizer_dropout: bool = True
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "strides", tuple(self.strides))
    object.__setattr__(self, "dilations", tuple(self.dilations))
    if math.prod(self.strides) != HOP_LENGTH or min(self.strides) < 1:
      raise ValueError(f"SoundStreamConfig.strides {self.strides} multiply to "
                       f"{math.prod(self.strides)}; the encoder must downsample by "
                       f"{HOP_LENGTH} (24 kHz -> 50 frames/s), e.g. (2, 4, 6, 10) or "
                       "(4, 4, 5, 6)")
    for name in ("channels", "embedding_dim", "num_levels", "codebook_size",
                 "residual_kernel_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"SoundStreamConfig.{name} must be positive, got "
                         f"{getattr(self, name)}")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def frame_rate(self) -> float:
    """Frames (of `num_levels` codes) per second: 50."""
    return SAMPLE_RATE / HOP_LENGTH

  def bitrate(self, num_levels: int | None = None) -> float:
    """Bits per second of the first `num_levels` levels (default all): 6000 at 12."""
    num_levels = self.num_levels if num_levels is None else num_levels
    return self.frame_rate * num_levels * math.log2(self.codebook_size)


class ResidualUnit(nn.Module):
  """`x + Conv(k=1)(ELU(Conv(k, dilation)(ELU(x))))` on `[batch, time, channels]`."""
  kernel_size: int
  dilation: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, streaming: bool = False) -> jax.Array:
    channels = x.shape[-1]
    h = CausalConv1d(channels, self.kernel_size, dilation=self.dilation, dtype=self.dtype,
                     name="dilated_conv")(nn.elu(x), streaming)
    h = CausalConv1d(channels, 1, dtype=self.dtype, name="pointwise_conv")(nn.elu(h),
                                                                           streaming)
    return x + h


class EncoderBlock(nn.Module):
  """Residual units, then a strided conv: `[B, T, C] -> [B, T / stride, features]`."""
  config: SoundStreamConfig
  features: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, streaming: bool = False) -> jax.Array:
    cfg = self.config
    for i, dilation in enumerate(cfg.dilations):
      x = ResidualUnit(cfg.residual_kernel_size, dilation, cfg.compute_dtype,
                       name=f"residual_{i}")(x, streaming)
    return CausalConv1d(self.features, 2 * self.stride, self.stride,
                        dtype=cfg.compute_dtype, name="downsample")(nn.elu(x), streaming)


class DecoderBlock(nn.Module):
  """A transposed conv, then residual units: `[B, T, C] -> [B, T * stride, features]`."""
  config: SoundStreamConfig
  features: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, streaming: bool = False) -> jax.Array:
    cfg = self.config
    x = CausalConvTranspose1d(self.features, 2 * self.stride, self.stride,
                              dtype=cfg.compute_dtype, name="upsample")(nn.elu(x), streaming)
    for i, dilation in enumerate(cfg.dilations):
      x = ResidualUnit(cfg.residual_kernel_size, dilation, cfg.compute_dtype,
                       name=f"residual_{i}")(x, streaming)
    return x


class Encoder(nn.Module):
  """Waveform `[batch, samples]` -> embeddings `[batch, samples / 480, D]`."""
  config: SoundStreamConfig

  @nn.compact
  def __call__(self, wav: jax.Array, streaming: bool = False) -> jax.Array:
    cfg = self.config
    dtype = cfg.compute_dtype
    x = CausalConv1d(cfg.channels, 7, dtype=dtype, name="conv_in")(wav[..., None], streaming)
    for i, stride in enumerate(cfg.strides):
      x = EncoderBlock(cfg, cfg.channels * 2**(i + 1), stride, name=f"block_{i}")(
          x, streaming)
    return CausalConv1d(cfg.embedding_dim, 3, dtype=dtype, name="conv_out")(nn.elu(x),
                                                                            streaming)


class Decoder(nn.Module):
  """Embeddings `[batch, frames, D]` -> float32 waveform `[batch, frames * 480]`."""
  config: SoundStreamConfig

  @nn.compact
  def __call__(self, x: jax.Array, streaming: bool = False) -> jax.Array:
    cfg = self.config
    dtype = cfg.compute_dtype
    num_blocks = len(cfg.strides)
    x = CausalConv1d(cfg.channels * 2**num_blocks, 7, dtype=dtype, name="conv_in")(
        x.astype(dtype), streaming)
    for i, stride in enumerate(reversed(cfg.strides)):
      x = DecoderBlock(cfg, cfg.channels * 2**(num_blocks - 1 - i), stride,
                       name=f"block_{i}")(x, streaming)
    wav = CausalConv1d(1, 7, dtype=dtype, name="conv_out")(nn.elu(x), streaming)
    return wav[..., 0].astype(jnp.float32)


def _check_waveform(wav: jax.Array) -> None:
  if wav.ndim != 2 or wav.shape[1] % HOP_LENGTH:
    raise ValueError(f"expected a waveform [batch, samples] with samples a multiple of "
                     f"{HOP_LENGTH}, got shape {wav.shape}")


def _check_codes(codes: jax.Array, num_levels: int) -> None:
  if codes.ndim != 3 or not 1 <= codes.shape[-1] <= num_levels:
    raise ValueError(f"expected codes [batch, frames, q] with 1 <= q <= {num_levels} levels, "
                     f"got shape {codes.shape}")


class SoundStream(nn.Module):
  """Encoder, residual vector quantizer and decoder.

  Variables: `"params"` (convolutions, trained by gradient) and
  `"quantizer"` (EMA codebooks, updated when `train=True` and mutable; see
  `ResidualVectorQuantizer`, which also needs a `"quantizer"` rng then).
  Streaming calls keep their context in the `"stream"` collection.
  """
  config: SoundStreamConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.quantizer = ResidualVectorQuantizer(
        num_levels=cfg.num_levels, codebook_size=cfg.codebook_size,
        decay=cfg.quantizer_decay, kmeans_init=cfg.quantizer_kmeans_init,
        kmeans_iters=cfg.quantizer_kmeans_iters,
        dead_code_threshold=cfg.quantizer_dead_code_threshold,
        quantizer_dropout=cfg.quantizer_dropout)
    self.decoder = Decoder(cfg)

  def __call__(self, wav: jax.Array, train: bool) -> tuple[jax.Array, QuantizerOutput]:
    """Reconstruction `[batch, samples]` of `wav [batch, samples]` (samples a
    multiple of 480) and the quantizer's output (codes `[batch, frames, levels]`,
    commitment loss, codebook metrics)."""
    _check_waveform(wav)
    quantized = self.quantizer(self.encoder(wav), train)
    return self.decoder(quantized.quantized), quantized

  def embed(self, wav: jax.Array, streaming: bool = False) -> jax.Array:
    """Unquantized embeddings `[batch, samples / 480, D]` of `wav [batch, samples]`."""
    _check_waveform(wav)
    return self.encoder(wav, streaming)

  def encode(self, wav: jax.Array, streaming: bool = False) -> jax.Array:
    """int32 codes `[batch, samples / 480, levels]` of `wav [batch, samples]`."""
    return self.quantizer.encode(self.embed(wav, streaming))

  def decode(self, codes: jax.Array, streaming: bool = False) -> jax.Array:
    """Waveform `[batch, frames * 480]` from codes `[batch, frames, q]`, any `q <= levels`."""
    return self.synthesize(self.dequantize(codes), streaming)

  def dequantize(self, codes: jax.Array) -> jax.Array:
    """float32 embeddings `[batch, frames, D]`: the sum of the first q levels' code
    vectors of `codes [batch, frames, q]`."""
    _check_codes(codes, self.config.num_levels)
    return self.quantizer.decode(codes)

  def synthesize(self, embeddings: jax.Array, streaming: bool = False) -> jax.Array:
    """Waveform `[batch, frames * 480]` of (quantized) embeddings `[batch, frames, D]`."""
    return self.decoder(embeddings, streaming)


class SoundStreamCodec:
  """Jitted waveform <-> codes functions of a `SoundStream`, offline and streaming.

  Streaming state is the `"stream"` collection returned by the previous
  call (`None` starts a new stream); encoder and decoder streams are
  independent. Chunks are whole frames (multiples of 480 samples).
  """

  def __init__(self, config: SoundStreamConfig):
    self.config = config
    self.module = SoundStream(config)
    self._init = jax.jit(lambda rng, wav: self.module.init({"params": rng}, wav, train=False))
    # Decoding is split so that the decoder compiles once for every prefix q.
    self._encode = jax.jit(self._encode_padded)
    self._dequantize = jax.jit(functools.partial(self.module.apply, method="dequantize"))
    self._synthesize = jax.jit(functools.partial(self.module.apply, method="synthesize"))
    self._stream_step = {method: jax.jit(functools.partial(self._stream_step_fn, method))
                         for method in ("encode", "decode")}
    self._state_shapes: dict[tuple[str, int], Any] = {}

  @staticmethod
  def num_frames(num_samples: int) -> int:
    """Frames that `num_samples` samples encode to: `ceil(num_samples / 480)`."""
    return -(-num_samples // HOP_LENGTH)

  def init(self, rng: jax.Array, num_samples: int = HOP_LENGTH) -> Variables:
    """Fresh `"params"` and `"quantizer"` variables (codebooks are random until the
    first training call fits them by k-means)."""
    wav = jnp.zeros((1, self.num_frames(num_samples) * HOP_LENGTH), jnp.float32)
    return dict(self._init(rng, wav))

  def bitrate(self, num_levels: int | None = None) -> float:
    """Bits per second: 50 frames/s x levels x log2(codebook_size)."""
    return self.config.bitrate(num_levels)

  def encode(self, variables: Variables, wav: jax.Array) -> jax.Array:
    """int32 codes `[batch, ceil(samples / 480), levels]` of `wav [batch, samples]`;
    the signal is padded with zeros to whole frames."""
    if np.ndim(wav) != 2:
      raise ValueError(f"expected a waveform [batch, samples], got shape {np.shape(wav)}")
    return self._encode(variables, wav)

  def decode(self, variables: Variables, codes: jax.Array) -> jax.Array:
    """float32 waveform `[batch, frames * 480]` of codes `[batch, frames, q]`, q <= levels."""
    codes = jnp.asarray(codes, jnp.int32)
    return self._synthesize(variables, self._dequantize(variables, codes))

  def encode_stream(self, variables: Variables, chunk: jax.Array, state: Variables | None
                    ) -> tuple[jax.Array, Variables]:
    """Codes `[batch, samples / 480, levels]` of the next `chunk [batch, samples]`
    (samples a multiple of 480) and the state for the following chunk."""
    chunk = jnp.asarray(chunk, jnp.float32)
    _check_waveform(chunk)
    return self._apply_stream("encode", variables, chunk, state)

  def decode_stream(self, variables: Variables, codes: jax.Array, state: Variables | None
                    ) -> tuple[jax.Array, Variables]:
    """Waveform `[batch, frames * 480]` of the next codes `[batch, frames, q]` and
    the state for the following chunk."""
    codes = jnp.asarray(codes, jnp.int32)
    return self._apply_stream("decode", variables, codes, state)

  def _encode_padded(self, variables: Variables, wav: jax.Array) -> jax.Array:
    padding = self.num_frames(wav.shape[1]) * HOP_LENGTH - wav.shape[1]
    wav = jnp.pad(wav.astype(jnp.float32), ((0, 0), (0, padding)))
    return self.module.apply(variables, wav, method="encode")

  def _apply_stream(self, method: str, variables: Variables, inputs: jax.Array,
                    state: Variables | None) -> tuple[jax.Array, Variables]:
    if state is None:
      state = self._zero_state(method, variables, inputs)
    return self._stream_step[method](variables, inputs, state)

  def _stream_step_fn(self, method: str, variables: Variables, inputs: jax.Array,
                      state: Variables) -> tuple[jax.Array, Variables]:
    outputs, updated = self.module.apply({**variables, STREAM: state}, inputs,
                                         streaming=True, method=method, mutable=[STREAM])
    return outputs, updated[STREAM]

  def _zero_state(self, method: str, variables: Variables, inputs: jax.Array) -> Variables:
    """The context of a new stream: zeros shaped as the first call creates them.

    Context shapes depend on the batch size only (not on the chunk's length),
    so they are traced once per method and batch size.
    """
    key = (method, inputs.shape[0])
    if key not in self._state_shapes:
      self._state_shapes[key] = jax.eval_shape(
          lambda: self.module.apply(variables, inputs, streaming=True, method=method,
                                    mutable=[STREAM])[1][STREAM])
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self._state_shapes[key])


def load_codec(model_dir: str, step: int | None = None
               ) -> tuple[SoundStreamCodec, Variables]:
  """The codec a `musiclm train` run of `CodecModel` wrote to `model_dir`.

  The configuration comes from the checkpoint's manifest, so no gin file is
  needed. Returns the codec and its variables (`params`, `quantizer`).
  Raises `checkpoints.MissingCheckpointError` when there is no checkpoint and
  ValueError when the run trained something else.
  """
  from musiclm_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  variables, manifest = checkpoints.load_trained_variables(model_dir, step)
  if manifest.get("model") != "CodecModel":
    raise ValueError(f"{model_dir} holds a {manifest.get('model')!r} checkpoint, not a "
                     "SoundStream codec (CodecModel)")
  config = SoundStreamConfig(**manifest["model_config"])
  return SoundStreamCodec(config), {"params": variables["params"]["generator"],
                                    "quantizer": variables["quantizer"]}
