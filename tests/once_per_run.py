"""What test files in any xdist worker share: built once per test run.

tests/conftest.py makes the run's shared directory (`MUSICLM_TESTS_SHARED_DIR`)
and removes it at the end. The first test to ask for an entry builds it under
a file lock; every other one, in any worker, waits for it and reads it.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from typing import Callable

COMPLETE = "COMPLETE"


def shared_directory(name: str, build: Callable[[str], None]) -> str:
  """`MUSICLM_TESTS_SHARED_DIR/name`, filled by `build(directory)` once per run.

  A build that failed (no COMPLETE marker) is removed and run again by the next
  test that asks.
  """
  shared = os.environ["MUSICLM_TESTS_SHARED_DIR"]
  directory = os.path.join(shared, name)
  with open(os.path.join(shared, f"{name}.lock"), "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.isfile(os.path.join(directory, COMPLETE)):
      shutil.rmtree(directory, ignore_errors=True)
      os.makedirs(directory)
      build(directory)
      open(os.path.join(directory, COMPLETE), "w", encoding="utf-8").close()
  return directory
