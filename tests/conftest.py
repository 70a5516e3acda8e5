"""Test set-up: 8 virtual CPU devices and a clean gin config per test."""
import os
import shutil
import tempfile

import once_per_run
import xla_env

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_env.xla_flags(8)).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU compiles the partitionable threefry of every parameter shape
# slowly (a GAN's initialisation: 36 s instead of 12 s); the values differ,
# the behaviour under test does not. Subprocesses inherit the setting.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
# One persistent compilation cache for the whole run: the xdist workers and
# every CLI subprocess a test starts inherit it from the process that made it,
# and load a program another one compiled (the same tiny model's steps,
# samplers and tokenizers) instead of compiling it. Removed at the end.
# Beside it, a directory for what test files in any worker share
# (`tests/once_per_run.py`: the tiny corpus, tokenizers and reference runs).
_OWNS_SHARED_DIRS = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWNS_SHARED_DIRS:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="musiclm_jax_tests_xla_")
  os.environ["MUSICLM_TESTS_SHARED_DIR"] = tempfile.mkdtemp(prefix="musiclm_jax_tests_shared_")
# Every program, however quick to compile: the small ones (eager ops, pads,
# slices) recur in every process, and loading one costs less than compiling it
# (the whole run: 11.9 min and 21.9 CPU-min instead of 14.2 and 26.3 with a
# 0.5 s minimum).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import gin  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from musiclm_jax.layers.transformer import DecoderConfig  # pylint: disable=wrong-import-position
from musiclm_jax.models import DecoderOnlyModel  # pylint: disable=wrong-import-position


# The test files that cost most, most first (CPU seconds of the whole file,
# 2026-12-08, 2 cores): xdist hands files out in collection order
# (`--no-loadscope-reorder` in pytest.ini), so the two workers start on the long
# ones and end on the short ones (the rest, in pytest's order) and finish
# together. test_pipeline builds the tokenizers that test_melody_conditioning
# and test_quickstart wait for, while the other worker runs
# test_codec_training, which needs nothing shared.
COSTLIEST_FILES = ("test_pipeline.py",             # 255
                   "test_codec_training.py",       # 97
                   "test_melody_conditioning.py",  # 123
                   "test_quickstart.py",           # 77
                   "test_training.py",             # 63
                   "test_w2v_bert.py",             # 57
                   "test_soundstream.py",          # 47
                   "test_cli.py",                  # 34
                   "test_melody.py",               # 31
                   "test_launchers.py")            # 28


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(COSTLIEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest


def pytest_sessionfinish(session):
  if _OWNS_SHARED_DIRS and not hasattr(session.config, "workerinput"):
    for name in ("JAX_COMPILATION_CACHE_DIR", "MUSICLM_TESTS_SHARED_DIR"):
      shutil.rmtree(os.environ[name], ignore_errors=True)


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


# What the lent GPU image lacks of the [data] extra (jax, flax, optax, orbax,
# numpy, protobuf, etils, sentencepiece and scikit-learn are there).
NOT_ON_GPU_IMAGE = ("tensorflow", "seqio", "tensorflow_datasets", "apache_beam", "clu",
                    "librosa", "pretty_midi", "music21", "audioread")


def blocked_modules(directory, modules=NOT_ON_GPU_IMAGE) -> str:
  """A directory for PYTHONPATH in which importing any of `modules` fails."""
  for module in modules:
    os.makedirs(os.path.join(directory, module), exist_ok=True)
    with open(os.path.join(directory, module, "__init__.py"), "w", encoding="utf-8") as f:
      f.write(f"raise ImportError('{module} is blocked in this test')\n")
  return str(directory)


def tiny_config(**overrides) -> DecoderConfig:
  """The `tiny` size of gin/sizes/tiny.gin, in float32 for tight comparisons."""
  fields = dict(num_layers=2, num_heads=4, head_dim=16, d_model=64, d_ff=256,
                dtype="float32")
  fields.update(overrides)
  return DecoderConfig(**fields)


@pytest.fixture
def tiny_model() -> DecoderOnlyModel:
  return DecoderOnlyModel(tiny_config())


def random_batch(rng: np.random.Generator, batch_size: int, length: int,
                 prefix_length: int = 5) -> dict[str, np.ndarray]:
  """Prefix-LM batch of random ids in [1, 2000)."""
  from musiclm_jax.models import prefix_lm_example  # pylint: disable=g-import-not-at-top
  examples = [prefix_lm_example(rng.integers(1, 2000, prefix_length),
                                rng.integers(1, 2000, length - prefix_length - 2), length)
              for _ in range(batch_size)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@pytest.fixture(scope="session")
def tiny_gm_corpus() -> str:
  """A gm_synth corpus of 24 clips × 4 s (TimGM6mb SoundFont), built once per run
  (`once_per_run`) and only read; its corpus_dir."""
  from musiclm_jax.corpora import base  # pylint: disable=g-import-not-at-top
  from musiclm_jax.corpora import gm_synth  # pylint: disable=g-import-not-at-top
  from musiclm_jax.tasks import corpora  # pylint: disable=g-import-not-at-top
  spec = base.BuildSpec(num_examples=24, seconds=4.0, seed=3)
  data_dir = once_per_run.shared_directory("tiny_gm_corpus", lambda directory: corpora.prepare(
      gm_synth.GmSynthSource(soundfont="timgm6mb"), spec, directory, workers=2))
  return corpora.dataset_dir(data_dir, "gm_synth", spec)
