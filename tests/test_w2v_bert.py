"""w2v-BERT: rates, masking, pre-training, semantic k-means and tokens."""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.partitioning import Partitioner
from musiclm_jax.tokenizers import semantic
from musiclm_jax.tokenizers import w2v_bert
from musiclm_jax.training import optimizers
from musiclm_jax.training.checkpoints import Checkpointer
from musiclm_jax.training.metrics import read_jsonl_metrics
from musiclm_jax.training.trainer import train

RATE = 16000
PITCHES = 220.0 * 2.0 ** (np.arange(0, 24, 2) / 12)  # a two-octave whole-tone scale


def tiny_config(**overrides) -> w2v_bert.W2vBertConfig:
  fields = dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_contrastive_layers=1,
                num_mlm_layers=2, subsampling_channels=8, codebook_size=32, code_dim=16,
                projection_dim=16, dtype="float32")
  fields.update(overrides)
  return w2v_bert.W2vBertConfig(**fields)


def tiny_model(diversity_weight: float = 0.1) -> w2v_bert.W2vBertModel:
  return w2v_bert.W2vBertModel(tiny_config(), mask_start_prob=0.15, mask_span=3,
                               num_negatives=8, gumbel_decay=0.95,
                               diversity_weight=diversity_weight)


def melody(rng: np.random.Generator, seconds: float) -> np.ndarray:
  """Notes of random pitch (0.08-0.32 s each, 3 harmonics) plus a little noise."""
  out = np.zeros(int(seconds * RATE), np.float32)
  start = 0
  while start < len(out):
    length = int(rng.uniform(0.08, 0.32) * RATE)
    t = np.arange(min(length, len(out) - start)) / RATE
    f = rng.choice(PITCHES)
    note = sum(np.sin(2 * np.pi * h * f * t) / h for h in (1, 2, 3))
    out[start:start + len(t)] = 0.2 * note * np.exp(-3 * t)
    start += length
  return out + 0.003 * rng.standard_normal(len(out)).astype(np.float32)


class MelodyTask:
  """Endless batches `{"audio": [batch, samples]}` of `melody` clips (trainer protocol)."""

  def __init__(self, seconds: float = 1.0):
    self.seconds = seconds

  def iterator(self, split, global_batch_size):
    task = self

    class Iterator:
      def __init__(self):
        self.index = 0

      def __iter__(self):
        return self

      def __next__(self):
        rng = np.random.default_rng([self.index, split == "train"])
        self.index += 1
        return {"audio": np.stack([melody(rng, task.seconds)
                                   for _ in range(global_batch_size)])}

      def get_state(self):
        return {"index": self.index}

      def set_state(self, state):
        self.index = state["index"]

    return Iterator()


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
  """A tiny w2v-BERT trained 200 steps on melodies through the generic trainer.

  Without the diversity loss: at this size and batch it flattens the
  quantiser's softmax and stalls the contrastive loss within 200 steps.
  """
  model_dir = tmp_path_factory.mktemp("w2v_bert")
  result = train(model_dir=str(model_dir), task=MelodyTask(),
                 model=tiny_model(diversity_weight=0.0),
                 num_steps=200, batch_size=8,
                 optimizer=optimizers.make_optimizer(
                     schedule=optimizers.warmup_cosine(2e-3, 5, 200)),
                 partitioner=Partitioner((-1, 1, 1)),
                 checkpointer=functools.partial(Checkpointer, save_every_steps=1000),
                 log_every_steps=1, eval_every_steps=200, eval_batches=1)
  return str(model_dir), result


def test_one_second_is_25_frames():
  model = tiny_model()
  wav = np.stack([melody(np.random.default_rng(i), 1.0) for i in range(2)])
  variables = jax.eval_shape(lambda r: model.init_variables(r, {"audio": wav}),
                             jax.random.PRNGKey(0))
  params = nn.unbox(variables)["params"]
  assert w2v_bert.num_frames(RATE) == 25 and w2v_bert.FRAME_RATE == 25

  def hidden(audio, layer=None):
    return jax.eval_shape(lambda p, a: model.hidden_states(p, a, layer), params, audio).shape

  for seconds, frames in ((1.0, 25), (2.5, 62), (0.04, 1)):
    assert hidden(jnp.zeros((2, int(seconds * RATE)))) == (2, frames, 32)
  assert hidden(wav, 1) == (2, 25, 32)
  out = jax.eval_shape(lambda p: model.module.apply(
      {"params": p}, wav, jnp.zeros((2, 25), bool), jnp.ones(())), params)
  assert out.context.shape == out.targets.shape == (2, 25, 16)
  assert out.mlm_logits.shape == (2, 25, 32) and out.code_ids.shape == (2, 25)
  with pytest.raises(ValueError, match="shorter than one"):
    hidden(wav[:, :600])
  with pytest.raises(ValueError, match="outside"):
    hidden(wav, 3)
  with pytest.raises(ValueError, match="does not match"):
    jax.eval_shape(lambda p: model.module.apply(
        {"params": p}, wav, jnp.zeros((2, 24), bool), jnp.ones(())), params)


def test_feature_layer_rule_scales_the_papers_7_of_12():
  assert [tiny_config(num_mlm_layers=n).semantic_layer for n in (1, 2, 4, 6, 12, 24)] == [
      1, 1, 2, 4, 7, 14]
  assert tiny_config(feature_layer=2).semantic_layer == 2
  with pytest.raises(ValueError, match="feature_layer"):
    tiny_config(feature_layer=3)


def test_span_mask_fraction_and_span_lengths():
  p, span, frames = 0.05, 10, 200
  mask = np.asarray(w2v_bert.span_mask(jax.random.PRNGKey(0), 2000, frames, p, span))
  # Interior frames are masked unless none of the last `span` frames started a span.
  expected = 1 - (1 - p) ** span
  assert abs(mask[:, span:].mean() - expected) < 0.01
  assert abs(mask[:, 0].mean() - p) < 0.02
  # Every masked run that does not reach the end is at least one span long.
  padded = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
  starts = np.argwhere(np.diff(padded, axis=1) == 1)
  ends = np.argwhere(np.diff(padded, axis=1) == -1)
  lengths = ends[:, 1] - starts[:, 1]
  interior = ends[:, 1] < frames
  assert lengths[interior].min() >= span
  assert lengths[~interior].min() >= 1
  # Mean run length of overlapping spans: span - 1 + 1 / P(no start in a frame)... > span.
  assert lengths[interior].mean() > span


def test_negatives_are_other_masked_frames():
  mask = np.array(w2v_bert.span_mask(jax.random.PRNGKey(3), 16, 40, 0.1, 4))
  mask[0] = False
  mask[0, 7] = True  # a single masked frame: distractors come from elsewhere
  negatives = np.asarray(w2v_bert.sample_negatives(jax.random.PRNGKey(4), jnp.asarray(mask), 12))
  assert negatives.shape == (16, 40, 12)
  assert not np.any(negatives == np.arange(40)[None, :, None])
  for b in range(1, 16):
    if mask[b].sum() >= 2:
      assert mask[b][negatives[b][mask[b]]].all()


def test_pretraining_loss_falls_through_the_trainer(trained_dir):
  model_dir, result = trained_dir
  rows = [r for r in read_jsonl_metrics(model_dir) if "train/loss" in r]
  first, last = rows[0], rows[-40:]
  # Contrastive: from at least chance (log of 1 + 8 candidates) to clearly below.
  assert first["train/contrastive_loss"] > 0.98 * np.log(9)
  assert np.mean([r["train/contrastive_loss"] for r in last]) < 0.96 * np.log(9)
  assert np.mean([r["train/loss"] for r in last]) < 0.8 * first["train/loss"]
  assert np.mean([r["train/accuracy"] for r in last]) > 0.2  # MLM: 32 codes
  assert np.mean([r["train/code_perplexity"] for r in last]) > 8  # codes in use
  assert 0.2 < rows[-1]["train/masked_fraction"] < 0.7
  assert result.metrics["audio_s_per_sec"] > 0
  assert result.metrics["eval_loss"] < 0.8 * first["train/loss"]
  assert os.listdir(os.path.join(model_dir, "checkpoints")) == ["200"]


def blobs(rng, num_points, centres):
  labels = rng.integers(0, len(centres), num_points)
  return centres[labels] + 0.05 * rng.standard_normal((num_points, centres.shape[1])), labels


@pytest.mark.parametrize("max_lloyd_frames", [10_000, 100])
def test_fit_kmeans_recovers_separable_clusters(max_lloyd_frames):
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((6, 8)) * np.array([1, 10, 1, 10, 1, 10, 1, 10])
  frames, labels = blobs(rng, 2000, centres)
  fitted, stats = semantic.fit_kmeans(jax.random.PRNGKey(0), frames, num_clusters=6,
                                      max_lloyd_frames=max_lloyd_frames, minibatch_size=256)
  test_frames, test_labels = blobs(rng, 500, centres)
  ids = np.asarray(fitted.assign(jnp.asarray(test_frames, jnp.float32)))
  # Each true cluster maps to exactly one k-means cluster, and vice versa.
  pairs = set(zip(test_labels.tolist(), ids.tolist()))
  assert len(pairs) == 6 and len({i for _, i in pairs}) == 6
  assert stats["used_clusters"] == 6 and stats["perplexity"] > 5.5
  with pytest.raises(ValueError, match="clusters"):
    semantic.fit_kmeans(jax.random.PRNGKey(0), frames[:5], num_clusters=6)


def test_semantic_tokens_at_25_hz_are_deterministic(trained_dir):
  model_dir, _ = trained_dir
  batches = MelodyTask(seconds=2.0).iterator("train", 4)
  manifest = semantic.fit_semantic_kmeans(model_dir, batches, num_clusters=16,
                                          num_frames=400, frames_per_clip=25, seed=0)
  assert manifest["mlm_layer"] == 1 and manifest["num_frames"] == 400
  assert manifest["used_clusters"] >= 8
  first = np.load(os.path.join(model_dir, semantic.KMEANS_FILE))["centroids"]
  semantic.fit_semantic_kmeans(model_dir, MelodyTask(seconds=2.0).iterator("train", 4),
                               num_clusters=16, num_frames=400, frames_per_clip=25, seed=0)
  np.testing.assert_array_equal(
      first, np.load(os.path.join(model_dir, semantic.KMEANS_FILE))["centroids"])

  tokenizer = semantic.SemanticTokenizer.load(model_dir)
  wav = np.stack([melody(np.random.default_rng(100 + i), 3.0) for i in range(2)])
  tokens = np.asarray(tokenizer.semantic_tokens(wav))
  assert tokens.shape == (2, 75) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < 16 and len(np.unique(tokens)) >= 4
  again = semantic.SemanticTokenizer.load(model_dir).semantic_tokens(wav)
  np.testing.assert_array_equal(tokens, np.asarray(again))
  # A clip's tokens do not depend on the other clips of the batch.
  np.testing.assert_array_equal(tokens[1:], np.asarray(tokenizer.semantic_tokens(wav[1:])))
  with open(os.path.join(model_dir, semantic.KMEANS_MANIFEST_FILE)) as f:
    assert json.load(f)["format"] == semantic.KMEANS_FORMAT
