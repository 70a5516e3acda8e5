import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_batch, tiny_config
from musiclm_jax.layers.attention import prefix_lm_mask
from musiclm_jax.layers.relative_position import relative_position_bucket
from musiclm_jax.models import DecoderOnlyModel, prefix_lm_example


def bucket(rel, bidirectional=False, num_buckets=32, max_distance=128):
  return int(relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                      num_buckets=num_buckets, max_distance=max_distance))


def test_relative_position_buckets_unidirectional():
  # Keys before the query: distances 0..15 are exact buckets.
  assert [bucket(-n) for n in range(16)] == list(range(16))
  # Then logarithmic: 16 + floor(16 * log(n/16) / log(128/16)).
  assert bucket(-16) == 16
  assert bucket(-32) == 16 + 5  # 16*log(2)/log(8) = 5.33
  assert bucket(-64) == 16 + 10  # 10.67
  assert bucket(-127) == 31
  assert bucket(-1000) == 31  # beyond max_distance: last bucket
  assert bucket(5) == 0  # future keys share bucket 0


def test_relative_position_buckets_bidirectional():
  # Past keys use buckets [0, 16), future keys [16, 32).
  assert bucket(0, True) == 0
  assert bucket(-3, True) == 3
  assert bucket(3, True) == 16 + 3
  assert bucket(-8, True) == 8  # 8 exact buckets, then log
  assert bucket(-16, True) == 8 + 2  # 8*log(2)/log(16) = 2
  assert bucket(1000, True) == 31
  assert bucket(-1000, True) == 15
  # Monotone in distance.
  past = [bucket(-n, True) for n in range(300)]
  assert past == sorted(past)


def test_prefix_lm_mask():
  positions = jnp.arange(5)
  in_prefix = jnp.array([[True, True, True, False, False]])
  mask = np.asarray(prefix_lm_mask(positions, positions, in_prefix, in_prefix))[0, 0]
  expected = np.tril(np.ones((5, 5), bool))
  expected[:3, :3] = True
  np.testing.assert_array_equal(mask, expected)


def test_prefix_is_bidirectional_and_targets_are_causal(tiny_model):
  params = nn.unbox(tiny_model.init_params(jax.random.key(0), 16))
  rng = np.random.default_rng(0)
  base = prefix_lm_example(rng.integers(1, 500, 6), rng.integers(1, 500, 8), 16)
  batch = {k: v[None] for k, v in base.items()}
  logits = tiny_model.logits(params, batch)

  def changed_at(position):
    other = {k: v.copy() for k, v in batch.items()}
    other["decoder_input_tokens"][0, position] += 1
    return np.abs(np.asarray(tiny_model.logits(params, other) - logits)).max(-1)[0] > 1e-6

  # A later prefix token changes earlier prefix positions (bidirectional) ...
  assert changed_at(5)[:5].all()
  # ... but a target token never changes positions before it (causal).
  diff = changed_at(10)
  assert not diff[:10].any() and diff[10:].all()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 6e-2)])
def test_kv_cached_decoding_equals_full_forward(dtype, tol):
  model = DecoderOnlyModel(tiny_config(dtype=dtype))
  params = nn.unbox(model.init_params(jax.random.key(1), 32))
  batch = random_batch(np.random.default_rng(1), 3, 24, prefix_length=6)
  full = model.logits(params, batch)

  cache = nn.unbox(model.init_cache(3, 32))  # longer than the sequence
  tokens, in_prefix = batch["decoder_input_tokens"], batch["decoder_causal_attention"]
  prefill = 7  # BOS + the 6 prefix tokens: the whole bidirectional block at once
  decode = jax.jit(model.decode)
  logits, cache = decode(params, cache, tokens[:, :prefill], in_prefix[:, :prefill])
  pieces = [logits]
  for t in range(prefill, 24):
    logits, cache = decode(params, cache, tokens[:, t:t + 1], in_prefix[:, t:t + 1])
    pieces.append(logits)
  cached = np.concatenate(pieces, axis=1)
  assert int(cache["index"]) == 24
  scale = np.abs(np.asarray(full)).max()
  np.testing.assert_allclose(cached, full, atol=tol * scale, rtol=0)
  np.testing.assert_array_equal(cached.argmax(-1)[:, prefill:],
                                np.asarray(full).argmax(-1)[:, prefill:])


def test_remat_policies_give_the_same_gradients():
  batch = random_batch(np.random.default_rng(2), 2, 16)
  grads = {}
  for policy in ("none", "full", "dots"):
    model = DecoderOnlyModel(tiny_config(remat_policy=policy, dropout_rate=0.1))
    params = nn.unbox(model.init_params(jax.random.key(3), 16))
    grads[policy] = jax.jit(jax.grad(lambda p: model.loss_sums(
        p, batch, jax.random.key(4))[0]))(params)
  for policy in ("full", "dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads["none"], grads[policy])


def test_bf16_compute_keeps_fp32_params_and_logits():
  model = DecoderOnlyModel(tiny_config(dtype="bfloat16"))
  params = nn.unbox(model.init_params(jax.random.key(0), 8))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  batch = random_batch(np.random.default_rng(0), 2, 8, prefix_length=2)
  assert model.logits(params, batch).dtype == jnp.float32
  jaxpr = str(jax.make_jaxpr(model.logits)(params, batch))
  assert "bf16" in jaxpr


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="remat_policy"):
    tiny_config(remat_policy="sometimes")
  with pytest.raises(TypeError):
    tiny_config(dtype="float99")
