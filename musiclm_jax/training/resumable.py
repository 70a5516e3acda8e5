"""Batches of a deterministic input pipeline, resumable by counting them.

Every task's pipeline is a pure function of its seed and the process index,
so the reading position is just the number of batches read: `set_state`
rebuilds the pipeline and skips that many (re-reading them costs a moment
per thousand batches). This is what the trainer saves in its checkpoints.
No TensorFlow here: a tf.data pipeline comes in as
`lambda skip: dataset.skip(skip).as_numpy_iterator()`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np

Batch = dict[str, np.ndarray]


def local_batch_size(global_batch_size: int) -> int:
  """This process' rows of a global batch."""
  if global_batch_size % jax.process_count():
    raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


class BatchCountIterator(Iterator[Batch]):
  """Iterates numpy batches; `get_state()` is the batches read.

  Args:
    batches_from: `batches_from(n)` iterates the (endless, deterministic)
      batches from the n-th on.
    convert: applied to each numpy batch (e.g. bytes -> str); default none.
  """

  def __init__(self, batches_from: Callable[[int], Iterator[Batch]],
               convert: Callable[[Batch], Batch] = lambda batch: batch):
    self._batches_from = batches_from
    self._convert = convert
    self._batches_read = 0
    self._iterator = batches_from(0)

  def __next__(self) -> Batch:
    batch = next(self._iterator)
    self._batches_read += 1
    return self._convert(batch)

  def get_state(self) -> dict[str, Any]:
    return {"batches_read": self._batches_read}

  def set_state(self, state: dict[str, Any]) -> None:
    self._batches_read = int(state["batches_read"])
    self._iterator = self._batches_from(self._batches_read)
