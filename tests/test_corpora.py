"""Corpus builds: audio folders and MusicCaps with bad files, splits, resume."""
import csv
import json
import os

import numpy as np
import pytest

from musiclm_jax import audio
from musiclm_jax.corpora import audio_folder
from musiclm_jax.corpora import base
from musiclm_jax.corpora import musiccaps
from musiclm_jax.tasks import corpora
import audio_fixtures


def read_split(corpus_dir, split):
  return list(corpora.load(corpus_dir, split).as_numpy_iterator())


def read_all(corpus_dir):
  """Every split that has clips (TFDS writes no empty split)."""
  counts = corpora.read_report(corpus_dir)["clips"]
  return {split: read_split(corpus_dir, split) for split in base.SPLITS if counts[split]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("user_audio"))
  return directory, audio_fixtures.write_audio_folder(directory)


@pytest.fixture(scope="module")
def folder_corpus(folder, tmp_path_factory):
  directory, _ = folder
  spec = base.BuildSpec(num_examples=0, seconds=2.0, seed=0, source_dir=directory)
  data_dir = str(tmp_path_factory.mktemp("data"))
  return corpora.prepare(audio_folder.AudioFolderSource(), spec, data_dir, workers=1)


def test_audio_folder_skips_and_counts_bad_files(folder, folder_corpus):
  _, expected = folder
  report = corpora.read_report(folder_corpus)
  reasons = [o for o in expected.values() if not o.startswith("ok")]
  assert report["skipped"] == {r: reasons.count(r) for r in set(reasons)}
  good_clips = sum(int(o.split(":")[1]) if ":" in o else 1
                   for o in expected.values() if o.startswith("ok"))
  assert sum(report["clips"].values()) == good_clips
  assert report["repairs"]["downmixed"] == 3 and report["repairs"]["padded"] == 1
  examples = [e for split in read_all(folder_corpus).values() for e in split]
  assert len(examples) == good_clips
  for e in examples:
    assert e["audio"].shape == (2 * audio.SAMPLE_RATE,) and e["audio"].dtype == np.float32
    assert e["caption"].decode().startswith("Test clip")
    assert list(e["aspect_list"]) == [b"soft", b"chord", b"test"]
    assert e["metadata"]["genre"] == b"test tone"
  padded = [e for e in examples if e["clip_id"] == b"audio_folder:short_tail.wav@0"][0]
  assert padded["duration_s"] == pytest.approx(1.4, abs=1e-3)
  assert not padded["audio"][int(1.45 * audio.SAMPLE_RATE):].any()


def test_splits_are_disjoint_by_source(folder_corpus):
  sources = {split: {e["metadata"]["source_id"] for e in examples}
             for split, examples in read_all(folder_corpus).items()}
  assert all(sources.values())
  assert not (sources["train"] & sources["validation"] or sources["train"] & sources["test"]
              or sources["validation"] & sources["test"])
  # The long file's three clips share one source, so one split.
  long_clips = [(split, e["clip_id"]) for split, es in read_all(folder_corpus).items()
                for e in es if e["clip_id"].startswith(b"audio_folder:long_8k.wav")]
  assert len(long_clips) == 3 and len({s for s, _ in long_clips}) == 1


def test_load_resamples_on_the_fly(folder_corpus):
  example = next(corpora.load(folder_corpus, "train", sample_rate=16000).as_numpy_iterator())
  assert example["audio"].shape == (32000,)
  with pytest.raises(ValueError, match="no split 'dev'"):
    corpora.load(folder_corpus, "dev")
  with pytest.raises(FileNotFoundError, match="not a built corpus"):
    corpora.load(os.path.dirname(folder_corpus), "train")


def test_test_prompts_file_lists_the_test_split(folder_corpus):
  with open(os.path.join(folder_corpus, corpora.PROMPTS_FILE)) as f:
    prompts = [json.loads(line) for line in f]
  test = read_split(folder_corpus, "test")
  assert sorted(p["clip_id"] for p in prompts) == sorted(e["clip_id"].decode() for e in test)
  assert all(p["prompt"] and "genre" in p["attributes"] for p in prompts)


def test_assign_splits_is_deterministic_and_balanced():
  ids = [f"piece{i}" for i in range(100)]
  splits = base.assign_splits(ids, seed=3)
  assert splits == base.assign_splits(list(reversed(ids)), seed=3)
  assert splits != base.assign_splits(ids, seed=4)
  counts = [list(splits.values()).count(s) for s in base.SPLITS]
  assert counts == [80, 10, 10]
  assert sorted(base.assign_splits(["a", "b", "c"], seed=0).values()) == [
      "test", "train", "validation"]


def test_cut_clips_pads_drops_and_refuses():
  spec = base.BuildSpec(num_examples=0, seconds=1.0)
  wav = audio_fixtures.tone(3.3, audio.SAMPLE_RATE)[:, 0]
  repairs = audio.Repairs()
  clips = base.cut_clips(wav, spec, repairs)
  assert [round(start, 2) for _, start, _ in clips] == [0.0, 1.0, 2.0]  # 0.3 s tail dropped
  assert repairs.done == ["cropped"]
  clips = base.cut_clips(wav[:int(0.7 * audio.SAMPLE_RATE)], spec, audio.Repairs())
  assert len(clips) == 1 and clips[0][2] == pytest.approx(0.7)
  with pytest.raises(audio.AudioError, match="shorter than 50%"):
    base.cut_clips(wav[:1000], spec, audio.Repairs())
  assert len(base.cut_clips(wav, spec, audio.Repairs(), max_clips=2)) == 2


def test_interrupted_build_resumes_without_duplicates(folder, tmp_path):
  directory, _ = folder
  source = audio_folder.AudioFolderSource()
  spec = base.BuildSpec(num_examples=0, seconds=2.0, seed=1, source_dir=directory)
  data_dir = str(tmp_path)
  items = source.items(spec)
  cache_dir = os.path.join(data_dir, "build_cache", source.name, spec.config_name)
  # The first run "dies" after half the items, and in the middle of a write.
  base.build_clips(source, spec, items[:len(items) // 2], cache_dir, workers=1)
  with open(os.path.join(cache_dir, "deadbeef.npz.tmp"), "wb") as f:
    f.write(b"half a file")
  resumed = corpora.prepare(source, spec, data_dir, workers=1)
  report = corpora.read_report(resumed)
  assert report["resumed_items"] == len(items) // 2
  fresh = corpora.prepare(source, spec, str(tmp_path / "fresh"), workers=1)
  ids = lambda d: sorted(e["clip_id"] for es in read_all(d).values() for e in es)
  assert ids(resumed) == ids(fresh) and len(set(ids(resumed))) == len(ids(resumed))
  assert not os.path.exists(cache_dir)
  # A finished corpus is left alone.
  assert corpora.prepare(source, spec, data_dir, workers=1) == resumed


def test_num_examples_caps_the_clips(folder, tmp_path):
  directory, _ = folder
  spec = base.BuildSpec(num_examples=4, seconds=2.0, seed=0, source_dir=directory)
  built = corpora.prepare(audio_folder.AudioFolderSource(), spec, str(tmp_path), workers=1)
  assert sum(corpora.read_report(built)["clips"].values()) == 4


def test_audio_folder_errors_name_the_problem(tmp_path):
  source = audio_folder.AudioFolderSource()
  with pytest.raises(ValueError, match="needs --source_dir"):
    source.check(base.BuildSpec(num_examples=0, seconds=1.0, source_dir=str(tmp_path / "no")))
  with pytest.raises(ValueError, match="no captions file"):
    source.check(base.BuildSpec(num_examples=0, seconds=1.0, source_dir=str(tmp_path)))
  (tmp_path / "captions.jsonl").write_text('{"file": "a.wav"}\n')
  with pytest.raises(ValueError, match="row 1 lacks"):
    source.items(base.BuildSpec(num_examples=0, seconds=1.0, source_dir=str(tmp_path)))


def test_musiccaps_counts_missing_clips(tmp_path):
  rate = 44100
  audio_fixtures.tone(2.0, rate, channels=2)
  import soundfile  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / "audio")
  soundfile.write(tmp_path / "audio" / "AAAAAAAAAAA.wav", audio_fixtures.tone(2.0, rate), rate)
  # A whole "video" from which [2 s, 4 s) is cut; its id contains '_'.
  video = np.concatenate([np.zeros((2 * rate, 1), np.float32),
                          audio_fixtures.tone(2.0, rate), np.zeros((2 * rate, 1), np.float32)])
  soundfile.write(tmp_path / "B_BBBBBBBBB_full.flac", video, rate)
  with open(tmp_path / musiccaps.CSV_NAME, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["ytid", "start_s", "end_s", "audioset_positive_labels", "aspect_list",
                     "caption", "author_id", "is_balanced_subset", "is_audioset_eval"])
    writer.writerow(["AAAAAAAAAAA", 30, 32, "", "['piano', 'soft']", "A soft piano.", 1, 0, 0])
    writer.writerow(["B_BBBBBBBBB", 2, 4, "", "['organ']", "An organ chord.", 1, 0, 1])
    for ytid in ("CCCCCCCCCCC", "DDDDDDDDDDD"):
      writer.writerow([ytid, 0, 2, "", "['x']", "Missing.", 1, 0, 0])
  spec = base.BuildSpec(num_examples=0, seconds=2.0, seed=0, source_dir=str(tmp_path))
  built = corpora.prepare(musiccaps.MusicCapsSource(), spec, str(tmp_path / "data"), workers=1)
  report = corpora.read_report(built)
  assert report["skipped"] == {"missing_clip": 2}
  assert report["repairs"]["cut_from_video"] == 1
  examples = {e["clip_id"]: e for es in read_all(built).values() for e in es}
  assert set(examples) == {b"musiccaps:AAAAAAAAAAA", b"musiccaps:B_BBBBBBBBB"}
  organ = examples[b"musiccaps:B_BBBBBBBBB"]
  assert organ["caption"] == b"An organ chord." and list(organ["aspect_list"]) == [b"organ"]
  assert audio.rms_dbfs(organ["audio"]) > -30  # the tone, not the silence around it
