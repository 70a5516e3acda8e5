"""Melody conditioning (issue 10): melody tokens in the token space, melody-conditioned
stages, `generate --melody` end to end with tiny untrained stages, the refusals of
unusable recordings, and the melody evaluation measures."""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import shutil
import subprocess
import sys

from absl.testing import flagsaver
import numpy as np
import pytest
import soundfile

from musiclm_jax import audio
from musiclm_jax import main as cli
from musiclm_jax import stages
from musiclm_jax import vocab
from musiclm_jax.eval import melody as melody_eval
from musiclm_jax.eval import stage as stage_eval
from musiclm_jax.layers.transformer import DecoderConfig
from musiclm_jax.models import DecoderOnlyModel
from musiclm_jax.sampling import bundle
from musiclm_jax.sampling import hierarchy
from musiclm_jax.sampling import infer as infer_lib
from musiclm_jax.corpora import melody_pairs
from musiclm_jax.tasks import corpora
from musiclm_jax import stage_task
from musiclm_jax import token_cache
from musiclm_jax.tasks import token_tasks
from musiclm_jax.tokenizers import frozen
from musiclm_jax.tokenizers import melody as melody_lib
from musiclm_jax.tokenizers import melody_cli
from musiclm_jax.training import checkpoints
from audio_fixtures import TUNE_A, TUNE_B, tune
import tiny_tokenizers
import xla_env
from conftest import blocked_modules

LAYOUT = vocab.TokenLayout(mulan_levels=12, mulan_codebook_size=4, semantic_codebook_size=16,
                           acoustic_levels=12, acoustic_codebook_size=64)
MELODY_LAYOUT = vocab.TokenLayout(mulan_levels=12, mulan_codebook_size=4,
                                  semantic_codebook_size=16, acoustic_levels=12,
                                  acoustic_codebook_size=64, melody_levels=4,
                                  melody_codebook_size=8)


# ---------------------------------------------------------------- token layout


def test_token_layout_round_trip_with_and_without_melody():
  plain = LAYOUT.to_dict()
  assert not any(k.startswith("melody") for k in plain)  # old manifests compare equal
  assert vocab.TokenLayout.from_dict(plain) == LAYOUT
  with_melody = MELODY_LAYOUT.to_dict()
  assert vocab.TokenLayout.from_dict(with_melody) == MELODY_LAYOUT
  assert with_melody["melody_levels"] == 4 and with_melody["melody_codebook_size"] == 8
  # Melody ids come after every other family: no offset moves.
  for key in ("mulan_offset", "semantic_offset", "acoustic_offset"):
    assert with_melody[key] == plain[key]
  assert MELODY_LAYOUT.melody_offset == LAYOUT.num_used_ids
  assert MELODY_LAYOUT.num_used_ids == LAYOUT.num_used_ids + 4 * 8
  codes = np.random.default_rng(0).integers(0, 8, (3, 5, 4))
  ids = MELODY_LAYOUT.melody_tokens(codes)
  for q in range(4):
    lo, hi = MELODY_LAYOUT.melody_range(q)
    assert np.all((ids[..., q] >= lo) & (ids[..., q] < hi))
  np.testing.assert_array_equal(MELODY_LAYOUT.melody_codes(ids), codes)
  with pytest.raises(ValueError, match="inconsistent"):
    vocab.TokenLayout.from_dict(dict(with_melody, melody_offset=with_melody["melody_offset"] + 1))
  with pytest.raises(ValueError, match="melody level 4"):
    MELODY_LAYOUT.melody_range(4)


# ---------------------------------------------------------------- stages


def melody_clip(rng, frames_s, melody_windows, layout=MELODY_LAYOUT):
  return stages.ClipTokens(
      mulan=rng.integers(0, layout.mulan_codebook_size, layout.mulan_levels),
      semantic=rng.integers(0, layout.semantic_codebook_size, frames_s),
      acoustic=rng.integers(0, layout.acoustic_codebook_size,
                            (2 * frames_s, layout.acoustic_levels)),
      melody=rng.integers(0, layout.melody_codebook_size,
                          (melody_windows, layout.melody_levels)))


@pytest.mark.parametrize("name", ["semantic", "coarse"])
def test_melody_conditioned_prefix_decodes_to_the_clips_melody_windows(name):
  rng = np.random.default_rng(1)
  # 4 s of tokens, melody windows every 0.5 s (7 windows of 1 s), stage window 1.2 s.
  clip = melody_clip(rng, 100, 7)
  stage = stages.Stage(name=name, window_seconds=1.2, layout=MELODY_LAYOUT,
                       melody_conditioning=True, melody_hop_seconds=0.5)
  plain = stages.Stage(name=name, window_seconds=1.2, layout=MELODY_LAYOUT)
  assert stage.melody_windows == math.ceil(1.2 / 0.5) == 3
  assert stage.lengths()[0] == plain.lengths()[0] + 3 * 4
  for start in (0, 12, 13, 70):  # 70: windows 2.8 s.. -> rows 5, 6, then the last held
    prefix, targets = stage.sequences(stage.window(clip, start))
    assert (len(prefix), len(targets)) == stage.lengths()
    codes = stage.codes(prefix, targets)
    first = int(start / 25 / 0.5)
    rows = np.minimum(first + np.arange(3), 6)
    np.testing.assert_array_equal(codes["melody"], clip.melody[rows])
    np.testing.assert_array_equal(codes["mulan"], clip.mulan)
    np.testing.assert_array_equal(codes["semantic"], clip.semantic[start:start + 30])
    # Without the switch: today's layout, the same ids after the melody.
    plain_prefix, plain_targets = plain.sequences(plain.window(clip, start))
    np.testing.assert_array_equal(plain_targets, targets)
    np.testing.assert_array_equal(np.delete(prefix, np.arange(12, 24)), plain_prefix)
  np.testing.assert_array_equal(stage.melody_window_indices(70, 7, loop=True), [5, 6, 0])
  # Guidance / conditioning dropout pads M and T_mel, nothing else.
  prefix, _ = stage.sequences(stage.window(clip, 0))
  dropped = stage.unconditional(prefix)
  assert np.all(dropped[:24] == vocab.PAD_ID)
  np.testing.assert_array_equal(dropped[24:], prefix[24:])
  # Training examples carry the clip's own melody rows.
  prefixes, _ = stage.examples(clip, np.random.default_rng(0))
  assert prefixes.shape == (1, stage.lengths()[0])


def test_melody_dropout_pads_the_melody_alone_of_that_fraction_of_kept_windows():
  clip = melody_clip(np.random.default_rng(3), 100, 7)
  stage = stages.Stage(name="coarse", window_seconds=1.2, layout=MELODY_LAYOUT,
                       melody_conditioning=True, melody_hop_seconds=0.5)
  prefix, _ = stage.sequences(stage.window(clip, 0))
  no_melody = stage.without_melody(prefix)
  assert np.all(no_melody[12:24] == vocab.PAD_ID)
  np.testing.assert_array_equal(np.delete(no_melody, np.arange(12, 24)),
                                np.delete(prefix, np.arange(12, 24)))
  # A text prompt without a recording (the sampler) gets the same conditioning.
  np.testing.assert_array_equal(stage.conditioning_tokens(clip.mulan, None), no_melody[:24])
  rng = np.random.default_rng(4)
  kinds = collections.Counter()
  for _ in range(1000):
    p = stage.examples(clip, rng, conditioning_dropout=0.2, melody_dropout=0.5)[0][0]
    mulan_padded = np.all(p[:12] == vocab.PAD_ID)
    melody_padded = np.all(p[12:24] == vocab.PAD_ID)
    assert np.all(p[24:] != vocab.PAD_ID)  # the semantic tokens are never dropped
    kinds[(bool(mulan_padded), bool(melody_padded))] += 1
  assert kinds[(True, False)] == 0  # M is only dropped together with T_mel
  assert 0.16 < kinds[(True, True)] / 1000 < 0.24  # conditioning dropout
  assert 0.35 < kinds[(False, True)] / 1000 < 0.45  # half of the other 80 %
  evaluation = stage.examples(clip, None, conditioning_dropout=0.9, melody_dropout=0.9)[0]
  assert np.all(evaluation[:, :24] != vocab.PAD_ID)
  plain = stages.Stage(name="coarse", window_seconds=1.2, layout=MELODY_LAYOUT)
  with pytest.raises(ValueError, match="no melody conditioning"):
    plain.without_melody(prefix)
  # Without melody conditioning, melody_dropout draws nothing: the same windows.
  same = [plain.examples(clip, np.random.default_rng(5), 0.3, melody_dropout=m)[0]
          for m in (0.0, 0.9)]
  np.testing.assert_array_equal(*same)


def test_melody_conditioning_errors_are_clear():
  with pytest.raises(ValueError, match="melody_levels > 0"):
    stages.Stage(name="semantic", window_seconds=1.0, layout=LAYOUT, melody_conditioning=True,
                 melody_hop_seconds=0.5)
  with pytest.raises(ValueError, match="fine stage takes no melody"):
    stages.Stage(name="fine", window_seconds=1.0, layout=MELODY_LAYOUT,
                 melody_conditioning=True, melody_hop_seconds=0.5)
  stage = stages.Stage(name="semantic", window_seconds=1.0, layout=MELODY_LAYOUT,
                       melody_conditioning=True, melody_hop_seconds=0.5)
  clip = melody_clip(np.random.default_rng(2), 50, 3)
  with pytest.raises(ValueError, match="needs melody codes"):
    stage.examples(stages.ClipTokens(clip.mulan, clip.semantic, clip.acoustic))


# ---------------------------------------------------------------- recordings and evaluation


def test_unusable_recordings_are_refused_with_the_reason():
  config = melody_lib.MelodyConfig(window_seconds=1.0, hop_seconds=0.5)
  rng = np.random.default_rng(0)
  hum = tune(TUNE_A)  # 4 s
  np.testing.assert_array_equal(melody_lib.check_melody_recording(config, hum), hum)
  noisy_hum = hum + np.std(hum) * rng.standard_normal(len(hum)).astype(np.float32)
  melody_lib.check_melody_recording(config, noisy_hum)  # 0 dB SNR still holds a tune
  white = 0.1 * rng.standard_normal(64000)
  brown = np.cumsum(white)
  brown = 0.3 * (brown - brown.mean()) / np.abs(brown - brown.mean()).max()
  for noise in (white, brown):  # flat and low-heavy spectra: no pitched frame
    assert np.mean(melody_lib.pitch_salience(config, noise) > melody_lib.PITCH_SALIENCE) < 0.05
    with pytest.raises(audio.AudioError, match="holds no melody.*noise only") as error:
      melody_lib.check_melody_recording(config, noise)
    assert error.value.reason == "unpitched"
  assert np.median(melody_lib.pitch_salience(config, hum)) > 2 * melody_lib.PITCH_SALIENCE
  with pytest.raises(audio.AudioError, match="shorter than one melody window"):
    melody_lib.check_melody_recording(config, hum[:12000])
  with pytest.raises(audio.AudioError, match="silent"):
    melody_lib.check_melody_recording(config, np.zeros(32000, np.float32))


def test_contour_similarity_is_key_invariant_and_tells_melodies_apart():
  config = melody_lib.MelodyConfig()
  a = tune(TUNE_A)
  transposed = tune(TUNE_A, shift=5, harmonics=(1.0, 0.5, 0.3))  # other key and timbre
  other = tune(TUNE_B, harmonics=(1.0, 0.5, 0.3))
  same = melody_eval.contour_similarity(config, a, transposed)
  different = melody_eval.contour_similarity(config, a, other)
  assert same["similarity"] > 0.9 and same["transposition"] == 7  # 7 = -5 mod 12
  assert different["similarity"] < 0.5
  assert melody_eval.contour_similarity(config, a, a) == {"similarity": pytest.approx(1.0),
                                                          "transposition": 0}
  chroma = melody_eval.chroma(config, a)
  assert chroma.shape == (len(a) // config.hop_length + 1, 12)
  # Each 0.25 s note's pitch class dominates its frames (C=0, D=2, E=4, F=5, G=7).
  middle = [int(round((i + 0.5) * 0.25 * 16000 / config.hop_length)) for i in range(16)]
  np.testing.assert_array_equal(np.argmax(chroma[middle], axis=1), np.array(TUNE_A) % 12)


def test_retrieval_accuracy_on_known_embeddings():
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(6, 16))
  emb = np.concatenate([c + 0.05 * rng.normal(size=(3, 16)) for c in centres])
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  ids = np.repeat(np.arange(6), 3)
  report = melody_eval.retrieval_accuracy(emb, ids)
  assert report == {"accuracy": 1.0, "chance": pytest.approx(2 / 17), "num_queries": 18,
                    "num_melodies": 6, "num_candidates": 18}
  shuffled = melody_eval.retrieval_accuracy(emb, rng.permutation(ids))
  assert shuffled["accuracy"] < 0.5
  few = melody_eval.retrieval_accuracy(emb, ids, max_melodies=2)
  assert few["num_candidates"] == 6 and few["accuracy"] == 1.0
  np.testing.assert_allclose(np.linalg.norm(melody_eval.mean_embeddings(
      emb.reshape(6, 3, 16)), axis=1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="several renditions"):
    melody_eval.retrieval_accuracy(emb[:6], np.arange(6))
  with pytest.raises(ValueError, match="17 melody_ids do not pair"):
    melody_eval.retrieval_accuracy(emb, ids[:17])


def test_chroma_retrieval_finds_renditions_in_other_keys_and_timbres():
  config = melody_lib.MelodyConfig()
  rich = (1.0, 0.5, 0.3)
  tunes = [TUNE_A, TUNE_B, TUNE_A[::-1]]
  clips = np.stack([clip for i, pitches in enumerate(tunes)
                    for clip in (tune(pitches), tune(pitches, shift=2 * i - 5, harmonics=rich))])
  ids = np.repeat(np.arange(3), 2)
  report = melody_eval.chroma_retrieval_accuracy(config, clips, ids)
  assert report == {"accuracy": 1.0, "chance": pytest.approx(1 / 5), "num_queries": 6,
                    "num_melodies": 3, "num_candidates": 6}
  # Another tune's clip stands in for each second rendition: nothing to find.
  assert melody_eval.chroma_retrieval_accuracy(config, clips, [0, 1, 1, 2, 2, 0])[
      "accuracy"] == 0.0


# ---------------------------------------------------------------- end to end, tiny models

IN_PROCESS = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
WINDOWS = stages.StageWindows(semantic_seconds=1.0, coarse_seconds=0.4, fine_seconds=0.2)


@pytest.fixture(scope="module")
def tokenizer_dirs():
  return tiny_tokenizers.shared_tiny_tokenizers(with_melody=True)


@pytest.fixture(scope="module")
def cache(tiny_gm_corpus, tokenizer_dirs, tmp_path_factory):
  """The tiny corpus tokenized with melody tokens (Beam, in process)."""
  cache_dir = str(tmp_path_factory.mktemp("tokens"))
  spec = token_tasks.TokenTaskSpec("gm", tiny_gm_corpus, tokenizer_dirs, clips_per_shard=12,
                                   batch_size=12)
  return cache_dir, token_tasks.run_cache_job([spec], cache_dir, IN_PROCESS)["gm"]


def read_split(cache_dir, split, layout):
  task_dir = token_cache.task_cache_dir(cache_dir, "gm")
  return list(token_tasks.read_cached(task_dir, split, layout.acoustic_levels,
                                      layout.melody_levels).as_numpy_iterator())


def test_cache_holds_each_clips_melody_tokens(cache, tiny_gm_corpus, tokenizer_dirs):
  cache_dir, manifest = cache
  layout = vocab.TokenLayout.from_dict(manifest["layout"])
  assert (layout.melody_levels, layout.melody_codebook_size) == (
      tiny_tokenizers.MELODY_LEVELS, tiny_tokenizers.MELODY_CODEBOOK_SIZE)
  assert manifest["melody_config"]["hop_seconds"] == 0.5
  tokenizers = frozen.FrozenTokenizers.load(tokenizer_dirs)
  clips = {ex["clip_id"]: ex for ex in corpora.load(tiny_gm_corpus, "validation")
           .as_numpy_iterator()}
  records = read_split(cache_dir, "validation", layout)
  assert len(records) == len(clips) == 2
  for record in records:
    clip = clips[record["clip_id"]]
    num_samples = int(round(clip["duration_s"] * 24000))
    direct = tokenizers.tokenize_clips(clip["audio"][None], [num_samples])
    # 4 s at 16 kHz, 1 s windows every 0.5 s: 7 windows
    assert record["melody"].shape == (7, tiny_tokenizers.MELODY_LEVELS)
    np.testing.assert_array_equal(record["melody"], direct.melody[0])
    np.testing.assert_array_equal(record["mulan"], direct.mulan[0])


@pytest.mark.parametrize("reader", stage_task.READERS)
@pytest.mark.parametrize("name", ["semantic", "coarse"])
def test_melody_conditioned_stage_examples_hold_the_clips_own_melody(cache, name, reader):
  cache_dir, _ = cache
  task = stage_task.StageTask(stage=name, cache_dir=cache_dir, corpora={"gm": 1.0},
                              windows=WINDOWS, melody_conditioning=True, reader=reader)
  plain = stage_task.StageTask(stage=name, cache_dir=cache_dir, corpora={"gm": 1.0},
                               windows=WINDOWS)
  stage = task.stage
  assert stage.melody_conditioning and stage.melody_windows == {"semantic": 2, "coarse": 1}[name]
  assert task.length == plain.length + stage.melody_windows * tiny_tokenizers.MELODY_LEVELS
  assert task.describe()["melody_hop_seconds"] == 0.5
  assert (task.name, plain.name) == (f"gm_{name}_melody", f"gm_{name}")  # both stay readable
  clips = read_split(cache_dir, "validation", stage.layout)
  expected = set()
  for clip in clips:  # evaluation windows: consecutive, from the start
    tokens = stages.ClipTokens(clip["mulan"], clip["semantic"], clip["acoustic"], clip["melody"])
    for start in stage.window_starts(len(clip["semantic"])):
      prefix, targets = stage.sequences(stage.window(tokens, start))
      expected.add((prefix.tobytes(), targets.tobytes()))
  iterator = task.iterator("validation", 4)
  seen = set()
  for _ in range(len(expected) // 4):
    batch = next(iterator)
    for i in range(4):
      row = {k: v[i] for k, v in batch.items()}
      prefix_len = int(row["decoder_causal_attention"].sum()) - 1
      num_targets = int(row["decoder_loss_weights"].sum())
      prefix = row["decoder_target_tokens"][:prefix_len]
      targets = row["decoder_target_tokens"][prefix_len:prefix_len + num_targets]
      codes = stage.codes(prefix, targets)  # every id legal, melody rows included
      assert codes["melody"].shape == (stage.melody_windows, tiny_tokenizers.MELODY_LEVELS)
      seen.add((prefix.tobytes(), targets.tobytes()))
  assert seen <= expected and len(seen) >= len(expected) - 4
  # Training windows: the gin-set melody dropout reaches the examples.
  dropping = stage_task.StageTask(stage=name, cache_dir=cache_dir, corpora={"gm": 1.0},
                                  windows=WINDOWS, melody_conditioning=True,
                                  melody_dropout=0.5, reader=reader)
  batch = next(dropping.iterator("train", 32))
  melody = batch["decoder_target_tokens"][:, 12:stage.conditioning_length]
  padded = np.all(melody == vocab.PAD_ID, axis=1)
  assert 0 < padded.sum() < 32
  assert np.all(batch["decoder_target_tokens"][:, :12] != vocab.PAD_ID)
  # A padded prefix is context, not targets: only the window's tokens are weighted.
  prefix_len, num_targets = stage.lengths()
  weights = batch["decoder_loss_weights"]
  np.testing.assert_array_equal(weights[:, :prefix_len], 0.0)
  np.testing.assert_array_equal(weights[:, prefix_len:prefix_len + num_targets], 1.0)
  # The gin-set first-frame weight: the targets of the first semantic frame of a
  # training window; evaluation windows weigh every target 1.
  weighted = stage_task.StageTask(stage=name, cache_dir=cache_dir, corpora={"gm": 1.0},
                                  windows=WINDOWS, melody_conditioning=True,
                                  first_frame_weight=4.0, reader=reader)
  first = stage.lengths(1)[1]
  assert first == {"semantic": 1, "coarse": 2 * 4}[name]  # coarse: two acoustic frames
  weights = next(weighted.iterator("train", 8))["decoder_loss_weights"]
  np.testing.assert_array_equal(weights[:, :prefix_len], 0.0)
  np.testing.assert_array_equal(weights[:, prefix_len:prefix_len + first], 4.0)
  np.testing.assert_array_equal(weights[:, prefix_len + first:prefix_len + num_targets], 1.0)
  weights = next(weighted.iterator("validation", 4))["decoder_loss_weights"]
  np.testing.assert_array_equal(weights[:, prefix_len:prefix_len + num_targets], 1.0)
  with pytest.raises(ValueError, match="first_frame_weight must be positive"):
    stage_task.StageTask(stage=name, cache_dir=cache_dir, corpora={"gm": 1.0},
                         windows=WINDOWS, first_frame_weight=0.0)
  with pytest.raises(ValueError, match="melody_dropout must be in"):
    stage_task.StageTask(stage=name, cache_dir=cache_dir, corpora={"gm": 1.0},
                         windows=WINDOWS, melody_conditioning=True, melody_dropout=1.0)
  with pytest.raises(ValueError, match="no melody tokens|has none"):
    stage_task.stage_from_manifest({"layout": vocab.LAYOUT.to_dict(), "semantic_rate": 25,
                                    "acoustic_rate": 50, "corpus": "x"}, name, WINDOWS,
                                   melody_conditioning=True)


@pytest.fixture(scope="module")
def bundle_dir(cache, tokenizer_dirs, tmp_path_factory):
  """Melody-conditioned stages, untrained (step 0), exported with the melody encoder."""
  return tiny_tokenizers.untrained_stage_bundle(cache[0], tokenizer_dirs, WINDOWS,
                                                str(tmp_path_factory.mktemp("stages")),
                                                melody_conditioning=True)


@pytest.fixture(scope="module")
def generator(bundle_dir):
  return hierarchy.Generator(bundle.Bundle.load(bundle_dir[0]))


def without_melody_model(generator):
  """A generator of the same bundle with its melody encoder taken away."""
  loaded = generator.bundle
  without = bundle.Bundle(loaded.directory, loaded.manifest, copy.copy(loaded.tokenizers),
                          loaded.stages)
  without.tokenizers.melody = None
  return hierarchy.Generator(without)


def test_generation_follows_the_melody_tokens_of_the_recording(generator, bundle_dir, tmp_path):
  loaded = generator.bundle
  assert loaded.tokenizers.melody is not None and generator.melody_conditioned
  assert {n: s.stage.melody_windows for n, s in loaded.stages.items()} == {
      "semantic": 2, "coarse": 1, "fine": 0}
  hum = tune(TUNE_A)  # 4 s at 16 kHz: 7 melody windows
  rows = [[("a calm piano waltz", 1.6)]]
  result = generator.generate(rows, seeds=[1], melody_audio=hum)
  frames = int(1.6 * 25)
  assert result.audio.shape == (1, frames * 960) and np.all(np.isfinite(result.audio))
  np.testing.assert_array_equal(result.melody[0],
                                loaded.tokenizers.melody.tokens(hum[None], 16000)[0])
  # The same melody at 44.1 kHz tokenizes alike (resampled to the encoder's rate).
  at_44k = loaded.tokenizers.melody.tokens(audio.resample(hum, 16000, 44100)[None], 44100)
  assert np.mean(at_44k == result.melody) >= 0.75
  # Each window's prefix holds the recording's melody windows of its span (1 s
  # semantic windows every 0.5 s with overlap 0.5 -> starts 0, 12, 24 frames).
  semantic_stage = loaded.stages["semantic"].stage
  conditioning = generator._conditioning_ids  # pylint: disable=protected-access
  for start in (0, 12, 24, 40):
    ids = conditioning(semantic_stage, result.mulan, 0, result.melody, start)
    first = int(start / 25 / 0.5)
    codes = semantic_stage.codes(ids[0], np.zeros(0, np.int32))
    np.testing.assert_array_equal(codes["melody"], result.melody[0, [first % 7, (first + 1) % 7]])
  unconditioned = generator.generate(rows, seeds=[1])  # T_mel padded
  assert unconditioned.melody is None
  # Without a recording the prefix is the melody dropout of training's (M kept).
  recorded = conditioning(semantic_stage, result.mulan, 0, result.melody, 0)
  np.testing.assert_array_equal(conditioning(semantic_stage, result.mulan, 0, None, 0),
                                semantic_stage.without_melody(recorded))
  assert np.any(unconditioned.semantic != result.semantic)  # the melody is heard
  # A recording shorter than the piece loops; errors name the problem.
  short = generator.generate(rows, seeds=[1], melody_audio=hum[:24000])  # 2 windows
  assert short.melody.shape == (1, 2, tiny_tokenizers.MELODY_LEVELS)
  ids = conditioning(semantic_stage, short.mulan, 0, short.melody, 24)
  np.testing.assert_array_equal(semantic_stage.codes(ids[0], np.zeros(0, np.int32))["melody"],
                                short.melody[0, [1, 0]])  # window 2 is window 0 again
  with pytest.raises(ValueError, match="shorter than one melody window"):
    generator.generate(rows, seeds=[1], melody_audio=hum[:8000])
  with pytest.raises(ValueError, match="silent"):
    generator.generate(rows, seeds=[1], melody_audio=np.zeros(32000, np.float32))
  noise = 0.1 * np.random.default_rng(0).standard_normal(32000).astype(np.float32)
  with pytest.raises(ValueError, match="holds no melody"):
    generator.generate(rows, seeds=[1], melody_audio=noise)
  with pytest.raises(ValueError, match="has no melody model"):
    without_melody_model(generator).generate(rows, seeds=[1], melody_audio=hum)
  # A melody-conditioned bundle without its melody encoder is refused.
  broken = str(tmp_path / "broken")
  shutil.copytree(bundle_dir[0], broken)
  shutil.rmtree(os.path.join(broken, "melody"))
  with pytest.raises(bundle.BundleError, match="token layout|no melody encoder"):
    bundle.Bundle.load(broken)


def test_infer_follows_each_items_melody_and_skips_unusable_recordings(generator, tmp_path):
  hums = tmp_path / "hums"
  hums.mkdir()
  soundfile.write(str(hums / "a.wav"), tune(TUNE_A), 16000)
  soundfile.write(str(hums / "b.flac"), audio.resample(tune(TUNE_B), 16000, 44100), 44100)
  soundfile.write(str(hums / "silent.wav"), np.zeros(32000, np.float32), 16000)
  soundfile.write(str(hums / "short.wav"), tune(TUNE_A)[:8000], 16000)
  lines = [{"id": "a", "prompt": "a jazz trio", "melody": "hums/a.wav", "seconds": 0.8, "seed": 1},
           {"id": "b", "prompt": "a string quartet", "melody": "hums/b.flac", "seconds": 0.8,
            "seed": 2},
           {"id": "plain", "prompt": "a jazz trio", "seconds": 0.8, "seed": 1},
           {"id": "silent", "prompt": "x", "melody": "hums/silent.wav", "seconds": 0.8},
           {"id": "short", "prompt": "x", "melody": "hums/short.wav", "seconds": 0.8},
           {"id": "gone", "prompt": "x", "melody": "hums/gone.wav", "seconds": 0.8}]
  prompts = str(tmp_path / "prompts.jsonl")
  with open(prompts, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  out = str(tmp_path / "out")
  report = infer_lib.infer(generator, prompts, out, batch_size=4)
  assert report["generated"] == 3
  assert report["skipped"] == {"melody file not found": 1, "melody silent": 1,
                               "melody too_short": 1}
  skipped = [json.loads(line) for line in open(os.path.join(out, "skipped.jsonl"))]
  assert {s.get("id") for s in skipped} == {None, "silent", "short"}
  assert any("shorter than one melody window" in s.get("message", "") for s in skipped)
  manifest = {r["id"]: r for r in map(json.loads, open(os.path.join(out, "manifest.jsonl")))}
  assert manifest["a"]["melody"].endswith("hums/a.wav") and manifest["plain"]["melody"] is None
  # Batched with another recording, "a" is what generate gives its recording alone.
  direct = generator.generate([[("a jazz trio", 0.8)]], seeds=[1], melody_audio=tune(TUNE_A))
  tokens = np.load(os.path.join(out, "a.npz"))
  np.testing.assert_array_equal(tokens["melody"], direct.melody[0])
  np.testing.assert_array_equal(tokens["semantic"], direct.semantic[0])
  b_tokens = np.load(os.path.join(out, "b.npz"))["melody"]
  assert b_tokens.shape[1] == tiny_tokenizers.MELODY_LEVELS and np.any(
      b_tokens[:len(tokens["melody"])] != tokens["melody"][:len(b_tokens)])
  assert "melody" not in np.load(os.path.join(out, "plain.npz"))
  # A re-run redoes nothing and lists the unusable items again.
  again = infer_lib.infer(generator, prompts, out, batch_size=4)
  assert (again["generated"], again["already_done"]) == (0, 3)
  assert again["skipped"] == report["skipped"]
  # A bundle without a melody model skips the melody items and makes the others.
  refused = infer_lib.infer(without_melody_model(generator), prompts,
                            str(tmp_path / "no_melody"), batch_size=4)
  assert refused["generated"] == 1 and refused["skipped"]["melody refused"] == 4


def test_evaluate_generation_reports_both_sides(generator):
  report = melody_eval.evaluate_generation(generator, [tune(TUNE_A)], "a calm waltz", 1.6)
  for side in ("with_melody", "without_melody"):
    assert -1.0 <= report[side]["similarity"] <= 1.0 and len(report[side]["per_melody"]) == 1
  assert report["difference"] == pytest.approx(
      report["with_melody"]["similarity"] - report["without_melody"]["similarity"])
  with pytest.raises(ValueError, match="has no melody model"):
    melody_eval.evaluate_generation(without_melody_model(generator), [tune(TUNE_A)], "a waltz",
                                    1.6)


def test_cli_generate_with_a_melody_file(bundle_dir, tmp_path):
  hum = str(tmp_path / "hum.flac")  # another format, rate and channel count
  soundfile.write(hum, np.stack([audio.resample(tune(TUNE_A), 16000, 44100)] * 2, axis=1),
                  44100)
  wav = str(tmp_path / "out.wav")
  env = xla_env.subprocess_env(1)
  result = subprocess.run(
      [sys.executable, "-m", "musiclm_jax.main", "generate", f"--bundle={bundle_dir[0]}",
       "--prompt=a jazz trio", f"--melody={hum}", "--seconds=0.8", f"--output={wav}"],
      env=env, capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  data, rate = soundfile.read(wav)
  assert rate == 24000 and data.shape == (int(0.8 * 24000),) and np.abs(data).max() > 0


def test_cli_eval_stage_reports_what_a_checkpoint_uses_of_its_prefix(bundle_dir, cache,
                                                                     tokenizer_dirs, tmp_path):
  runs = bundle_dir[1]
  output = tmp_path / "coarse.json"
  result = subprocess.run(  # where TensorFlow and SeqIO cannot be imported (a GPU image)
      [sys.executable, "-m", "musiclm_jax.main", "eval", "stage", f"--checkpoint={runs['coarse']}",
       "--split=validation", "--num_clips=0", f"--output={output}"],
      env=xla_env.subprocess_env(1, PYTHONPATH=blocked_modules(tmp_path / "blocked")),
      capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  assert all(s in result.stdout for s in ("other_melody", "±", "outside legal"))
  report = json.loads(output.read_text())
  assert list(report["variants"]) == ["own", "no_conditioning", "no_melody", "other_mulan",
                                      "other_melody", "other_semantic"]
  assert (report["step"], report["split"], report["windows"]) == (0, "validation", 20)
  # The same windows and numbers as an evaluation in this process through SeqIO.
  task = stage_task.StageTask(stage="coarse", cache_dir=cache[0], corpora={"gm": 1.0},
                              windows=WINDOWS, melody_conditioning=True)
  prefixes, targets = task.eval_windows("validation", 0)
  variables, manifest = checkpoints.load_trained_variables(runs["coarse"])
  model = DecoderOnlyModel(DecoderConfig(**manifest["model_config"]))
  expected = stage_eval.evaluate_stage(model, variables["params"], task.stage, prefixes, targets)
  for name, row in expected["variants"].items():
    assert report["variants"][name]["loss"] == pytest.approx(row["loss"], rel=1e-5)
  assert report["variants"]["other_melody"]["unchanged"] < 1.0  # two clips: other melodies
  # A cache that moved, a missing step, a split it lacks and a run that is not a stage
  # are named.
  cli.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(checkpoint=runs["coarse"],
                           gin_bindings=[f"TOKENS_DIR = '{tmp_path}'"]):
    with pytest.raises(cli.CommandError, match="run `musiclm tokenize` first"):
      cli.EVALUATIONS["stage"]([])
  with flagsaver.flagsaver(checkpoint=runs["coarse"], step=5):
    with pytest.raises(cli.CommandError, match=r"no checkpoint of step 5 \(steps: \[0\]\)"):
      cli.EVALUATIONS["stage"]([])
  with flagsaver.flagsaver(checkpoint=runs["coarse"], split="tset"):
    with pytest.raises(cli.CommandError, match="no split 'tset'; it has test, train, validation"):
      cli.EVALUATIONS["stage"]([])
  with flagsaver.flagsaver(checkpoint=tokenizer_dirs.melody):
    with pytest.raises(cli.CommandError, match="not a MusicLM stage"):
      cli.EVALUATIONS["stage"]([])


def test_eval_melody_skips_and_counts_unusable_renditions(generator, tokenizer_dirs, tmp_path):
  """The first rendition of the first melody is silenced: its next one stands in."""
  data_dir = str(tmp_path / "melodies")
  shutil.copytree(os.path.join(os.path.dirname(tokenizer_dirs.melody), "melody_corpus"), data_dir)
  data = melody_pairs.load_split(data_dir, "train")
  first = np.lexsort((data["rendition"], data["melody_id"]))[0]
  shard = os.path.join(data_dir, melody_pairs.read_manifest(data_dir)["splits"]["train"]["files"][0])
  with np.load(shard) as stored:
    silenced = {k: stored[k] for k in stored.files}
  assert silenced["melody_id"][first] == data["melody_id"][first]  # one shard holds the split
  silenced["audio"][first] = 0.0
  np.savez(shard, **silenced)
  report = melody_cli.evaluate_generation(generator, data_dir, "a calm waltz", 1.0,
                                          split="train", num_melodies=2)
  assert report["skipped_renditions"] == {"silent": 1}
  assert report["num_melodies"] == 2 and len(report["with_melody"]["per_melody"]) == 2


def test_cli_melody_prepare_fit_rvq_and_eval(tokenizer_dirs, tmp_path):
  env = xla_env.subprocess_env(1)

  def musiclm(*args):
    return subprocess.run([sys.executable, "-m", "musiclm_jax.main", *args], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  data_dir = str(tmp_path / "melodies")
  prepared = musiclm("melody", "prepare", f"--data_dir={data_dir}", "--num_melodies=5",
                     "--renditions=2", "--seconds=1.5", "--soundfont=")
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  assert sum(json.loads(prepared.stdout.splitlines()[-1])["clips"].values()) == 10
  model_dir = str(tmp_path / "melody")
  shutil.copytree(tokenizer_dirs.melody, model_dir)
  os.remove(os.path.join(model_dir, melody_lib.RVQ_FILE))
  fitted = musiclm("melody", "fit_rvq", f"--checkpoint={model_dir}", f"--data_dir={data_dir}",
                   "--gin_file=gin/tokenizers/melody_tiny.gin",
                   "--gin_bindings=fit_melody_rvq.codebook_size = 2")
  assert fitted.returncode == 0, fitted.stderr[-3000:]
  report = json.loads(fitted.stdout.splitlines()[-1])
  assert (report["num_levels"], report["codebook_size"]) == (4, 2)  # from the gin file
  assert melody_lib.load_rvq(model_dir).shape == (4, 2, 32)
  evaluated = musiclm("eval", "melody", f"--checkpoint={model_dir}", f"--data_dir={data_dir}",
                      "--split=train")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  retrieval = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])["retrieval"]
  assert 0.0 <= retrieval["accuracy"] <= 1.0 and retrieval["num_candidates"] >= 4
  train = melody_pairs.load_split(data_dir, "train")
  config = melody_lib.MelodyTokenizer.load(model_dir).config
  expected = melody_eval.chroma_retrieval_accuracy(
      config, audio.resample(train["audio"], 24000, config.sample_rate), train["melody_id"])
  assert retrieval["chroma_accuracy"] == pytest.approx(expected["accuracy"])
