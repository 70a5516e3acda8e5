"""Melody embeddings and melody tokens `T_mel` (MusicLM, appendix C).

A `MelodyEncoder` maps a window of audio (4 s at 16 kHz by default) to an
L2-normalised embedding (192-d) in which renditions of one melody (other
instrument, key, register, tempo, accompaniment, hummed) lie close together
and other melodies far away:

  audio -> power on a semitone grid (STFT through triangular filters centred
  on MIDI pitches, `layers/spectral.py`), with `pitch_classes` summed over
  octaves into 12 pitch classes -> log, relative to the window's peak ->
  2-D convolutions over (time, pitch) -> per frame, the pitch axis flattened
  (`pitch_pooling='flatten'`) or maxed over (`'max'`, which keeps little of
  the contour) -> Transformer over time -> mean over time -> projection.

With `pitch_classes` the embedding is invariant to key and register by
construction: the convolutions wrap around the circle of pitch classes, the
rest of the encoder runs on all 12 rotations of their output (one per
transposition) and the 12 embeddings are max-pooled. Without it (semitone
grid, the only recipe before 2026-12-07) the invariance must be learnt from
the transposed renditions, and on the 1000-melody CPU corpus it was not: a
test rendition found its melody among 100 in 8 % of queries, against 73 %
with pitch classes (`benchmarks/RESULTS.md`, "Melody conditioning on CPU").

It is trained (`MelodyModel`, generic trainer) with the semi-hard triplet
loss on batches of K melodies x R renditions (`MelodyTask` reads the
`melody_renditions` corpus of `corpora/melody_pairs.py`). A clip is embedded
every `hop_seconds` (`melody_embeddings`: `[batch, windows, D]`), and an RVQ
fitted by k-means on the train clips' window embeddings (24 x 512 in the
paper) turns them into melody tokens (`melody_tokens`: int32
`[batch, windows, Q]`), saved next to the checkpoints as
`MODEL_DIR/melody_rvq.npz` plus `melody_rvq.json`, like MuLan's (both through
`embedding_rvq`).

A user's recording is checked before it is tokenized
(`check_melody_recording`): at least one window long, not silent, and not
noise only (`pitch_salience`: too few frames with a semitone standing out
of its octave).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from musiclm_jax import audio as audio_lib
from musiclm_jax.layers import quantizers
from musiclm_jax.layers import spectral
from musiclm_jax.layers.projection import Projection
from musiclm_jax.layers.transformer import DecoderConfig
from musiclm_jax.tokenizers import embedding_rvq
from musiclm_jax.tokenizers import mulan

Batch = Mapping[str, Any]
PITCH_POOLINGS = ("max", "flatten")
RVQ_FILES = embedding_rvq.RvqFiles(name="melody_rvq", what="melody",
                                   fit_hint="`musiclm melody fit_rvq`", gin_name="fit_melody_rvq")
RVQ_FILE = RVQ_FILES.npz_file
RVQ_MANIFEST_FILE = RVQ_FILES.manifest_file
# Log power below the window's peak by more than this (natural log, ~70 dB) is floor.
DYNAMIC_RANGE = 16.0


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MelodyConfig(mulan.AudioWindowsConfig):
  """Front end, encoder sizes and loss; `gin/tokenizers/melody_{tiny,small}.gin`."""
  embed_dim: int = 192
  # front end: `sample_rate` audio, one frame per `hop_length` samples, one
  # bin per semitone from `min_pitch` to `max_pitch` (MIDI numbers)
  sample_rate: int = 16000
  window_seconds: float = 4.0
  hop_seconds: float = 3.0
  n_fft: int = 2048
  hop_length: int = 320
  min_pitch: int = 36
  max_pitch: int = 108
  # Fold the semitone grid into 12 pitch classes (register invariance) and
  # max-pool the embeddings of all 12 transpositions (key invariance; 12x the
  # work after the convolutions). Every gin recipe sets it; the default False
  # is what checkpoints that predate the field were trained with.
  pitch_classes: bool = False
  # encoder
  conv_channels: tuple[int, ...] = (32, 64)
  conv_kernel: tuple[int, int] = (3, 7)  # (frames, semitones)
  pitch_pooling: str = "flatten"
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  head_dim: int = 64
  d_ff: int = 1024
  # semi-hard triplet loss on squared distances of unit vectors (in [0, 4])
  margin: float = 0.2
  dtype: str = "float32"

  def __post_init__(self):
    if self.pitch_pooling not in PITCH_POOLINGS:
      raise ValueError(f"pitch_pooling {self.pitch_pooling!r} is not one of {PITCH_POOLINGS}")
    if not 0 <= self.min_pitch < self.max_pitch:
      raise ValueError(f"need 0 <= min_pitch < max_pitch; got {self.min_pitch}, "
                       f"{self.max_pitch}")
    if _pitch_hz(self.max_pitch + 1) >= self.sample_rate / 2:
      raise ValueError(f"max_pitch {self.max_pitch} lies above the Nyquist frequency of "
                       f"{self.sample_rate} Hz")
    self.check_windows()
    if not self.conv_channels:
      raise ValueError("conv_channels must name at least one layer")
    if self.margin <= 0:
      raise ValueError(f"margin must be positive, got {self.margin}")
    object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
    object.__setattr__(self, "conv_kernel", tuple(self.conv_kernel))

  @property
  def num_pitches(self) -> int:
    return self.max_pitch - self.min_pitch + 1

  def encoder_config(self) -> DecoderConfig:
    """The `DecoderConfig` of the Transformer blocks (every field given, so no
    gin binding of `DecoderConfig` leaks in)."""
    return DecoderConfig(num_layers=self.num_layers, num_heads=self.num_heads,
                         head_dim=self.head_dim, d_model=self.d_model, d_ff=self.d_ff,
                         vocab_size=1, dropout_rate=0.0, dtype=self.dtype, remat_policy="none",
                         relpos_num_buckets=32, relpos_max_distance=128,
                         attention_implementation=None)


# ---------------------------------------------------------------- front end


def _pitch_hz(pitch: float) -> float:
  return 440.0 * 2.0 ** ((pitch - 69.0) / 12.0)


@functools.lru_cache(maxsize=16)
def semitone_filterbank(sample_rate: int, n_fft: int, min_pitch: int,
                        max_pitch: int) -> np.ndarray:
  """Triangular filters centred on MIDI pitches, each reaching its neighbours.

  Returns:
    float32 `[n_fft // 2 + 1, max_pitch - min_pitch + 1]`, columns summing to
    1 where a filter covers at least one FFT bin (a low pitch narrower than a
    bin takes the nearest bin).
  """
  bin_pitch = 69.0 + 12.0 * np.log2(np.maximum(
      np.linspace(0, sample_rate / 2, n_fft // 2 + 1), 1e-3) / 440.0)
  pitches = np.arange(min_pitch, max_pitch + 1, dtype=np.float64)
  weights = np.maximum(0.0, 1.0 - np.abs(bin_pitch[:, None] - pitches[None, :]))
  empty = weights.sum(axis=0) == 0
  weights[np.argmin(np.abs(bin_pitch[:, None] - pitches[None, empty]), axis=0),
          np.flatnonzero(empty)] = 1.0
  return (weights / weights.sum(axis=0, keepdims=True)).astype(np.float32)


def semitone_power(config: MelodyConfig, wav: jax.Array) -> jax.Array:
  """Power on the semitone grid.

  Args:
    wav: float `[batch, window_samples]` at `config.sample_rate`.
  Returns:
    float32 `[batch, frames, num_pitches]`, pitch `config.min_pitch + i` in bin i.
  """
  power = jnp.square(jnp.abs(spectral.stft(wav, config.n_fft, config.hop_length)))
  return power @ semitone_filterbank(config.sample_rate, config.n_fft, config.min_pitch,
                                     config.max_pitch)


def fold_octaves(config: MelodyConfig, power: jax.Array) -> jax.Array:
  """Semitone-grid power `[..., num_pitches]` summed per pitch class: `[..., 12]`,
  C in bin 0 (MIDI pitch p goes to bin p mod 12)."""
  pitch_class = (config.min_pitch + np.arange(config.num_pitches)) % 12
  return power @ jnp.asarray(np.eye(12, dtype=np.float32)[pitch_class])


def _relative_log_power(power: jax.Array) -> jax.Array:
  """`[batch, frames, bins]` power -> log power in `[0, 1]` relative to each
  window's peak (1 at the peak, 0 at DYNAMIC_RANGE below it or lower)."""
  log_power = jnp.log(power + 1e-10)
  peak = jnp.max(log_power, axis=(1, 2), keepdims=True)
  return jnp.clip(1.0 + (log_power - peak) / DYNAMIC_RANGE, 0.0, 1.0)


def pitch_features(config: MelodyConfig, wav: jax.Array) -> jax.Array:
  """The encoder's input: log power on the semitone grid, or per pitch class
  when `config.pitch_classes`, relative to each window's peak.

  Args:
    wav: float `[batch, window_samples]` at `config.sample_rate`.
  Returns:
    float32 `[batch, frames, bins]` in `[0, 1]` (invariant to the level), bins
    `config.num_pitches` or 12.
  """
  power = semitone_power(config, wav)
  if config.pitch_classes:
    power = fold_octaves(config, power)
  return _relative_log_power(power)


# A frame is pitched when a semitone's log power stands this far (natural log,
# ~13 dB) above the mean log power of the octave around it; noise of any
# colour stays below ~2, a hum, a whistle or an instrument reaches 4-10.
PITCH_SALIENCE = 3.0
# A melody recording needs at least this fraction of pitched frames.
MIN_PITCHED_FRACTION = 0.2


def pitch_salience(config: MelodyConfig, wav: np.ndarray) -> np.ndarray:
  """Per frame, how far the strongest semitone stands above its octave.

  Args:
    wav: float `[samples]` at `config.sample_rate`.
  Returns:
    float32 `[frames]`: max over pitches of log power (smoothed over 3 frames)
    minus its mean over the 13 semitones centred on it (edges held).
  """
  power = np.asarray(semitone_power(config, jnp.asarray(wav, jnp.float32)[None]))[0]
  padded = np.pad(power, ((1, 1), (0, 0)), mode="edge")
  log_power = np.log((padded[:-2] + padded[1:-1] + padded[2:]) / 3.0 + 1e-10)
  rows = np.pad(log_power, ((0, 0), (6, 6)), mode="edge")
  cumulative = np.pad(np.cumsum(rows, axis=1), ((0, 0), (1, 0)))
  local_mean = (cumulative[:, 13:] - cumulative[:, :-13]) / 13.0
  return np.max(log_power - local_mean, axis=1).astype(np.float32)


def check_melody_recording(config: MelodyConfig, wav: np.ndarray,
                           name: str = "the melody recording") -> np.ndarray:
  """Refuses a recording that cannot give a melody; returns it repaired.

  Args:
    wav: float `[samples]` at `config.sample_rate`.
  Returns:
    float32 `[samples]` (a few non-finite samples zeroed, a peak above full
    scale scaled down: `audio.check_and_repair`).
  Raises:
    audio.AudioError (a ValueError) with reason "too_short" (less than one
    melody window), "silent", "non_finite", "clipped" or "unpitched" (fewer
    than MIN_PITCHED_FRACTION of the frames hold a pitch: noise only).
  """
  wav = np.asarray(wav, np.float32)
  if wav.ndim != 1:
    raise ValueError(f"{name} must be mono [samples]; got shape {wav.shape}")
  if len(wav) < config.window_samples:
    raise audio_lib.AudioError(
        "too_short", f"{name} lasts {len(wav) / config.sample_rate:.2f} s, shorter than one "
        f"melody window ({config.window_seconds} s); record at least that much")
  wav = audio_lib.check_and_repair(wav, audio_lib.Repairs(), name=name)
  pitched = float(np.mean(pitch_salience(config, wav) > PITCH_SALIENCE))
  if pitched < MIN_PITCHED_FRACTION:
    raise audio_lib.AudioError(
        "unpitched", f"{name} holds no melody: only {pitched:.0%} of its frames have a "
        f"clear pitch (need {MIN_PITCHED_FRACTION:.0%}); it sounds like noise only. Hum, "
        "whistle or play the tune closer to the microphone")
  return wav


# ---------------------------------------------------------------- encoder


class MelodyEncoder(nn.Module):
  """`wav [batch, window_samples]` -> L2-normalised float32 `[batch, embed_dim]`.

  With `config.pitch_classes`, the convolutions wrap around the circle of
  pitch classes, so transposing the input rolls their output along it; the
  rest of the encoder then runs on all 12 rolls of that output (one roll per
  transposition, the convolutions computed once) and each embedding
  dimension takes its largest value over the 12 (averaging them instead
  washed out what tells melodies apart: the tiny encoder then could not
  overfit 6 melodies).
  """
  config: MelodyConfig

  def __call__(self, wav: jax.Array) -> jax.Array:
    return self.embed_features(pitch_features(self.config, wav))

  @nn.compact
  def embed_features(self, features: jax.Array) -> jax.Array:
    """`pitch_features` `[batch, frames, bins]` -> L2-normalised `[batch, embed_dim]`."""
    cfg = self.config
    dtype = cfg.compute_dtype
    x = features[..., None].astype(dtype)  # [batch, frames, bins, 1]
    kernel_t, kernel_p = cfg.conv_kernel
    for i, channels in enumerate(cfg.conv_channels):
      # Halves the frame rate; the pitch axis keeps its resolution and shifts
      # equivariantly with transposition (padded with zeros on the semitone grid).
      if cfg.pitch_classes:
        x = jnp.pad(x, ((0, 0), (0, 0), (kernel_p // 2, kernel_p // 2), (0, 0)), mode="wrap")
        pitch_padding = (0, 0)
      else:
        pitch_padding = (kernel_p // 2, kernel_p // 2)
      x = nn.Conv(channels, (kernel_t, kernel_p), strides=(2, 1),
                  padding=((kernel_t // 2, kernel_t // 2), pitch_padding),
                  dtype=dtype, param_dtype=jnp.float32, name=f"conv_{i}")(x)
      x = nn.gelu(x)
    batch = x.shape[0]
    if cfg.pitch_classes:  # [12 * batch, frames, 12, channels], transposition-major
      x = jnp.concatenate([jnp.roll(x, shift, axis=2) for shift in range(12)])
    if cfg.pitch_pooling == "max":
      x = jnp.max(x, axis=2)  # [rows, frames, channels]
    else:
      x = x.reshape(x.shape[0], x.shape[1], -1)
    x = Projection((cfg.d_model,), ("mlp", "embed"), dtype=dtype, name="frame_embed")(x)
    valid = jnp.ones(x.shape[:2], bool)
    x = mulan.TransformerEncoder(cfg.encoder_config(), name="encoder")(x, valid)
    pooled = jnp.mean(x.astype(jnp.float32), axis=1)
    projected = Projection((cfg.embed_dim,), ("embed", "mlp"), dtype=jnp.float32,
                           name="projection")(pooled)
    if cfg.pitch_classes:
      projected = jnp.max(projected.reshape(-1, batch, cfg.embed_dim), axis=0)
    return mulan.l2_normalize(projected)


# ---------------------------------------------------------------- loss


def pairwise_squared_distances(emb: jax.Array) -> jax.Array:
  """`[batch, batch]` squared distances of unit vectors `[batch, dim]`: 2 - 2 cos."""
  emb = emb.astype(jnp.float32)
  return jnp.maximum(2.0 - 2.0 * emb @ emb.T, 0.0)


def semi_hard_triplet_loss(emb: jax.Array, labels: jax.Array, margin: float
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Semi-hard triplet loss over all anchor-positive pairs of a batch.

  For each pair (a, p) of one label (a != p) the negative is the nearest
  other-label example farther from a than p; when there is none, the farthest
  other-label example. The pair's loss is `max(d(a,p) - d(a,n) + margin, 0)`
  with squared distances. Under jit with the batch sharded over the mesh the
  distance matrix spans the global batch.

  Args:
    emb: L2-normalised `[batch, dim]`.
    labels: int `[batch]` melody ids.
    margin: the triplet margin.
  Returns:
    the mean loss over pairs, and sums over the batch: `loss` (over pairs),
    `pairs`, `active` (pairs with a positive loss), `correct` (rows whose
    nearest other row has their label), `count` (rows with a positive in the
    batch), `positive_distance`, `negative_distance` (over all pairs of
    each kind), `positive_pairs`, `negative_pairs`.
  """
  d = pairwise_squared_distances(emb)
  batch = d.shape[0]
  same = labels[:, None] == labels[None, :]
  eye = jnp.eye(batch, dtype=bool)
  positive = same & ~eye
  negative = ~same
  d_ap = d[:, :, None]  # [anchor, positive, 1]
  d_an = d[:, None, :]  # [anchor, 1, negative]
  farther = negative[:, None, :] & (d_an > d_ap)
  semi_hard = jnp.min(jnp.where(farther, d_an, jnp.inf), axis=2)
  easiest = jnp.max(jnp.where(negative, d, -jnp.inf), axis=1)[:, None]
  d_neg = jnp.where(jnp.any(farther, axis=2), semi_hard, easiest)
  has_negative = jnp.any(negative, axis=1)[:, None]
  pair = positive & has_negative
  per_pair = jnp.where(pair, jnp.maximum(d - d_neg + margin, 0.0), 0.0)
  pairs = jnp.sum(pair).astype(jnp.float32)
  nearest = jnp.argmin(jnp.where(eye, jnp.inf, d), axis=1)
  has_positive = jnp.any(positive, axis=1)
  sums = {"loss": jnp.sum(per_pair), "pairs": pairs,
          "active": jnp.sum(per_pair > 0).astype(jnp.float32),
          "correct": jnp.sum(has_positive & same[jnp.arange(batch), nearest]
                             ).astype(jnp.float32),
          "count": jnp.sum(has_positive).astype(jnp.float32),
          "positive_distance": jnp.sum(jnp.where(positive, d, 0.0)),
          "positive_pairs": jnp.sum(positive).astype(jnp.float32),
          "negative_distance": jnp.sum(jnp.where(negative, d, 0.0)),
          "negative_pairs": jnp.sum(negative).astype(jnp.float32)}
  return sums["loss"] / jnp.maximum(pairs, 1.0), sums


# ---------------------------------------------------------------- trainer protocol


@gin.configurable
class MelodyModel:
  """The melody encoder for `musiclm train`: init, triplet train/eval steps, costs.

  A batch holds `audio` float32 `[batch, window_samples]` (one window per
  row at `config.sample_rate`) and `melody_id` int `[batch]`, grouped as
  several renditions per melody (`MelodyTask`).
  """

  def __init__(self, config: MelodyConfig = gin.REQUIRED):
    self.config = config
    self.module = MelodyEncoder(config)
    self._apply = jax.jit(self.module.apply)

  def _check_batch(self, batch: Batch) -> None:
    cfg = self.config
    audio, ids = np.shape(batch["audio"]), np.shape(batch["melody_id"])
    cfg.check_window_batch(audio, "the melody encoder")
    if ids != audio[:1]:
      raise ValueError(f"melody_id of shape {ids} does not pair with audio {audio}")

  def init_variables(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
    """`{"params": ...}` boxed with logical axes (no other state)."""
    self._check_batch(batch)
    audio = jnp.zeros((1, self.config.window_samples), jnp.float32)
    return dict(jax.jit(self.module.init)({"params": rng}, audio))

  def loss(self, params: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean semi-hard triplet loss and its sums (`semi_hard_triplet_loss`)."""
    emb = self.module.apply({"params": params}, batch["audio"])
    return semi_hard_triplet_loss(emb, batch["melody_id"], self.config.margin)

  def make_train_step(self, optimizer, num_microbatches: int = 1) -> Callable:
    """`(state, batch) -> (state, metrics)`: one gradient step with `optimizer.tx`.

    Metrics: `loss`, `accuracy` (in-batch nearest-neighbour retrieval),
    `active_fraction` (pairs with a positive loss), `positive_distance`,
    `negative_distance` (mean squared distances), `grad_norm`, `learning_rate`.
    """
    if num_microbatches != 1:
      raise ValueError(f"num_microbatches={num_microbatches}: the triplet loss mines "
                       "negatives in the whole batch; use 1")

    def train_step(state, batch):
      (loss, sums), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, batch)
      updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
      new_state = state.replace(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state)
      metrics = {k: v for k, v in self._ratios(sums).items() if k != "loss"}
      return new_state, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                             learning_rate=optimizer.schedule(state.step))

    return train_step

  @staticmethod
  def _ratios(sums: Mapping[str, Any]) -> dict[str, Any]:
    def ratio(a, b):
      return sums[a] / jnp.maximum(sums[b], 1.0)
    return {"loss": ratio("loss", "pairs"), "accuracy": ratio("correct", "count"),
            "active_fraction": ratio("active", "pairs"),
            "positive_distance": ratio("positive_distance", "positive_pairs"),
            "negative_distance": ratio("negative_distance", "negative_pairs")}

  def make_eval_step(self) -> Callable:
    """`(state, batch) -> sums` (see `semi_hard_triplet_loss`)."""
    def eval_step(state, batch):
      return self.loss(state.params, batch)[1]
    return eval_step

  def eval_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
    """Means over evaluated batches: `loss`, `accuracy` (in-batch retrieval),
    `active_fraction`, `positive_distance`, `negative_distance`."""
    return {k: float(v) for k, v in self._ratios(
        {k: np.float64(v) for k, v in sums.items()}).items()}

  def train_cost(self, batch_size: int, batch: Batch):
    """Seconds of audio per step and FLOPs (3x the forward pass XLA counts)."""
    from musiclm_jax.training.metrics import TrainCost  # pylint: disable=g-import-not-at-top
    self._check_batch(batch)
    params = jax.eval_shape(lambda: nn.unbox(self.init_variables(jax.random.key(0), batch)))
    audio = jax.ShapeDtypeStruct((batch_size, self.config.window_samples), jnp.float32)
    ids = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    forward = jax.jit(lambda p, a, i: self.loss(
        p["params"], {"audio": a, "melody_id": i})[0]).lower(params, audio, ids)
    cost = forward.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    return TrainCost("audio_seconds", batch_size * self.config.window_seconds,
                     3.0 * float(cost.get("flops", 0.0)))

  def embed_windows(self, variables: Any, windows: jax.Array) -> jax.Array:
    """`windows [batch, window_samples]` -> L2-normalised `[batch, embed_dim]` (jitted
    once per shape when called outside jit)."""
    return self._apply({"params": variables["params"]}, windows)


# ---------------------------------------------------------------- clips and tokens


def melody_embeddings(model: MelodyModel, variables: Any, wav: jax.Array) -> jax.Array:
  """Embeddings of every window (`window_seconds`, every `hop_seconds`).

  Args:
    model: a `MelodyModel`.
    variables: `{"params": ...}`.
    wav: float32 `[batch, samples]` at `model.config.sample_rate`.
  Returns:
    L2-normalised float32 `[batch, windows, embed_dim]`.
  """
  cfg = model.config
  wav = jnp.asarray(wav, jnp.float32)
  # MuLan's windowing: `max(1, (samples - window) // hop + 1)` windows, one
  # zero-padded window for a clip shorter than a window.
  windows = mulan.clip_windows(wav, jnp.full(wav.shape[:1], wav.shape[1]), cfg.window_samples,
                               cfg.hop_samples)[0]
  batch, n, window = windows.shape
  emb = model.embed_windows(variables, windows.reshape(batch * n, window))
  return emb.reshape(batch, n, -1)


def melody_tokens(model: MelodyModel, variables: Any, codebooks: jax.Array,
                  wav: jax.Array) -> jax.Array:
  """`T_mel`: RVQ codes int32 `[batch, windows, Q]` of `wav [batch, samples]`, each in
  `[0, codebook_size)` (not yet offset into the stage token space)."""
  return quantizers.rvq_encode(jnp.asarray(codebooks, jnp.float32),
                               melody_embeddings(model, variables, wav))


@gin.configurable(denylist=["embeddings"])
def fit_melody_rvq(embeddings: np.ndarray, num_levels: int = 24, codebook_size: int = 512,
                   num_iters: int = 20, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """Fits the RVQ on window embeddings `[N, D]` (`embedding_rvq.fit`): float32
  codebooks `[num_levels, codebook_size, D]` and a report with `relative_error`
  per level."""
  return embedding_rvq.fit(RVQ_FILES, embeddings, num_levels, codebook_size, num_iters, seed)


def save_rvq(model_dir: str, codebooks: np.ndarray, report: dict[str, Any]) -> str:
  """Writes `melody_rvq.npz` and its manifest atomically; returns the npz path."""
  return embedding_rvq.save(RVQ_FILES, model_dir, codebooks, report)


def load_rvq(model_dir: str) -> np.ndarray:
  """The codebooks `[Q, K, D]` saved by `save_rvq`."""
  return embedding_rvq.load(RVQ_FILES, model_dir)


def config_from_manifest(manifest: dict[str, Any]) -> MelodyConfig:
  """The `MelodyConfig` a checkpoint manifest recorded."""
  return embedding_rvq.config_from_manifest(manifest, MelodyModel.__name__, MelodyConfig)


class MelodyTokenizer:
  """Melody embeddings and tokens of audio with a trained encoder.

  Build with `MelodyTokenizer.load(model_dir)` for a trained run, or from
  parts (tests, freshly fitted codebooks).
  """

  def __init__(self, model: MelodyModel, variables: Any, codebooks: np.ndarray | None = None,
               batch_size: int = 32, checkpoint_step: int | None = None):
    self.model = model
    self.config = model.config
    self.variables = {"params": variables["params"]}
    self.codebooks = None if codebooks is None else jnp.asarray(codebooks, jnp.float32)
    self.batch_size = batch_size
    self.checkpoint_step = checkpoint_step  # the step `load` read; None from parts
    self._embed = jax.jit(functools.partial(melody_embeddings, model))

  @classmethod
  def load(cls, model_dir: str, step: int | None = None, with_rvq: bool = True,
           batch_size: int = 32) -> "MelodyTokenizer":
    """A trained run: its checkpoint and (when `with_rvq`) `melody_rvq.npz`. The
    step defaults to the one the RVQ was fitted on (with the RVQ), else the newest."""
    from musiclm_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
    if step is None and with_rvq:
      step = checkpoints.fitted_step(os.path.join(model_dir, RVQ_MANIFEST_FILE))
    variables, manifest = checkpoints.load_trained_variables(model_dir, step)
    model = MelodyModel(config_from_manifest(manifest))
    return cls(model, variables, load_rvq(model_dir) if with_rvq else None, batch_size,
               checkpoint_step=manifest["step"])

  def embeddings(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 `[B, windows, embed_dim]` of `wav [B, samples]` (or `[samples]`),
    resampled to the model's rate first."""
    wav = np.atleast_2d(np.asarray(wav, np.float32))
    if wav.ndim != 2 or wav.shape[1] == 0:
      raise ValueError(f"audio must be [batch, samples] with samples > 0; got {wav.shape}")
    wav = audio_lib.resample(wav, sample_rate, self.config.sample_rate)
    out = [self._embed(self.variables, wav[i:i + self.batch_size])
           for i in range(0, len(wav), self.batch_size)]
    return np.concatenate([np.asarray(o) for o in out])

  def tokens(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """`T_mel`: int32 `[B, windows, num_levels]`."""
    if self.codebooks is None:
      raise ValueError("this MelodyTokenizer has no RVQ codebooks; fit them with `fit_rvq`")
    return np.asarray(quantizers.rvq_encode(self.codebooks,
                                            jnp.asarray(self.embeddings(wav, sample_rate))))


def _melody_pairs():
  """The corpus module, imported when a task reads it: it renders audio with
  pretty_midi and FluidSynth, which sampling (a tokenizer only) never needs."""
  from musiclm_jax.corpora import melody_pairs  # pylint: disable=g-import-not-at-top
  return melody_pairs


def fit_rvq(model_dir: str, data_dir: str, max_clips: int | None = None) -> dict[str, Any]:
  """Fits the RVQ (sizes from gin `fit_melody_rvq`) on the window embeddings of
  the train clips of a `melody_renditions` corpus and saves it to
  `MODEL_DIR/melody_rvq.npz`; returns the report."""
  from musiclm_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  tokenizer = MelodyTokenizer.load(model_dir, with_rvq=False)
  clips = _melody_pairs().load_split(data_dir, "train")["audio"][:max_clips]
  rate = _melody_pairs().read_manifest(data_dir)["sample_rate"]
  embeddings = tokenizer.embeddings(clips, rate)
  return embedding_rvq.fit_and_save(RVQ_FILES, model_dir,
                                    embeddings.reshape(-1, embeddings.shape[-1]),
                                    fit_melody_rvq,
                                    {"data_dir": data_dir,
                                     checkpoints.FITTED_STEP: tokenizer.checkpoint_step})


# ---------------------------------------------------------------- task


class MelodyBatches:
  """Iterator of `{"audio": [local_batch, window], "melody_id": [local_batch]}`.

  Batch `i` is a pure function of (seed, split, i): `get_state` is the
  batches read and `set_state` jumps there without re-reading.
  """

  def __init__(self, task: "MelodyTask", split: str, global_batch_size: int):
    self._task, self._split = task, split
    self._global = global_batch_size
    self._local = global_batch_size // jax.process_count()
    if global_batch_size % jax.process_count():
      raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                       f"{jax.process_count()} processes")
    self._batches_read = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._task.batch(self._split, self._global, self._batches_read)
    self._batches_read += 1
    first = jax.process_index() * self._local
    return {k: v[first:first + self._local] for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {"batches_read": self._batches_read}

  def set_state(self, state: dict[str, Any]) -> None:
    self._batches_read = int(state["batches_read"])


@gin.configurable
class MelodyTask:
  """Windows of a `melody_renditions` corpus, grouped by melody.

  Each batch holds `melodies_per_batch` melodies (fewer when the split has
  fewer), its rows cycling through them, each row another rendition (drawn
  without repeats while the melody has unused ones). All renditions of a
  melody in a batch start at the same point of the melody (a rendition
  played at `tempo_factor` f starts at `melody_time / f`), so they hold the
  same notes. Clips are resampled from 24 kHz to `sample_rate` once, on
  first use of a split.

  Args:
    data_dir: a corpus built by `corpora.melody_pairs.build_melody_renditions`.
    sample_rate, window_seconds: must match `MelodyConfig`.
    melodies_per_batch: K of the K x R batches.
    seed: melody, rendition and crop draws (validation and test batches are
      fixed by it too).
  """

  def __init__(self, data_dir: str = gin.REQUIRED, sample_rate: int = 16000,
               window_seconds: float = 4.0, melodies_per_batch: int = 8, seed: int = 0):
    self.manifest = _melody_pairs().read_manifest(data_dir)
    if melodies_per_batch < 2:
      raise ValueError(f"melodies_per_batch must be >= 2 (negatives), got {melodies_per_batch}")
    self.data_dir = data_dir
    self.sample_rate = sample_rate
    self.window_samples = int(round(window_seconds * sample_rate))
    self.melodies_per_batch = melodies_per_batch
    self.seed = seed
    self._splits: dict[str, dict[str, Any]] = {}

  def describe(self) -> dict[str, Any]:
    return {"data_dir": self.data_dir, "sample_rate": self.sample_rate,
            "window_samples": self.window_samples,
            "melodies_per_batch": self.melodies_per_batch, "seed": self.seed}

  def _split(self, split: str) -> dict[str, Any]:
    if split not in self._splits:
      data = _melody_pairs().load_split(self.data_dir, split)
      audio = audio_lib.resample(data["audio"], self.manifest["sample_rate"], self.sample_rate)
      rows = {}
      for row, melody in enumerate(data["melody_id"]):
        rows.setdefault(int(melody), []).append(row)
      self._splits[split] = dict(data, audio=audio, rows_of={m: np.array(r)
                                                             for m, r in rows.items()})
    return self._splits[split]

  def batch(self, split: str, global_batch_size: int, index: int) -> dict[str, np.ndarray]:
    """Global batch `index` of `split` (a pure function of the arguments and the seed)."""
    data = self._split(split)
    rng = np.random.default_rng([self.seed, ("train", "validation", "test").index(split),
                                 index])
    melodies = sorted(data["rows_of"])
    k = min(self.melodies_per_batch, len(melodies), global_batch_size)
    chosen = rng.choice(melodies, size=k, replace=False)
    rows = np.empty(global_batch_size, int)
    for slot, melody in enumerate(chosen):
      slots = np.arange(slot, global_batch_size, k)
      candidates = data["rows_of"][int(melody)]
      picks = rng.permutation(candidates)
      while len(picks) < len(slots):
        picks = np.concatenate([picks, rng.permutation(candidates)])
      rows[slots] = picks[:len(slots)]
    tempo = data["tempo_factor"][rows]
    clip_samples = data["audio"].shape[1]
    spare = max(clip_samples - self.window_samples, 0)
    # A melody-time start every chosen rendition of the melody can play from.
    melody_start = {int(m): rng.uniform(0, spare * float(np.min(
        tempo[data["melody_id"][rows] == m]))) for m in chosen}
    audio = np.zeros((global_batch_size, self.window_samples), np.float32)
    for i, row in enumerate(rows):
      start = min(int(melody_start[int(data["melody_id"][row])] / tempo[i]), spare)
      window = data["audio"][row, start:start + self.window_samples]
      audio[i, :len(window)] = window
    return {"audio": audio, "melody_id": data["melody_id"][rows].astype(np.int32)}

  def iterator(self, split: str, global_batch_size: int) -> MelodyBatches:
    self._split(split)  # fails early on a missing split
    return MelodyBatches(self, split, global_batch_size)
