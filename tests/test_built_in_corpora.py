"""The built-in corpora, rendered with the small TimGM6mb SoundFont: labels
agree with the audio, captions mention every label, builds are reproducible."""
import librosa
import numpy as np
import pytest

from musiclm_jax import audio
from musiclm_jax.corpora import base
from musiclm_jax.corpora import gm_synth
from musiclm_jax.corpora import music21_gm
from musiclm_jax.corpora import rendered
from musiclm_jax.music import captions
from musiclm_jax.music import piece as piece_lib
from musiclm_jax.tasks import corpora

SOUNDFONT = "timgm6mb"


def examples_of(corpus_dir):
  counts = corpora.read_report(corpus_dir)["clips"]
  return [e for split in base.SPLITS if counts[split]
          for e in corpora.load(corpus_dir, split).as_numpy_iterator()]


@pytest.fixture(scope="module")
def gm_build(tmp_path_factory):
  source = gm_synth.GmSynthSource(soundfont=SOUNDFONT)
  spec = base.BuildSpec(num_examples=30, seconds=8.0, seed=7)
  data_dir = str(tmp_path_factory.mktemp("gm_synth"))
  corpus_dir = corpora.prepare(source, spec, data_dir, workers=2)  # the process pool
  return source, spec, corpus_dir


def test_gm_synth_builds_every_clip_with_labels(gm_build):
  _, spec, corpus_dir = gm_build
  report = corpora.read_report(corpus_dir)
  assert sum(report["clips"].values()) == spec.num_examples and not report["skipped"]
  assert all(report["clips"][split] > 0 for split in base.SPLITS)
  examples = examples_of(corpus_dir)
  genres = {e["metadata"]["genre"] for e in examples}
  assert len(genres) >= 8
  for e in examples:
    assert e["audio"].shape == (spec.num_samples,) and np.isfinite(e["audio"]).all()
    assert np.abs(e["audio"]).max() <= rendered.MAX_PEAK + 1e-6
    assert -30 < audio.rms_dbfs(e["audio"]) < rendered.TARGET_RMS_DBFS + 0.5
    assert 60 <= e["metadata"]["tempo_bpm"] <= 180 and e["metadata"]["instruments"].size
    assert e["midi"][:4] == b"MThd"


def test_labelled_tempo_agrees_with_librosa(gm_build):
  _, _, corpus_dir = gm_build
  errors = []
  for e in examples_of(corpus_dir):
    instruments = {i.decode() for i in e["metadata"]["instruments"]}
    if not instruments & set(piece_lib.DRUM_KITS):
      continue
    estimate = librosa.feature.tempo(y=e["audio"], sr=24000)[0]
    label = e["metadata"]["tempo_bpm"]
    errors.append(abs(estimate - label) / label)
  assert len(errors) >= 15
  within = np.mean(np.array(errors) <= 0.04)
  assert within >= 0.8, f"{within:.0%} of {len(errors)} drum clips within 4%: {errors}"


def test_captions_mention_every_labelled_attribute(gm_build):
  source, spec, corpus_dir = gm_build
  by_key = {e["clip_id"].decode(): e for e in examples_of(corpus_dir)}
  for item in source.items(spec):
    piece, _ = source.piece(item, spec)
    example = by_key[item.key]
    caption = example["caption"].decode().lower()
    for attribute, phrases in captions.attribute_mentions(piece).items():
      assert any(p in caption for p in phrases), (attribute, phrases, caption)
    meta = example["metadata"]
    assert meta["genre"].decode() == piece.genre and meta["key"].decode() == piece.key
    assert meta["mode"].decode() == piece.mode
    assert meta["time_signature"].decode() == piece.time_signature
    assert meta["tempo_bpm"] == pytest.approx(piece.tempo_bpm)
    assert [i.decode() for i in meta["instruments"]] == list(piece.instruments)
  assert len({e["caption"] for e in by_key.values()}) == len(by_key)


def test_same_seed_same_corpus(tmp_path):
  source = gm_synth.GmSynthSource(soundfont=SOUNDFONT)

  def build(seed, name):
    spec = base.BuildSpec(num_examples=4, seconds=3.0, seed=seed)
    built = corpora.prepare(source, spec, str(tmp_path / name), workers=1)
    return {e["clip_id"]: e for e in examples_of(built)}

  first, again, other = build(1, "a"), build(1, "b"), build(2, "c")
  assert first.keys() == again.keys()
  for key, e in first.items():
    assert e["caption"] == again[key]["caption"] and e["midi"] == again[key]["midi"]
    np.testing.assert_array_equal(e["audio"], again[key]["audio"])
  assert {e["caption"] for e in first.values()}.isdisjoint({e["caption"] for e in other.values()})


def test_music21_gm_arranges_the_repertoire(tmp_path):
  source = music21_gm.Music21GmSource(soundfont=SOUNDFONT)
  spec = base.BuildSpec(num_examples=8, seconds=6.0, seed=0)
  built = corpora.prepare(source, spec, str(tmp_path), workers=1)
  report = corpora.read_report(built)
  assert sum(report["clips"].values()) + sum(report["skipped"].values()) == 8
  assert sum(report["clips"].values()) >= 6, report["skipped_examples"]
  examples = examples_of(built)
  assert len({e["metadata"]["source_id"] for e in examples}) == len(examples)
  for e in examples:
    assert e["metadata"]["source_id"].startswith(b"music21:")
    caption = e["caption"].decode().lower()
    assert str(int(round(e["metadata"]["tempo_bpm"]))) in caption
    assert e["metadata"]["key"].decode().lower() in caption
    assert e["metadata"]["genre"] and e["aspect_list"].size
    assert np.abs(e["audio"]).max() < 1.0 and e["duration_s"] > 3.0


def test_gm_synth_refuses_a_bad_request():
  with pytest.raises(ValueError, match="--num_examples > 0"):
    gm_synth.GmSynthSource().check(base.BuildSpec(num_examples=0, seconds=1.0))
  with pytest.raises(ValueError, match="unknown gm_synth genres"):
    gm_synth.GmSynthSource(genres=("polka-dubstep",)).check(
        base.BuildSpec(num_examples=1, seconds=1.0))
