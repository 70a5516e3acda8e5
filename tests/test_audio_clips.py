"""Audio segments for tokenizer training: shapes, rates, crops, resumption."""
import numpy as np
import pytest

from musiclm_jax.tasks import corpora
from musiclm_jax.tasks.audio_clips import AudioClipTask


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_segments_have_the_rate_and_length_asked_for(tiny_gm_corpus):
  task = AudioClipTask(tiny_gm_corpus, sample_rate=16000, segment_seconds=0.5,
                       with_captions=True)
  batch = next(task.iterator("train", 4))
  assert batch["audio"].shape == (4, 8000) and batch["audio"].dtype == np.float32
  assert all(isinstance(c, str) and c for c in batch["caption"])
  assert (np.abs(batch["audio"]).max(axis=1) > 0.01).all()  # crops hold music


def test_train_crops_come_from_the_clips_and_validation_is_fixed(tiny_gm_corpus):
  clips = [e["audio"] for e in corpora.load(tiny_gm_corpus, "validation").as_numpy_iterator()]
  task = AudioClipTask(tiny_gm_corpus, segment_seconds=1.0)
  first = take(task.iterator("validation", 2), 2)
  again = take(task.iterator("validation", 2), 2)
  np.testing.assert_array_equal(first[0]["audio"], again[0]["audio"])
  middle = (clips[0].size - 24000) // 2
  np.testing.assert_array_equal(first[0]["audio"][0], clips[0][middle:middle + 24000])
  train_rows = np.concatenate([b["audio"] for b in take(task.iterator("train", 4), 3)])
  train_clips = [e["audio"] for e in corpora.load(tiny_gm_corpus, "train").as_numpy_iterator()]
  for row in train_rows:  # each crop is a window of some clip
    assert any(np.array_equal(row, clip[o:o + 24000])
               for clip in train_clips
               for o in np.flatnonzero(clip[:clip.size - 24000 + 1] == row[0])[:50])


def test_resume_gives_the_same_batches(tiny_gm_corpus):
  task = AudioClipTask(tiny_gm_corpus, segment_seconds=0.25, seed=5)
  uninterrupted = take(task.iterator("train", 4), 7)
  interrupted = task.iterator("train", 4)
  take(interrupted, 3)
  state = interrupted.get_state()
  resumed = task.iterator("train", 4)
  resumed.set_state(state)
  for a, b in zip(take(resumed, 4), uninterrupted[3:]):
    np.testing.assert_array_equal(a["audio"], b["audio"])
  other_seed = next(AudioClipTask(tiny_gm_corpus, segment_seconds=0.25, seed=6)
                    .iterator("train", 4))
  assert not np.array_equal(other_seed["audio"], uninterrupted[0]["audio"])


def test_bad_arguments_are_named(tiny_gm_corpus, tmp_path):
  with pytest.raises(FileNotFoundError, match="not a built corpus"):
    AudioClipTask(str(tmp_path))
  with pytest.raises(ValueError, match="segment_seconds"):
    AudioClipTask(tiny_gm_corpus, segment_seconds=0)
