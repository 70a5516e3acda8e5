import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from conftest import random_batch, tiny_config
from musiclm_jax.models import DecoderOnlyModel
from musiclm_jax.partitioning import Partitioner, resolve_mesh_shape
from musiclm_jax.training.optimizers import Optimizer, make_optimizer
from musiclm_jax.training.steps import make_train_step
from musiclm_jax.training.train_state import partitioned_initializer


def test_resolve_mesh_shape():
  assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  assert resolve_mesh_shape((1, 4, 2), 8) == (1, 4, 2)
  with pytest.raises(ValueError, match="at most one -1"):
    resolve_mesh_shape((-1, -1, 1), 8)
  with pytest.raises(ValueError, match="not divisible"):
    resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    resolve_mesh_shape((2, 2, 1), 8)
  with pytest.raises(ValueError, match="3 entries"):
    resolve_mesh_shape((8, 1), 8)


def test_logical_rules_shard_params_and_optimizer_state():
  partitioner = Partitioner((2, 2, 2))
  model = DecoderOnlyModel(tiny_config())
  _, abstract, shardings = partitioned_initializer(
      lambda rng: {"params": model.init_params(rng, 16)}, make_optimizer().tx, partitioner)
  spec = lambda s: tuple(s.spec)
  # [layers, embed, qkv, heads, kv] -> embed over fsdp, heads over tensor.
  assert spec(shardings.params["layers"]["attention"]["qkv"]["kernel"]) == (
      None, "fsdp", None, "tensor", None)
  assert spec(shardings.params["logits"]["kernel"]) == ("fsdp", "tensor")
  assert spec(shardings.params["token_embed"]["embedding"]) == ("tensor", "fsdp")
  # Adam moments follow their parameters; the step count is replicated.
  adam = shardings.opt_state[1][0]
  assert spec(adam.mu["layers"]["mlp"]["wo"]["kernel"]) == (None, "tensor", "fsdp")
  assert spec(adam.nu["logits"]["kernel"]) == ("fsdp", "tensor")
  assert spec(adam.count) == ()
  assert abstract.params["logits"]["kernel"].sharding == shardings.params["logits"]["kernel"]


def test_shard_batch_builds_global_arrays():
  partitioner = Partitioner((4, 2, 1))
  local = {"x": np.arange(16 * 3).reshape(16, 3)}
  batch = partitioner.shard_batch(local)
  assert batch["x"].shape == (16, 3)
  assert batch["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  assert len(batch["x"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
  with pytest.raises(ValueError, match="divisible by the data-parallel size 8"):
    partitioner.check_batch_size(12)


def _run_steps(partitioner, model, optimizer, batches):
  init, _, shardings = partitioned_initializer(
      lambda rng: model.init_variables(rng, batches[0]), optimizer.tx, partitioner)
  step = partitioner.partition(
      make_train_step(model, optimizer),
      in_shardings=(shardings, partitioner.batch_shardings(batches[0])),
      out_shardings=(shardings, partitioner.replicated()))
  state = init(0)
  losses = []
  for batch in batches:
    state, metrics = step(state, partitioner.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_sharded_train_step_equals_single_device():
  model = DecoderOnlyModel(tiny_config())
  optimizer = make_optimizer()
  rng = np.random.default_rng(0)
  batches = [random_batch(rng, 8, 16) for _ in range(3)]
  single = Partitioner((1, 1, 1), devices=jax.devices()[:1])
  sharded = Partitioner((2, 2, 2))
  state_1, losses_1 = _run_steps(single, model, optimizer, batches)
  state_8, losses_8 = _run_steps(sharded, model, optimizer, batches)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  assert losses_1[-1] < losses_1[0]
  # The sharded run really was sharded.
  qkv = state_8.params["layers"]["attention"]["qkv"]["kernel"]
  assert len({s.device for s in qkv.addressable_shards}) == 8
  assert qkv.addressable_shards[0].data.shape == (2, 32, 3, 2, 16)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6), state_8.params, state_1.params)


def test_gradient_accumulation_equals_full_batch():
  model = DecoderOnlyModel(tiny_config())
  optimizer = Optimizer(optax.sgd(1.0), optax.constant_schedule(1.0))
  partitioner = Partitioner((2, 2, 2))
  batch = random_batch(np.random.default_rng(5), 16, 16)
  init, _, shardings = partitioned_initializer(
      lambda rng: {"params": model.init_params(rng, 16)}, optimizer.tx, partitioner)
  results = []
  for n in (1, 4):
    step = partitioner.partition(
        make_train_step(model, optimizer, num_microbatches=n),
        in_shardings=(shardings, partitioner.batch_shardings(batch)),
        out_shardings=(shardings, partitioner.replicated()))
    results.append(step(init(0), partitioner.shard_batch(batch)))
  (full, full_metrics), (accumulated, acc_metrics) = results
  np.testing.assert_allclose(acc_metrics["loss"], full_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(acc_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), accumulated.params, full.params)


def test_sharded_kv_cached_decoding_equals_single_device():
  model = DecoderOnlyModel(tiny_config())
  batch = random_batch(np.random.default_rng(6), 8, 12, prefix_length=3)
  tokens, in_prefix = batch["decoder_input_tokens"], batch["decoder_causal_attention"]
  params = nn.unbox(model.init_params(jax.random.key(2), 16))

  def decode_all(partitioner):
    boxed_cache = model.init_cache(8, 16)
    param_shardings = partitioner.logical_shardings(
        jax.eval_shape(lambda rng: model.init_params(rng, 16), jax.random.key(2)))
    cache_shardings = partitioner.logical_shardings(boxed_cache)
    step = partitioner.partition(
        model.decode, in_shardings=(param_shardings, cache_shardings, None, None),
        out_shardings=(partitioner.batch_sharding(3), cache_shardings))
    cache = jax.device_put(nn.unbox(boxed_cache), cache_shardings)
    sharded_params = jax.device_put(params, param_shardings)
    logits, cache = step(sharded_params, cache, tokens[:, :4], in_prefix[:, :4])
    out = [logits]
    for t in range(4, 12):
      logits, cache = step(sharded_params, cache, tokens[:, t:t + 1], in_prefix[:, t:t + 1])
      out.append(logits)
    return np.concatenate(out, axis=1), cache

  single, _ = decode_all(Partitioner((1, 1, 1), devices=jax.devices()[:1]))
  sharded, cache = decode_all(Partitioner((2, 2, 2)))
  key = cache["layers"]["attention"]["key"]  # [layers, batch, length, heads, kv]
  assert key.sharding.spec == jax.sharding.PartitionSpec(
      None, ("data", "fsdp"), None, "tensor", None)
  np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-4)
