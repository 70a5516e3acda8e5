"""k-means: seeding, Lloyd, mini-batch updates, sharded fitting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from musiclm_jax.layers import kmeans


def gaussian_clusters(seed: int, k: int = 6, dim: int = 4, per_cluster: int = 64,
                      spread: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Points `[k * per_cluster, dim]` around `k` centres at least ~3 apart."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(k, dim)).astype(np.float32) * 4.0
  while min(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]) < 3:
    centres = rng.normal(size=(k, dim)).astype(np.float32) * 4.0
  points = centres[:, None] + spread * rng.normal(size=(k, per_cluster, dim))
  points = points.reshape(-1, dim).astype(np.float32)
  return points[rng.permutation(len(points))], centres


def match_error(found: np.ndarray, centres: np.ndarray) -> float:
  """Largest distance from a true centre to its nearest found centroid, with every
  found centroid used once (a permutation)."""
  distances = np.linalg.norm(centres[:, None] - np.asarray(found)[None], axis=-1)
  nearest = distances.argmin(axis=1)
  assert sorted(nearest.tolist()) == list(range(len(centres))), nearest
  return float(distances.min(axis=1).max())


def test_assign_matches_brute_force():
  rng = np.random.default_rng(0)
  centroids = rng.normal(size=(7, 3)).astype(np.float32)
  x = rng.normal(size=(2, 5, 3)).astype(np.float32)
  ids, distances = kmeans.assign(jnp.asarray(centroids), jnp.asarray(x))
  brute = ((x[..., None, :] - centroids) ** 2).sum(-1)
  assert ids.shape == (2, 5) and ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids, brute.argmin(-1))
  np.testing.assert_allclose(distances, brute.min(-1), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="do not match"):
    kmeans.assign(jnp.asarray(centroids), jnp.ones((4, 2)))


def test_fit_recovers_separated_clusters():
  x, centres = gaussian_clusters(0)
  found = jax.jit(kmeans.fit, static_argnums=(2, 3))(jax.random.key(1), x, 6, 10)
  assert found.shape == (6, 4) and found.dtype == jnp.float32
  assert match_error(found, centres) < 0.1


def test_kmeans_plus_plus_picks_distinct_points():
  x, _ = gaussian_clusters(1, k=8, per_cluster=16)
  seeds = np.asarray(kmeans.kmeans_plus_plus(jax.random.key(0), jnp.asarray(x), 8))
  rows = {tuple(s) for s in seeds}
  assert len(rows) == 8
  assert all(np.any(np.all(x == s, axis=1)) for s in seeds)  # every seed is a data point
  # D^2 sampling on well-separated clusters picks one point per cluster.
  ids, _ = kmeans.assign(jnp.asarray(seeds), jnp.asarray(x))
  assert len(np.unique(np.asarray(ids))) == 8


def test_more_clusters_than_distinct_points_never_nan():
  x = jnp.asarray(np.repeat(np.eye(3, dtype=np.float32), 5, axis=0))  # 3 distinct points
  centroids = kmeans.fit(jax.random.key(0), x, 8, num_iters=5)
  assert np.all(np.isfinite(centroids))
  # Every distinct point is covered exactly.
  _, distances = kmeans.assign(centroids, x)
  np.testing.assert_allclose(distances, 0.0, atol=1e-6)


def test_lloyd_reseeds_empty_cluster_from_farthest_point():
  x = jnp.asarray([[0.0], [0.1], [10.0]], jnp.float32)
  centroids = jnp.asarray([[0.0], [100.0]], jnp.float32)  # the second one wins nothing
  new = kmeans.lloyd_step(centroids, x)
  np.testing.assert_allclose(np.asarray(new)[:, 0], [10.1 / 3, 10.0], rtol=1e-6)


def test_mini_batch_kmeans_converges_to_clusters():
  x, centres = gaussian_clusters(2, per_cluster=200)
  model = kmeans.MiniBatchKMeans(k=6, dim=4)
  batches = x.reshape(-1, 60, 4)
  state = model.init(jax.random.key(0), x[:300])
  update = jax.jit(model.update)
  for batch in batches:
    state = update(state, batch)
  assert float(state.counts.sum()) == len(x)
  assert match_error(state.centroids, centres) < 0.1
  # The counts-based rate makes each centroid the mean of its members so far.
  ids, _ = kmeans.assign(state.centroids, x)
  full_means = np.stack([x[np.asarray(ids) == c].mean(0) for c in range(6)])
  np.testing.assert_allclose(np.sort(state.centroids, axis=0), np.sort(full_means, axis=0),
                             atol=0.05)
  with pytest.raises(ValueError, match="expects a batch"):
    model.update(state, jnp.ones((3, 5)))


def test_mini_batch_update_is_the_running_mean():
  model = kmeans.MiniBatchKMeans(k=2, dim=1)
  state = kmeans.MiniBatchKMeansState(centroids=jnp.asarray([[0.0], [10.0]]),
                                      counts=jnp.asarray([2.0, 1.0]))
  state = model.update(state, jnp.asarray([[1.0], [2.0], [9.0]]))
  # centroid 0: (2 * 0 + 1 + 2) / 4; centroid 1: (1 * 10 + 9) / 2.
  np.testing.assert_allclose(np.asarray(state.centroids)[:, 0], [0.75, 9.5])
  np.testing.assert_allclose(state.counts, [4.0, 2.0])


def test_fit_sharded_over_devices_equals_unsharded():
  assert jax.device_count() == 8
  x, _ = gaussian_clusters(3, k=5, per_cluster=32)  # 160 points, 20 per device
  fit = jax.jit(kmeans.fit, static_argnums=(2, 3))
  expected = fit(jax.random.key(4), jnp.asarray(x), 5, 8)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded_x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None)))
  assert len(sharded_x.sharding.device_set) == 8
  got = fit(jax.random.key(4), sharded_x, 5, 8)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
