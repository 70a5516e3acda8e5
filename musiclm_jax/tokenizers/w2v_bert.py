"""w2v-BERT (Chung et al. 2021): the self-supervised encoder behind the semantic tokens.

16 kHz audio -> log-mel (80 bins, 10 ms hop) -> per-clip normalisation
(`W2vBertConfig.mel_norm`)
-> two 3x3 convolutions of stride 2 in time (x4 subsampling: 25 frames/s,
one frame per 640 samples) and 2 or 1 over the mel bins
(`W2vBertConfig.subsampling_freq_stride`) -> linear to `d_model` -> the
*contrastive module* (Conformer blocks) -> the *MLM module* (more Conformer
blocks).

Pre-training, on span-masked input (`span_mask`):

* a Gumbel-softmax quantiser turns the unmasked subsampled features into
  one of `codebook_size` codes per frame and its codebook vector; its input
  is a stop-gradient copy of the features, so that the feature encoder
  cannot make the targets trivial by collapsing;
* contrastive loss (wav2vec 2.0): at each masked frame the contrastive
  module's output must pick its own quantised target (cosine similarity /
  `temperature`) among `num_negatives` distractors drawn from the other
  masked frames of the whole batch (`negative_scope`; wav2vec 2.0 draws
  them from the same utterance; a distractor with the target's code is
  kept: excluding it would reward a collapsed codebook); plus the codebook
  diversity loss
  `(V - perplexity) / V` of the batch-averaged code distribution;
* MLM loss: the MLM module predicts the quantiser's code id at masked
  frames (cross-entropy).

`loss = contrastive + diversity_weight * diversity + mlm_weight * mlm`.

Semantic features are the hidden states after MLM layer `feature_layer`
(see `W2vBertConfig.semantic_layer`); `W2vBertModel.hidden_states` runs the
network only up to that layer.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax

from musiclm_jax.layers import spectral
from musiclm_jax.layers.conformer import conformer_stack, layer_norm
from musiclm_jax.layers.projection import Projection
from musiclm_jax.layers.relative_position import RelativePositionBias
from musiclm_jax.layers.transformer import HIDDEN_AXES, check_remat_policy
from musiclm_jax.training import steps
from musiclm_jax.training.metrics import TrainCost
from musiclm_jax.training.optimizers import Optimizer
from musiclm_jax.training.train_state import TrainState

SAMPLE_RATE = 16000
HOP_LENGTH = 160  # 10 ms: 100 log-mel frames per second
N_FFT = 400  # 25 ms windows
SUBSAMPLING = 4
SAMPLES_PER_FRAME = HOP_LENGTH * SUBSAMPLING  # 640 samples: 25 frames per second
FRAME_RATE = SAMPLE_RATE / SAMPLES_PER_FRAME
# The paper's semantic layer: AudioLM/MusicLM take the 7th of the 12 MLM layers
# of the 24-layer, 600M-parameter w2v-BERT.
PAPER_FEATURE_LAYER, PAPER_MLM_LAYERS = 7, 12
EVAL_MASK_SEED = 1234

Batch = dict[str, Any]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class W2vBertConfig:
  """Size and numerics of w2v-BERT; `gin/tokenizers/w2v_bert_*.gin` bind these.

  `base` (num_contrastive_layers = num_mlm_layers = 12, d_model 1024, 8 heads
  of 128, d_ff 4096, kernel 5) has about 600M parameters, the paper's XL.

  Attributes:
    feature_layer: MLM layer (1-based, counted inside the MLM module) whose
      output is the semantic feature; None: `semantic_layer`'s default rule.
    mel_norm: per-clip log-mel normalisation. "clip": subtract the clip's
      mean over time and bins and divide by its RMS, which removes the gain
      and keeps the spectral shape; "bin": subtract each bin's mean over time
      (speech's cepstral mean normalisation), which also removes a note or
      chord held through the clip (worse on music, see `W2vBertModel`).
    subsampling_freq_stride: stride over mel bins of each of the two
      subsampling convolutions. 2 (the speech Conformer's) keeps a quarter
      of the bins; 1 keeps every bin, the pitch resolution music needs (see
      `gin/tokenizers/w2v_bert_cpu.gin`) at a larger input projection.
  """
  d_model: int = 64
  num_heads: int = 4
  head_dim: int = 16
  d_ff: int = 256
  conv_kernel_size: int = 5
  num_contrastive_layers: int = 2
  num_mlm_layers: int = 2
  n_mels: int = 80
  subsampling_channels: int = 32
  subsampling_freq_stride: int = 2
  codebook_size: int = 1024
  code_dim: int = 256
  projection_dim: int = 256
  feature_layer: int | None = None
  dropout_rate: float = 0.0
  dtype: str = "bfloat16"
  remat_policy: str = "none"
  relpos_num_buckets: int = 32
  relpos_max_distance: int = 128
  attention_implementation: str | None = None
  mel_norm: str = "clip"

  def __post_init__(self):
    if self.mel_norm not in ("clip", "bin"):
      raise ValueError(f"mel_norm must be 'clip' or 'bin'; got {self.mel_norm!r}")
    check_remat_policy(self.remat_policy)
    if self.num_contrastive_layers < 1 or self.num_mlm_layers < 1:
      raise ValueError("w2v-BERT needs at least one contrastive and one MLM layer; got "
                       f"{self.num_contrastive_layers} and {self.num_mlm_layers}")
    if self.feature_layer is not None and not 1 <= self.feature_layer <= self.num_mlm_layers:
      raise ValueError(f"feature_layer {self.feature_layer} is outside the MLM module's "
                       f"layers 1..{self.num_mlm_layers}")
    if self.subsampling_freq_stride not in (1, 2):
      raise ValueError("subsampling_freq_stride must be 1 or 2; got "
                       f"{self.subsampling_freq_stride}")
    if self.conv_kernel_size % 2 == 0:
      raise ValueError(f"conv_kernel_size must be odd (centred); got {self.conv_kernel_size}")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def semantic_layer(self) -> int:
    """MLM layer (1-based) of the semantic features.

    `feature_layer` when set; otherwise the paper's 7th of 12 MLM layers
    scaled to this model, `max(1, round(7 * num_mlm_layers / 12))` with
    halves rounded up: layer 1 of 2 (tiny), 2 of 4 (small), 7 of 12 (base).
    """
    if self.feature_layer is not None:
      return self.feature_layer
    return max(1, int(PAPER_FEATURE_LAYER * self.num_mlm_layers / PAPER_MLM_LAYERS + 0.5))

  @property
  def num_layers(self) -> int:
    return self.num_contrastive_layers + self.num_mlm_layers

  def frame_matmul_params(self) -> int:
    """Multiply-adds per 25 Hz frame outside attention's score/value products."""
    d, c = self.d_model, self.subsampling_channels
    stride = self.subsampling_freq_stride
    mels_1, mels_2 = math.ceil(self.n_mels / stride), math.ceil(self.n_mels / stride**2)
    subsampling = 2 * mels_1 * 9 * c + mels_2 * 9 * c * c + mels_2 * c * d
    attention = 4 * d * self.num_heads * self.head_dim
    layer = 4 * d * self.d_ff + attention + 3 * d * d + self.conv_kernel_size * d
    heads = (d * self.codebook_size + self.codebook_size * self.code_dim
             + (self.code_dim + d) * self.projection_dim + d * self.codebook_size)
    return subsampling + self.num_layers * layer + heads

  def train_flops(self, batch_size: int, frames: int) -> float:
    """Forward + backward FLOPs of a step: 6 * params * frames + bidirectional attention."""
    attention = (4 * batch_size * frames**2 * self.num_heads * self.head_dim * 3
                 * self.num_layers)
    return 6 * self.frame_matmul_params() * batch_size * frames + attention


def num_frames(num_samples: int) -> int:
  """25 Hz frames of a 16 kHz clip: one per whole 640 samples."""
  return num_samples // SAMPLES_PER_FRAME


def span_mask(rng: jax.Array, batch_size: int, frames: int, start_prob: float,
              span_length: int) -> jax.Array:
  """wav2vec 2.0 span masking.

  Every frame starts a span with probability `start_prob`; a span masks
  `span_length` frames from its start (spans may overlap and are cut at
  the end). Away from the start, a frame is masked with probability
  `1 - (1 - start_prob) ** span_length`.

  Returns:
    bool `[batch, frames]`, True on masked frames.
  """
  starts = jax.random.bernoulli(rng, start_prob, (batch_size, frames)).astype(jnp.int32)
  count = jnp.cumsum(starts, axis=1)
  count_before = jnp.pad(count, ((0, 0), (span_length, 0)))[:, :frames]
  return count - count_before > 0


def sample_negatives(rng: jax.Array, mask: jax.Array, num_negatives: int) -> jax.Array:
  """Distractor frames for each masked frame: uniform over the clip's other masked frames.

  Drawn with replacement. A clip with a single masked frame draws an
  unmasked one instead.

  Args:
    mask: bool `[batch, frames]`.
  Returns:
    int32 `[batch, frames, num_negatives]` frame indices, never the frame itself.
  """
  batch_size, frames = mask.shape
  order = jnp.argsort(~mask, axis=1, stable=True)  # masked frames first
  rank = jnp.argsort(order, axis=1)  # position of each frame in `order`
  count = jnp.sum(mask, axis=1)
  high = jnp.maximum(count - 1, 1)[:, None, None]
  draw = jax.random.randint(rng, (batch_size, frames, num_negatives), 0, high)
  draw = jnp.minimum(draw + (draw >= rank[:, :, None]), frames - 1)
  return jax.vmap(lambda o, d: o[d])(order, draw).astype(jnp.int32)


def sample_flat_negatives(rng: jax.Array, mask: jax.Array, num_negatives: int,
                          scope: str) -> jax.Array:
  """Distractors as indices into the flattened `[batch * frames]` frames.

  Args:
    mask: bool `[batch, frames]`.
    scope: "clip": the clip's other masked frames (`sample_negatives`);
      "batch": any other masked frame of the batch; "mixed": half of them
      (rounded down) from the clip, the rest from the batch.
  Returns:
    int32 `[batch, frames, num_negatives]`, never the frame's own flat index.
  """
  batch_size, frames = mask.shape
  if scope == "mixed":
    clip_rng, batch_rng = jax.random.split(rng)
    from_clip = num_negatives // 2
    parts = [sample_flat_negatives(batch_rng, mask, num_negatives - from_clip, "batch")]
    if from_clip:
      parts.insert(0, sample_flat_negatives(clip_rng, mask, from_clip, "clip"))
    return jnp.concatenate(parts, axis=-1)
  if scope == "clip":
    offsets = (jnp.arange(batch_size, dtype=jnp.int32) * frames)[:, None, None]
    return sample_negatives(rng, mask, num_negatives) + offsets
  if scope == "batch":
    flat = sample_negatives(rng, mask.reshape(1, batch_size * frames), num_negatives)
    return flat.reshape(batch_size, frames, num_negatives)
  raise ValueError(f"negative scope must be 'clip', 'batch' or 'mixed'; got {scope!r}")


def gumbel_temperature(step: jax.Array, start: float, end: float, decay: float) -> jax.Array:
  """wav2vec 2.0's schedule: `max(start * decay ** step, end)`."""
  return jnp.maximum(start * jnp.power(decay, step.astype(jnp.float32)), end)


class W2vBertOutput(NamedTuple):
  """Pre-training outputs, each `[batch, frames, ...]`."""
  context: jax.Array  # contrastive module output, projected: [b, t, projection_dim]
  targets: jax.Array  # quantised targets, projected: [b, t, projection_dim]
  code_ids: jax.Array  # int32 [b, t], the quantiser's codes (MLM targets)
  code_probs: jax.Array  # float32 [codebook_size], batch-averaged softmax
  mlm_logits: jax.Array  # float32 [b, t, codebook_size]


class ConvSubsampling(nn.Module):
  """Log-mel `[batch, 4 * frames, n_mels]` -> `[batch, frames, d_model]`: two 3x3
  convolutions of stride 2 in time and `freq_stride` over the bins."""
  channels: int
  d_model: int
  dtype: Any
  freq_stride: int = 2

  @nn.compact
  def __call__(self, mel: jax.Array) -> jax.Array:
    h = mel[..., None].astype(self.dtype)
    for i in range(2):
      h = nn.Conv(self.channels, (3, 3), strides=(2, self.freq_stride), padding="SAME",
                  dtype=self.dtype, param_dtype=jnp.float32, name=f"conv_{i}")(h)
      h = nn.relu(h)
    h = h.reshape(h.shape[0], h.shape[1], -1)  # [batch, frames, mels / stride² * channels]
    h = Projection((self.d_model,), (None, "embed"), dtype=self.dtype, name="proj")(h)
    return nn.with_logical_constraint(h, HIDDEN_AXES)


class GumbelQuantizer(nn.Module):
  """One codebook; straight-through one-hot of the (Gumbel-)softmax's argmax.

  Training uses `softmax((logits + g) / temperature)` with Gumbel noise `g`
  when `gumbel_noise` (wav2vec 2.0), else without noise (a straight-through
  softmax). With `deterministic` the code is the argmax of the logits.
  """
  codebook_size: int
  code_dim: int
  dtype: Any
  gumbel_noise: bool

  @nn.compact
  def __call__(self, x: jax.Array, temperature: jax.Array, deterministic: bool
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x `[b, t, embed]` -> (codebook vectors `[b, t, code_dim]`, ids int32 `[b, t]`,
    batch-averaged softmax `[codebook_size]`)."""
    logits = Projection((self.codebook_size,), ("embed", "vocab"), dtype=self.dtype,
                        name="logits")(x).astype(jnp.float32)
    if deterministic:
      ids = jnp.argmax(logits, axis=-1)
      weights = jax.nn.one_hot(ids, self.codebook_size)
    else:
      if self.gumbel_noise:
        logits_noisy = logits + jax.random.gumbel(self.make_rng("gumbel"), logits.shape)
      else:
        logits_noisy = logits
      soft = jax.nn.softmax(logits_noisy / temperature, axis=-1)
      ids = jnp.argmax(soft, axis=-1)
      hard = jax.nn.one_hot(ids, self.codebook_size)
      weights = hard + soft - jax.lax.stop_gradient(soft)
    codebook = self.param("codebook", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")),
                          (self.codebook_size, self.code_dim), jnp.float32)
    vectors = weights.astype(self.dtype) @ codebook.astype(self.dtype)
    probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=(0, 1))
    return vectors, ids.astype(jnp.int32), probs


class W2vBert(nn.Module):
  """The network; `__call__` for pre-training, `hidden_states` for features.

  Attributes:
    config: sizes.
    deterministic: no dropout and no Gumbel noise (evaluation, inference).
    gumbel_noise: see `GumbelQuantizer`.
  """
  config: W2vBertConfig
  deterministic: bool = True
  gumbel_noise: bool = False

  def setup(self):
    cfg = self.config
    dtype = cfg.compute_dtype
    self.subsampling = ConvSubsampling(cfg.subsampling_channels, cfg.d_model, dtype,
                                       cfg.subsampling_freq_stride)
    self.feature_norm = layer_norm(dtype, None)
    self.relpos_bias = RelativePositionBias(cfg.num_heads, cfg.relpos_num_buckets,
                                            cfg.relpos_max_distance, dtype)
    layer_kwargs = dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, d_ff=cfg.d_ff,
                        kernel_size=cfg.conv_kernel_size, dropout_rate=cfg.dropout_rate,
                        dtype=dtype, attention_implementation=cfg.attention_implementation,
                        deterministic=self.deterministic)
    self.contrastive_layers = conformer_stack(cfg.num_contrastive_layers,
                                              cfg.remat_policy)(**layer_kwargs)
    self.mlm_layers = conformer_stack(cfg.num_mlm_layers, cfg.remat_policy)(**layer_kwargs)
    self.mask_embedding = self.param(
        "mask_embedding", nn.with_logical_partitioning(nn.initializers.uniform(1.0),
                                                       ("embed",)),
        (cfg.d_model,), jnp.float32)
    self.quantizer = GumbelQuantizer(cfg.codebook_size, cfg.code_dim, dtype,
                                     self.gumbel_noise)
    self.context_proj = Projection((cfg.projection_dim,), ("embed", "mlp"), dtype=dtype)
    self.target_proj = Projection((cfg.projection_dim,), (None, "mlp"), dtype=dtype)
    self.mlm_head = Projection((cfg.codebook_size,), ("embed", "vocab"), dtype=dtype)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def features(self, wav: jax.Array) -> jax.Array:
    """16 kHz `[batch, samples]` -> subsampled features `[batch, samples // 640, d_model]`."""
    frames = num_frames(wav.shape[-1])
    if frames < 1:
      raise ValueError(f"audio of {wav.shape[-1]} samples is shorter than one "
                       f"{SAMPLES_PER_FRAME}-sample w2v-BERT frame")
    mel = spectral.log_mel_spectrogram(wav, SAMPLE_RATE, N_FFT, HOP_LENGTH,
                                       self.config.n_mels)
    mel = mel[:, :frames * SUBSAMPLING]  # drop the centred STFT's extra frame
    mean_axes = (1,) if self.config.mel_norm == "bin" else (1, 2)
    mel = mel - jnp.mean(mel, axis=mean_axes, keepdims=True)
    mel = mel * jax.lax.rsqrt(jnp.mean(jnp.square(mel), axis=(1, 2), keepdims=True) + 1e-2)
    return self.feature_norm(self.subsampling(mel))

  def _encode(self, x: jax.Array, stacks) -> list[tuple[jax.Array, jax.Array]]:
    """Per stack: (last output `[b, t, d]`, every layer's `[layers, b, t, d]`)."""
    positions = jnp.arange(x.shape[1])
    bias = self.relpos_bias(positions, positions)
    mask = jnp.ones((x.shape[0], 1, x.shape[1], x.shape[1]), bool)
    outputs = []
    for stack in stacks:
      x, layers = stack(x, bias, mask)
      outputs.append((x, layers))
    return outputs

  def hidden_states(self, wav: jax.Array) -> jax.Array:
    """Output of the last MLM layer (unmasked input, no dropout): `[batch, frames, d_model]`."""
    x = self.features(wav)
    return self._encode(x, (self.contrastive_layers, self.mlm_layers))[-1][0]

  def layer_outputs(self, wav: jax.Array) -> jax.Array:
    """Every layer's output (unmasked input, no dropout), in `layer_names` order.

    Returns:
      `[1 + num_layers, batch, frames, d_model]`: the subsampled input
      features, then the contrastive layers, then the MLM layers.
    """
    x = self.features(wav)
    (_, contrastive), (_, mlm) = self._encode(x, (self.contrastive_layers, self.mlm_layers))
    return jnp.concatenate([x[None], contrastive, mlm])

  def __call__(self, wav: jax.Array, mask: jax.Array, temperature: jax.Array
               ) -> W2vBertOutput:
    """Pre-training forward pass.

    Args:
      wav: float32 `[batch, samples]` at 16 kHz.
      mask: bool `[batch, samples // 640]`, True where the input is masked.
      temperature: Gumbel-softmax temperature (unused when deterministic).
    """
    x = self.features(wav)
    if mask.shape != x.shape[:2]:
      raise ValueError(f"mask of shape {mask.shape} does not match the "
                       f"{x.shape[:2]} (batch, frames) of the audio")
    vectors, ids, probs = self.quantizer(jax.lax.stop_gradient(x), temperature,
                                         self.deterministic)
    masked = jnp.where(mask[..., None], self.mask_embedding.astype(x.dtype), x)
    masked = self.dropout(masked, deterministic=self.deterministic)
    (context, _), (mlm_out, _) = self._encode(masked,
                                              (self.contrastive_layers, self.mlm_layers))
    return W2vBertOutput(
        context=self.context_proj(context).astype(jnp.float32),
        targets=self.target_proj(vectors).astype(jnp.float32),
        code_ids=ids, code_probs=probs,
        mlm_logits=self.mlm_head(mlm_out).astype(jnp.float32))


def truncate_mlm_layers(params: Any, num_mlm_layers: int) -> Any:
  """Parameters with only the first `num_mlm_layers` MLM layers (for `hidden_states`)."""
  params = dict(params)
  params["mlm_layers"] = jax.tree.map(lambda p: p[:num_mlm_layers], params["mlm_layers"])
  return params


@gin.configurable
class W2vBertModel:
  """w2v-BERT pre-training for the generic trainer (`train.model = @W2vBertModel()`).

  Batches are `{"audio": float32 [batch, samples]}` at 16 kHz
  (`AudioClipTask(sample_rate=16000)`).

  Args:
    config: network size.
    mask_start_prob: probability that a frame starts a masked span.
    mask_span: masked span length in 25 Hz frames.
    num_negatives: contrastive distractors per masked frame.
    contrastive_temperature: divides the cosine similarities.
    diversity_weight: weight of the codebook diversity loss.
    mlm_weight: weight of the MLM loss.
    gumbel_start, gumbel_end, gumbel_decay: quantiser softmax temperature
      schedule `max(start * decay ** step, end)`.
    gumbel_noise: add Gumbel noise to the quantiser logits in training
      (wav2vec 2.0). Off by default: on small models and batches the noisy
      codes made the code distribution go uniform per frame and the
      contrastive loss stall at log(1 + num_negatives) for hundreds of steps,
      while the noise-free straight-through softmax trains (see the tests).
    negative_scope: where distractors come from: "batch" (default), any
      other masked frame of the (micro)batch, or "clip", the clip's own
      masked frames (wav2vec 2.0). Music holds a note or chord for many
      frames, so a clip's masked frames mostly share their target: with
      "clip" negatives the tiny model on `gm_synth` clips (4 s) collapsed its
      masked-frame outputs to one vector orthogonal to every target and the
      contrastive loss sat at exactly log(1 + num_negatives); with "batch"
      negatives and `mel_norm="clip"` it falls (3.93 -> 3.35 in 300 steps).
      "mixed" takes half of the distractors from the clip and half from the
      batch: the batch half keeps the loss from collapsing, the clip half
      asks the model to tell apart the notes and chords of one clip, not just
      its instruments (`gin/tokenizers/w2v_bert_cpu.gin`).
  """

  def __init__(self, config: W2vBertConfig = gin.REQUIRED, mask_start_prob: float = 0.065,
               mask_span: int = 10, num_negatives: int = 100,
               contrastive_temperature: float = 0.1, diversity_weight: float = 0.1,
               mlm_weight: float = 1.0, gumbel_start: float = 2.0, gumbel_end: float = 0.5,
               gumbel_decay: float = 0.999995, gumbel_noise: bool = False,
               negative_scope: str = "batch"):
    if not 0.0 < mask_start_prob < 1.0:
      raise ValueError(f"mask_start_prob must be in (0, 1); got {mask_start_prob}")
    if mask_span < 1 or num_negatives < 1:
      raise ValueError(f"mask_span ({mask_span}) and num_negatives ({num_negatives}) "
                       "must be positive")
    self.config = config
    self.mask_start_prob = mask_start_prob
    self.mask_span = mask_span
    self.num_negatives = num_negatives
    if negative_scope not in ("clip", "batch", "mixed"):
      raise ValueError("negative_scope must be 'clip', 'batch' or 'mixed'; got "
                       f"{negative_scope!r}")
    self.negative_scope = negative_scope
    self.contrastive_temperature = contrastive_temperature
    self.diversity_weight = diversity_weight
    self.mlm_weight = mlm_weight
    self.gumbel_schedule = (gumbel_start, gumbel_end, gumbel_decay)
    self.module = W2vBert(config, deterministic=True)
    self.train_module = W2vBert(config, deterministic=False, gumbel_noise=gumbel_noise)

  # -- pieces ------------------------------------------------------------------
  def sample_mask(self, rng: jax.Array, audio: jax.Array) -> jax.Array:
    """bool `[batch, frames]` span mask for `audio [batch, samples]`."""
    return span_mask(rng, audio.shape[0], num_frames(audio.shape[-1]),
                     self.mask_start_prob, self.mask_span)

  def init_variables(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
    """`{"params": ...}` boxed with logical axes, for one example batch."""
    audio = jnp.asarray(batch["audio"][:1], jnp.float32)
    mask = self.sample_mask(rng, audio)
    return dict(self.module.init({"params": rng}, audio, mask, jnp.ones(())))

  def loss_sums(self, params: Any, audio: jax.Array, mask: jax.Array,
                temperature: jax.Array, rng: jax.Array | None
                ) -> tuple[dict[str, jax.Array], jax.Array]:
    """Summed losses over the masked frames of a batch and the diversity loss.

    Args:
      rng: dropout, Gumbel noise and distractors; None: deterministic
        (distractors from a fixed seed).
    Returns:
      sums: `contrastive`, `mlm`, `contrastive_correct`, `mlm_correct`,
        `masked` (number of masked frames), `frames`.
      diversity: scalar `(V - perplexity) / V` of this batch's code usage.
    """
    deterministic = rng is None
    rng = jax.random.PRNGKey(EVAL_MASK_SEED) if rng is None else rng
    negatives_rng, gumbel_rng, dropout_rng = jax.random.split(rng, 3)
    module = self.module if deterministic else self.train_module
    out = module.apply({"params": params}, audio, mask, temperature,
                       rngs={"gumbel": gumbel_rng, "dropout": dropout_rng})
    weights = mask.astype(jnp.float32)

    # Contrastive: positive at index 0, then the distractors.
    negatives = sample_flat_negatives(negatives_rng, mask, self.num_negatives,
                                      self.negative_scope)
    context = out.context / (jnp.linalg.norm(out.context, axis=-1, keepdims=True) + 1e-6)
    targets = out.targets / (jnp.linalg.norm(out.targets, axis=-1, keepdims=True) + 1e-6)
    positive = jnp.sum(context * targets, axis=-1, keepdims=True)  # [b, t, 1]
    distractors = targets.reshape(-1, targets.shape[-1])[negatives]  # [b, t, n, p]
    negative = jnp.einsum("btp,btnp->btn", context, distractors)
    logits = jnp.concatenate([positive, negative], axis=-1) / self.contrastive_temperature
    contrastive = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.zeros(mask.shape, jnp.int32))
    # Strictly above every distractor: a tie (e.g. a constant context) is not a hit.
    contrastive_correct = positive[..., 0] > jnp.max(negative, axis=-1)

    mlm = optax.softmax_cross_entropy_with_integer_labels(out.mlm_logits, out.code_ids)
    mlm_correct = jnp.argmax(out.mlm_logits, axis=-1) == out.code_ids

    size = self.config.codebook_size
    perplexity = jnp.exp(-jnp.sum(out.code_probs * jnp.log(out.code_probs + 1e-7)))
    sums = {"contrastive": jnp.sum(contrastive * weights),
            "mlm": jnp.sum(mlm * weights),
            "contrastive_correct": jnp.sum(contrastive_correct * weights),
            "mlm_correct": jnp.sum(mlm_correct * weights),
            "masked": jnp.sum(weights),
            "frames": jnp.asarray(mask.size, jnp.float32),
            "code_perplexity": perplexity}
    return sums, (size - perplexity) / size

  # -- trainer protocol ----------------------------------------------------------
  def make_train_step(self, optimizer: Optimizer, num_microbatches: int = 1
                      ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`(state, batch) -> (state, metrics)`; gradients accumulated over microbatches.

    The masks of the whole batch are drawn first, so the losses are
    normalised by the batch's total masked frames for any `num_microbatches`.
    """
    def train_step(state: TrainState, batch: Batch):
      rng = jax.random.fold_in(state.rng, state.step)
      mask_rng, loss_rng = jax.random.split(rng)
      audio = batch["audio"].astype(jnp.float32)
      mask = self.sample_mask(mask_rng, audio)
      num_masked = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
      temperature = gumbel_temperature(state.step, *self.gumbel_schedule)

      def loss_fn(params, micro_audio, micro_mask, micro_rng):
        sums, diversity = self.loss_sums(params, micro_audio, micro_mask, temperature,
                                         micro_rng)
        loss = ((sums["contrastive"] + self.mlm_weight * sums["mlm"]) / num_masked
                + self.diversity_weight * diversity / num_microbatches)
        return loss, dict(sums, diversity=diversity / num_microbatches,
                          code_perplexity=sums["code_perplexity"] / num_microbatches)

      grad_fn = jax.grad(loss_fn, has_aux=True)
      if num_microbatches == 1:
        grads, sums = grad_fn(state.params, audio, mask, loss_rng)
      else:
        micro = steps.split_microbatches({"audio": audio, "mask": mask}, num_microbatches)
        rngs = jax.random.split(loss_rng, num_microbatches)

        def accumulate(acc, xs):
          out = grad_fn(state.params, xs["audio"], xs["mask"], xs["rng"])
          return jax.tree.map(jnp.add, acc, out), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.eval_shape(grad_fn, state.params, first["audio"], first["mask"], rngs[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, dict(micro, rng=rngs))
      updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
      new_state = state.replace(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state)
      metrics = self._metrics(sums)
      metrics.update(grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                     learning_rate=optimizer.schedule(state.step),
                     gumbel_temperature=temperature)
      return new_state, metrics

    return train_step

  def _metrics(self, sums: dict[str, Any]) -> dict[str, Any]:
    """Means from sums (jnp or float); `loss` is the training objective."""
    masked = jnp.maximum(sums["masked"], 1.0)
    contrastive, mlm = sums["contrastive"] / masked, sums["mlm"] / masked
    return {"loss": contrastive + self.mlm_weight * mlm
                    + self.diversity_weight * sums["diversity"],
            "contrastive_loss": contrastive, "mlm_loss": mlm,
            "diversity_loss": sums["diversity"],
            "accuracy": sums["mlm_correct"] / masked,
            "contrastive_accuracy": sums["contrastive_correct"] / masked,
            "code_perplexity": sums["code_perplexity"],
            "masked_fraction": sums["masked"] / jnp.maximum(sums["frames"], 1.0)}

  def make_eval_step(self) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """`(state, batch) -> sums` with fixed masks and distractors, no noise or dropout."""
    def eval_step(state: TrainState, batch: Batch):
      audio = batch["audio"].astype(jnp.float32)
      mask = self.sample_mask(jax.random.PRNGKey(EVAL_MASK_SEED), audio)
      sums, diversity = self.loss_sums(state.params, audio, mask, jnp.ones(()), None)
      return dict(sums, diversity=diversity, batches=jnp.ones(()))
    return eval_step

  def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
    """Means of summed eval-step outputs over evaluation batches."""
    batches = max(sums["batches"], 1.0)
    averaged = dict(sums, diversity=sums["diversity"] / batches,
                    code_perplexity=sums["code_perplexity"] / batches)
    return {k: float(v) for k, v in self._metrics(averaged).items()}

  def train_cost(self, batch_size: int, batch: Batch) -> TrainCost:
    """Seconds of audio per step and the model FLOPs of a step."""
    samples = batch["audio"].shape[-1]
    return TrainCost("audio_seconds", batch_size * samples / SAMPLE_RATE,
                     self.config.train_flops(batch_size, num_frames(samples)))

  # -- inference -----------------------------------------------------------------
  def layer_names(self) -> list[str]:
    """Names of `layer_outputs`' rows: "input", "contrastive_1", ..., "mlm_1", ..."""
    cfg = self.config
    return (["input"] + [f"contrastive_{i}" for i in range(1, cfg.num_contrastive_layers + 1)]
            + [f"mlm_{i}" for i in range(1, cfg.num_mlm_layers + 1)])

  def layer_outputs(self, params: Any, wav: jax.Array, dtype: str | None = None) -> jax.Array:
    """Every layer's output: float32 `[1 + num_layers, batch, samples // 640, d_model]`
    (rows named by `layer_names`); `dtype` as in `hidden_states`."""
    module = W2vBert(dataclasses.replace(self.config, dtype=dtype or self.config.dtype))
    return module.apply({"params": params}, jnp.asarray(wav, jnp.float32),
                        method=W2vBert.layer_outputs).astype(jnp.float32)

  def hidden_states(self, params: Any, wav: jax.Array, mlm_layer: int | None = None,
                    dtype: str | None = None) -> jax.Array:
    """Output of MLM layer `mlm_layer` (default `config.semantic_layer`).

    Runs the network only up to that layer.

    Args:
      params: the trained parameters (unboxed).
      wav: float32 `[batch, samples]` at 16 kHz.
      mlm_layer: 1-based MLM layer.
      dtype: compute dtype; default the config's (training) dtype.
    Returns:
      float32 `[batch, samples // 640, d_model]`.
    """
    layer = self.config.semantic_layer if mlm_layer is None else mlm_layer
    if not 1 <= layer <= self.config.num_mlm_layers:
      raise ValueError(f"mlm_layer {layer} is outside 1..{self.config.num_mlm_layers}")
    module = W2vBert(dataclasses.replace(self.config, num_mlm_layers=layer,
                                         feature_layer=None, dtype=dtype or self.config.dtype))
    return module.apply({"params": truncate_mlm_layers(params, layer)},
                        jnp.asarray(wav, jnp.float32),
                        method=W2vBert.hidden_states).astype(jnp.float32)
