"""`musiclm` command line: subcommands configured by gin (T5X conventions).

    musiclm train --gin_file=gin/runs/synthetic_tiny.gin \
        --gin_bindings="MODEL_DIR='/tmp/run'"

`--gin_file` and `--gin_bindings` repeat; `--gin_search_paths` adds
directories in which `--gin_file` and gin `include`s are looked up (this
repository's root and `gin/` are always searched last).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only clu's summary writer here
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import gin

# Imported for their gin configurables.
from musiclm_jax import models  # pylint: disable=unused-import
from musiclm_jax import partitioning  # pylint: disable=unused-import
from musiclm_jax.layers import transformer  # pylint: disable=unused-import
from musiclm_jax.training import checkpoints  # pylint: disable=unused-import
from musiclm_jax.training import optimizers  # pylint: disable=unused-import
from musiclm_jax.training import synthetic_task  # pylint: disable=unused-import
from musiclm_jax.training import trainer

flags.DEFINE_multi_string("gin_file", [], "gin config file(s), applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, e.g. \"MODEL_DIR='/tmp/x'\".")
flags.DEFINE_list("gin_search_paths", [], "extra directories to look up gin files in.")
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


def _train() -> None:
  _require_macro("MODEL_DIR", "'/path/to/run'")
  trainer.train()  # pylint: disable=no-value-for-parameter


SUBCOMMANDS: dict[str, Callable[[], None]] = {"train": _train}


def main(argv: Sequence[str]) -> int:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # progress lines go to stdout
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: musiclm {{{'|'.join(SUBCOMMANDS)}}} [--gin_file=...] "
                         f"[--gin_bindings=...]; got {' '.join(argv[1:]) or 'nothing'}")
  try:
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    SUBCOMMANDS[argv[1]]()
  except (GinConfigError, trainer.NonFiniteLossError,
          trainer.IncompatibleCheckpointError) as e:
    print(f"musiclm {argv[1]}: error: {e}", file=sys.stderr, flush=True)
    return 1 if not isinstance(e, GinConfigError) else 2
  return 0


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
