import functools
import logging
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from musiclm_jax.models import DecoderOnlyModel
from musiclm_jax.partitioning import Partitioner
from musiclm_jax.training import optimizers
from musiclm_jax.training.checkpoints import Checkpointer, MissingCheckpointError, load_trained_variables
from musiclm_jax.training.metrics import read_jsonl_metrics
from musiclm_jax.training.synthetic_task import SyntheticTokenTask
from musiclm_jax.training.train_state import partitioned_initializer
from musiclm_jax.training.trainer import NonFiniteLossError, IncompatibleCheckpointError, train


def run(model_dir, num_steps, *, model=None, optimizer=None, mesh_shape=None,
        save_every=2, **kwargs):
  """The trainer on the synthetic task: on one device, or on the first of the 8
  devices that `mesh_shape` (no -1) spans (8 virtual devices share 2 cores: a step
  on all 8 costs several times more)."""
  partitioner = (Partitioner((1, 1, 1), devices=jax.devices()[:1]) if mesh_shape is None
                 else Partitioner(mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)]))
  return train(model_dir=str(model_dir), task=SyntheticTokenTask(length=32, max_motif_length=6),
               model=model or DecoderOnlyModel(tiny_config()), num_steps=num_steps,
               batch_size=8, optimizer=optimizer or optimizers.make_optimizer(
                   schedule=optimizers.warmup_cosine(3e-3, 5, 60)),
               partitioner=partitioner,
               checkpointer=functools.partial(Checkpointer, save_every_steps=save_every,
                                              max_to_keep=2),
               log_every_steps=1, **kwargs)


def losses(model_dir):
  return {row["step"]: row["train/loss"] for row in read_jsonl_metrics(str(model_dir))
          if "train/loss" in row}


def test_loss_falls_on_the_synthetic_task(tmp_path):
  result = run(tmp_path, 60, eval_every_steps=60, eval_batches=2, save_every=100)
  curve = losses(tmp_path)
  assert curve[1] > 9.0  # ~log(vocab) at initialisation
  assert np.mean([curve[s] for s in range(55, 61)]) < 0.45 * curve[1]
  assert result.metrics["eval_loss"] < 0.45 * curve[1]
  assert result.metrics["tokens_per_sec"] > 0
  assert os.listdir(tmp_path / "checkpoints") == ["60"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_adafactor_with_rsqrt_schedule_trains_on_a_sharded_mesh(tmp_path):
  optimizer = optimizers.make_optimizer(optimizer=optimizers.adafactor,
                                        schedule=optimizers.warmup_rsqrt(1e-2, 5))
  run(tmp_path, 20, optimizer=optimizer, mesh_shape=(2, 2, 2), save_every=100)
  curve = losses(tmp_path)
  assert np.mean([curve[s] for s in range(16, 21)]) < 0.6 * curve[1]


def test_resume_after_sigterm_reproduces_the_uninterrupted_run(tmp_path):
  data_parallel = (2, 1, 1)  # sharded state and batches over 2 devices
  uninterrupted = run(tmp_path / "a", 6, mesh_shape=data_parallel)
  assert not uninterrupted.preempted
  # Saved every 2 steps, the newest 2 kept.
  assert Checkpointer(str(tmp_path / "a" / "checkpoints")).all_steps() == [4, 6]

  def preempt(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  interrupted = run(tmp_path / "b", 6, mesh_shape=data_parallel, step_callback=preempt)
  assert interrupted.preempted and interrupted.step == 3
  assert Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == 3
  resumed = run(tmp_path / "b", 6, mesh_shape=data_parallel)
  assert resumed.step == 6
  assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bit-exact on CPU


def test_restore_onto_a_different_mesh(tmp_path):
  model = DecoderOnlyModel(tiny_config())
  tx = optimizers.make_optimizer().tx
  init_variables = lambda rng: {"params": model.init_params(rng, 16)}
  data_parallel = Partitioner((8, 1, 1))
  init, _, _ = partitioned_initializer(init_variables, tx, data_parallel)
  state = init(7)
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, {"batches_read": 5}, {"note": "test"})
  ckpt.wait()

  model_parallel = Partitioner((2, 2, 2))
  _, abstract, shardings = partitioned_initializer(init_variables, tx, model_parallel)
  restored, data_state, manifest = ckpt.restore(1, abstract)
  assert data_state == {"batches_read": 5} and manifest == {"note": "test"}
  kernel = restored.params["layers"]["mlp"]["wi_0"]["kernel"]
  assert kernel.sharding.spec == shardings.params["layers"]["mlp"]["wi_0"]["kernel"].spec
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, state)
  ckpt.close()



def test_saving_small_replicated_arrays_compiles_nothing(tmp_path):
  """Orbax's replica-parallel save would compile a slice program per shape and
  replica (checkpoints.REPLICA_PARALLEL_MIN_SLICE_BYTES keeps small arrays whole)."""
  mesh = Partitioner((4, 2, 1)).mesh
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  state = {f"w{i}": jax.device_put(jnp.arange(16 * (i + 1) * 8, dtype=jnp.float32)
                                   .reshape(16 * (i + 1), 8), sharding) for i in range(6)}
  compiles = []

  class CompileLog(logging.Handler):
    def emit(self, record):
      if "Finished XLA compilation" in record.getMessage():
        compiles.append(record.getMessage())

  handler = CompileLog()
  logging.getLogger("jax._src.dispatch").addHandler(handler)
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  try:
    with jax.log_compiles():
      ckpt.save(1, state, {}, {})
      ckpt.wait()
  finally:
    logging.getLogger("jax._src.dispatch").removeHandler(handler)
  assert not compiles
  restored, _, _ = ckpt.restore(1, jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, state)
  ckpt.close()

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Updates turn NaN from the 4th step (state.step == 3) on.
  poison = optax.scale_by_schedule(lambda count: jnp.where(count >= 3, jnp.nan, 1.0))
  tx = optax.chain(optax.adamw(1e-3), poison)
  optimizer = optimizers.Optimizer(tx, optax.constant_schedule(1e-3))
  with pytest.raises(NonFiniteLossError, match=r"step 4.*last good checkpoint is step 2"):
    run(tmp_path, 10, optimizer=optimizer)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.all_steps() == [2]
  _, abstract, _ = partitioned_initializer(
      lambda rng: {"params": DecoderOnlyModel(tiny_config()).init_params(rng, 32)}, tx,
      Partitioner((-1, 1, 1)))
  state, _, _ = ckpt.restore(2, abstract)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  ckpt.close()


def test_resuming_with_another_model_is_refused(tmp_path):
  run(tmp_path, 2)
  with pytest.raises(IncompatibleCheckpointError, match="d_ff"):
    run(tmp_path, 4, model=DecoderOnlyModel(tiny_config(d_ff=128)))


def test_schedules():
  cosine = optimizers.warmup_cosine(1.0, warmup_steps=10, decay_steps=110)
  assert float(cosine(0)) == 0.0
  assert float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(cosine(110)) == pytest.approx(0.0, abs=1e-7)
  rsqrt = optimizers.warmup_rsqrt(1.0, warmup_steps=100)
  assert float(rsqrt(50)) == pytest.approx(0.5)
  assert float(rsqrt(100)) == pytest.approx(1.0)
  assert float(rsqrt(400)) == pytest.approx(0.5)


def test_load_trained_variables_reads_params_and_model_state_onto_one_device(tmp_path):
  model = DecoderOnlyModel(tiny_config())
  codebook = np.arange(12, dtype=np.float32).reshape(4, 3)

  def init_variables(rng):
    return {"params": model.init_params(rng, 16), "quantizer": {"codebook": codebook}}

  init, _, _ = partitioned_initializer(init_variables, optimizers.make_optimizer().tx,
                                       Partitioner((2, 2, 2)))
  state = init(3)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(4, state, {"batches_read": 4}, {"model": "test"})
  ckpt.close()
  variables, manifest = load_trained_variables(str(tmp_path))
  assert manifest == {"model": "test", "step": 4} and sorted(variables) == ["params", "quantizer"]
  np.testing.assert_array_equal(variables["quantizer"]["codebook"], codebook)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               variables["params"], state.params)
  assert all(len(leaf.devices()) == 1 for leaf in jax.tree.leaves(variables))
  with pytest.raises(MissingCheckpointError, match="no checkpoint of step 9"):
    load_trained_variables(str(tmp_path), step=9)
  with pytest.raises(MissingCheckpointError, match="train the model first"):
    load_trained_variables(str(tmp_path / "nowhere"))
