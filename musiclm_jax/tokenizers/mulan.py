"""MuLan: a joint music-text embedding trained with a contrastive loss.

Two towers map into one L2-normalised `embed_dim` space:

* audio: 16 kHz audio -> log-mel -> a ResNet-style 2-D CNN (`audio_encoder =
  'cnn'`) or a Transformer over patches of frames (`'transformer'`) -> masked
  mean over time -> projection;
* text: SentencePiece ids (`tokenizers/text.py`) -> a Transformer ->
  mean over the tokens (or a learned CLS vector) -> projection.

Both towers take a validity mask, and padding never changes an embedding:
samples beyond a clip's length are zeroed, a log-mel frame whose analysis
window reaches past the end is masked, and every layer is per-example and
mask-aware (no batch statistics; convolutions see zeros at masked frames;
attention and pooling skip them).

A clip of any length is embedded by windows of `window_seconds` with a hop
of `hop_seconds`, whose embeddings are averaged and re-normalised
(`embed_clips`); a clip shorter than a window is one masked window.

Training minimises the symmetric InfoNCE loss with a learnable temperature.
The similarity matrix is taken over the whole batch inside the jitted step;
when the batch is sharded over the data-parallel mesh, GSPMD gathers the
embeddings, so every example's negatives come from the global batch (all
devices and hosts), not just its own shard.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from musiclm_jax.layers import spectral
from musiclm_jax.layers.projection import Projection
from musiclm_jax.layers.relative_position import RelativePositionBias
from musiclm_jax.layers.transformer import DecoderConfig, DecoderLayer, rms_norm

Batch = Mapping[str, Any]
AUDIO_ENCODERS = ("cnn", "transformer")
TEXT_POOLINGS = ("mean", "cls")
# Log-mel values (natural log of power, floored at 1e-5) are mapped by
# (x - offset) / scale to roughly [-1, 1] for audio normalised to -20 dBFS.
LOG_MEL_OFFSET = -4.0
LOG_MEL_SCALE = 4.0


class AudioWindowsConfig:
  """What a config of an encoder of audio windows (MuLan, the melody encoder) derives
  from its fields `sample_rate`, `window_seconds`, `hop_seconds`, `n_fft` and `dtype`:
  the window and hop in samples, their checks, and the compute dtype."""

  sample_rate: int
  window_seconds: float
  hop_seconds: float
  n_fft: int
  dtype: str

  @property
  def window_samples(self) -> int:
    return int(round(self.window_seconds * self.sample_rate))

  @property
  def hop_samples(self) -> int:
    return int(round(self.hop_seconds * self.sample_rate))

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def check_windows(self) -> None:
    """Raises ValueError for a window too short for the STFT, a hop that is not
    positive or an unknown dtype name."""
    if self.window_samples <= self.n_fft // 2:
      raise ValueError(f"window of {self.window_samples} samples is too short for "
                       f"n_fft {self.n_fft}")
    if self.hop_samples <= 0:
      raise ValueError(f"hop_seconds {self.hop_seconds} must be positive")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  def check_window_batch(self, audio_shape: tuple[int, ...], model: str) -> None:
    """Raises ValueError unless a training batch's audio is `[batch, window_samples]`."""
    if len(audio_shape) != 2 or audio_shape[1] != self.window_samples:
      raise ValueError(f"batch audio has shape {audio_shape}; {model} trains on "
                       f"[batch, {self.window_samples}] windows ({self.window_seconds} s at "
                       f"{self.sample_rate} Hz)")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MulanConfig(AudioWindowsConfig):
  """Sizes of both towers, the audio front end and the loss.

  `gin/tokenizers/mulan_{tiny,small}.gin` bind these. Transformer widths are
  `heads * head_dim` for attention, `d_model` for the residual stream.
  """
  embed_dim: int = 128
  # audio front end (16 kHz; 100 log-mel frames per second by default)
  sample_rate: int = 16000
  window_seconds: float = 10.0
  hop_seconds: float = 1.0
  n_fft: int = 512
  hop_length: int = 160
  n_mels: int = 64
  # audio tower
  audio_encoder: str = "cnn"
  cnn_channels: tuple[int, ...] = (32, 64, 128, 256)
  patch_frames: int = 8
  audio_layers: int = 4
  audio_d_model: int = 256
  audio_heads: int = 4
  audio_d_ff: int = 1024
  # text tower
  text_vocab_size: int = 1024
  max_text_length: int = 64
  text_layers: int = 4
  text_d_model: int = 256
  text_heads: int = 4
  text_d_ff: int = 1024
  text_pooling: str = "mean"
  head_dim: int = 64
  # contrastive loss: temperature starts at `initial_temperature` and is
  # learned (as log 1/T), clipped to [min_temperature, 1]
  initial_temperature: float = 0.07
  min_temperature: float = 0.01
  dtype: str = "float32"

  def __post_init__(self):
    if self.audio_encoder not in AUDIO_ENCODERS:
      raise ValueError(f"audio_encoder {self.audio_encoder!r} is not one of {AUDIO_ENCODERS}")
    if self.text_pooling not in TEXT_POOLINGS:
      raise ValueError(f"text_pooling {self.text_pooling!r} is not one of {TEXT_POOLINGS}")
    if not 0 < self.min_temperature <= self.initial_temperature <= 1:
      raise ValueError(f"need 0 < min_temperature ({self.min_temperature}) <= "
                       f"initial_temperature ({self.initial_temperature}) <= 1")
    self.check_windows()
    if not self.cnn_channels:
      raise ValueError("cnn_channels must name at least one stage")
    object.__setattr__(self, "cnn_channels", tuple(self.cnn_channels))

  def encoder_config(self, tower: str) -> DecoderConfig:
    """The `DecoderConfig` whose pre-norm blocks the `tower` ('audio'/'text') stacks.

    Every field is passed, so no gin binding of `DecoderConfig` leaks in.
    """
    layers, d_model, heads, d_ff = (
        (self.audio_layers, self.audio_d_model, self.audio_heads, self.audio_d_ff)
        if tower == "audio" else
        (self.text_layers, self.text_d_model, self.text_heads, self.text_d_ff))
    return DecoderConfig(num_layers=layers, num_heads=heads, head_dim=self.head_dim,
                         d_model=d_model, d_ff=d_ff, vocab_size=self.text_vocab_size,
                         dropout_rate=0.0, dtype=self.dtype, remat_policy="none",
                         relpos_num_buckets=32, relpos_max_distance=128,
                         attention_implementation=None)


# ---------------------------------------------------------------- front end


def frame_mask(lengths: jax.Array, num_frames: int, n_fft: int, hop_length: int) -> jax.Array:
  """bool `[batch, num_frames]`: frames whose analysis window ends within the audio.

  Frame j covers samples `[j * hop - n_fft / 2, j * hop + n_fft / 2)`; it is
  valid when that ends at or before `lengths` (frame 0 always is).
  """
  j = jnp.arange(num_frames)
  return (j[None, :] * hop_length + n_fft // 2 <= lengths[:, None]) | (j[None, :] == 0)


def log_mel_features(config: MulanConfig, wav: jax.Array, lengths: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """Normalised log-mel of `wav [batch, samples]` with samples past `lengths` zeroed.

  Returns:
    features float32 `[batch, frames, n_mels]` (zero at masked frames) and
    their validity bool `[batch, frames]`.
  """
  samples = jnp.arange(wav.shape[1])
  wav = jnp.where(samples[None, :] < lengths[:, None], wav, 0.0)
  mel = spectral.log_mel_spectrogram(wav, config.sample_rate, config.n_fft,
                                     config.hop_length, config.n_mels)
  valid = frame_mask(lengths, mel.shape[1], config.n_fft, config.hop_length)
  mel = (mel - LOG_MEL_OFFSET) / LOG_MEL_SCALE
  return jnp.where(valid[..., None], mel, 0.0), valid


# ---------------------------------------------------------------- towers


def _masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of `x [batch, length, features]` over the valid positions `[batch, length]`."""
  weights = valid.astype(jnp.float32)[..., None]
  return jnp.sum(x.astype(jnp.float32) * weights, axis=1) / jnp.maximum(
      jnp.sum(weights, axis=1), 1.0)


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class TransformerEncoder(nn.Module):
  """Bidirectional stack of the decoder's pre-norm blocks with a key padding mask."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    """`x [batch, length, d_model]`, `valid` bool `[batch, length]` -> same shape."""
    cfg = self.config
    batch, length, _ = x.shape
    positions = jnp.arange(length)
    bias = RelativePositionBias(cfg.num_heads, cfg.relpos_num_buckets, cfg.relpos_max_distance,
                                cfg.compute_dtype, name="relpos_bias")(positions, positions)
    mask = jnp.broadcast_to(valid[:, None, None, :], (batch, 1, length, length))
    stack = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                    length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(cfg, True, False, name="layers")(x, bias, mask, jnp.zeros((), jnp.int32))
    return rms_norm(cfg.compute_dtype, "final_norm")(x)


class MaskedResidualBlock(nn.Module):
  """conv3x3-norm-relu-conv3x3-norm plus shortcut, over `[batch, time, freq, channels]`.

  Masked frames are zeroed before every convolution, so they look exactly
  like the zero padding at the end of a shorter clip. Norms are per frame
  (over frequency and channels), never over the batch or time. Striding
  uses fixed symmetric padding, so output frame i is centred on input
  frame `stride * i` whatever the length.
  """
  channels: int
  stride: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    def conv(features, kernel, stride, name):
      pad = kernel // 2
      return nn.Conv(features, (kernel, kernel), (stride, stride),
                     padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                     param_dtype=jnp.float32, name=name)

    def norm(name):
      return nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1),
                          dtype=self.dtype, param_dtype=jnp.float32, name=name)

    def zero_masked(h, mask):
      return jnp.where(mask[:, :, None, None], h, 0).astype(h.dtype)

    x = zero_masked(x, valid)
    out_valid = valid[:, ::self.stride]
    h = nn.relu(norm("norm_0")(conv(self.channels, 3, self.stride, "conv_0")(x)))
    h = norm("norm_1")(conv(self.channels, 3, 1, "conv_1")(zero_masked(h, out_valid)))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.channels:
      shortcut = conv(self.channels, 1, self.stride, "shortcut")(x)
    return zero_masked(nn.relu(h + shortcut), out_valid), out_valid


class CnnAudioEncoder(nn.Module):
  """ResNet-style 2-D CNN over log-mel; each stage halves time and frequency.

  The last feature map is flattened over frequency and channels per frame
  (pooling over frequency would lose where in the spectrum things are, i.e.
  pitch and register) and averaged over the valid frames.
  """
  config: MulanConfig

  @nn.compact
  def __call__(self, mel: jax.Array, valid: jax.Array) -> jax.Array:
    """`mel [batch, frames, n_mels]`, `valid [batch, frames]` ->
    `[batch, n_mels / 2^stages * channels[-1]]`."""
    cfg = self.config
    x = mel[..., None].astype(cfg.compute_dtype)
    x = nn.Conv(cfg.cnn_channels[0], (3, 3), padding=((1, 1), (1, 1)), dtype=cfg.compute_dtype,
                param_dtype=jnp.float32, name="stem")(x)
    for i, channels in enumerate(cfg.cnn_channels):
      x, valid = MaskedResidualBlock(channels, 2, cfg.compute_dtype, name=f"block_{i}")(x, valid)
    return _masked_mean(x.reshape(x.shape[0], x.shape[1], -1), valid)


class PatchTransformerAudioEncoder(nn.Module):
  """Transformer over patches of `patch_frames` consecutive log-mel frames."""
  config: MulanConfig

  @nn.compact
  def __call__(self, mel: jax.Array, valid: jax.Array) -> jax.Array:
    """`mel [batch, frames, n_mels]`, `valid [batch, frames]` -> `[batch, d_model]`."""
    cfg = self.config
    batch, frames, n_mels = mel.shape
    p = cfg.patch_frames
    num_patches = -(-frames // p)
    mel = jnp.pad(mel, ((0, 0), (0, num_patches * p - frames), (0, 0)))
    patches = mel.reshape(batch, num_patches, p * n_mels)
    patch_valid = valid[:, ::p]  # a patch counts when its first frame does
    x = Projection((cfg.audio_d_model,), ("mlp", "embed"), dtype=cfg.compute_dtype,
                   name="patch_embed")(patches)
    x = TransformerEncoder(cfg.encoder_config("audio"), name="encoder")(x, patch_valid)
    return _masked_mean(x, patch_valid)


class TextEncoder(nn.Module):
  """Transformer over token ids (0 = padding) with mean or CLS pooling."""
  config: MulanConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """`tokens` int `[batch, length]` -> `[batch, text_d_model]`."""
    cfg = self.config
    valid = tokens > 0
    x = nn.Embed(cfg.text_vocab_size, cfg.text_d_model, dtype=cfg.compute_dtype,
                 param_dtype=jnp.float32,
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                             ("vocab", "embed")),
                 name="token_embed")(tokens)
    if cfg.text_pooling == "cls":
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                           ("embed",)),
                       (cfg.text_d_model,), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[2])),
                           x], axis=1)
      valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
    x = TransformerEncoder(cfg.encoder_config("text"), name="encoder")(x, valid)
    if cfg.text_pooling == "cls":
      return x[:, 0].astype(jnp.float32)
    return _masked_mean(x, valid)


class Mulan(nn.Module):
  """Both towers, their projections and the learned logit scale (log 1/T)."""
  config: MulanConfig

  def setup(self):
    cfg = self.config
    encoder = CnnAudioEncoder if cfg.audio_encoder == "cnn" else PatchTransformerAudioEncoder
    self.audio_encoder = encoder(cfg)
    self.text_encoder = TextEncoder(cfg)
    self.audio_projection = Projection((cfg.embed_dim,), ("embed", "mlp"), dtype=jnp.float32)
    self.text_projection = Projection((cfg.embed_dim,), ("embed", "mlp"), dtype=jnp.float32)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(-math.log(cfg.initial_temperature)), (),
        jnp.float32)

  def embed_audio(self, wav: jax.Array, lengths: jax.Array) -> jax.Array:
    """One window per row: `wav [batch, samples]`, `lengths [batch]` -> `[batch, embed_dim]`."""
    mel, valid = log_mel_features(self.config, wav, lengths)
    return l2_normalize(self.audio_projection(self.audio_encoder(mel, valid)))

  def embed_text(self, tokens: jax.Array) -> jax.Array:
    """`tokens` int `[batch, length]` -> L2-normalised `[batch, embed_dim]`."""
    return l2_normalize(self.text_projection(self.text_encoder(tokens)))

  def clipped_logit_scale(self) -> jax.Array:
    """`1 / T` with T in `[min_temperature, 1]`."""
    return jnp.exp(jnp.clip(self.logit_scale, 0.0, -math.log(self.config.min_temperature)))

  def __call__(self, wav: jax.Array, lengths: jax.Array, tokens: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(audio embeddings, text embeddings, logit scale) of paired rows."""
    return self.embed_audio(wav, lengths), self.embed_text(tokens), self.clipped_logit_scale()


# ---------------------------------------------------------------- loss


def contrastive_loss(audio_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE over the batch; row i of each is a positive pair.

  Under jit with the batch sharded over the data-parallel mesh, the
  `[batch, batch]` similarity matrix spans the global batch, so the
  negatives of every example come from all devices.

  Args:
    audio_emb, text_emb: L2-normalised `[batch, dim]`.
    logit_scale: scalar `1 / temperature`.
  Returns:
    the mean of the audio->text and text->audio cross-entropies, and sums
    over the batch: `loss` (of the symmetric per-pair loss), `audio_to_text_correct`,
    `text_to_audio_correct` (top-1 in-batch retrieval), `count`.
  """
  logits = logit_scale * (audio_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T)
  labels = jnp.arange(logits.shape[0])
  audio_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_audio = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  per_pair = 0.5 * (audio_to_text + text_to_audio)
  sums = {"loss": jnp.sum(per_pair),
          "audio_to_text_correct": jnp.sum(jnp.argmax(logits, axis=1) == labels
                                           ).astype(jnp.float32),
          "text_to_audio_correct": jnp.sum(jnp.argmax(logits, axis=0) == labels
                                           ).astype(jnp.float32),
          "count": jnp.asarray(logits.shape[0], jnp.float32)}
  return jnp.mean(per_pair), sums


# ---------------------------------------------------------------- clips


def clip_windows(wav: jax.Array, lengths: jax.Array, window: int, hop: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cuts `wav [batch, samples]` into windows starting every `hop` samples.

  The batch gets `max(1, (samples - window) // hop + 1)` windows (one
  zero-padded window when `samples < window`). Window k counts for example
  b when it is the first or lies within `lengths[b]`, so a row gives the
  same windows whatever longer rows share its batch.

  Returns:
    windows `[batch, n, window]`, their real lengths int32 `[batch, n]`
    (samples of the example inside the window), and float32 weights
    `[batch, n]` (1 for counted windows, else 0).
  """
  samples = wav.shape[1]
  if samples < window:
    wav = jnp.pad(wav, ((0, 0), (0, window - samples)))
  n = max(1, (samples - window) // hop + 1)
  starts = np.arange(n) * hop
  windows = wav[:, starts[:, None] + np.arange(window)[None, :]]
  window_lengths = jnp.clip(lengths[:, None] - starts[None, :], 0, window).astype(jnp.int32)
  counted = (starts[None, :] + window <= lengths[:, None]) | (starts[None, :] == 0)
  return windows, window_lengths, counted.astype(jnp.float32)


def embed_clips(module: Mulan, variables: Any, wav: jax.Array, lengths: jax.Array
                ) -> jax.Array:
  """Clip embeddings: the re-normalised mean of window embeddings.

  Args:
    module: the `Mulan` module.
    variables: `{"params": ...}`.
    wav: float32 `[batch, samples]` at `config.sample_rate`, zero-padded.
    lengths: int `[batch]` real samples per row (at least 1).
  Returns:
    L2-normalised float32 `[batch, embed_dim]`.
  """
  cfg = module.config
  windows, window_lengths, weights = clip_windows(wav, lengths, cfg.window_samples,
                                                  cfg.hop_samples)
  batch, n, window = windows.shape
  emb = module.apply(variables, windows.reshape(batch * n, window),
                     window_lengths.reshape(batch * n), method=Mulan.embed_audio)
  emb = emb.reshape(batch, n, -1)
  return l2_normalize(jnp.sum(emb * weights[..., None], axis=1))


# ---------------------------------------------------------------- trainer protocol


def _batch_lengths(batch: Batch) -> jax.Array:
  audio = batch["audio"]
  if "audio_lengths" in batch:
    return batch["audio_lengths"].astype(jnp.int32)
  return jnp.full(audio.shape[:1], audio.shape[1], jnp.int32)


@gin.configurable
class MulanModel:
  """MuLan for `musiclm train`: init, contrastive train/eval steps, costs, embedding.

  A batch holds `audio` float32 `[batch, window_samples]` (16 kHz, one
  window per row; optional `audio_lengths` int `[batch]`) and
  `text_tokens` int32 `[batch, max_text_length]` (0 = padding).
  """

  def __init__(self, config: MulanConfig = gin.REQUIRED):
    self.config = config
    self.module = Mulan(config)

  def _check_batch(self, batch: Batch) -> None:
    cfg = self.config
    audio, tokens = np.shape(batch["audio"]), np.shape(batch["text_tokens"])
    cfg.check_window_batch(audio, "MuLan")
    if len(tokens) != 2 or tokens[0] != audio[0]:
      raise ValueError(f"text_tokens of shape {tokens} do not pair with audio {audio}")

  def init_variables(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
    """`{"params": ...}` boxed with logical axes (MuLan has no other state)."""
    self._check_batch(batch)
    tokens = np.asarray(batch["text_tokens"])
    if tokens.size and tokens.max() >= self.config.text_vocab_size:
      raise ValueError(f"text token id {tokens.max()} >= text_vocab_size "
                       f"{self.config.text_vocab_size}: the tokenizer and MulanConfig disagree")
    audio = jnp.zeros((1, self.config.window_samples), jnp.float32)
    init = jax.jit(self.module.init)  # traced once: eager flax init is slow
    return dict(init({"params": rng}, audio, jnp.full((1,), audio.shape[1]),
                     jnp.ones((1, tokens.shape[1]), jnp.int32)))

  def loss(self, params: Any, batch: Batch
           ) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array]]:
    """Mean symmetric InfoNCE, its metric sums (`contrastive_loss`) and `1 / T`."""
    audio_emb, text_emb, scale = self.module.apply(
        {"params": params}, batch["audio"], _batch_lengths(batch), batch["text_tokens"])
    loss, sums = contrastive_loss(audio_emb, text_emb, scale)
    return loss, (sums, scale)

  def make_train_step(self, optimizer, num_microbatches: int = 1) -> Callable:
    """`(state, batch) -> (state, metrics)`: one gradient step with `optimizer.tx`.

    Metrics: `loss`, `temperature`, `accuracy` (in-batch top-1 retrieval,
    both directions averaged), `grad_norm`, `learning_rate`.
    """
    if num_microbatches != 1:
      raise ValueError(f"num_microbatches={num_microbatches}: MuLan's contrastive loss needs "
                       "the whole batch at once (its negatives); use 1")

    def train_step(state, batch):
      (loss, (sums, scale)), grads = jax.value_and_grad(self.loss, has_aux=True)(
          state.params, batch)
      updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
      new_state = state.replace(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state)
      accuracy = 0.5 * (sums["audio_to_text_correct"] + sums["text_to_audio_correct"]
                        ) / sums["count"]
      return new_state, {"loss": loss, "temperature": 1.0 / scale,
                         "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
                         "learning_rate": optimizer.schedule(state.step)}

    return train_step

  def make_eval_step(self) -> Callable:
    """`(state, batch) -> sums` of loss, correct retrievals and count."""
    def eval_step(state, batch):
      return self.loss(state.params, batch)[1][0]
    return eval_step

  def eval_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
    """Means over evaluated pairs: `loss`, `audio_to_text_accuracy`,
    `text_to_audio_accuracy` and their average `accuracy`."""
    count = max(float(sums["count"]), 1.0)
    a2t = float(sums["audio_to_text_correct"]) / count
    t2a = float(sums["text_to_audio_correct"]) / count
    return {"loss": float(sums["loss"]) / count, "audio_to_text_accuracy": a2t,
            "text_to_audio_accuracy": t2a, "accuracy": 0.5 * (a2t + t2a)}

  def train_cost(self, batch_size: int, batch: Batch):
    """Seconds of audio per step and FLOPs (3x the forward pass XLA counts)."""
    from musiclm_jax.training.metrics import TrainCost  # pylint: disable=g-import-not-at-top
    self._check_batch(batch)
    params = jax.eval_shape(lambda: nn.unbox(self.init_variables(jax.random.key(0), batch)))
    audio = jax.ShapeDtypeStruct((batch_size, self.config.window_samples), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch_size, np.shape(batch["text_tokens"])[1]), jnp.int32)
    forward = jax.jit(lambda p, a, t: self.loss(
        p["params"], {"audio": a, "text_tokens": t})[0]).lower(params, audio, tokens)
    cost = forward.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    return TrainCost("audio_seconds", batch_size * self.config.window_seconds,
                     3.0 * float(cost.get("flops", 0.0)))

  # -- embedding ---------------------------------------------------------------
  def embed_clips(self, variables: Any, wav: jax.Array, lengths: jax.Array) -> jax.Array:
    """See `embed_clips`; `wav [batch, samples]` at `config.sample_rate`."""
    return embed_clips(self.module, variables, wav, lengths)

  def embed_text(self, variables: Any, tokens: jax.Array) -> jax.Array:
    """`tokens` int `[batch, length]` -> L2-normalised `[batch, embed_dim]`."""
    return self.module.apply(variables, tokens, method=Mulan.embed_text)
