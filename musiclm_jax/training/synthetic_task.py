"""A built-in token task with learnable structure, for trying out the trainer.

No audio or tokenizer is needed: every example is a prefix-LM sequence in
the real token space (`vocab.LAYOUT`) whose prefix is 12 MuLan tokens and
whose targets are a random motif of semantic tokens repeated until the
example is full. The motif's first occurrence cannot be predicted (beyond
its alphabet); every later token copies the token one motif-length back,
which a two-layer Transformer learns in a few hundred steps.
"""
from __future__ import annotations

from typing import Any, Iterator

import gin
import jax
import numpy as np

from musiclm_jax import vocab
from musiclm_jax.models import prefix_lm_example

SPLIT_SEEDS = {"train": 0, "validation": 1}


class TokenIterator(Iterator[dict[str, np.ndarray]]):
  """This process' rows of each global batch, with a resumable position.

  `get_state()` returns how many batches were consumed; `set_state` seeks.
  Row r of global batch i is a pure function of (seed, split, i, r), so the
  global batch is the same however many processes share it.
  """

  def __init__(self, task: "SyntheticTokenTask", split: str, global_batch_size: int):
    if split not in SPLIT_SEEDS:
      raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    if global_batch_size % jax.process_count():
      raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                       f"{jax.process_count()} processes")
    self._task = task
    self._split_seed = SPLIT_SEEDS[split]
    self._local_batch_size = global_batch_size // jax.process_count()
    self._index = 0

  def __next__(self) -> dict[str, np.ndarray]:
    first_row = jax.process_index() * self._local_batch_size
    examples = [self._task.example(np.random.default_rng(
        [self._task.seed, self._split_seed, self._index, row]))
                for row in range(first_row, first_row + self._local_batch_size)]
    self._index += 1
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def get_state(self) -> dict[str, Any]:
    return {"batches_read": self._index}

  def set_state(self, state: dict[str, Any]) -> None:
    self._index = int(state["batches_read"])


@gin.configurable
class SyntheticTokenTask:
  """Repeated semantic-token motifs after a MuLan prefix.

  Args:
    length: example length (prefix + targets, padded).
    alphabet_size: how many semantic codes motifs draw from.
    min_motif_length, max_motif_length: motif lengths, drawn per example.
    seed: makes the task reproducible.
  """

  def __init__(self, length: int = 64, alphabet_size: int = 32,
               min_motif_length: int = 3, max_motif_length: int = 8, seed: int = 0):
    self.layout = vocab.LAYOUT
    self.prefix_length = self.layout.mulan_levels
    if length <= self.prefix_length + 2 * max_motif_length:
      raise ValueError(f"length {length} leaves no room for two motifs of "
                       f"{max_motif_length} after the {self.prefix_length}-token prefix")
    if not 1 <= alphabet_size <= self.layout.semantic_codebook_size:
      raise ValueError(f"alphabet_size {alphabet_size} outside "
                       f"1..{self.layout.semantic_codebook_size}")
    self.length = length
    self.alphabet_size = alphabet_size
    self.min_motif_length = min_motif_length
    self.max_motif_length = max_motif_length
    self.seed = seed

  def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One example of the four prefix-LM features, each `[length]`."""
    mulan_codes = rng.integers(0, self.layout.mulan_codebook_size, self.prefix_length)
    prefix = self.layout.mulan_tokens(mulan_codes)
    motif_length = rng.integers(self.min_motif_length, self.max_motif_length + 1)
    motif = rng.integers(0, self.alphabet_size, motif_length)
    num_targets = self.length - self.prefix_length
    targets = self.layout.semantic_tokens(np.resize(motif, num_targets))
    return prefix_lm_example(prefix, targets, self.length)

  def iterator(self, split: str, global_batch_size: int) -> TokenIterator:
    return TokenIterator(self, split, global_batch_size)
