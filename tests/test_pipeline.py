"""The pipeline after the tokenizers, end to end: SeqIO's Beam cache job of two tiny
corpora with the three tiny tokenizers, the stage tasks and mixtures that read the
cache, stage training, bundles, and generation through the hierarchy."""
import collections
import gc
import json
import os
import shutil
import subprocess
import sys


import jax
import numpy as np
import pytest
import seqio
import soundfile
import tensorflow as tf

from musiclm_jax import stages
from musiclm_jax import vocab
from musiclm_jax.corpora import audio_folder
from musiclm_jax.eval import generation as generation_eval
from musiclm_jax.sampling import bundle
from musiclm_jax.sampling import decoding
from musiclm_jax.sampling import hierarchy
from musiclm_jax.sampling import infer as infer_lib
from musiclm_jax.corpora import base
from musiclm_jax.tasks import corpora
from musiclm_jax import stage_task
from musiclm_jax import token_cache
from musiclm_jax.tasks import token_tasks
from musiclm_jax.tokenizers import frozen
from musiclm_jax.training import checkpoints
from musiclm_jax.training import metrics
from musiclm_jax.training import trainer
from musiclm_jax.models import DecoderOnlyModel
from musiclm_jax.partitioning import Partitioner
import audio_fixtures
import tiny_tokenizers
import xla_env
from conftest import blocked_modules, tiny_config

TWO_WORKERS = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
               "--direct_num_workers=2", "--default_sdk_harness_log_level=WARNING"]
IN_PROCESS = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOWS = stages.StageWindows(semantic_seconds=1.0, coarse_seconds=0.4, fine_seconds=0.2)
MIN_SECONDS = 1.5  # the folder's 1.4 s clip is skipped as too short


@pytest.fixture(scope="module")
def folder_corpus(tmp_path_factory):
  """Test tones in 2 s clips; one clip holds 1.4 s of audio."""
  directory = str(tmp_path_factory.mktemp("tones"))
  audio_fixtures.write_audio_folder(directory)
  spec = base.BuildSpec(num_examples=0, seconds=2.0, seed=0, source_dir=directory)
  return corpora.prepare(audio_folder.AudioFolderSource(), spec,
                         str(tmp_path_factory.mktemp("tones_data")), workers=1)


@pytest.fixture(scope="module")
def tokenizer_dirs():
  return tiny_tokenizers.shared_tiny_tokenizers()


def specs(tiny_gm_corpus, folder_corpus, dirs):
  return [token_tasks.TokenTaskSpec("gm", tiny_gm_corpus, dirs, clips_per_shard=8, batch_size=4,
                                    min_seconds=MIN_SECONDS),
          token_tasks.TokenTaskSpec("tones", folder_corpus, dirs, clips_per_shard=8,
                                    batch_size=4, min_seconds=MIN_SECONDS)]


@pytest.fixture(scope="module")
def cache(tiny_gm_corpus, folder_corpus, tokenizer_dirs, tmp_path_factory):
  """Both corpora cached by one Beam pipeline on two worker processes."""
  cache_dir = str(tmp_path_factory.mktemp("tokens"))
  manifests = token_tasks.run_cache_job(specs(tiny_gm_corpus, folder_corpus, tokenizer_dirs),
                                        cache_dir, TWO_WORKERS)
  return cache_dir, manifests


def read_split(cache_dir, corpus, split, levels=12):
  task_dir = token_cache.task_cache_dir(cache_dir, corpus)
  return list(token_tasks.read_cached(task_dir, split, levels).as_numpy_iterator())


def corpus_clips(corpus_dir, split):
  return {ex["clip_id"]: ex for ex in corpora.load(corpus_dir, split).as_numpy_iterator()}


def test_cache_job_writes_seqio_caches_and_counts_skipped_clips(cache, tiny_gm_corpus,
                                                                folder_corpus):
  cache_dir, manifests = cache
  for corpus, corpus_dir in (("gm", tiny_gm_corpus), ("tones", folder_corpus)):
    task_dir = token_cache.task_cache_dir(cache_dir, corpus)
    names = set(os.listdir(task_dir))
    assert {"COMPLETED", "tokens_manifest.json", "info.train.json", "stats.train.json"} <= names
    built = corpora.read_report(corpus_dir)["clips"]
    splits = manifests[corpus]["splits"]
    for split, count in built.items():
      assert splits[split]["clips"] + sum(splits[split]["skipped"].values()) == count
  durations = [c["duration_s"] for c in corpus_clips(tiny_gm_corpus, "train").values()]
  frames = sum(int(round(d * 24000)) // 960 for d in durations)
  assert manifests["gm"]["splits"]["train"] == {
      "clips": 20, "skipped": {}, "semantic_frames": frames, "audio_seconds": frames / 25}
  skipped = collections.Counter()
  for split in manifests["tones"]["splits"].values():
    skipped.update(split["skipped"])
  assert skipped == {"too_short": 1}
  manifest = manifests["gm"]
  assert manifest["layout"]["semantic_codebook_size"] == tiny_tokenizers.SEMANTIC_CLUSTERS
  assert manifest["layout"]["mulan_codebook_size"] == tiny_tokenizers.MULAN_CODEBOOK_SIZE
  assert (manifest["semantic_rate"], manifest["acoustic_rate"]) == (25, 50)
  # SeqIO itself reads the cache as the token task's cached dataset.
  token_tasks.register_token_task(specs(tiny_gm_corpus, folder_corpus, frozen.TokenizerDirs(
      *manifest["tokenizer_dirs"].values()))[0], manifest["layout"])
  seqio.add_global_cache_dirs([cache_dir])
  ds = seqio.get_mixture_or_task("gm_tokens").get_dataset(None, "validation", use_cached=True,
                                                          shuffle=False)
  assert len(list(ds.as_numpy_iterator())) == 2


def test_cached_tokens_equal_direct_tokenization_and_are_aligned(cache, tiny_gm_corpus,
                                                                 tokenizer_dirs):
  cache_dir, _ = cache
  tokenizers = frozen.FrozenTokenizers.load(tokenizer_dirs, MIN_SECONDS)
  clips = corpus_clips(tiny_gm_corpus, "train")
  records = read_split(cache_dir, "gm", "train")
  assert sorted(r["clip_id"] for r in records) == sorted(clips)
  for record in records[:6]:
    clip = clips[record["clip_id"]]
    num_samples = int(round(clip["duration_s"] * 24000))
    direct = tokenizers.tokenize_clips(clip["audio"][None], [num_samples])
    frames = num_samples // 960
    assert record["semantic"].shape == (frames,)
    assert record["acoustic"].shape == (2 * frames, 12)
    np.testing.assert_array_equal(record["semantic"], direct.semantic[0])
    np.testing.assert_array_equal(record["acoustic"], direct.acoustic[0])
    np.testing.assert_array_equal(record["mulan"], direct.mulan[0])
    assert record["caption"] == clip["caption"] and record["split"] == b"train"


def test_tokenizer_skips_bad_clips_with_reasons(tokenizer_dirs):
  tokenizers = frozen.FrozenTokenizers.load(tokenizer_dirs, min_seconds=1.0)
  good = audio_fixtures.tone(2.0, 24000)[:, 0]
  nan = good.copy()
  nan[::5] = np.nan
  wav = np.stack([good, np.zeros_like(good), nan, good])
  out = tokenizers.tokenize_clips(wav, [48000, 48000, 48000, 12000])
  assert out.skip_reasons == ["", "silent", "non_finite", "too_short"]
  assert out.semantic[0].shape == (50,) and out.acoustic[0].shape == (100, 12)
  assert [len(s) for s in out.semantic[1:]] == [0, 0, 0]
  with pytest.raises(FileNotFoundError, match="soundstream tokenizer at /no/such/run"):
    frozen.FrozenTokenizers.load(frozen.TokenizerDirs("/no/such/run", tokenizer_dirs.semantic,
                                                      tokenizer_dirs.mulan))


def test_interrupted_job_reruns_without_duplicates_or_losses(cache, tiny_gm_corpus,
                                                             folder_corpus, tokenizer_dirs,
                                                             tmp_path, capsys):
  cache_dir, _ = cache
  rerun_dir = str(tmp_path / "tokens")
  shutil.copytree(cache_dir, rerun_dir)
  # What a killed job leaves: no COMPLETED, a half-written shard, Beam's temp files.
  gm_dir = token_cache.task_cache_dir(rerun_dir, "gm")
  os.remove(os.path.join(gm_dir, "COMPLETED"))
  shard = sorted(n for n in os.listdir(gm_dir) if n.startswith("train.tfrecord"))[0]
  with open(os.path.join(gm_dir, shard), "r+b") as f:
    f.truncate(100)
  os.makedirs(os.path.join(gm_dir, "beam-temp-train.tfrecord-0123"))
  tones_dir = token_cache.task_cache_dir(rerun_dir, "tones")
  tones_mtime = os.path.getmtime(os.path.join(tones_dir, "COMPLETED"))

  token_tasks.run_cache_job(specs(tiny_gm_corpus, folder_corpus, tokenizer_dirs), rerun_dir,
                            IN_PROCESS)
  out = capsys.readouterr().out
  assert "tokenize gm: removing the incomplete cache" in out
  assert "tokenize tones: cached already" in out
  assert os.path.getmtime(os.path.join(tones_dir, "COMPLETED")) == tones_mtime
  for split in ("train", "validation", "test"):
    before = read_split(cache_dir, "gm", split)
    after = read_split(rerun_dir, "gm", split)
    assert len(after) == len(before)
    assert sorted(r["clip_id"] for r in after) == sorted(r["clip_id"] for r in before)
    by_id = {r["clip_id"]: r for r in before}
    for r in after:
      np.testing.assert_array_equal(r["acoustic"], by_id[r["clip_id"]]["acoustic"])
  assert not any(n.startswith("beam-temp") for n in os.listdir(gm_dir))


def stage_rows(task, split, num_batches, batch_size=4):
  iterator = task.iterator(split, batch_size)
  return [next(iterator) for _ in range(num_batches)]


def unpack(stage, row):
  """Prefix and target ids of one decoder example."""
  targets = row["decoder_target_tokens"]
  prefix_len = int(row["decoder_causal_attention"].sum()) - 1
  num_targets = int(row["decoder_loss_weights"].sum())
  return targets[:prefix_len], targets[prefix_len:prefix_len + num_targets]


@pytest.mark.parametrize("name", stages.STAGE_NAMES)
def test_stage_examples_decode_to_aligned_windows_of_the_cached_tokens(cache, name):
  cache_dir, _ = cache
  task = stage_task.StageTask(stage=name, cache_dir=cache_dir, corpora={"gm": 1.0},
                              windows=WINDOWS)
  stage = task.stage
  assert task.length == sum(stage.lengths())
  clips = read_split(cache_dir, "gm", "validation")
  expected = set()
  for clip in clips:  # evaluation windows: consecutive, from the start
    tokens = stages.ClipTokens(clip["mulan"], clip["semantic"], clip["acoustic"])
    for start in stage.window_starts(len(clip["semantic"])):
      prefix, targets = stage.sequences(stage.window(tokens, start))
      expected.add((prefix.tobytes(), targets.tobytes()))
  rows = stage_rows(task, "validation", num_batches=len(expected) // 4)
  seen = set()
  for batch in rows:
    assert batch["decoder_input_tokens"].shape == (4, task.length)
    for i in range(4):
      prefix, targets = unpack(stage, {k: v[i] for k, v in batch.items()})
      assert len(targets) == stage.lengths()[1]
      seen.add((prefix.tobytes(), targets.tobytes()))
      stage.codes(prefix, targets)  # every id in its legal range
  assert seen <= expected and len(seen) >= len(expected) - 4

  train_rows = stage_rows(task, "train", num_batches=2)
  by_mulan = {tuple(c["mulan"]): c for c in read_split(cache_dir, "gm", "train")}
  for i in range(4):
    prefix, targets = unpack(stage, {k: v[i] for k, v in train_rows[0].items()})
    codes = stage.codes(prefix, targets)
    if name == "fine":
      continue  # no MuLan prefix to find the clip by; checked through "coarse"
    clip = by_mulan[tuple(codes["mulan"])]
    n = len(codes["semantic"]) if name == "semantic" else stage.semantic_frames
    starts = [s for s in range(len(clip["semantic"]) - n + 1)
              if np.array_equal(clip["semantic"][s:s + n], codes["semantic"][:n])]
    assert starts, "the window's semantic tokens are not a window of its clip"
    if name == "coarse":  # S and A windows start at the same time
      assert any(np.array_equal(clip["acoustic"][2 * s:2 * s + 2 * n, :4], codes["acoustic"])
                 for s in starts)


@pytest.mark.parametrize("name", stages.STAGE_NAMES)
def test_numpy_reader_reads_what_seqio_reads(cache, name):
  cache_dir, _ = cache
  tasks = [stage_task.StageTask(stage=name, cache_dir=cache_dir, corpora={"gm": 1.0},
                                windows=WINDOWS, reader=reader) for reader in stage_task.READERS]
  assert tasks[0].describe() == tasks[1].describe()
  # Evaluation batches: the same windows in the same order, the same features.
  seqio_rows, numpy_rows = (stage_rows(task, "validation", num_batches=6) for task in tasks)
  for a, b in zip(seqio_rows, numpy_rows):
    assert a.keys() == b.keys()
    for feature in a:
      assert a[feature].dtype == b[feature].dtype
      np.testing.assert_array_equal(a[feature], b[feature], err_msg=feature)
  for split, max_windows in (("test", 0), ("validation", 3)):
    windows = [task.eval_windows(split, max_windows) for task in tasks]
    assert len(windows[0][0]) == len(windows[1][0]) > 0
    for a, b in zip(sum(windows[0], []), sum(windows[1], [])):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="has no split 'dev'"):
    tasks[1].eval_windows("dev", 1)


def test_token_cache_records_equal_tensorflows_and_bad_files_are_named(cache, tmp_path):
  cache_dir, _ = cache
  for corpus in ("gm", "tones"):  # tones has a skipped clip
    task_dir = token_cache.task_cache_dir(cache_dir, corpus)
    for split in token_cache.cached_splits(task_dir):
      cached = token_cache.CachedSplit(task_dir, split, acoustic_levels=12)
      ours = sorted((cached.read(ref) for ref in cached.records), key=lambda r: r["clip_id"])
      theirs = sorted((r for r in read_split(cache_dir, corpus, split) if not r["skip_reason"]),
                      key=lambda r: r["clip_id"])
      assert len(ours) == len(theirs) > 0
      for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in b:
          np.testing.assert_array_equal(a[key], b[key], err_msg=key)
          assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype
  # Read in a shuffled order over the 3 shards, at most 2 of them stay open.
  gm_dir = token_cache.task_cache_dir(cache_dir, "gm")
  shard_names = {os.path.realpath(p) for p in token_cache.shard_paths(gm_dir, "train")}
  def open_shards():
    return sum(os.path.realpath(os.path.join("/proc/self/fd", fd)) in shard_names
               for fd in os.listdir("/proc/self/fd"))
  cached = token_cache.CachedSplit(gm_dir, "train", acoustic_levels=12, max_open_files=2)
  assert len({ref.path for ref in cached.records}) == 3
  by_clip = {}
  for i in np.random.default_rng(0).permutation(2 * len(cached.records)):
    record = cached.read(cached.records[i % len(cached.records)])
    by_clip.setdefault(record["clip_id"], record)
    assert 1 <= open_shards() <= 2
  for record in read_split(cache_dir, "gm", "train"):
    np.testing.assert_array_equal(by_clip[record["clip_id"]]["acoustic"], record["acoustic"])
  del cached
  gc.collect()
  assert open_shards() == 0
  broken = str(tmp_path / "tokens")
  shutil.copytree(cache_dir, broken)
  gm_dir = token_cache.task_cache_dir(broken, "gm")
  shards = token_cache.shard_paths(gm_dir, "train")
  with open(shards[0], "r+b") as f:  # a flipped bit in the first record's data
    f.seek(40)
    byte = f.read(1)
    f.seek(40)
    f.write(bytes([byte[0] ^ 1]))
  with pytest.raises(token_cache.CorruptCacheError, match="record at byte 0 fails its checksum"):
    token_cache.CachedSplit(gm_dir, "train", 12)
  with open(shards[1], "r+b") as f:  # a shard cut short
    f.truncate(os.path.getsize(shards[1]) - 7)
  with pytest.raises(token_cache.CorruptCacheError, match="truncated in the record at byte"):
    token_cache.record_spans(shards[1])
  os.remove(shards[2])
  task = stage_task.StageTask(stage="fine", cache_dir=broken, corpora={"gm": 1.0},
                              windows=WINDOWS, reader="numpy")
  with pytest.raises(FileNotFoundError, match="lacks 1 of the 3 shards of 'train'"):
    next(task.iterator("train", 4))


def test_interleave_order_is_tf_datas():
  """SeqIO reads unshuffled files through tf.data's interleave; the numpy
  reader's order must be the same for any file sizes."""
  rng = np.random.default_rng(0)
  for _ in range(6):
    sizes = rng.integers(0, 40, size=rng.integers(1, 24))
    cycle, block = (int(v) for v in rng.integers(1, 18, size=2))
    files = tf.data.Dataset.from_tensor_slices(sizes.astype(np.int64))
    ds = tf.data.Dataset.zip(files, tf.data.Dataset.range(len(sizes))).interleave(
        lambda size, index: tf.data.Dataset.range(size).map(lambda i: (index, i)),
        cycle_length=cycle, block_length=block, num_parallel_calls=tf.data.AUTOTUNE)
    expected = [(int(f), int(i)) for f, i in ds.as_numpy_iterator()]
    sources = [[(f, i) for i in range(size)] for f, size in enumerate(sizes)]
    assert token_cache.interleave(sources, cycle, block) == expected


def test_tfrecord_framing_and_checksums_match_tensorflows(tmp_path):
  rng = np.random.default_rng(2)
  records = [bytes(range(n)) for n in range(10)] + [rng.bytes(int(n)) for n in
                                                    rng.integers(0, 3000, size=40)]
  path = str(tmp_path / "records.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  with open(path, "rb") as f:
    data = f.read()
  assert [data[start:start + n] for start, n in token_cache.record_spans(path)] == records
  offset = sum(12 + len(r) + 4 for r in records[:20])
  broken = bytearray(data)
  broken[offset] ^= 0x01  # the 21st record's length, by one byte
  with pytest.raises(token_cache.CorruptCacheError,
                     match=f"the length of the record at byte {offset} fails its checksum"):
    token_cache.record_spans(path, bytes(broken))


def test_packed_int64_lists_decode_like_tensorflows():
  values = np.array([0, 1, 127, 128, 1023, 16384, 2**31 - 1, 2**40, -1, -5, -2**63, 2**63 - 1])
  example = tf.train.Example(features=tf.train.Features(feature={
      "codes": tf.train.Feature(int64_list=tf.train.Int64List(value=values)),
      "empty": tf.train.Feature(int64_list=tf.train.Int64List(value=[]))}))
  parsed = token_cache._example_class()()  # pylint: disable=protected-access
  parsed.ParseFromString(example.SerializeToString())
  features = parsed.features.feature
  np.testing.assert_array_equal(
      token_cache.decode_varints(b"".join(features["codes"].int64_list.value)), values)
  assert token_cache.decode_varints(b"".join(features["empty"].int64_list.value)).shape == (0,)
  with pytest.raises(token_cache.CorruptCacheError, match="ends inside a value"):
    token_cache.decode_varints(bytes([0x05, 0x80]))


def test_decoder_features_are_seqios_prefix_lm_features_without_weighting_a_padded_prefix():
  stage = stages.Stage("coarse", window_seconds=0.4, layout=vocab.LAYOUT)
  prefix_len, target_len = stage.lengths()
  rng = np.random.default_rng(1)
  prefix = rng.integers(1, 100, prefix_len - 3).astype(np.int32)  # a short last window
  targets = rng.integers(1, 100, target_len - 8).astype(np.int32)
  ds = tf.data.Dataset.from_tensors({"inputs": prefix, "targets": targets})
  lengths = {"inputs": prefix_len, "targets": target_len}
  (expected,) = seqio.PrefixLMFeatureConverter(pack=False)(ds, lengths).as_numpy_iterator()
  made = stage.decoder_features(prefix, targets)
  assert made.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(made[name], value, err_msg=name)
  dropped = stage.unconditional(prefix)  # conditioning dropout pads M
  weights = stage.decoder_features(dropped, targets, first_frame_weight=3.0)[
      "decoder_loss_weights"]
  first = stage.lengths(1)[1]
  np.testing.assert_array_equal(weights[:len(prefix)], 0.0)
  np.testing.assert_array_equal(weights[len(prefix):len(prefix) + first], 3.0)
  np.testing.assert_array_equal(weights[len(prefix) + first:len(prefix) + len(targets)], 1.0)
  np.testing.assert_array_equal(weights[len(prefix) + len(targets):], 0.0)
  with pytest.raises(ValueError, match="does not fit"):
    stage.decoder_features(prefix, np.concatenate([targets, targets]))


@pytest.mark.parametrize("reader", stage_task.READERS)
def test_stage_reading_is_deterministic_resumable_and_host_sharded(cache, monkeypatch, reader):
  cache_dir, _ = cache
  task = stage_task.StageTask(stage="semantic", cache_dir=cache_dir, corpora={"gm": 1.0},
                              windows=WINDOWS, seed=3, reader=reader)
  first = stage_rows(task, "train", num_batches=5)
  again = stage_rows(task, "train", num_batches=5)
  resumed = task.iterator("train", 4)
  resumed.set_state({"batches_read": 3})
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
  for expected in first[3:]:
    np.testing.assert_array_equal(next(resumed)["decoder_target_tokens"],
                                  expected["decoder_target_tokens"])
  assert resumed.get_state() == {"batches_read": 5}
  other_seed = stage_task.StageTask(stage="semantic", cache_dir=cache_dir, corpora={"gm": 1.0},
                                    windows=WINDOWS, seed=4, reader=reader)
  assert not np.array_equal(stage_rows(other_seed, "train", 1)[0]["decoder_target_tokens"],
                            first[0]["decoder_target_tokens"])

  def examples(batches):
    return {row.tobytes() for b in batches for row in b["decoder_target_tokens"]}
  everything = examples(stage_rows(task, "validation", 2))  # 2 clips x 4 windows
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  hosts = []
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    hosts.append(examples(stage_rows(task, "validation", 2, batch_size=4)))
  assert hosts[0] and hosts[1] and not hosts[0] & hosts[1]
  assert hosts[0] | hosts[1] == everything


@pytest.mark.parametrize("reader", stage_task.READERS)
def test_mixture_samples_corpora_at_their_rates(cache, reader):
  cache_dir, _ = cache
  task = stage_task.StageTask(stage="semantic", cache_dir=cache_dir,
                              corpora={"gm": 3.0, "tones": 1.0}, windows=WINDOWS, reader=reader)
  assert task.name == "gm__tones_semantic"
  owner = {}
  for corpus in ("gm", "tones"):
    for split in ("train",):
      for clip in read_split(cache_dir, corpus, split):
        if clip["skip_reason"]:
          continue
        owner.setdefault(tuple(clip["mulan"]), set()).add(corpus)
  counts = collections.Counter()
  for batch in stage_rows(task, "train", num_batches=40, batch_size=8):
    for row in batch["decoder_target_tokens"]:
      prefix = task.stage.layout.mulan_codes(row[:12])
      corpora_of = owner[tuple(prefix)]
      if len(corpora_of) == 1:
        counts.update(corpora_of)
  share = counts["gm"] / (counts["gm"] + counts["tones"])
  assert 0.6 < share < 0.9, counts


def test_stage_gin_files_train_without_tensorflow_and_checkpoint_the_position(cache, tmp_path):
  """`musiclm train` on the numpy reader, in a process where importing
  TensorFlow, SeqIO, TFDS and the audio libraries fails (as on the GPU image)."""
  cache_dir, manifests = cache
  model_dir = str(tmp_path / "coarse")
  env = xla_env.subprocess_env(8, PYTHONPATH=blocked_modules(tmp_path / "blocked"))
  bindings = [f"MODEL_DIR = '{model_dir}'", f"TOKENS_DIR = '{cache_dir}'",
              "CORPORA = {'gm': 1.0}", "NUM_STEPS = 2", "train.log_every_steps = 1",
              "train.eval_every_steps = 2", "train.eval_batches = 1",
              "Partitioner.mesh_shape = (2, 2, 2)", "StageTask.reader = 'numpy'"]
  result = subprocess.run(
      [sys.executable, "-m", "musiclm_jax.main", "train", "--gin_file=gin/stages/tiny.gin",
       "--gin_file=gin/stages/coarse.gin", *[f"--gin_bindings={b}" for b in bindings]],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "no TensorBoard summaries" in result.stderr  # clu's writer needs TensorFlow
  curves = metrics.read_jsonl_metrics(model_dir)
  assert np.isfinite([row["eval/loss"] for row in curves if "eval/loss" in row]).all()
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"))
  assert ckpt.latest_step() == 2
  assert ckpt.read_data_state(2) == {"batches_read": 2}
  assert ckpt.read_manifest(2)["token_layout"] == manifests["gm"]["layout"]


def test_too_small_a_vocabulary_is_refused(cache, tmp_path):
  cache_dir, _ = cache
  task = stage_task.StageTask(stage="fine", cache_dir=cache_dir, corpora={"gm": 1.0},
                              windows=WINDOWS)
  model = DecoderOnlyModel(tiny_config(vocab_size=128))
  with pytest.raises(ValueError, match="vocab_size 128 is smaller than the task's token space"):
    trainer.train(model_dir=str(tmp_path / "x"), task=task, model=model, num_steps=1,
                  batch_size=8)


def test_missing_cache_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="run `musiclm tokenize` first"):
    stage_task.StageTask(stage="fine", cache_dir=str(tmp_path), corpora={"gm": 1.0})


@pytest.fixture(scope="module")
def bundle_dir(cache, tokenizer_dirs, tmp_path_factory):
  """The three stages untrained (step 0) on the cache, exported with the tokenizers."""
  return tiny_tokenizers.untrained_stage_bundle(cache[0], tokenizer_dirs, WINDOWS,
                                                str(tmp_path_factory.mktemp("stages")))


@pytest.fixture(scope="module")
def generator(bundle_dir):
  return hierarchy.Generator(bundle.Bundle.load(bundle_dir[0]))


def test_bundle_round_trip_and_refusals(bundle_dir, cache, tokenizer_dirs, tmp_path):
  output, runs = bundle_dir
  _, manifests = cache
  loaded = bundle.Bundle.load(output)
  assert loaded.layout.to_dict() == manifests["gm"]["layout"]
  assert {n: s.stage.window_seconds for n, s in loaded.stages.items()} == {
      "semantic": 1.0, "coarse": 0.4, "fine": 0.2}
  assert not os.path.exists(os.path.join(output, "coarse", "checkpoints", "0", "state",
                                         "opt_state"))
  for name in ("semantic", "coarse", "fine"):
    original, _ = checkpoints.load_trained_variables(runs[name])
    exported, _ = checkpoints.load_trained_variables(os.path.join(output, name))
    jax.tree.map(np.testing.assert_array_equal, original["params"], exported["params"])
  with pytest.raises(FileExistsError, match="exists"):
    bundle.export_bundle(bundle.BundleRuns(tokenizer_dirs.soundstream, tokenizer_dirs.semantic,
                                           tokenizer_dirs.mulan, **runs), output)
  with pytest.raises(bundle.BundleError, match="the coarse run holds .* 'fine' examples"):
    bundle.export_bundle(bundle.BundleRuns(
        tokenizer_dirs.soundstream, tokenizer_dirs.semantic, tokenizer_dirs.mulan,
        semantic=runs["semantic"], coarse=runs["fine"], fine=runs["fine"]),
        str(tmp_path / "wrong"))
  assert not os.path.exists(str(tmp_path / "wrong"))
  tampered = str(tmp_path / "tampered")
  shutil.copytree(output, tampered)
  with open(os.path.join(tampered, "manifest.json")) as f:
    manifest = json.load(f)
  manifest["layout"] = dict(manifest["layout"], semantic_codebook_size=1024)
  with open(os.path.join(tampered, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  with pytest.raises(bundle.BundleError, match="token layout"):
    bundle.Bundle.load(tampered)
  with pytest.raises(FileNotFoundError, match="not a bundle"):
    bundle.Bundle.load(str(tmp_path))


def test_generation_is_seeded_legal_and_a_shorter_piece_starts_a_longer_one(generator,
                                                                           monkeypatch):
  rows = [[("a calm piano waltz", 1.6)], [("fast techno drums", 1.6)]]
  long = generator.generate(rows, seeds=[1, 2])  # 3 semantic and 7 coarse windows
  frames = int(1.6 * 25)
  assert long.audio.shape == (2, frames * 960) and np.all(np.isfinite(long.audio))
  assert long.semantic.shape == (2, frames) and long.acoustic.shape == (2, 2 * frames, 12)
  layout = generator.layout
  assert np.all((long.semantic >= 0) & (long.semantic < layout.semantic_codebook_size))
  assert np.all((long.acoustic >= 0) & (long.acoustic < layout.acoustic_codebook_size))
  other = generator.generate(rows, seeds=[3, 2])  # row 1 keeps its seed: same output
  assert np.mean(other.semantic[0] != long.semantic[0]) > 0.3
  np.testing.assert_array_equal(other.acoustic[1], long.acoustic[1])
  # Windows slide causally: 0.8 s generated alone is the start of the 1.6 s piece,
  # also when its 8 fine windows (4 per row) are sampled in calls of 5 rows (the
  # last filled up) and its 40 frames decoded as a stream of 7-frame chunks (the
  # last padded): the same tokens, and the waveform up to float32 rounding.
  calls = []
  sample = decoding.sample
  def recording_sample(model, params, prefix, *args, **kwargs):
    calls.append(len(prefix))
    return sample(model, params, prefix, *args, **kwargs)
  monkeypatch.setattr(decoding, "sample", recording_sample)
  chunked = hierarchy.Generator(generator.bundle, hierarchy.HierarchyConfig(
      fine_rows_per_call=5, decode_frames_per_call=7))
  short = chunked.generate([[("a calm piano waltz", 0.8)], [("fast techno drums", 0.8)]],
                           seeds=[1, 2])
  assert calls[-2:] == [5, 5] and calls.count(5) == 2
  np.testing.assert_array_equal(short.semantic, long.semantic[:, :20])
  np.testing.assert_array_equal(short.acoustic, long.acoustic[:, :40])
  np.testing.assert_allclose(short.audio, long.audio[:, :short.audio.shape[1]], rtol=1e-4,
                             atol=1e-5)


def test_story_mode_and_audio_continuation(generator):
  story = [[("a calm piano waltz", 0.6), ("now loud drums", 0.6)]]
  result = generator.generate(story, seeds=[0])
  assert result.mulan.shape == (1, 2, 12) and result.semantic.shape == (1, 30)
  prompt = audio_fixtures.tone(1.0, 24000)[:, 0][None]
  continued = generator.generate([[("more of the same", 0.6)]], seeds=[0], prompt_audio=prompt)
  direct = generator.bundle.tokenizers.tokenize_clips(prompt, [24000])
  assert continued.semantic.shape == (1, 25 + 15)
  np.testing.assert_array_equal(continued.semantic[0, :25], direct.semantic[0])
  np.testing.assert_array_equal(continued.acoustic[0, :50], direct.acoustic[0])
  with pytest.raises(ValueError, match="prompt is empty"):
    generator.generate([[("  ", 1.0)]], seeds=[0])
  with pytest.raises(ValueError, match="silent"):
    generator.generate([[("x", 1.0)]], seeds=[0], prompt_audio=np.zeros((1, 24000)))


def test_cli_generate_writes_one_wav_per_prompt_and_refuses_bad_input(bundle_dir, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  output, _ = bundle_dir
  env = xla_env.subprocess_env(1)

  def musiclm(*args):
    return subprocess.run([sys.executable, "-m", "musiclm_jax.main", *args], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  wav = str(tmp_path / "out.wav")
  result = musiclm("generate", f"--bundle={output}", "--prompt=a calm waltz",
                   "--prompt=loud drums", "--seconds=0.4", f"--output={wav}", "--seed=5")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [r["seed"] for r in rows] == [5, 6]
  for i in range(2):
    data, rate = soundfile.read(str(tmp_path / f"out_{i}.wav"))
    assert rate == 24000 and data.shape == (int(0.4 * 24000),)
  bad = musiclm("generate", f"--bundle={tmp_path}", "--prompt=x", f"--output={wav}")
  assert bad.returncode == 1 and "is not a bundle" in bad.stderr
  no_output = musiclm("export")
  assert no_output.returncode == 2 and "--output is required" in no_output.stderr


def test_infer_resumes_skips_bad_lines_and_splits_items_over_hosts(generator, tmp_path,
                                                                   monkeypatch):
  prompts = str(tmp_path / "prompts.jsonl")
  lines = [{"id": "a", "prompt": "a calm waltz", "seconds": 0.4, "seed": 1},
           {"id": "b", "prompt": "loud drums", "seconds": 0.4, "seed": 2},
           {"id": "c", "segments": [["calm", 0.2], ["loud", 0.2]], "seed": 3},
           {"id": "d", "prompt": "   ", "seconds": 0.4},
           {"id": "a", "prompt": "again", "seconds": 0.4},
           {"id": "e", "prompt": "soft strings", "seconds": 0.4, "seed": 5}]
  with open(prompts, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
    f.write("not json\n")
  out = str(tmp_path / "out")
  batches = []
  generate = generator.generate
  def recording_generate(rows, seeds, **kwargs):
    batches.append(list(seeds))
    return generate(rows, seeds, **kwargs)
  monkeypatch.setattr(generator, "generate", recording_generate)
  report = infer_lib.infer(generator, prompts, out, batch_size=2)
  assert report["generated"] == 4 and report["already_done"] == 0
  assert report["skipped"] == {"empty prompt": 1, "id 'a' repeats": 1,
                               "Expecting value: line 1 column 1 (char 0)": 1}
  # a, b and e (0.4 s, one segment) in two batches of 2, the second filled up with
  # a copy of e (so that it reuses the first batch's programs); c alone.
  assert batches == [[1, 2], [5, 5], [3]]
  manifest = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
  assert sorted(r["id"] for r in manifest) == ["a", "b", "c", "e"]
  alone = generate([[("soft strings", 0.4)]], [5])
  e_tokens = np.load(os.path.join(out, "e.npz"))
  np.testing.assert_array_equal(e_tokens["semantic"], alone.semantic[0])
  np.testing.assert_array_equal(e_tokens["acoustic"], alone.acoustic[0])
  first_b = soundfile.read(os.path.join(out, "b.wav"))[0]
  # Killed before "b" was recorded: its line and files are gone; "a" must not be redone.
  with open(os.path.join(out, "manifest.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in manifest if r["id"] != "b")
  os.remove(os.path.join(out, "b.wav"))
  mtime_a = os.path.getmtime(os.path.join(out, "a.wav"))
  report = infer_lib.infer(generator, prompts, out, batch_size=2)
  assert report["generated"] == 1 and report["already_done"] == 3
  assert os.path.getmtime(os.path.join(out, "a.wav")) == mtime_a
  np.testing.assert_allclose(soundfile.read(os.path.join(out, "b.wav"))[0], first_b, atol=1e-4)
  tokens = np.load(os.path.join(out, "c.npz"))
  assert tokens["mulan"].shape == (2, 12) and tokens["acoustic"].shape == (20, 12)
  owned = []
  for index in (0, 1):
    host_dir = str(tmp_path / f"host{index}")
    infer_lib.infer(generator, prompts, host_dir, process_index=index, process_count=2)
    owned.append(infer_lib.finished_ids(host_dir))
  assert owned[0] | owned[1] == {"a", "b", "c", "e"} and not owned[0] & owned[1]


def test_eval_generation_measures_generated_and_real_clips(generator, tiny_gm_corpus):
  report = generation_eval.evaluate_generation(generator, tiny_gm_corpus, num_clips=8,
                                               seconds=1.0)
  assert report["num_clips"] == 2  # the tiny corpus' test split
  prompts = generation_eval.read_prompts(tiny_gm_corpus, 8)
  for side in ("generated", "reference"):
    measured = report[side]
    assert -1.0 <= measured["cycle_consistency"] <= 1.0
    for key in ("text_to_audio_recall@1", "genre_accuracy", "tempo_accuracy"):
      assert 0.0 <= measured[key] <= 1.0, (side, key)
    assert measured["num_tempo_labels"] == 2
    # The per-clip rows a report shows are the ones the means come from.
    rows = measured["per_clip"]
    assert len(rows) == 2
    assert np.mean([r["cycle_consistency"] for r in rows]) == pytest.approx(
        measured["cycle_consistency"], abs=1e-3)
    assert measured["genre_accuracy"] == np.mean(
        [r["genre"] == p["attributes"]["genre"] for r, p in zip(rows, prompts)])
  assert np.isfinite(report["frechet_distance"]) and report["frechet_distance"] >= 0
  assert "generated" in generation_eval.format_report(report)


def test_data_parallel_generation_over_8_devices_equals_one_device(generator):
  sharded = hierarchy.Generator(generator.bundle, partitioner=Partitioner((8, 1, 1)))
  rows = [[("a calm piano waltz", 0.6)], [("fast techno drums", 0.6)], [("a slow hymn", 0.6)]]
  one = generator.generate(rows, seeds=[4, 5, 6])
  eight = sharded.generate(rows, seeds=[4, 5, 6])
  np.testing.assert_array_equal(eight.acoustic, one.acoustic)
