"""w2v-BERT: rates, masking, pre-training, semantic k-means and tokens."""
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pretty_midi
import pytest
import xla_env

from musiclm_jax import audio
from musiclm_jax.eval import semantic as semantic_eval
from musiclm_jax.partitioning import Partitioner
from musiclm_jax.sampling import bundle
from musiclm_jax.tokenizers import semantic
from musiclm_jax.tokenizers import w2v_bert
from musiclm_jax.training import checkpoints
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
                 partitioner=Partitioner((1, 1, 1), devices=jax.devices()[:1]),
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


@pytest.mark.parametrize("freq_stride,bins", [(2, 20), (1, 80)])
def test_subsampling_keeps_the_mel_bins_its_frequency_stride_leaves(freq_stride, bins):
  config = tiny_config(subsampling_freq_stride=freq_stride)
  model = w2v_bert.W2vBertModel(config, mask_start_prob=0.15, mask_span=3, num_negatives=8)
  wav = np.stack([melody(np.random.default_rng(i), 1.0) for i in range(2)])
  params = nn.unbox(jax.eval_shape(lambda r: model.init_variables(r, {"audio": wav}),
                                   jax.random.PRNGKey(0)))["params"]
  projection = params["subsampling"]["proj"]["kernel"]
  assert projection.shape == (bins * 8, 32)  # 80 mel bins / stride², 8 channels -> d_model
  assert jax.eval_shape(lambda p: model.hidden_states(p, wav), params).shape == (2, 25, 32)
  # The cost model counts the projection's multiply-adds per frame.
  other = 3 - freq_stride
  other_bins = 80 // other**2
  difference = (config.frame_matmul_params()
                - tiny_config(subsampling_freq_stride=other).frame_matmul_params())
  assert difference == (2 * (80 // freq_stride - 80 // other) * 9 * 8
                        + (bins - other_bins) * 9 * 8 * 8 + (bins - other_bins) * 8 * 32)
  with pytest.raises(ValueError, match="subsampling_freq_stride"):
    tiny_config(subsampling_freq_stride=4)


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


def test_flat_negatives_by_scope():
  mask = np.array(w2v_bert.span_mask(jax.random.PRNGKey(5), 4, 30, 0.2, 3))
  flat_mask = mask.reshape(-1)
  own = np.arange(4 * 30).reshape(4, 30, 1)
  clip = np.asarray(w2v_bert.sample_flat_negatives(jax.random.PRNGKey(6), jnp.asarray(mask),
                                                   16, "clip"))
  assert clip.shape == (4, 30, 16) and not np.any(clip == own)
  assert np.all(clip // 30 == np.arange(4)[:, None, None])  # the frame's own clip
  batch = np.asarray(w2v_bert.sample_flat_negatives(jax.random.PRNGKey(6), jnp.asarray(mask),
                                                    16, "batch"))
  assert batch.shape == (4, 30, 16) and not np.any(batch == own)
  assert flat_mask[batch[mask]].all()  # masked frames only
  assert len(np.unique(batch[mask] // 30)) == 4  # drawn across clips
  mixed = np.asarray(w2v_bert.sample_flat_negatives(jax.random.PRNGKey(6), jnp.asarray(mask),
                                                    16, "mixed"))
  assert mixed.shape == (4, 30, 16) and not np.any(mixed == own)
  assert np.all(mixed[..., :8] // 30 == np.arange(4)[:, None, None])  # the clip's half
  assert flat_mask[mixed[mask]].all() and len(np.unique(mixed[mask][:, 8:] // 30)) == 4
  with pytest.raises(ValueError, match="scope"):
    w2v_bert.sample_flat_negatives(jax.random.PRNGKey(6), jnp.asarray(mask), 4, "corpus")


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
  assert result.metrics["audio_seconds_per_sec"] > 0
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


@pytest.fixture(scope="module")
def fitted_dir(trained_dir):
  """`trained_dir` with its semantic k-means (16 clusters) fitted on melodies."""
  model_dir, _ = trained_dir
  manifest = semantic.fit_semantic_kmeans(model_dir, MelodyTask(seconds=2.0).iterator("train", 4),
                                          num_clusters=16, num_frames=400, frames_per_clip=25,
                                          seed=0, data={"task": "melodies"})
  return model_dir, manifest


def test_semantic_tokens_at_25_hz_are_deterministic(fitted_dir):
  model_dir, manifest = fitted_dir
  assert manifest["mlm_layer"] == 1 and manifest["num_frames"] == 400
  assert manifest["used_clusters"] >= 8 and manifest["data"] == {"task": "melodies"}
  assert manifest["feature_dtype"] == "float32"  # whatever the training dtype
  with open(os.path.join(model_dir, semantic.KMEANS_MANIFEST_FILE)) as f:
    assert json.load(f)["format"] == semantic.KMEANS_FORMAT
  fitted = semantic.SemanticKMeans.load(os.path.join(model_dir, semantic.KMEANS_FILE))
  with tempfile.TemporaryDirectory() as copy:
    shutil.copytree(os.path.join(model_dir, "checkpoints"), os.path.join(copy, "checkpoints"))
    semantic.fit_semantic_kmeans(copy, MelodyTask(seconds=2.0).iterator("train", 4),
                                 num_clusters=16, num_frames=400, frames_per_clip=25, seed=0)
    again = semantic.SemanticKMeans.load(os.path.join(copy, semantic.KMEANS_FILE))
  np.testing.assert_array_equal(fitted.centroids, again.centroids)

  tokenizer = semantic.SemanticTokenizer.load(model_dir)
  wav = np.stack([melody(np.random.default_rng(100 + i), 3.0) for i in range(2)])
  tokens = np.asarray(tokenizer.semantic_tokens(wav))
  assert tokens.shape == (2, 75) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < 16 and len(np.unique(tokens)) >= 4
  np.testing.assert_array_equal(tokens, np.asarray(tokenizer.semantic_tokens(wav)))
  # A clip's tokens do not depend on the other clips of the batch.
  np.testing.assert_array_equal(tokens[1:], np.asarray(tokenizer.semantic_tokens(wav[1:])))
  # Identical audio gives identical tokens; gain and delays change some of them.
  stability = semantic_eval.token_stability(tokenizer.semantic_tokens, list(wav),
                                            gains_db=(0.0, 3.0), shifts_ms=(0, 5))
  assert stability["gain_+0dB"] == stability["delay_0ms"] == 1.0
  assert 0.0 <= stability["delay_5ms"] <= 1.0 and 0.0 <= stability["gain_+3dB"] <= 1.0
  assert stability["delay_mean"] == pytest.approx((1.0 + stability["delay_5ms"]) / 2)


# -- evaluation ------------------------------------------------------------------------

def chord_score(rng: np.random.Generator, seconds: float) -> pretty_midi.PrettyMIDI:
  """Random major/minor triads of 0.24-0.48 s in an organ, drum hits every 0.2 s."""
  score = pretty_midi.PrettyMIDI()
  organ = pretty_midi.Instrument(program=19)
  drums = pretty_midi.Instrument(program=0, is_drum=True)
  start = 0.0
  while start < seconds:
    end = min(start + rng.choice([0.24, 0.32, 0.48]), seconds)
    root = int(rng.integers(48, 60))
    for interval in (0, 4 if rng.random() < 0.5 else 3, 7):
      organ.notes.append(pretty_midi.Note(velocity=90, pitch=root + interval, start=start,
                                          end=end))
    start = end
  drums.notes += [pretty_midi.Note(velocity=100, pitch=38, start=t, end=t + 0.05)
                  for t in np.arange(0.0, seconds, 0.2)]
  score.instruments += [organ, drums]
  return score


def labelled_clip(rng: np.random.Generator, seconds: float) -> semantic_eval.LabelledClip:
  """A chord score rendered with sines (pretty_midi) plus noise bursts for the drums."""
  score = chord_score(rng, seconds)
  samples = int(seconds * RATE)
  wav = np.zeros(samples, np.float32)
  tones = score.instruments[0].synthesize(RATE)[:samples]
  wav[:len(tones)] = 0.1 * tones
  for note in score.instruments[1].notes:
    start = int(note.start * RATE)
    burst = rng.standard_normal(800) * np.exp(-np.arange(800) / 150)
    wav[start:start + 800] += 0.3 * burst[:samples - start].astype(np.float32)
  midi = io.BytesIO()
  score.write(midi)
  frames = w2v_bert.num_frames(samples)
  return semantic_eval.LabelledClip(wav, semantic_eval.midi_frame_labels(midi.getvalue(),
                                                                         frames))


def test_midi_frame_labels():
  score = pretty_midi.PrettyMIDI()
  piano = pretty_midi.Instrument(program=0)
  piano.notes += [pretty_midi.Note(velocity=80, pitch=p, start=0.0, end=0.5)
                  for p in (60, 64, 67)]  # C major
  piano.notes += [pretty_midi.Note(velocity=80, pitch=p, start=0.5, end=1.0)
                  for p in (57, 60, 64, 76)]  # A minor, E on top
  drums = pretty_midi.Instrument(program=0, is_drum=True)
  drums.notes += [pretty_midi.Note(velocity=80, pitch=36, start=t, end=t + 0.1)
                  for t in (0.0, 0.25, 0.99)]
  score.instruments += [piano, drums]
  midi = io.BytesIO()
  score.write(midi)
  labels = semantic_eval.midi_frame_labels(midi.getvalue(), 30)
  assert set(labels) == set(semantic_eval.LABELS)
  c_major, a_minor = (1 << 0) | (1 << 4) | (1 << 7), (1 << 9) | (1 << 0) | (1 << 4)
  # Frames of 40 ms: 0-11 C major, 12 (0.48-0.52 s) both, 13-24 A minor, 25- silent.
  np.testing.assert_array_equal(labels["pitch_classes"],
                                [c_major] * 12 + [c_major | a_minor] + [a_minor] * 12 + [0] * 5)
  np.testing.assert_array_equal(labels["lowest_pitch_class"],
                                [0] * 12 + [9] * 13 + [semantic_eval.NO_NOTE] * 5)
  np.testing.assert_array_equal(labels["top_pitch_class"],  # G, then the E on top
                                [7] * 12 + [4] * 13 + [semantic_eval.NO_NOTE] * 5)
  np.testing.assert_array_equal(labels["chord_root"][:12], 0)
  np.testing.assert_array_equal(labels["chord_root"][13:25], 9)
  np.testing.assert_array_equal(labels["chord_root"][25:], semantic_eval.NO_NOTE)
  np.testing.assert_array_equal(np.nonzero(labels["drum_onset"])[0], [0, 6, 24])
  with pytest.raises(ValueError, match="MIDI"):
    semantic_eval.midi_frame_labels(b"not a midi file", 10)


def test_nmi_and_usage_through_evaluate_tokens():
  clips = [labelled_clip(np.random.default_rng(i), seconds) for i, seconds in enumerate((2, 3))]
  truth = {name: np.concatenate([c.labels[name] for c in clips]) for name in semantic_eval.LABELS}
  by_length = {len(c.wav): c for c in clips}  # gain and delays keep the length

  def perfect(wav):  # a one-to-one renaming of the clip's pitch-class sets
    return (by_length[wav.shape[1]].labels["pitch_classes"] * 7 + 3)[None]

  report = semantic_eval.evaluate_tokens(perfect, 4096 * 7 + 3, clips)
  assert report["nmi"]["pitch_classes"] == pytest.approx(1.0)
  assert report["ami"]["pitch_classes"] == pytest.approx(1.0)
  assert report["nmi_shuffled_labels"]["pitch_classes"] < 0.5
  # Random tokens over many clusters: a sizeable NMI from the finite sample alone,
  # an AMI near zero.
  random_tokens = np.random.default_rng(0).integers(0, 64, len(truth["chord_root"]))
  noise = semantic_eval.label_nmi(random_tokens, {"chord_root": truth["chord_root"]})
  assert noise["nmi"]["chord_root"] > 0.1 and abs(noise["ami"]["chord_root"]) < 0.05
  assert report["used_clusters"] == len(np.unique(truth["pitch_classes"]))
  assert report["stability"]["gain_mean"] == 1.0
  constant = semantic_eval.evaluate_tokens(
      lambda wav: np.zeros((1, wav.shape[1] // 640), np.int32), 16, clips)
  assert all(v == 0.0 for v in constant["nmi"].values())
  assert all(v == pytest.approx(0.0) for v in constant["ami"].values())
  assert constant["perplexity"] == 1.0 and constant["used_clusters"] == 1
  assert constant["stability"]["gain_mean"] == constant["stability"]["delay_mean"] == 1.0
  with pytest.raises(ValueError, match="shape"):
    semantic_eval.label_nmi(np.zeros(5), {"x": np.zeros(6)})
  # Within clips: the perfect tokens follow every change, constant ones none.
  assert report["within_clip_ami"]["pitch_classes"] == pytest.approx(1.0)
  assert all(v == pytest.approx(0.0) for v in constant["within_clip_ami"].values())


def test_within_clip_ami_tells_tokens_that_follow_notes_from_clip_names():
  clips = [labelled_clip(np.random.default_rng(i), 3.0) for i in range(4)]
  labels = [c.labels for c in clips]
  # Each clip renames its own chord roots differently: one-to-one inside a clip,
  # clashing across clips.
  follow = [(c["chord_root"] + 2) * (i + 1) % 13 for i, c in enumerate(labels)]
  within = semantic_eval.within_clip_ami(follow, labels)
  assert within["chord_root"] == pytest.approx(1.0)
  assert semantic_eval.label_nmi(np.concatenate(follow), {"chord_root": np.concatenate(
      [c["chord_root"] for c in labels])})["ami"]["chord_root"] < 0.9
  # A token that names the clip: a fair AMI over all frames, none within clips.
  identity = semantic_eval.clip_identity(clips)
  assert identity["ami"]["chord_root"] > 0.05
  assert identity["within_clip_ami"]["chord_root"] == pytest.approx(0.0)
  # A label that never changes inside a clip has nothing to follow there.
  steady = [dict(c, chord_root=np.full_like(c["chord_root"], i)) for i, c in enumerate(labels)]
  assert semantic_eval.within_clip_ami(follow, steady)["chord_root"] is None
  with pytest.raises(ValueError, match="clips"):
    semantic_eval.within_clip_ami(follow[:2], labels)


def test_tokenizer_and_export_read_the_step_the_kmeans_was_fitted_on(fitted_dir, tmp_path):
  model_dir, manifest = fitted_dir
  run = str(tmp_path / "run")
  shutil.copytree(model_dir, run)
  variables, checkpoint_manifest = checkpoints.load_trained_variables(run)
  fitted_step = checkpoint_manifest.pop("step")
  assert manifest[checkpoints.FITTED_STEP] == fitted_step
  # Training goes on after the fit: a newer checkpoint with other parameters.
  later = Checkpointer(os.path.join(run, "checkpoints"), async_save=False)
  later.save(fitted_step + 10, {"params": jax.tree.map(lambda p: p * 0.5, variables["params"])},
             {}, checkpoint_manifest)
  later.close()
  wav = melody(np.random.default_rng(5), 2.0)[None]
  expected = np.asarray(semantic.SemanticTokenizer.load(model_dir).semantic_tokens(wav))
  np.testing.assert_array_equal(semantic.SemanticTokenizer.load(run).semantic_tokens(wav),
                                expected)
  newest = semantic.FeatureExtractor(*semantic.load_w2v_bert(run)[:2], manifest["mlm_layer"])
  assert not np.allclose(newest(wav), semantic.SemanticTokenizer.load(run).features(wav))
  exported = str(tmp_path / "bundle_w2v_bert")
  copied = bundle._copy_model(run, "w2v_bert", exported)  # pylint: disable=protected-access
  assert copied["step"] == fitted_step
  np.testing.assert_array_equal(semantic.SemanticTokenizer.load(exported).semantic_tokens(wav),
                                expected)


def test_baseline_is_fitted_on_the_same_frame_times():
  batches = [{"audio": np.zeros((2, 640 * 30), np.float32)} for _ in range(3)]

  def frame_index(wav):
    return np.broadcast_to(np.arange(30, dtype=np.float32)[None, :, None], (len(wav), 30, 2))

  first = semantic.sample_frames(frame_index, batches, 50, 10, seed=5)
  second = semantic.sample_frames(lambda w: 3 * frame_index(w), batches, 50, 10, seed=5)
  assert first.shape == (50, 2)
  np.testing.assert_array_equal(3 * first, second)


def test_evaluation_report_on_the_trained_model(fitted_dir):
  model_dir, manifest = fitted_dir
  tokenizer = semantic.SemanticTokenizer.load(model_dir)
  clips = [labelled_clip(np.random.default_rng(10 + i), 4.0) for i in range(3)]
  train_batches = [{"audio": np.stack([labelled_clip(np.random.default_rng(100 + 4 * b + i),
                                                     4.0).wav for i in range(4)])}
                   for b in range(2)]
  report = semantic_eval.evaluate_semantic(tokenizer, train_batches, clips,
                                           manifest["num_frames"], manifest["frames_per_clip"],
                                           manifest["seed"])
  assert report["clips"] == 3 and report["frames"] == 300 and report["num_clusters"] == 16
  assert report["baseline_fit"]["used_clusters"] >= 8
  for method in ("semantic", "log_mel_kmeans"):
    result = report[method]
    assert (set(result["nmi"]) == set(result["nmi_shuffled_labels"]) == set(result["ami"])
            == set(result["within_clip_ami"]) == set(semantic_eval.LABELS))
    assert all(-0.1 <= v <= 1.0 for v in result["ami"].values())
    assert set(result["stability"]) == {"gain_-3dB", "gain_+3dB", "gain_mean", "delay_mean",
                                        *(f"delay_{s}ms" for s in range(1, 6))}
    values = [result["perplexity"], *result["nmi"].values(),
              *result["nmi_shuffled_labels"].values(), *result["stability"].values()]
    assert np.all(np.isfinite(values)) and all(0.0 <= v <= 1.0 for v in values[1:])
    assert 1.0 <= result["perplexity"] <= result["used_clusters"] <= 16
  # The labels are aligned with the audio: log-mel clusters follow chords and drums.
  baseline = report["log_mel_kmeans"]
  for label in ("pitch_classes", "chord_root", "drum_onset"):
    assert baseline["nmi"][label] > 1.5 * baseline["nmi_shuffled_labels"][label] + 0.02, label
    assert baseline["ami"][label] > 0.02, label
  # The layer sweep scores every layer's k-means on the same frames.
  assert list(report["layers"]) == ["input", "contrastive_1", "mlm_1", "mlm_2"]
  assert set(report["clip_identity"]["ami"]) == set(semantic_eval.LABELS)
  for result in report["layers"].values():
    assert (set(result["nmi"]) == set(result["ami"]) == set(result["within_clip_ami"])
            == set(semantic_eval.LABELS))
    assert all(0.0 <= v <= 1.0 for v in result["nmi"].values())
    assert 1.0 <= result["perplexity"] <= result["used_clusters"] <= 16
  json.dumps(report)  # JSON-able
  text = semantic_eval.format_report(report)
  assert "NMI chord_root" in text and "AMI chord_root" in text and "contrastive_1" in text
  assert "AMI within clips top_pitch_class" in text and "clip_identity" in text


def test_layer_outputs_are_the_hidden_states_of_each_layer(fitted_dir):
  model_dir, _ = fitted_dir
  model, params, _ = semantic.load_w2v_bert(model_dir)
  wav = np.stack([melody(np.random.default_rng(200 + i), 2.0) for i in range(2)])
  layers = np.asarray(model.layer_outputs(params, wav))
  assert model.layer_names() == ["input", "contrastive_1", "mlm_1", "mlm_2"]
  assert layers.shape == (4, 2, 50, 32)
  for mlm_layer in (1, 2):
    np.testing.assert_allclose(layers[1 + mlm_layer],
                               np.asarray(model.hidden_states(params, wav, mlm_layer)),
                               rtol=1e-4, atol=1e-4)
  assert not np.allclose(layers[0], layers[1]) and not np.allclose(layers[2], layers[3])


def musiclm(*args):
  env = xla_env.subprocess_env(1)
  return subprocess.run([sys.executable, "-m", "musiclm_jax.main", *args], env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_semantic_tokens(fitted_dir, tmp_path):
  model_dir, _ = fitted_dir
  wav = melody(np.random.default_rng(7), 2.0)
  audio.write_wav(str(tmp_path / "in.wav"), wav, 22050)  # resampled to 16 kHz on load
  result = musiclm("semantic", "tokens", f"--checkpoint={model_dir}", str(tmp_path / "in.wav"),
                   str(tmp_path / "out.npy"))
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads(result.stdout.strip().splitlines()[-1])
  expected = w2v_bert.num_frames(int(len(wav) / 22050 * RATE))
  assert row["frame_rate"] == 25 and len(row["tokens"]) == expected
  np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), row["tokens"])
  tokenizer = semantic.SemanticTokenizer.load(model_dir)
  loaded, _ = audio.load(str(tmp_path / "in.wav"), RATE)
  np.testing.assert_array_equal(np.asarray(tokenizer.semantic_tokens(loaded[None]))[0],
                                row["tokens"])
  # A checkpoint without k-means: a clear error, exit status 1.
  result = musiclm("semantic", "tokens", f"--checkpoint={tmp_path}", str(tmp_path / "in.wav"))
  assert result.returncode == 1 and "semantic_kmeans" in result.stderr
