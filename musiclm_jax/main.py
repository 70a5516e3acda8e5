"""`musiclm` command line: subcommands configured by gin (T5X conventions).

    musiclm train --gin_file=gin/runs/synthetic_tiny.gin \
        --gin_bindings="MODEL_DIR='/tmp/run'"
    musiclm prepare gm_synth --data_dir=data --num_examples=200 --seconds=10

`--gin_file` and `--gin_bindings` repeat; `--gin_search_paths` adds
directories in which `--gin_file` and gin `include`s are looked up (this
repository's root and `gin/` are always searched last).
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow's start-up logs
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import gin

flags.DEFINE_multi_string("gin_file", [], "gin config file(s), applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, e.g. \"MODEL_DIR='/tmp/x'\".")
flags.DEFINE_list("gin_search_paths", [], "extra directories to look up gin files in.")
# `musiclm prepare CORPUS`; everything else about a corpus is in gin.
flags.DEFINE_string("data_dir", "data", "prepare: TFDS data directory to build corpora in.")
flags.DEFINE_integer("num_examples", 0, "prepare: clips to build (0: all the source has).")
flags.DEFINE_float("seconds", 10.0, "prepare: clip length in seconds.")
flags.DEFINE_integer("seed", 0, "prepare: seed of composition, choices and splits.")
flags.DEFINE_string("source_dir", None, "prepare: the user's files (audio_folder, musiccaps).")
flags.DEFINE_integer("workers", 0, "prepare: worker processes (0: one per CPU core).")
FLAGS = flags.FLAGS

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Searched after --gin_search_paths, so that `gin/runs/x.gin` and includes
# such as `sizes/tiny.gin` resolve from any working directory.
DEFAULT_SEARCH_PATHS = (REPO_DIR, os.path.join(REPO_DIR, "gin"))


_SEARCH_PATHS_ADDED: set[str] = set()


class GinConfigError(ValueError):
  """A gin file or binding could not be parsed or refers to something unknown."""


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses files then bindings; errors name the file or binding at fault."""
  for path in [*search_paths, *DEFAULT_SEARCH_PATHS]:
    if os.path.isdir(path) and path not in _SEARCH_PATHS_ADDED:
      gin.add_config_file_search_path(path)
      _SEARCH_PATHS_ADDED.add(path)
  verbosity = logging.get_verbosity()
  # gin logs an error for every search path that misses, even when a later
  # one hits; a real failure is raised below with its own message.
  logging.set_verbosity(logging.FATAL)
  try:
    for path in gin_files:
      try:
        gin.parse_config_file(path)
      except Exception as e:  # gin raises IOError, ValueError, SyntaxError, ...
        raise GinConfigError(f"gin file {path!r}: {e}") from e
    for binding in gin_bindings:
      try:
        gin.parse_config(binding)
      except Exception as e:
        raise GinConfigError(f"gin binding {binding!r}: {e}") from e
  finally:
    logging.set_verbosity(verbosity)


def _require_macro(name: str, example: str) -> None:
  try:
    gin.query_parameter(f"%{name}")
  except ValueError:
    raise GinConfigError(f"the gin macro {name} is not set; add "
                         f"--gin_bindings=\"{name}={example}\"") from None


class UsageError(ValueError):
  """Wrong positional arguments or flags for a subcommand."""


class CommandError(RuntimeError):
  """A subcommand stopped on bad input or state, with a message for the user."""


def _train(args: Sequence[str]) -> None:
  from musiclm_jax.training import trainer  # pylint: disable=g-import-not-at-top
  if args:
    raise UsageError(f"train takes no positional arguments; got {' '.join(args)}")
  _require_macro("MODEL_DIR", "'/path/to/run'")
  try:
    trainer.train()  # pylint: disable=no-value-for-parameter
  except (trainer.NonFiniteLossError, trainer.IncompatibleCheckpointError) as e:
    raise CommandError(str(e)) from e


def _prepare(args: Sequence[str]) -> None:
  from musiclm_jax.corpora import base  # pylint: disable=g-import-not-at-top
  from musiclm_jax.corpora import registry  # pylint: disable=g-import-not-at-top
  from musiclm_jax.music import render  # pylint: disable=g-import-not-at-top
  from musiclm_jax.tasks import corpora  # pylint: disable=g-import-not-at-top
  if len(args) != 1 or args[0] not in registry.SOURCES:
    raise UsageError(f"usage: musiclm prepare {{{'|'.join(registry.SOURCES)}}} --data_dir=DIR "
                     f"--num_examples=N --seconds=S --seed=K [--source_dir=DIR]; "
                     f"got {' '.join(args) or 'no corpus'}")
  try:
    spec = base.BuildSpec(num_examples=FLAGS.num_examples, seconds=FLAGS.seconds,
                          seed=FLAGS.seed, source_dir=FLAGS.source_dir)
    corpora.prepare(registry.SOURCES[args[0]](), spec, FLAGS.data_dir, workers=FLAGS.workers)
  except (ValueError, render.RenderError) as e:
    raise CommandError(str(e)) from e


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "train": _train, "prepare": _prepare}
# Modules whose gin configurables a subcommand needs, imported before gin is
# parsed. Kept per subcommand, so that each imports only its own stack:
# `train` runs on GPU images without TensorFlow or the audio libraries, and
# `prepare`'s worker processes, which re-import this module, start quickly.
GIN_MODULES = {
    "train": ("musiclm_jax.models", "musiclm_jax.partitioning",
              "musiclm_jax.layers.transformer", "musiclm_jax.training.checkpoints",
              "musiclm_jax.training.optimizers", "musiclm_jax.training.synthetic_task",
              "musiclm_jax.training.trainer"),
    "prepare": ("musiclm_jax.corpora.registry",),
}


def import_configurables(subcommand: str) -> None:
  """Registers the gin configurables of `subcommand` (before parsing gin)."""
  for module in GIN_MODULES[subcommand]:
    importlib.import_module(module)


def main(argv: Sequence[str]) -> int:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # progress lines go to stdout
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: musiclm {{{'|'.join(SUBCOMMANDS)}}} [--gin_file=...] "
                         f"[--gin_bindings=...]; got {' '.join(argv[1:]) or 'nothing'}")
  import_configurables(argv[1])
  try:
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    SUBCOMMANDS[argv[1]](argv[2:])
  except (GinConfigError, UsageError, CommandError) as e:
    print(f"musiclm {argv[1]}: error: {e}", file=sys.stderr, flush=True)
    return 2 if isinstance(e, (GinConfigError, UsageError)) else 1
  return 0


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
