"""Melody renditions, the melody_renditions corpus and the melody encoder / tokens."""
from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from musiclm_jax import audio as audio_lib
from musiclm_jax import main as cli
from musiclm_jax.corpora import melody_pairs
from musiclm_jax.layers import quantizers
from musiclm_jax.music import melody_renditions as mr
from musiclm_jax.tokenizers import melody
from musiclm_jax.training.optimizers import Optimizer
from musiclm_jax.training.train_state import TrainState
from audio_fixtures import TUNE_A, TUNE_B, tune

TINY_GIN = os.path.join(os.path.dirname(__file__), "..", "gin", "tokenizers",
                        "melody_tiny.gin")


def _parse_tiny_gin(bindings: list[str]) -> None:
  for module in cli.GIN_MODULES["train"]:
    __import__(module)
  cli.parse_gin([TINY_GIN], ["MODEL_DIR = '/unused'", "DATA_DIR = '/unused'", *bindings])


def _notes(rendition: mr.Rendition) -> list:
  return sorted(rendition.midi.instruments[0].notes, key=lambda n: n.start)


# ---------------------------------------------------------------- renditions


def test_renditions_keep_intervals_and_relative_rhythm():
  piece = mr.compose_melody_piece(seed=5, seconds=8.0)
  line = mr.melody_line(piece)
  assert len(line) >= 4
  items = mr.renditions(piece, 24, seed=1)
  for r in items:
    spec, notes = r.spec, _notes(r)
    assert r.midi.instruments[0].name == "melody"
    np.testing.assert_array_equal(np.diff([n.pitch for n in notes]), line.intervals())
    assert notes[0].pitch - line.pitches[0] == spec.key_shift + 12 * spec.octave_shift
    # Onset gaps are the score's, scaled by the tempo, within the jitter.
    gaps = np.diff([n.start for n in notes])
    np.testing.assert_allclose(gaps, line.inter_onsets() / spec.tempo_factor,
                               atol=2 * spec.timing_jitter_s + 1e-6)
    assert -5 <= spec.key_shift <= 6 and 0.9 <= spec.tempo_factor <= 1.1
    assert spec.timing_jitter_s <= 0.02
    bends = [b.pitch for b in r.midi.instruments[0].pitch_bends]
    assert len(bends) == len(notes) and max(abs(b) for b in bends) < 8192
    assert (len(r.midi.instruments) > 1) == spec.accompaniment
    if spec.accompaniment:  # pitched parts move with the key, not the octave
      source = next(i for i in piece.midi.instruments[1:] if not i.is_drum)
      copied = next(i for i in r.midi.instruments[1:] if i.name == source.name)
      assert copied.notes[0].pitch - source.notes[0].pitch == spec.key_shift
  voices = {r.spec.voice for r in items}
  assert voices & set(mr.HUMMED_VOICES) and voices - set(mr.HUMMED_VOICES)
  assert len({r.spec.key_shift for r in items}) > 3


def test_renditions_are_deterministic_given_the_seed():
  piece = mr.compose_melody_piece(seed=7, seconds=6.0)
  first, again = mr.renditions(piece, 5, seed=3), mr.renditions(piece, 5, seed=3)
  other = mr.renditions(piece, 5, seed=4)
  key = lambda rs: [(r.spec, [(n.pitch, n.start, n.end, n.velocity) for n in _notes(r)])
                    for r in rs]
  assert key(first) == key(again)
  assert key(first) != key(other)
  sine = mr.render_rendition_midi(piece, dataclasses.replace(first[0].spec, voice=mr.SINE_VOICE,
                                                             accompaniment=False))
  wav = mr.sine_voice(sine.line, 24000, 3.0, seed=0)
  np.testing.assert_array_equal(wav, mr.sine_voice(sine.line, 24000, 3.0, seed=0))
  assert not np.array_equal(wav, mr.sine_voice(sine.line, 24000, 3.0, seed=1))
  as_tuples = lambda p: [(n.pitch, n.start, n.end, n.velocity) for n in p.midi.instruments[0].notes]
  assert as_tuples(mr.compose_melody_piece(7, 6.0)) == as_tuples(piece)


def test_sine_voice_sings_the_pitch_with_harmonics_and_vibrato():
  rate = 24000
  line = mr.MelodyLine(pitches=np.array([69]), starts=np.array([0.1]), ends=np.array([0.9]),
                       velocities=np.array([100]), cents=np.array([0.0]))
  wav = mr.sine_voice(line, rate, 1.0, seed=0)
  assert wav.shape == (rate,) and wav.dtype == np.float32
  assert np.abs(wav).max() == pytest.approx(0.5, abs=1e-6)
  assert np.sqrt(np.mean(wav[:int(0.05 * rate)] ** 2)) < 1e-3  # silent before the note
  spectrum = np.abs(np.fft.rfft(wav[int(0.2 * rate):int(0.9 * rate)]))
  freqs = np.fft.rfftfreq(int(0.7 * rate), 1 / rate)
  assert abs(freqs[np.argmax(spectrum)] - 440.0) < 10.0  # vibrato: +-30 cents ~ +-8 Hz
  band = lambda f: spectrum[(freqs > f - 20) & (freqs < f + 20)].max()
  assert band(880.0) > 0.1 * band(440.0) and band(1320.0) > 0.03 * band(440.0)
  # Frequency modulation at 5 Hz: sidebands at 440 +- 5 Hz.
  assert band(660.0) < 0.01 * band(440.0)


# ---------------------------------------------------------------- corpus


def test_build_melody_renditions_splits_by_melody(tmp_path):
  manifest = melody_pairs.build_melody_renditions(str(tmp_path / "a"), num_melodies=6,
                                                  renditions_per_melody=3, seconds=1.0,
                                                  seed=2, soundfont=None)
  splits = manifest["splits"]
  ids = [set(splits[s]["melody_ids"]) for s in ("train", "validation", "test")]
  assert all(ids) and set.union(*ids) == set(range(6)) and sum(map(len, ids)) == 6
  for split, melodies in zip(("train", "validation", "test"), ids):
    data = melody_pairs.load_split(str(tmp_path / "a"), split)
    assert data["audio"].shape == (3 * len(melodies), 24000)
    assert data["audio"].dtype == np.float32
    assert set(data["melody_id"].tolist()) == melodies
    for wav in data["audio"]:
      assert -21.0 < audio_lib.rms_dbfs(wav) < -12.0 and np.abs(wav).max() <= 0.95
  again = melody_pairs.build_melody_renditions(str(tmp_path / "b"), 6, 3, 1.0, seed=2,
                                               soundfont=None)
  np.testing.assert_array_equal(melody_pairs.load_split(str(tmp_path / "a"), "train")["audio"],
                                melody_pairs.load_split(str(tmp_path / "b"), "train")["audio"])
  assert again["clips"] == manifest["clips"]


def test_build_melody_renditions_with_a_soundfont(tmp_path):
  manifest = melody_pairs.build_melody_renditions(str(tmp_path), num_melodies=3,
                                                  renditions_per_melody=3, seconds=1.0,
                                                  seed=0, soundfont="timgm6mb")
  assert len(manifest["clips"]) == 9
  assert {c["spec"]["voice"] for c in manifest["clips"]} - {mr.SINE_VOICE}
  data = melody_pairs.load_split(str(tmp_path), "train")
  assert data["audio"].shape == (3, 24000)
  assert all(audio_lib.rms_dbfs(w) > -25.0 for w in data["audio"])


def test_a_rendition_the_soundfont_leaves_silent_is_drawn_again():
  """TimGM6mb has no Whistle sample around A6: melody 26's second rendition (seed
  0) rendered silence, which loudness normalisation turned into a DC offset."""
  piece = melody_pairs._melody_piece(0, 26, 4.0)  # pylint: disable=protected-access
  first_draw = mr.renditions(piece, 4, seed=int(np.random.SeedSequence([0, 26, 99])
                                                .generate_state(1)[0]),
                             voices=tuple(mr.VOICE_RANGES))[1]
  assert first_draw.spec.voice == "Whistle" and min(first_draw.line.pitches) > 80
  with pytest.raises(audio_lib.AudioError, match="silent"):
    melody_pairs.rendition_audio(first_draw, 4.0, "timgm6mb")
  clips, records = melody_pairs.melody_clips(0, 26, 4, 4.0, "timgm6mb")
  assert records[1]["spec"] != dataclasses.asdict(first_draw.spec)
  for wav in clips:  # every clip holds sound, not an offset
    assert np.sqrt(np.mean(np.square(wav - wav.mean()))) > 0.05


# ---------------------------------------------------------------- encoder


def test_semi_hard_triplet_loss_on_known_embeddings():
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  separated = jnp.eye(6)[jnp.array([0, 0, 2, 2, 4, 4])]
  loss, sums = melody.semi_hard_triplet_loss(separated, labels, margin=0.2)
  assert float(loss) == 0.0 and float(sums["correct"]) == 6.0 and float(sums["pairs"]) == 6
  collapsed = jnp.ones((6, 4)) / 2.0
  loss, sums = melody.semi_hard_triplet_loss(collapsed, labels, margin=0.2)
  assert float(loss) == pytest.approx(0.2, abs=1e-6) and float(sums["active"]) == 6
  # Against a loop over triplets on random embeddings.
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(12, 3))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = rng.integers(0, 4, 12)
  d = np.sum((emb[:, None] - emb[None, :]) ** 2, axis=-1)
  expected = []
  for a in range(12):
    negatives = [d[a, n] for n in range(12) if labels[n] != labels[a]]
    for p in range(12):
      if p != a and labels[p] == labels[a]:
        farther = [x for x in negatives if x > d[a, p]]
        d_an = min(farther) if farther else max(negatives)
        expected.append(max(d[a, p] - d_an + 0.3, 0.0))
  loss, sums = melody.semi_hard_triplet_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(labels),
                                             margin=0.3)
  assert float(sums["pairs"]) == len(expected)
  assert float(loss) == pytest.approx(np.mean(expected), abs=1e-4)


def _tiny_config() -> melody.MelodyConfig:
  _parse_tiny_gin([])
  config = melody.MelodyConfig()
  gin.clear_config()
  return config


def test_pitch_class_encoder_is_invariant_to_transposition():
  """With `pitch_classes`, features rolled around the circle of pitch classes (a
  transposition) embed exactly where they did; the semitone-grid encoder moves
  them as far as another tune lies."""
  config = _tiny_config()
  tunes = jnp.stack([tune(TUNE_A)[:config.window_samples], tune(TUNE_B)[:config.window_samples]])
  for pitch_classes in (True, False):
    cfg = dataclasses.replace(config, pitch_classes=pitch_classes)
    encoder = melody.MelodyEncoder(cfg)
    variables = jax.jit(encoder.init)(jax.random.key(0), tunes)
    features = melody.pitch_features(cfg, tunes)
    frames = config.window_samples // config.hop_length + 1
    assert features.shape == (2, frames, 12 if pitch_classes else config.num_pitches)
    embed_features = jax.jit(functools.partial(encoder.apply,
                                               method=melody.MelodyEncoder.embed_features))
    embed = lambda f: np.asarray(embed_features(variables, f))  # pylint: disable=cell-var-from-loop
    plain = embed(features)
    np.testing.assert_allclose(plain, jax.jit(encoder.apply)(variables, tunes), atol=1e-6)
    between_tunes = np.abs(plain[0] - plain[1]).max()
    for shift in (1, 5, -4):
      moved = np.abs(embed(jnp.roll(features, shift, axis=2)) - plain).max()
      if pitch_classes:
        assert moved < 1e-4 * between_tunes
      else:
        assert moved > 0.3 * between_tunes
  # The pitch classes of a tune in another key and octave are the rolled ones.
  cfg = dataclasses.replace(config, pitch_classes=True)
  moved = melody.pitch_features(cfg, tune(TUNE_A, shift=-7)[None, :config.window_samples])[0]
  notes = config.window_samples // 4000  # 0.25 s notes at 16 kHz
  middle = [int(round((i + 0.5) * 4000 / config.hop_length)) for i in range(notes)]
  np.testing.assert_array_equal(np.argmax(moved[np.array(middle)], axis=1),
                                (np.array(TUNE_A[:notes]) - 7) % 12)


def test_a_checkpoint_from_before_pitch_classes_loads_as_it_was_trained():
  """Manifests written before `pitch_classes` existed lack the field: the
  semitone-grid encoder they were trained as, not the gin recipes' default."""
  config = _tiny_config()
  assert config.pitch_classes  # every gin recipe sets it
  stored = {k: v for k, v in dataclasses.asdict(config).items() if k != "pitch_classes"}
  old = melody.config_from_manifest({"model": "MelodyModel", "model_config": stored})
  assert not old.pitch_classes and old.conv_channels == config.conv_channels
  with pytest.raises(ValueError, match="fields this code lacks"):
    melody.config_from_manifest({"model": "MelodyModel",
                                 "model_config": dict(stored, pitch_shift_pooling=True)})


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> str:
  """6 melodies x 4 sine-voice renditions x 2 s."""
  directory = str(tmp_path_factory.mktemp("melodies"))
  melody_pairs.build_melody_renditions(directory, num_melodies=6, renditions_per_melody=4,
                                       seconds=2.0, seed=0, soundfont=None)
  return directory


@pytest.fixture(scope="module")
def trained(tiny_corpus):
  """The tiny encoder trained on all 24 clips; (model, variables, clips, ids, losses)."""
  gin.clear_config()
  config = _tiny_config()
  model = melody.MelodyModel(config)
  splits = [melody_pairs.load_split(tiny_corpus, s) for s in ("train", "validation", "test")]
  clips = audio_lib.resample(np.concatenate([s["audio"] for s in splits]), 24000,
                             config.sample_rate)
  ids = np.concatenate([s["melody_id"] for s in splits]).astype(np.int32)
  batch = {"audio": clips, "melody_id": ids}
  variables = nn.unbox(model.init_variables(jax.random.PRNGKey(0),
                                            {k: v[:1] for k, v in batch.items()}))
  schedule = optax.constant_schedule(3e-3)
  optimizer = Optimizer(optax.adamw(schedule, weight_decay=0.0), schedule)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     opt_state=optimizer.tx.init(variables["params"]),
                     rng=jax.random.PRNGKey(0))
  step = jax.jit(model.make_train_step(optimizer))
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return model, {"params": state.params}, clips, ids, losses


def test_triplet_training_pulls_renditions_together(trained):
  model, variables, clips, ids, losses = trained
  assert np.isfinite(losses).all()
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
  emb = np.asarray(melody.melody_embeddings(model, variables, clips))
  assert emb.shape == (24, 1, 32)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  d = np.asarray(melody.pairwise_squared_distances(jnp.asarray(emb[:, 0])))
  same = ids[:, None] == ids[None, :]
  off_diagonal = ~np.eye(len(ids), dtype=bool)
  assert d[same & off_diagonal].mean() < 0.5 * d[~same].mean()
  nearest = np.argmin(np.where(off_diagonal, d, np.inf), axis=1)
  accuracy = np.mean(ids[nearest] == ids)
  assert accuracy >= 0.75  # chance: 3 of 23 neighbours, 0.13
  sums = jax.jit(model.make_eval_step())(
      TrainState(step=0, params=variables["params"], opt_state=None, rng=None),
      {"audio": clips, "melody_id": ids})
  metrics = model.eval_metrics({k: float(v) for k, v in sums.items()})
  assert metrics["accuracy"] == pytest.approx(accuracy)
  assert metrics["positive_distance"] < metrics["negative_distance"]


def test_melody_tokens_shapes_and_rvq_round_trip(trained, tmp_path):
  model, variables, clips, _, _ = trained
  config = model.config
  long_wav = np.concatenate([clips[:3], clips[3:6]], axis=1)  # 4 s: windows at 0, 1, 2 s
  emb = np.asarray(melody.melody_embeddings(model, variables, long_wav))
  assert emb.shape == (3, 3, config.embed_dim)
  np.testing.assert_allclose(emb[:, 0], np.asarray(
      melody.melody_embeddings(model, variables, clips[:3]))[:, 0], atol=1e-5)
  short = np.asarray(melody.melody_embeddings(model, variables, clips[:2, :8000]))
  assert short.shape == (2, 1, config.embed_dim)

  windows = np.asarray(melody.melody_embeddings(model, variables, clips)).reshape(-1, 32)
  codebooks, report = melody.fit_melody_rvq(windows, num_levels=4, codebook_size=8,
                                            num_iters=10)
  assert codebooks.shape == (4, 8, 32)
  errors = report["relative_error"]
  assert errors[-1] < errors[0] < 1.0
  tokens = np.asarray(melody.melody_tokens(model, variables, codebooks, long_wav))
  assert tokens.shape == (3, 3, 4) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < 8
  decoded = np.asarray(quantizers.rvq_decode(jnp.asarray(codebooks), jnp.asarray(tokens)))
  assert np.sum((decoded - emb) ** 2) < np.sum(emb ** 2)
  first_level = quantizers.rvq_decode(jnp.asarray(codebooks), jnp.asarray(tokens[..., :1]))
  np.testing.assert_array_equal(
      np.asarray(quantizers.rvq_encode(jnp.asarray(codebooks), first_level))[..., 0],
      tokens[..., 0])

  melody.save_rvq(str(tmp_path), codebooks, report)
  np.testing.assert_array_equal(melody.load_rvq(str(tmp_path)), codebooks)
  tokenizer = melody.MelodyTokenizer(model, variables, melody.load_rvq(str(tmp_path)))
  at_24k = audio_lib.resample(long_wav, config.sample_rate, 24000)
  same_tokens = tokenizer.tokens(at_24k, 24000)
  assert same_tokens.shape == (3, 3, 4)
  assert np.mean(same_tokens[..., 0] == tokens[..., 0]) >= 0.75  # resampling round trip


# ---------------------------------------------------------------- task and trainer


def test_melody_task_groups_renditions_and_resumes(tiny_corpus):
  task = melody.MelodyTask(tiny_corpus, window_seconds=1.5, melodies_per_batch=3, seed=1)
  iterator = task.iterator("train", 12)
  batches = [next(iterator) for _ in range(3)]
  for batch in batches:
    assert batch["audio"].shape == (12, 24000) and batch["melody_id"].shape == (12,)
    _, counts = np.unique(batch["melody_id"], return_counts=True)
    assert len(counts) == 3 and (counts == 4).all()
  state = iterator.get_state()
  following = next(iterator)
  resumed = task.iterator("train", 12)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["audio"], following["audio"])
  first = next(task.iterator("validation", 4))  # a split of one melody: all rows share it
  assert len(set(first["melody_id"].tolist())) == 1
  np.testing.assert_array_equal(first["audio"], next(task.iterator("validation", 4))["audio"])


def test_trainer_trains_and_tokenizer_loads_the_run(tiny_corpus, tmp_path):
  from musiclm_jax.training import trainer  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path / "run")
  _parse_tiny_gin([f"MODEL_DIR = '{model_dir}'", f"DATA_DIR = '{tiny_corpus}'",
                   "train.num_steps = 3", "train.batch_size = 8", "train.log_every_steps = 1",
                   "train.eval_every_steps = 3", "train.eval_batches = 1",
                   "MelodyTask.melodies_per_batch = 4", "fit_melody_rvq.codebook_size = 4",
                   "fit_melody_rvq.num_iters = 5"])
  result = trainer.train()  # pylint: disable=no-value-for-parameter
  assert result.step == 3 and np.isfinite(result.metrics["loss"])
  assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0
  report = melody.fit_rvq(model_dir, tiny_corpus)
  assert report["num_levels"] == 4 and report["num_embeddings"] == 16
  assert report["checkpoint_step"] == 3  # the step the tokenizer then loads
  tokenizer = melody.MelodyTokenizer.load(model_dir)
  assert tokenizer.checkpoint_step == 3
  tokens = tokenizer.tokens(np.zeros((1, 24000 * 3), np.float32) + _tone(3.0), 24000)
  assert tokens.shape == (1, 2, 4) and tokens.max() < 4


def _tone(seconds: float) -> np.ndarray:
  t = np.arange(int(seconds * 24000)) / 24000
  return (0.3 * np.sin(2 * np.pi * 330.0 * t)).astype(np.float32)
