"""Tests of MuLan: masking, window averaging, the contrastive loss and its
sharded step, learning audible attributes named by captions, RVQ tokens and
the retrieval metrics. The corpus pipeline is in test_mulan_pipeline.py."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from musiclm_jax import audio as audio_lib
from musiclm_jax.eval import retrieval
from musiclm_jax.partitioning import Partitioner
from musiclm_jax.tokenizers import melody
from musiclm_jax.tokenizers import mulan
from musiclm_jax.tokenizers import mulan_tokens
from musiclm_jax.tokenizers import text as text_lib
from musiclm_jax.training.optimizers import Optimizer
from musiclm_jax.training.train_state import TrainState


def tiny_mulan_config(**overrides) -> mulan.MulanConfig:
  fields = dict(embed_dim=32, window_seconds=0.5, hop_seconds=0.25, n_fft=256, hop_length=128,
                n_mels=16, cnn_channels=(4, 8), patch_frames=4, audio_layers=1,
                audio_d_model=32, audio_heads=2, audio_d_ff=64, text_vocab_size=64,
                max_text_length=12, text_layers=1, text_d_model=32, text_heads=2,
                text_d_ff=64, head_dim=16, dtype="float32")
  fields.update(overrides)
  return mulan.MulanConfig(**fields)


def _init(model: mulan.MulanModel, seed: int = 0):
  return _cached_init(model.config, seed)


@functools.lru_cache(maxsize=None)
def _cached_init(config: mulan.MulanConfig, seed: int):
  """Unboxed variables; cached per config, as compiling an init takes seconds."""
  example = {"audio": np.zeros((1, config.window_samples), np.float32),
             "text_tokens": np.ones((1, config.max_text_length), np.int32)}
  # RBG keys compile much faster than threefry on CPU.
  return nn.unbox(mulan.MulanModel(config).init_variables(jax.random.key(seed, impl="rbg"),
                                                          example))


def test_config_errors():
  with pytest.raises(ValueError, match="audio_encoder"):
    tiny_mulan_config(audio_encoder="rnn")
  with pytest.raises(ValueError, match="text_pooling"):
    tiny_mulan_config(text_pooling="max")
  with pytest.raises(ValueError, match="temperature"):
    tiny_mulan_config(initial_temperature=0.001)


def test_batch_shape_errors():
  model = mulan.MulanModel(tiny_mulan_config())
  with pytest.raises(ValueError, match="windows"):
    model.init_variables(jax.random.key(0), {"audio": np.zeros((1, 100), np.float32),
                                             "text_tokens": np.ones((1, 12), np.int32)})
  with pytest.raises(ValueError, match="text_vocab_size"):
    model.init_variables(jax.random.key(0), {"audio": np.zeros((1, 8000), np.float32),
                                             "text_tokens": np.full((1, 12), 64, np.int32)})
  with pytest.raises(ValueError, match="num_microbatches"):
    model.make_train_step(Optimizer(optax.sgd(0.1), optax.constant_schedule(0.1)), 2)


@pytest.mark.parametrize("encoder", ["cnn", "transformer"])
def test_padding_and_batch_mates_do_not_change_the_embedding(encoder):
  model = mulan.MulanModel(tiny_mulan_config(audio_encoder=encoder))
  variables = _init(model)
  window = model.config.window_samples
  rng = np.random.default_rng(0)
  short = rng.normal(0, 0.1, int(0.6 * window)).astype(np.float32)
  long = rng.normal(0, 0.1, int(1.7 * window)).astype(np.float32)
  embed = jax.jit(model.embed_clips)
  alone = embed(variables, short[None], jnp.array([len(short)]))
  batch = np.stack([np.concatenate([short, rng.normal(0, 3.0, len(long) - len(short))]), long])
  together = embed(variables, batch.astype(np.float32), jnp.array([len(short), len(long)]))
  assert alone.shape == (1, 32)
  np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(together[0], alone[0], atol=1e-5)
  # the noise is not ignored when it counts as audio
  noisy = embed(variables, batch.astype(np.float32), jnp.array([len(long), len(long)]))
  assert np.abs(noisy[0] - alone[0]).max() > 1e-2


def test_clip_embedding_averages_windows():
  model = mulan.MulanModel(tiny_mulan_config())
  variables = _init(model)
  cfg = model.config
  window, hop = cfg.window_samples, cfg.hop_samples
  wav = np.random.default_rng(1).normal(0, 0.1, (1, window + 2 * hop + 100)).astype(np.float32)
  clip = jax.jit(model.embed_clips)(variables, wav, jnp.array([wav.shape[1]]))
  windows = np.stack([wav[0, k * hop:k * hop + window] for k in range(3)])
  each = jax.jit(lambda v, w, l: model.module.apply(v, w, l, method=mulan.Mulan.embed_audio))(
      variables, windows, jnp.full((3,), window))
  mean = np.mean(np.asarray(each), axis=0)
  np.testing.assert_allclose(clip[0], mean / np.linalg.norm(mean), atol=1e-5)
  windows_, lengths, weights = mulan.clip_windows(jnp.asarray(wav), jnp.array([window + hop]),
                                                  window, hop)
  assert windows_.shape == (1, 3, window)
  np.testing.assert_array_equal(lengths, [[window, window, window - hop]])
  np.testing.assert_array_equal(weights, [[1, 1, 0]])


def test_contrastive_loss_values():
  eye = jnp.eye(4, 8)
  loss, sums = mulan.contrastive_loss(eye, eye, jnp.asarray(100.0))
  assert float(loss) < 1e-6 and float(sums["audio_to_text_correct"]) == 4
  same = jnp.tile(eye[:1], (4, 1))
  loss, _ = mulan.contrastive_loss(same, same, jnp.asarray(10.0))
  np.testing.assert_allclose(loss, np.log(4.0), rtol=1e-6)
  # audio->text and text->audio differ for a non-symmetric similarity
  similarity = jnp.asarray([[1.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
  _, sums = mulan.contrastive_loss(similarity, jnp.eye(3), jnp.asarray(1.0))
  assert float(sums["audio_to_text_correct"]) == 2 and float(sums["text_to_audio_correct"]) == 3


def _random_batch(cfg: mulan.MulanConfig, batch_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return {"audio": rng.normal(0, 0.1, (batch_size, cfg.window_samples)).astype(np.float32),
          "text_tokens": rng.integers(1, cfg.text_vocab_size,
                                      (batch_size, cfg.max_text_length)).astype(np.int32)}


def test_sharded_step_equals_unsharded_step():
  """Negatives span the global batch: 8-way data parallel == one device."""
  model = mulan.MulanModel(tiny_mulan_config())
  params = _init(model)["params"]
  tx = optax.adam(1e-2)
  optimizer = Optimizer(tx, optax.constant_schedule(1e-2))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0), model_state={})
  batch = _random_batch(model.config, 16)
  step = model.make_train_step(optimizer, 1)
  single = jax.jit(step)(jax.device_put(state, jax.devices()[0]),
                         jax.device_put(batch, jax.devices()[0]))
  partitioner = Partitioner(mesh_shape=(-1, 1, 1))
  assert partitioner.data_parallel_size == 8
  replicated = jax.tree.map(lambda _: partitioner.replicated(), state)
  sharded_step = partitioner.partition(
      step, in_shardings=(replicated, partitioner.batch_shardings(batch)),
      out_shardings=(replicated, partitioner.replicated()))
  sharded = sharded_step(state, partitioner.shard_batch(batch))
  # 16 pairs: a per-shard loss would see 2 candidates, log 2 at most by chance
  np.testing.assert_allclose(sharded[1]["loss"], single[1]["loss"], rtol=1e-5)
  np.testing.assert_allclose(sharded[1]["accuracy"], single[1]["accuracy"])
  # Adam divides by sqrt(v): a gradient near 0 summed in another order may move
  # its parameter by ~1e-5 of the 1e-2 step.
  for a, b in zip(jax.tree.leaves(sharded[0].params), jax.tree.leaves(single[0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
  shard_loss = jax.jit(lambda b: model.loss(params, b)[0])
  per_shard = np.mean([float(shard_loss(jax.tree.map(lambda x: x[i:i + 2], batch)))
                       for i in range(0, 16, 2)])
  assert abs(per_shard - float(single[1]["loss"])) > 0.3


# ------------------------------------------------------------------ learning

_PITCHES = {"low": 220.0, "middle": 550.0, "high": 1400.0, "very high": 3500.0}
_TIMBRES = ("pure", "buzzy")
_RHYTHMS = ("steady", "pulsing")
_CLASSES = [(p, t, r) for p in _PITCHES for t in _TIMBRES for r in _RHYTHMS]


def _caption(pitch: str, timbre: str, rhythm: str) -> str:
  return f"a {rhythm} {timbre} tone, {pitch} pitched"


def _sound(pitch: str, timbre: str, rhythm: str, seconds: float,
           rng: np.random.Generator) -> np.ndarray:
  """16 kHz audio whose pitch, timbre and rhythm the caption names."""
  t = np.arange(int(seconds * 16000)) / 16000
  f0 = _PITCHES[pitch] * rng.uniform(0.97, 1.03)
  harmonics = (1,) if timbre == "pure" else (1, 3, 5, 7)
  wav = sum(np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 6.3)) / h for h in harmonics)
  if rhythm == "pulsing":
    wav = wav * (np.sin(2 * np.pi * 8 * t + rng.uniform(0, 6.3)) > 0)
  return (rng.uniform(0.1, 0.3) * wav).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny MuLan trained on the 16 synthetic classes; its tokenizer and loss curve."""
  captions = [_caption(*c) for c in _CLASSES]
  tokenizer = text_lib.TextTokenizer(text_lib.train_text_tokenizer(
      captions, str(tmp_path_factory.mktemp("mulan") / "text"), vocab_size=64))
  # so few captions give a near character-level vocabulary: room for 40 pieces
  model = mulan.MulanModel(tiny_mulan_config(text_vocab_size=tokenizer.vocab_size,
                                             max_text_length=40))
  params = _init(model)["params"]
  tx = optax.adam(3e-3)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0), model_state={})
  step = jax.jit(model.make_train_step(Optimizer(tx, optax.constant_schedule(3e-3))))
  tokens = tokenizer.encode(captions, model.config.max_text_length)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(80):
    order = rng.permutation(len(_CLASSES))
    batch = {"audio": np.stack([_sound(*_CLASSES[i], 0.5, rng) for i in order]),
             "text_tokens": tokens[order]}
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return model, {"params": state.params}, tokenizer, losses


def test_contrastive_training_learns_what_captions_say(trained):
  model, variables, tokenizer, losses = trained
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
  # fresh clips of 0.8 s (two windows) against the 16 captions
  rng = np.random.default_rng(1)
  wav = np.stack([_sound(*c, 0.8, rng) for c in _CLASSES])
  audio_emb = jax.jit(model.embed_clips)(variables, wav, jnp.full((16,), wav.shape[1]))
  text_emb = model.embed_text(variables, tokenizer.encode(
      [_caption(*c) for c in _CLASSES], model.config.max_text_length))
  metrics = retrieval.retrieval_metrics(np.asarray(text_emb), np.asarray(audio_emb))
  # chance: recall@1 = 1/16, recall@5 = 5/16
  assert metrics["text_to_audio_recall@1"] >= 0.4, metrics
  assert metrics["audio_to_text_recall@5"] >= 0.8, metrics
  cosine = retrieval.mulan_cycle_consistency(text_emb, audio_emb)
  assert cosine.shape == (16,)
  mismatched = retrieval.mulan_cycle_consistency(text_emb, np.roll(audio_emb, 1, axis=0))
  assert np.mean(cosine) > np.mean(mismatched) + 0.2
  # zero-shot pitch tagging from prompts that name only the pitch
  prompts = {p: [f"a steady pure tone, {p} pitched", f"a pulsing buzzy tone, {p} pitched"]
             for p in _PITCHES}
  names, class_emb = retrieval.class_embeddings(
      lambda texts: np.asarray(model.embed_text(
          variables, tokenizer.encode(texts, model.config.max_text_length))), prompts)
  tagging = retrieval.zero_shot_accuracy(np.asarray(audio_emb), names, class_emb,
                                         [c[0] for c in _CLASSES])
  assert tagging["accuracy"] >= 0.5 and tagging["chance"] == 0.25, tagging


def test_rvq_tokens_of_audio_and_text(trained, tmp_path):
  model, variables, tokenizer, _ = trained
  rng = np.random.default_rng(2)
  clips = [_CLASSES[i % 16] for i in range(64)]
  wav = np.stack([_sound(*c, 0.5, rng) for c in clips])
  tok = mulan_tokens.MulanTokenizer(model, variables, tokenizer, batch_size=64)
  embeddings = tok.audio_embeddings(wav, 16000)
  with pytest.raises(ValueError, match="cannot fit"):
    mulan_tokens.fit_mulan_rvq(embeddings[:4], num_levels=2, codebook_size=8)
  codebooks, report = mulan_tokens.fit_mulan_rvq(embeddings, num_levels=4, codebook_size=8,
                                                 num_iters=10)
  errors = report["relative_error"]
  assert codebooks.shape == (4, 8, 32) and len(errors) == 4
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.5 * errors[0]
  tok.codebooks = jnp.asarray(codebooks)
  # resampled input: 24 kHz audio gives the 16 kHz first-level codes
  m_a = tok.audio_tokens(wav[:8], 16000)
  m_a_24k = tok.audio_tokens(audio_lib.resample(wav[:8], 16000, 24000), 24000)
  assert m_a.shape == (8, 4) and m_a.dtype == np.int32
  np.testing.assert_array_equal(m_a[:, 0], m_a_24k[:, 0])
  m_t = tok.text_tokens([_caption(*c) for c in clips[:8]])
  assert m_t.shape == (8, 4) and np.all((m_t >= 0) & (m_t < 8))
  # a caption's first code tends to be its audio's: better than chance (1/8)
  assert np.mean(m_t[:, 0] == m_a[:, 0]) >= 0.25
  path = mulan_tokens.save_rvq(str(tmp_path), codebooks, report)
  np.testing.assert_array_equal(mulan_tokens.load_rvq(str(tmp_path)), codebooks)
  assert path == str(tmp_path / mulan_tokens.RVQ_FILE)
  assert os.path.isfile(tmp_path / mulan_tokens.RVQ_MANIFEST_FILE)


@pytest.mark.parametrize("make_config, model", [
    (mulan.MulanConfig, mulan.MulanModel), (melody.MelodyConfig, melody.MelodyModel)])
def test_audio_window_configs_refuse_bad_windows_and_batches(make_config, model):
  """MuLan and the melody encoder share their window fields' checks."""
  config = make_config(sample_rate=16000, window_seconds=0.5, hop_seconds=0.25)
  assert (config.window_samples, config.hop_samples) == (8000, 4000)
  assert config.compute_dtype == jnp.float32
  with pytest.raises(ValueError, match="too short for n_fft"):
    make_config(window_seconds=0.01, n_fft=512)
  with pytest.raises(ValueError, match="hop_seconds 0.0 must be positive"):
    make_config(hop_seconds=0.0)
  with pytest.raises(TypeError):
    make_config(dtype="float13")
  audio = np.zeros((2, 7999), np.float32)
  with pytest.raises(ValueError, match=r"trains on \[batch, 8000\] windows \(0.5 s at 16000"):
    model(config).init_variables(jax.random.key(0), {
        "audio": audio, "text_tokens": np.zeros((2, 4), np.int32),
        "melody_id": np.zeros(2, np.int32)})
