"""Residual vector quantizers: pure RVQ functions and the EMA-trained module."""
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from musiclm_jax.layers import quantizers
from musiclm_jax.layers.quantizers import ResidualVectorQuantizer


def clustered_frames(seed: int, batch: int = 4, frames: int = 32, dim: int = 4,
                     num_centres: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """`[batch, frames, dim]` vectors around `num_centres` well-separated centres, and
  the centres `[num_centres, dim]`."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_centres, dim)) * 3.0
  ids = rng.integers(0, num_centres, size=(batch, frames))
  x = centres[ids] + 0.05 * rng.normal(size=(batch, frames, dim))
  return x.astype(np.float32), centres.astype(np.float32)


def numpy_rvq(codebooks: np.ndarray, x: np.ndarray):
  """Brute-force greedy RVQ of `x [N, D]`: codes `[N, Q]` and residuals `[Q, N, D]`."""
  residual, codes, residuals = x.astype(np.float64), [], []
  for codebook in codebooks:
    residuals.append(residual)
    ids = ((residual[:, None] - codebook[None]) ** 2).sum(-1).argmin(-1)
    codes.append(ids)
    residual = residual - codebook[ids]
  return np.stack(codes, -1), np.stack(residuals)


def make_quantizer(**overrides) -> ResidualVectorQuantizer:
  fields = dict(num_levels=3, codebook_size=8, kmeans_init=False, quantizer_dropout=False,
                dead_code_threshold=0.0, decay=0.9, kmeans_iters=5)
  fields.update(overrides)
  return ResidualVectorQuantizer(**fields)


def init_variables(quantizer, x):
  init = jax.jit(functools.partial(quantizer.init, train=False))
  return init({"params": jax.random.key(0)}, jnp.asarray(x))


def jit_apply(quantizer, **static):
  """`quantizer.apply` jitted with keyword arguments `static` fixed."""
  return jax.jit(functools.partial(quantizer.apply, **static))


def train_call(quantizer, variables, x, seed=0):
  """One training call; returns (output, new variables)."""
  output, updates = quantizer.apply(variables, jnp.asarray(x), train=True,
                                    rngs={"quantizer": jax.random.key(seed)},
                                    mutable=["quantizer"])
  return output, {**variables, **updates}


def test_rvq_error_falls_with_every_level_and_prefixes_decode():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(512, 6)), jnp.float32)
  fit = jax.jit(quantizers.fit_rvq, static_argnums=(2, 3, 4))
  codebooks = fit(jax.random.key(1), x, 4, 16, 10)
  assert codebooks.shape == (4, 16, 6) and codebooks.dtype == jnp.float32
  codes = quantizers.rvq_encode(codebooks, x.reshape(2, 256, 6))
  assert codes.shape == (2, 256, 4) and codes.dtype == jnp.int32
  np.testing.assert_array_equal(codes.reshape(512, 4), numpy_rvq(np.asarray(codebooks),
                                                                 np.asarray(x))[0])
  errors = [float(jnp.mean(jnp.square(x)))]
  for q in range(1, 5):
    decoded = quantizers.rvq_decode(codebooks, codes[..., :q])
    assert decoded.shape == (2, 256, 6) and decoded.dtype == jnp.float32
    expected = sum(np.asarray(codebooks)[level][np.asarray(codes)[..., level]]
                   for level in range(q))
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-6)
    errors.append(float(jnp.mean(jnp.square(x.reshape(2, 256, 6) - decoded))))
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  # Encoding with fewer codebooks gives the prefix of the codes.
  np.testing.assert_array_equal(quantizers.rvq_encode(codebooks[:2], x.reshape(2, 256, 6)),
                                codes[..., :2])
  with pytest.raises(ValueError, match="only 4"):
    quantizers.rvq_decode(codebooks, jnp.zeros((3, 5), jnp.int32))
  with pytest.raises(ValueError, match="do not match"):
    quantizers.rvq_encode(codebooks, jnp.zeros((3, 5)))


def test_ema_step_matches_numpy():
  x, _ = clustered_frames(1)
  quantizer = make_quantizer()
  variables = init_variables(quantizer, x)
  state = jax.tree.map(np.asarray, variables["quantizer"])
  np.testing.assert_array_equal(state["ema_sum"], state["codebook"])
  output, variables = jax.jit(functools.partial(train_call, quantizer))(variables, x)
  new = variables["quantizer"]

  codes, residuals = numpy_rvq(state["codebook"], x.reshape(-1, 4))
  np.testing.assert_array_equal(np.asarray(output.codes).reshape(-1, 3), codes)
  for level in range(3):
    one_hot = np.eye(8)[codes[:, level]]
    count = 0.9 * state["ema_count"][level] + 0.1 * one_hot.sum(0)
    ema_sum = 0.9 * state["ema_sum"][level] + 0.1 * one_hot.T @ residuals[level]
    smoothed = (count + 1e-5) / (count.sum() + 8 * 1e-5) * count.sum()
    np.testing.assert_allclose(new["ema_count"][level], count, rtol=1e-5)
    np.testing.assert_allclose(new["ema_sum"][level], ema_sum, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["codebook"][level], ema_sum / smoothed[:, None],
                               rtol=1e-4, atol=1e-5)
  assert bool(new["initialized"])


def test_ema_moves_codes_towards_member_means():
  x, centres = clustered_frames(1)
  flat = x.reshape(-1, 4)
  quantizer = make_quantizer(num_levels=1)
  variables = init_variables(quantizer, x)
  codebook = jnp.asarray(centres[None] + 0.5)  # every code owns one cluster throughout
  variables = {"quantizer": {**variables["quantizer"], "codebook": codebook,
                             "ema_sum": codebook}}
  ids = ((flat[:, None] - centres[None]) ** 2).sum(-1).argmin(-1)
  means = np.stack([flat[ids == c].mean(0) for c in range(8)])
  gaps = [np.abs(np.asarray(codebook[0]) - means).max()]
  step = jax.jit(functools.partial(train_call, quantizer))
  for _ in range(4):
    output, variables = step(variables, x)
    np.testing.assert_array_equal(np.asarray(output.codes).reshape(-1), ids)
    gaps.append(np.abs(np.asarray(variables["quantizer"]["codebook"][0]) - means).max())
  assert all(b < 0.9 * a for a, b in zip(gaps, gaps[1:])), gaps


def test_kmeans_init_on_first_training_call():
  x, _ = clustered_frames(2)
  quantizer = make_quantizer(kmeans_init=True, num_levels=2)
  variables = init_variables(quantizer, x)
  initial = np.asarray(variables["quantizer"]["codebook"])
  assert not bool(variables["quantizer"]["initialized"])

  def reconstruction_error(variables):
    codes = jit_apply(quantizer, method="encode")(variables, x)
    decoded = jit_apply(quantizer, method="decode")(variables, codes)
    return float(jnp.mean(jnp.square(decoded - x)))

  random_error = reconstruction_error(variables)
  step = jax.jit(functools.partial(train_call, quantizer))
  _, variables = step(variables, x)
  fitted = np.asarray(variables["quantizer"]["codebook"])
  assert bool(variables["quantizer"]["initialized"])
  assert not np.allclose(fitted, initial)
  assert reconstruction_error(variables) < 0.01 * random_error
  # 8 clusters, 8 codes: each data cluster gets its own code at level 0.
  assert len(np.unique(jit_apply(quantizer, method="encode")(variables, x)[..., 0])) == 8
  # The second call does not refit: the flag holds and the codebook moves only by EMA.
  _, again = step(variables, x)
  np.testing.assert_allclose(again["quantizer"]["codebook"], fitted, atol=0.05)


def test_kmeans_init_with_fewer_vectors_than_codes():
  x, _ = clustered_frames(3, batch=1, frames=5)  # 5 vectors, 8 codes
  quantizer = make_quantizer(kmeans_init=True, num_levels=2)
  _, variables = jax.jit(functools.partial(train_call, quantizer))(
      init_variables(quantizer, x), x)
  state = variables["quantizer"]
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state))
  codes = jit_apply(quantizer, method="encode")(variables, x)
  decoded = jit_apply(quantizer, method="decode")(variables, codes)
  np.testing.assert_allclose(decoded, x, atol=1e-5)


def test_dead_code_restarts_from_batch_vector():
  x, _ = clustered_frames(4, num_centres=3)
  flat = x.reshape(-1, 4)
  # 128 vectors, 4 codes: a code's mean use is 32 per step; dead below 0.32.
  quantizer = make_quantizer(num_levels=1, codebook_size=4, decay=0.5,
                             dead_code_threshold=0.01)
  variables = init_variables(quantizer, x)
  centres = np.stack([flat[0], flat[1], flat[2], np.full(4, 100.0, np.float32)])[None]
  variables = {"quantizer": {**variables["quantizer"], "codebook": jnp.asarray(centres),
                             "ema_sum": jnp.asarray(centres)}}
  step = jax.jit(functools.partial(train_call, quantizer))
  output, variables = step(variables, x, seed=1)
  # Code 3 never wins: its count halves to 0.5, still above the threshold.
  assert 3 not in np.asarray(output.codes)
  np.testing.assert_allclose(variables["quantizer"]["ema_count"][0, 3], 0.5)
  assert float(output.metrics["codes_restarted_level0"]) == 0
  np.testing.assert_allclose(variables["quantizer"]["codebook"][0, 3], 100.0, rtol=1e-4)

  output, variables = step(variables, x, seed=2)
  assert float(output.metrics["codes_restarted_level0"]) == 1
  assert float(output.metrics["codes_restarted"]) == 1
  restarted = np.asarray(variables["quantizer"]["codebook"][0, 3])
  assert np.min(np.abs(flat - restarted).max(axis=1)) < 1e-5  # a vector of the batch
  # Its count restarts at the mean use (128 / 4), and its EMA sum agrees with
  # the new vector, so that the next EMA step starts from it.
  count = np.asarray(variables["quantizer"]["ema_count"][0])
  np.testing.assert_allclose(count[3], 32.0)
  smoothed = (count + 1e-5) / (count.sum() + 4e-5) * count.sum()
  np.testing.assert_allclose(variables["quantizer"]["ema_sum"][0, 3], restarted * smoothed[3],
                             rtol=1e-5)


def test_a_large_codebook_on_small_batches_is_not_restarted_every_step():
  # 192 vectors per step for 1024 codes (SoundStream's tiny CPU batches): an
  # absolute dead-code threshold would call every code dead and restart them
  # all at every step, so that the codebook never settles.
  quantizer = make_quantizer(num_levels=2, codebook_size=1024, kmeans_init=True,
                             dead_code_threshold=0.1, decay=0.99)
  x, _ = clustered_frames(9, batch=8, frames=24, num_centres=16)
  variables = init_variables(quantizer, x)
  step = jax.jit(functools.partial(train_call, quantizer))
  noise = np.random.default_rng(0).normal(size=(6,) + x.shape).astype(np.float32)
  restarted = []
  for seed in range(6):
    output, variables = step(variables, x + 0.01 * noise[seed], seed=seed)
    restarted.append(float(output.metrics["codes_restarted"]))
  # The first step replaces k-means' duplicate codes; after that, hardly any.
  assert max(restarted[1:]) < 0.01 * 1024, restarted


def test_quantizer_dropout_uses_a_prefix_of_levels_per_example():
  x, _ = clustered_frames(5, batch=16, frames=4)
  quantizer = make_quantizer(num_levels=4, quantizer_dropout=True)
  variables = init_variables(quantizer, x)
  codebooks = jax.jit(quantizers.fit_rvq, static_argnums=(2, 3, 4))(
      jax.random.key(0), x.reshape(-1, 4), 4, 8, 5)
  variables = {"quantizer": {**variables["quantizer"], "codebook": codebooks,
                             "ema_sum": codebooks}}
  output, updated = jax.jit(functools.partial(train_call, quantizer, seed=3))(variables, x)

  level_vectors = np.asarray(codebooks)[np.arange(4), np.asarray(output.codes)]  # [B, T, Q, D]
  prefix_sums = np.cumsum(level_vectors, axis=2)
  used_levels = []
  for example in range(16):
    matches = [q for q in range(1, 5) if np.allclose(
        output.quantized[example], prefix_sums[example, :, q - 1], atol=1e-5)]
    assert len(matches) == 1, (example, matches)
    used_levels.append(matches[0])
  assert len(set(used_levels)) >= 3, used_levels
  # EMA statistics of a level only count the examples where it is active.
  counts = np.asarray(updated["quantizer"]["ema_count"]).sum(-1)
  active_vectors = [4 * sum(n > level for n in used_levels) for level in range(4)]
  np.testing.assert_allclose(counts, 0.9 * 8 + 0.1 * np.asarray(active_vectors), rtol=1e-5)

  # Without training (or dropout), all levels or the requested number.
  full = jit_apply(quantizer, train=False)(variables, x)
  np.testing.assert_allclose(full.quantized, quantizers.rvq_decode(codebooks, full.codes),
                             atol=1e-5)
  two = jit_apply(quantizer, train=False, num_levels=2)(variables, x)
  np.testing.assert_allclose(two.quantized,
                             quantizers.rvq_decode(codebooks, two.codes[..., :2]), atol=1e-5)
  with pytest.raises(ValueError, match="num_levels=5"):
    jit_apply(quantizer, train=False, num_levels=5)(variables, x)

  def total(x):
    return jnp.sum(quantizer.apply(variables, x, train=True,
                                   rngs={"quantizer": jax.random.key(3)}).quantized)

  np.testing.assert_array_equal(jax.jit(jax.grad(total))(jnp.asarray(x)), np.ones_like(x))


def test_commitment_loss_and_bfloat16_inputs():
  x, _ = clustered_frames(6)
  quantizer = make_quantizer()
  variables = init_variables(quantizer, x)
  output = jit_apply(quantizer, train=False)(variables, x)
  codebooks = np.asarray(variables["quantizer"]["codebook"])
  codes, residuals = numpy_rvq(codebooks, x.reshape(-1, 4))
  expected = sum(np.mean((residuals[q] - codebooks[q][codes[:, q]]) ** 2) for q in range(3))
  np.testing.assert_allclose(output.commitment_loss, expected, rtol=1e-4)
  grad = jax.jit(jax.grad(
      lambda x: quantizer.apply(variables, x, train=False).commitment_loss))(jnp.asarray(x))
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0

  low = jit_apply(quantizer, train=False)(variables, jnp.asarray(x, jnp.bfloat16))
  assert low.quantized.dtype == jnp.bfloat16 and low.codes.dtype == jnp.int32
  np.testing.assert_array_equal(
      low.codes, quantizers.rvq_encode(codebooks, jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)))


def test_usage_metrics_on_hand_made_codes():
  codes = jnp.asarray([[0, 3], [0, 3], [1, 3], [2, 3]], jnp.int32)  # [N=4, Q=2]
  histogram = quantizers.code_histogram(codes, 4)
  np.testing.assert_array_equal(histogram, [[2, 1, 1, 0], [0, 0, 0, 4]])
  perplexity, usage = quantizers.usage_metrics(histogram)
  p = np.array([0.5, 0.25, 0.25])
  np.testing.assert_allclose(perplexity, [np.exp(-(p * np.log(p)).sum()), 1.0], rtol=1e-6)
  np.testing.assert_allclose(usage, [0.75, 0.25])
  weighted = quantizers.code_histogram(codes, 4, jnp.asarray([[1, 1], [0, 1], [1, 0], [1, 0]]))
  np.testing.assert_array_equal(weighted, [[1, 1, 1, 0], [0, 0, 0, 2]])

  # The module reports the same for an assignment fixed by hand.
  quantizer = make_quantizer(num_levels=1, codebook_size=4)
  codebook = jnp.asarray([[[0.0], [10.0], [20.0], [30.0]]])
  variables = {"quantizer": {"codebook": codebook, "ema_sum": codebook,
                             "ema_count": jnp.ones((1, 4)), "initialized": jnp.asarray(True)}}
  x = jnp.asarray([[[0.1], [0.2], [9.0], [11.0], [19.0], [21.0], [22.0], [31.0]]])
  metrics = jit_apply(quantizer, train=False)(variables, x).metrics
  p = np.array([2, 2, 3, 1]) / 8
  np.testing.assert_allclose(metrics["perplexity_level0"], np.exp(-(p * np.log(p)).sum()),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["perplexity"], metrics["perplexity_level0"])
  assert float(metrics["codebook_usage_level0"]) == 1.0
  assert float(metrics["codes_restarted"]) == 0.0


def test_sharded_training_call_equals_unsharded():
  x, _ = clustered_frames(7, batch=8, frames=8)
  quantizer = make_quantizer(kmeans_init=True, quantizer_dropout=True, dead_code_threshold=1.0)
  variables = init_variables(quantizer, x)
  step = jax.jit(functools.partial(train_call, quantizer))
  expected_output, expected = step(variables, x)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded_x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  output, got = step(variables, sharded_x)
  np.testing.assert_array_equal(output.codes, expected_output.codes)
  for name in ("codebook", "ema_count", "ema_sum"):
    np.testing.assert_allclose(got["quantizer"][name], expected["quantizer"][name],
                               rtol=1e-5, atol=1e-5)


def test_fields_are_gin_configurable():
  gin.parse_config("ResidualVectorQuantizer.codebook_size = 16\n"
                   "ResidualVectorQuantizer.quantizer_dropout = False")
  quantizer = ResidualVectorQuantizer()
  assert quantizer.codebook_size == 16 and not quantizer.quantizer_dropout
  assert quantizer.num_levels == 12 and quantizer.decay == 0.99
  variables = init_variables(quantizer, np.zeros((1, 2, 3), np.float32))
  assert variables["quantizer"]["codebook"].shape == (12, 16, 3)
  assert "params" not in variables
