"""k-means in pure JAX: k-means++ seeding, Lloyd iterations, mini-batch updates.

Everything is jit-able and written with whole-array ops (matmuls, argmin,
top-k), so that it runs unchanged when the points `x` are sharded over
devices: GSPMD turns the reductions over points into cross-device ones.
Distances are squared Euclidean, computed in float32 as
`|x|^2 - 2 x.c + |c|^2` with full-precision matmuls. `fit` holds an
`[N, k]` distance matrix; for millions of points use `MiniBatchKMeans`.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances(centroids: jax.Array, x: jax.Array) -> jax.Array:
  """Squared distances `[N, k]` between points `x [N, D]` and `centroids [k, D]`."""
  x = jnp.asarray(x, jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  cross = jnp.matmul(x, centroids.T, precision=_HIGHEST)
  distances = (jnp.sum(x * x, axis=-1, keepdims=True) - 2.0 * cross
               + jnp.sum(centroids * centroids, axis=-1))
  return jnp.maximum(distances, 0.0)


def assign(centroids: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of every point.

  Args:
    centroids: `[k, D]`.
    x: `[..., D]`.

  Returns:
    `(ids, distances)`: int32 `[...]` index of the nearest centroid and float32
    `[...]` squared distance to it.
  """
  _check_dims(centroids, x)
  flat = x.reshape(-1, x.shape[-1])
  distances = squared_distances(centroids, flat)
  ids = jnp.argmin(distances, axis=-1).astype(jnp.int32)
  nearest = jnp.take_along_axis(distances, ids[:, None], axis=-1)[:, 0]
  return ids.reshape(x.shape[:-1]), nearest.reshape(x.shape[:-1])


def cluster_statistics(ids: jax.Array, x: jax.Array, k: int,
                       weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Member counts `[k]` and member sums `[k, D]` of each cluster.

  Computed as a one-hot matmul (deterministic on every backend).

  Args:
    ids: int `[N]` cluster of each point.
    x: `[N, D]` points.
    k: number of clusters.
    weights: optional `[N]` weight of each point (e.g. a 0/1 mask).
  """
  one_hot = jax.nn.one_hot(ids, k, dtype=jnp.float32)
  if weights is not None:
    one_hot = one_hot * weights.astype(jnp.float32)[:, None]
  counts = jnp.sum(one_hot, axis=0)
  sums = jnp.matmul(one_hot.T, jnp.asarray(x, jnp.float32), precision=_HIGHEST)
  return counts, sums


def kmeans_plus_plus(rng: jax.Array, x: jax.Array, k: int) -> jax.Array:
  """k-means++ seeding: `k` points of `x [N, D]` drawn by D^2 sampling.

  The first centroid is uniform over the points; each next one is drawn with
  probability proportional to its squared distance to the nearest centroid
  chosen so far. When every point already coincides with a centroid (fewer
  distinct points than `k`), the draw falls back to uniform.

  Returns:
    float32 `[k, D]`.
  """
  if x.ndim != 2:
    raise ValueError(f"kmeans_plus_plus expects points [N, D], got shape {x.shape}")
  x = jnp.asarray(x, jnp.float32)
  first_rng, rest_rng = jax.random.split(rng)
  first = x[jax.random.randint(first_rng, (), 0, x.shape[0])]
  centroids = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
  min_distances = _distances_to(first, x)

  def add_centroid(i, carry):
    centroids, min_distances = carry
    logits = jnp.where(jnp.sum(min_distances) > 0, jnp.log(min_distances), 0.0)
    index = jax.random.categorical(jax.random.fold_in(rest_rng, i), logits)
    centroid = x[index]
    centroids = centroids.at[i].set(centroid)
    min_distances = jnp.minimum(min_distances, _distances_to(centroid, x))
    return centroids, min_distances

  centroids, _ = jax.lax.fori_loop(1, k, add_centroid, (centroids, min_distances))
  return centroids


def reseed_empty(centroids: jax.Array, counts: jax.Array, x: jax.Array,
                 distances: jax.Array) -> jax.Array:
  """Moves every centroid with `counts == 0` onto a far point of `x`.

  The j-th empty cluster gets the point with the j-th largest `distances`
  (the squared distance of each point to its nearest centroid).

  Args:
    centroids: `[k, D]`.
    counts: `[k]` members per cluster.
    x: `[N, D]` points.
    distances: `[N]`.
  """
  k = centroids.shape[0]
  num_far = min(k, x.shape[0])
  _, far = jax.lax.top_k(distances, num_far)
  empty = counts <= 0
  rank = (jnp.cumsum(empty) - 1) % num_far
  replacements = jnp.asarray(x, centroids.dtype)[far[rank]]
  return jnp.where(empty[:, None], replacements, centroids)


def lloyd_step(centroids: jax.Array, x: jax.Array) -> jax.Array:
  """One Lloyd iteration: every centroid moves to the mean of its members.

  Empty clusters are re-seeded from far points (`reseed_empty`), so the
  result never holds NaN.
  """
  ids, distances = assign(centroids, x)
  counts, sums = cluster_statistics(ids, x, centroids.shape[0])
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  return reseed_empty(means, counts, x, distances)


def fit(rng: jax.Array, x: jax.Array, k: int, num_iters: int = 20) -> jax.Array:
  """k-means: k-means++ seeding, then `num_iters` Lloyd iterations.

  Jit with `k` and `num_iters` static.

  Args:
    rng: PRNG key.
    x: `[N, D]` points (any float dtype; computed in float32).
    k: number of clusters.
    num_iters: Lloyd iterations.

  Returns:
    float32 centroids `[k, D]`.
  """
  if x.ndim != 2:
    raise ValueError(f"kmeans.fit expects points [N, D], got shape {x.shape}")
  if k < 1 or num_iters < 0:
    raise ValueError(f"kmeans.fit needs k >= 1 and num_iters >= 0, got k={k}, "
                     f"num_iters={num_iters}")
  x = jnp.asarray(x, jnp.float32)
  centroids = kmeans_plus_plus(rng, x, k)
  return jax.lax.fori_loop(0, num_iters, lambda _, c: lloyd_step(c, x), centroids)


@flax.struct.dataclass
class MiniBatchKMeansState:
  """centroids `[k, D]` float32; counts `[k]`: points assigned to each so far."""
  centroids: jax.Array
  counts: jax.Array


@dataclasses.dataclass(frozen=True)
class MiniBatchKMeans:
  """Mini-batch k-means (Sculley 2010, as in scikit-learn) over a stream of batches.

  `init` seeds the centroids with k-means++ on a first batch; each `update`
  assigns a batch and moves every centroid towards the mean of its members in
  the batch with rate `members / total members so far`, so each centroid is
  the running mean of every point ever assigned to it. A centroid that has
  had no member yet is re-seeded from a far point of the batch. `update` is
  pure and jit-able: `jax.jit(MiniBatchKMeans(k, dim).update)`.
  """
  k: int
  dim: int

  def init(self, rng: jax.Array, first_batch: jax.Array) -> MiniBatchKMeansState:
    """State seeded by k-means++ on `first_batch [n, D]`, with zero counts."""
    self._check_batch(first_batch)
    return MiniBatchKMeansState(centroids=kmeans_plus_plus(rng, first_batch, self.k),
                                counts=jnp.zeros((self.k,), jnp.float32))

  def update(self, state: MiniBatchKMeansState, batch: jax.Array) -> MiniBatchKMeansState:
    """One mini-batch step on `batch [n, D]`."""
    self._check_batch(batch)
    batch = jnp.asarray(batch, jnp.float32)
    ids, distances = assign(state.centroids, batch)
    batch_counts, batch_sums = cluster_statistics(ids, batch, self.k)
    counts = state.counts + batch_counts
    rate = 1.0 / jnp.maximum(counts, 1.0)[:, None]
    step = (batch_sums - batch_counts[:, None] * state.centroids) * rate
    centroids = reseed_empty(state.centroids + step, counts, batch, distances)
    return MiniBatchKMeansState(centroids=centroids, counts=counts)

  def _check_batch(self, batch: jax.Array) -> None:
    if batch.ndim != 2 or batch.shape[1] != self.dim:
      raise ValueError(f"MiniBatchKMeans(dim={self.dim}) expects a batch [n, {self.dim}], "
                       f"got shape {batch.shape}")


def _distances_to(centroid: jax.Array, x: jax.Array) -> jax.Array:
  """Squared distances `[N]` of `x [N, D]` to one point `[D]`; exactly 0 for copies."""
  return jnp.sum(jnp.square(x - centroid), axis=-1)


def _check_dims(centroids: jax.Array, x: jax.Array) -> None:
  if centroids.ndim != 2 or x.shape[-1] != centroids.shape[1]:
    raise ValueError(f"centroids [k, D] {centroids.shape} do not match points "
                     f"[..., D] {x.shape}")
