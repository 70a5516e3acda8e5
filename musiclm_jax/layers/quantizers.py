"""Residual vector quantization (RVQ): pure functions and an EMA-trained module.

An RVQ of `Q` levels quantizes a vector with the first codebook, the
remaining residual with the second, and so on; a prefix of `q <= Q` codes
decodes to a coarser approximation (SoundStream's bitrate scalability).
`rvq_encode`/`rvq_decode`/`fit_rvq` work on a codebook array `[Q, K, D]`
(MuLan's and w2v-BERT's fitted quantizers); `ResidualVectorQuantizer` learns
its codebooks by exponential moving averages during training (SoundStream).
Distances are computed in float32 whatever the input dtype.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp

from musiclm_jax.layers import kmeans

QUANTIZER_COLLECTION = "quantizer"


def rvq_encode(codebooks: jax.Array, x: jax.Array) -> jax.Array:
  """Codes of `x [..., D]` under codebooks `[Q, K, D]`: int32 `[..., Q]`."""
  codes, _, _ = _quantize_levels(codebooks, _flatten(codebooks, x))
  return codes.reshape(x.shape[:-1] + (codebooks.shape[0],))


def rvq_decode(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
  """Sum of the code vectors of the first `q` levels.

  Args:
    codebooks: `[Q, K, D]`.
    codes: int `[..., q]` with `q <= Q`.

  Returns:
    float32 `[..., D]`.
  """
  num_codebook_levels = codebooks.shape[0]
  if codes.shape[-1] > num_codebook_levels:
    raise ValueError(f"codes have {codes.shape[-1]} levels but the codebooks only "
                     f"{num_codebook_levels}")
  codebooks = jnp.asarray(codebooks, jnp.float32)
  levels = jnp.arange(codes.shape[-1])
  return jnp.sum(codebooks[levels, codes], axis=-2)


def fit_rvq(rng: jax.Array, x: jax.Array, num_levels: int, codebook_size: int,
            num_iters: int = 20) -> jax.Array:
  """Fits codebooks by k-means on successive residuals of `x [N, D]`.

  Jit with `num_levels`, `codebook_size` and `num_iters` static.

  Returns:
    float32 codebooks `[num_levels, codebook_size, D]`.
  """
  if x.ndim != 2:
    raise ValueError(f"fit_rvq expects vectors [N, D], got shape {x.shape}")

  def fit_level(residual, level_rng):
    codebook = kmeans.fit(level_rng, residual, codebook_size, num_iters)
    ids, _ = kmeans.assign(codebook, residual)
    return residual - codebook[ids], codebook

  _, codebooks = jax.lax.scan(fit_level, jnp.asarray(x, jnp.float32),
                              jax.random.split(rng, num_levels))
  return codebooks


def code_histogram(codes: jax.Array, codebook_size: int,
                   weights: jax.Array | None = None) -> jax.Array:
  """Counts `[Q, K]` of every code per level in `codes [N, Q]`, each weighted by
  `weights [N, Q]` (e.g. a 0/1 mask of active levels) when given."""
  if weights is None:
    weights = jnp.ones(codes.shape, jnp.float32)

  def level_histogram(level):
    level_codes, level_weights = level
    one_hot = jax.nn.one_hot(level_codes, codebook_size, dtype=jnp.float32)
    return jnp.sum(one_hot * level_weights[:, None], axis=0)

  return jax.lax.map(level_histogram, (codes.T, weights.T.astype(jnp.float32)))


def usage_metrics(histogram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Codebook perplexity and fraction of codes used, per level.

  Args:
    histogram: `[Q, K]` code counts of a batch.

  Returns:
    `(perplexity [Q], usage [Q])`: `exp(entropy)` of each level's code
    distribution (K when uniform, 1 when one code takes all) and the
    fraction of its K codes that occur.
  """
  total = jnp.sum(histogram, axis=-1, keepdims=True)
  p = histogram / jnp.maximum(total, 1e-12)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return jnp.exp(entropy), jnp.mean(histogram > 0, axis=-1)


def laplace_smoothed_counts(ema_count: jax.Array, epsilon: float) -> jax.Array:
  """`(n_k + eps) / (n + K eps) * n` per level of `ema_count [Q, K]` (n = sum over k),
  so that no code divides by zero and the total stays n."""
  total = jnp.sum(ema_count, axis=-1, keepdims=True)
  num_codes = ema_count.shape[-1]
  return (ema_count + epsilon) / (total + num_codes * epsilon) * jnp.maximum(total, epsilon)


@flax.struct.dataclass
class QuantizerOutput:
  """What `ResidualVectorQuantizer` returns.

  quantized: `[batch, frames, dim]` in the input dtype, straight-through to the input.
  codes: int32 `[batch, frames, levels]` (every level, active or not).
  commitment_loss: scalar, sum over levels of `mean((residual - sg(quantized))^2)`
    over the active positions; unweighted.
  metrics: dict of scalars (codebook perplexity, usage, restarted codes).
  """
  quantized: jax.Array
  codes: jax.Array
  commitment_loss: jax.Array
  metrics: dict[str, jax.Array]


@gin.configurable
class ResidualVectorQuantizer(nn.Module):
  """RVQ with EMA codebooks, k-means initialisation, dead-code restarts and
  quantizer dropout.

  Variables live in the `"quantizer"` collection (no gradient): `codebook
  [Q, K, D]`, `ema_count [Q, K]`, `ema_sum [Q, K, D]` and the `initialized`
  flag. They change only when called with `train=True` and the collection
  mutable (`apply(..., mutable=["quantizer"])`): then

  * on the first call with `kmeans_init`, every level's codebook is fitted by
    k-means on that batch's residuals (`fit_rvq`; a batch of fewer than K
    vectors is repeated up to K rows, so every vector can become a code),
    with the cluster sizes as EMA
    counts;
  * every call moves the EMA statistics of each level towards the batch's
    code counts and member sums (only from examples where the level is
    active) and sets `codebook = ema_sum / laplace_smoothed(ema_count)`;
  * a code whose EMA count (its uses per step, averaged) falls below
    `dead_code_threshold` times the mean use of a code at its level (this
    batch's active vectors / K) restarts from a random residual vector of
    the current batch, with its count reset to that mean, which gives it
    time to win vectors before it can be judged dead again. Relative to the
    batch, the rule means the same with 200 vectors per step as with 20 000
    (an absolute threshold such as 2 uses would call every code of a
    1024-code book dead at small batches and restart them all every step).

  With `quantizer_dropout` and `train=True`, each example uses the first n
  levels, n ~ Uniform{1..Q} (rng stream `"quantizer"`, which is also used to
  sample restarts and the k-means initialisation).

  Codes and the quantized output of a call use the codebooks from before its
  EMA update.
  """
  num_levels: int = 12
  codebook_size: int = 1024
  decay: float = 0.99
  epsilon: float = 1e-5
  kmeans_init: bool = True
  kmeans_iters: int = 10
  dead_code_threshold: float = 0.1
  quantizer_dropout: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               num_levels: int | None = None) -> QuantizerOutput:
    """Quantizes `x [batch, frames, dim]` (any `[batch, ..., dim]`).

    Args:
      x: vectors to quantize.
      train: training mode (quantizer dropout, EMA updates).
      num_levels: levels to use when not dropping out (default all).
    """
    if x.ndim < 2:
      raise ValueError(f"ResidualVectorQuantizer expects [batch, frames, dim], got "
                       f"shape {x.shape}")
    num_q, num_k, dim = self.num_levels, self.codebook_size, x.shape[-1]
    codebook = self.variable(
        QUANTIZER_COLLECTION, "codebook",
        lambda: jax.random.normal(self.make_rng("params"), (num_q, num_k, dim), jnp.float32))
    ema_count = self.variable(QUANTIZER_COLLECTION, "ema_count",
                              lambda: jnp.ones((num_q, num_k), jnp.float32))
    ema_sum = self.variable(QUANTIZER_COLLECTION, "ema_sum", lambda: codebook.value)
    initialized = self.variable(QUANTIZER_COLLECTION, "initialized",
                                lambda: jnp.asarray(False))
    if codebook.value.shape != (num_q, num_k, dim):
      raise ValueError(f"stored codebook {codebook.value.shape} does not match "
                       f"{(num_q, num_k, dim)} for input {x.shape}")

    update = (train and self.is_mutable_collection(QUANTIZER_COLLECTION)
              and not self.is_initializing())
    flat = x.reshape(-1, dim).astype(jnp.float32)  # [N, D]
    needs_rng = update or (train and self.quantizer_dropout)
    rng = self.make_rng(QUANTIZER_COLLECTION) if needs_rng else None
    codebooks, counts, sums = codebook.value, ema_count.value, ema_sum.value
    if update and self.kmeans_init:
      codebooks, counts, sums = jax.lax.cond(
          initialized.value, lambda: (codebooks, counts, sums),
          lambda: self._kmeans_statistics(jax.random.fold_in(rng, 0), flat))

    codes, quantized_levels, residuals = _quantize_levels(codebooks, flat)
    active = self._active_levels(x.shape[0], flat.shape[0], train, num_levels,
                                 None if rng is None else jax.random.fold_in(rng, 1))
    quantized = jnp.sum(active.T[..., None] * quantized_levels, axis=0)
    straight_through = flat + jax.lax.stop_gradient(quantized - flat)

    level_errors = jnp.sum(
        active.T[..., None] * jnp.square(residuals - jax.lax.stop_gradient(quantized_levels)),
        axis=(1, 2))
    commitment_loss = jnp.sum(level_errors / jnp.maximum(jnp.sum(active, axis=0) * dim, 1.0))

    histogram = code_histogram(codes, num_k, active)
    restarted = jnp.zeros((num_q,), jnp.float32)
    if update:
      codebooks, counts, sums, restarted = self._ema_update(
          codebooks, counts, sums, codes, residuals, active, histogram,
          jax.random.fold_in(rng, 2))
      codebook.value, ema_count.value, ema_sum.value = codebooks, counts, sums
      initialized.value = jnp.asarray(True)

    return QuantizerOutput(
        quantized=straight_through.reshape(x.shape).astype(x.dtype),
        codes=codes.reshape(x.shape[:-1] + (num_q,)),
        commitment_loss=commitment_loss,
        metrics=self._metrics(histogram, restarted))

  def encode(self, x: jax.Array, num_levels: int | None = None) -> jax.Array:
    """Codes int32 `[batch, frames, q]` of `x [batch, frames, dim]` with the stored
    codebooks, `q = num_levels` (default all); call with `method="encode"`."""
    codebooks = self._stored_codebooks()
    return rvq_encode(codebooks[:self._checked_levels(num_levels)], x)

  def decode(self, codes: jax.Array) -> jax.Array:
    """float32 `[batch, frames, dim]` from codes `[batch, frames, q]`, any `q <= Q`;
    call with `method="decode"`."""
    return rvq_decode(self._stored_codebooks(), codes)

  def _stored_codebooks(self) -> jax.Array:
    codebooks = self.get_variable(QUANTIZER_COLLECTION, "codebook")
    if codebooks is None:
      raise ValueError("ResidualVectorQuantizer has no codebook: pass the variables "
                       "with a 'quantizer' collection")
    return codebooks

  def _checked_levels(self, num_levels: int | None) -> int:
    if num_levels is None:
      return self.num_levels
    if not 1 <= num_levels <= self.num_levels:
      raise ValueError(f"num_levels={num_levels} is not in [1, {self.num_levels}]")
    return num_levels

  def _active_levels(self, batch: int, num_vectors: int, train: bool,
                     num_levels: int | None, rng: jax.Array | None) -> jax.Array:
    """0/1 float mask `[N, Q]` of the levels each vector uses."""
    levels = jnp.arange(self.num_levels)
    if train and self.quantizer_dropout:
      used = jax.random.randint(rng, (batch,), 1, self.num_levels + 1)
      per_example = (levels < used[:, None]).astype(jnp.float32)
      return jnp.repeat(per_example, num_vectors // batch, axis=0)
    used = self._checked_levels(num_levels)
    return jnp.broadcast_to((levels < used).astype(jnp.float32), (num_vectors, self.num_levels))

  def _kmeans_statistics(self, rng: jax.Array, flat: jax.Array):
    """Codebooks fitted on `flat [N, D]`, their cluster sizes as counts, and sums."""
    data = flat
    if flat.shape[0] < self.codebook_size:  # every vector, repeated up to K rows
      data = flat[jnp.arange(self.codebook_size) % flat.shape[0]]
    codebooks = fit_rvq(rng, data, self.num_levels, self.codebook_size, self.kmeans_iters)
    counts = code_histogram(rvq_encode(codebooks, flat), self.codebook_size)
    sums = codebooks * laplace_smoothed_counts(counts, self.epsilon)[..., None]
    return codebooks, counts, sums

  def _ema_update(self, codebooks, counts, sums, codes, residuals, active, histogram, rng):
    """EMA step and dead-code restarts; returns new (codebooks, counts, sums) and
    the number of codes restarted per level `[Q]`."""
    def level_sums(level):
      level_codes, level_residuals, level_active = level
      _, member_sums = kmeans.cluster_statistics(level_codes, level_residuals,
                                                 self.codebook_size, level_active)
      return member_sums

    batch_sums = jax.lax.map(level_sums, (codes.T, residuals, active.T))
    counts = self.decay * counts + (1.0 - self.decay) * histogram
    sums = self.decay * sums + (1.0 - self.decay) * batch_sums

    num_active = jnp.sum(active, axis=0)  # [Q]
    mean_count = (num_active / self.codebook_size)[:, None]  # [Q, 1]
    dead = (counts < self.dead_code_threshold * mean_count) & (num_active > 0)[:, None]
    counts = jnp.where(dead, mean_count, counts)
    smoothed = laplace_smoothed_counts(counts, self.epsilon)
    samples = _sample_active(rng, residuals, active, self.codebook_size)  # [Q, K, D]
    sums = jnp.where(dead[..., None], samples * smoothed[..., None], sums)
    codebooks = sums / smoothed[..., None]
    return codebooks, counts, sums, jnp.sum(dead, axis=-1).astype(jnp.float32)

  def _metrics(self, histogram: jax.Array, restarted: jax.Array) -> dict[str, jax.Array]:
    perplexity, usage = usage_metrics(histogram)
    metrics = {"perplexity": jnp.mean(perplexity), "codebook_usage": jnp.mean(usage),
               "codes_restarted": jnp.mean(restarted)}
    for level in range(self.num_levels):
      metrics[f"perplexity_level{level}"] = perplexity[level]
      metrics[f"codebook_usage_level{level}"] = usage[level]
      metrics[f"codes_restarted_level{level}"] = restarted[level]
    return metrics


def _flatten(codebooks: jax.Array, x: jax.Array) -> jax.Array:
  if codebooks.ndim != 3 or x.shape[-1] != codebooks.shape[-1]:
    raise ValueError(f"codebooks [Q, K, D] {codebooks.shape} do not match vectors "
                     f"[..., D] {x.shape}")
  return jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])


def _quantize_levels(codebooks: jax.Array, flat: jax.Array):
  """Greedy RVQ of `flat [N, D]`.

  Returns:
    codes int32 `[N, Q]`, each level's code vectors `[Q, N, D]` and the
    residual each level quantized `[Q, N, D]` (differentiable in `flat`).
  """
  def level(residual, codebook):
    ids, _ = kmeans.assign(codebook, residual)
    vectors = codebook[ids]
    return residual - jax.lax.stop_gradient(vectors), (ids, vectors, residual)

  _, (codes, vectors, residuals) = jax.lax.scan(
      level, flat, jnp.asarray(codebooks, jnp.float32))
  return codes.T, vectors, residuals


def _sample_active(rng: jax.Array, residuals: jax.Array, active: jax.Array,
                   num_samples: int) -> jax.Array:
  """`num_samples` vectors per level drawn uniformly, with replacement, from the
  active ones: residuals `[Q, N, D]`, active `[N, Q]` -> `[Q, num_samples, D]`."""
  cumulative = jnp.cumsum(active.T, axis=-1)  # [Q, N]
  total = cumulative[:, -1:]
  uniform = jax.random.uniform(rng, (active.shape[1], num_samples))
  rank = jnp.floor(uniform * total) + 1.0  # in [1, total]
  index = jax.vmap(jnp.searchsorted)(cumulative, rank)
  index = jnp.minimum(index, active.shape[0] - 1)
  return jnp.take_along_axis(residuals, index[..., None], axis=1)

