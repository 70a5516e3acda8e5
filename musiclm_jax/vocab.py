"""The one token space shared by every MusicLM stage.

Layout (ids are contiguous, in this order)::

  0                      pad (also the begin-of-sequence input of a decoder)
  M0 + 1024*q + c        MuLan token, RVQ level q in [0, 12), code c
  S0 + c                 semantic (w2v-BERT k-means) token, cluster c
  A0 + 1024*q + c        acoustic (SoundStream) token, RVQ level q in [0, 12)
  T0 + 512*q + c         melody token T_mel, RVQ level q in [0, melody_levels)

and the vocabulary size is rounded up to a multiple of 128 (the ids above the
last used token are never legal targets). Melody tokens (melody conditioning,
`tokenizers/melody.py`) come last, so that no other offset moves; a layout
without them (`melody_levels = 0`, the default) serialises exactly as before
they existed. Nothing else in the package may
hard-code an offset: use `LAYOUT` (or a `TokenLayout` read from a checkpoint
manifest) and its helpers.

Encode/decode helpers are plain arithmetic, so they work on numpy and jax
arrays alike (and inside `jit`); `check_*` helpers validate concrete arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Sizes of each token family; offsets and ranges are derived from them."""

  mulan_levels: int = 12
  mulan_codebook_size: int = 1024
  semantic_codebook_size: int = 1024
  acoustic_levels: int = 12
  acoustic_codebook_size: int = 1024
  vocab_multiple: int = 128
  melody_levels: int = 0
  melody_codebook_size: int = 512

  def __post_init__(self):
    if self.melody_levels < 0:
      raise ValueError(f"melody_levels must be >= 0; got {self.melody_levels}")
    if not self.melody_levels:  # no melody tokens: their codebook size means nothing
      object.__setattr__(self, "melody_codebook_size",
                         TokenLayout.__dataclass_fields__["melody_codebook_size"].default)

  # -- offsets ---------------------------------------------------------------
  @property
  def mulan_offset(self) -> int:
    return PAD_ID + 1

  @property
  def semantic_offset(self) -> int:
    return self.mulan_offset + self.mulan_levels * self.mulan_codebook_size

  @property
  def acoustic_offset(self) -> int:
    return self.semantic_offset + self.semantic_codebook_size

  @property
  def melody_offset(self) -> int:
    return self.acoustic_offset + self.acoustic_levels * self.acoustic_codebook_size

  @property
  def num_used_ids(self) -> int:
    """One past the largest legal id."""
    return self.melody_offset + self.melody_levels * self.melody_codebook_size

  @property
  def vocab_size(self) -> int:
    """Embedding / logit size: used ids rounded up to `vocab_multiple`."""
    m = self.vocab_multiple
    return -(-self.num_used_ids // m) * m

  # -- legal ranges ----------------------------------------------------------
  def mulan_range(self, level: int) -> tuple[int, int]:
    """[lo, hi) ids of MuLan RVQ level `level`."""
    _check_level(level, self.mulan_levels, "MuLan")
    lo = self.mulan_offset + level * self.mulan_codebook_size
    return lo, lo + self.mulan_codebook_size

  def semantic_range(self) -> tuple[int, int]:
    return self.semantic_offset, self.semantic_offset + self.semantic_codebook_size

  def acoustic_range(self, level: int) -> tuple[int, int]:
    """[lo, hi) ids of SoundStream RVQ level `level`."""
    _check_level(level, self.acoustic_levels, "acoustic")
    lo = self.acoustic_offset + level * self.acoustic_codebook_size
    return lo, lo + self.acoustic_codebook_size

  def melody_range(self, level: int) -> tuple[int, int]:
    """[lo, hi) ids of melody RVQ level `level`."""
    _check_level(level, self.melody_levels, "melody")
    lo = self.melody_offset + level * self.melody_codebook_size
    return lo, lo + self.melody_codebook_size

  def acoustic_position_ranges(self, num_positions: int, first_level: int,
                               num_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Legal [lo, hi) per position of flattened frame-major acoustic tokens.

    A window of acoustic levels `first_level .. first_level+num_levels-1` is
    flattened frame by frame, so position p carries level
    `first_level + p % num_levels`.

    Returns:
      lo, hi: int32 `[num_positions]`.
    """
    if first_level < 0 or num_levels < 1 or first_level + num_levels > self.acoustic_levels:
      raise ValueError(
          f"acoustic levels {first_level}..{first_level + num_levels - 1} are "
          f"outside 0..{self.acoustic_levels - 1}")
    levels = first_level + np.arange(num_positions) % num_levels
    lo = (self.acoustic_offset + levels * self.acoustic_codebook_size).astype(np.int32)
    return lo, (lo + self.acoustic_codebook_size).astype(np.int32)

  # -- encode / decode -------------------------------------------------------
  def mulan_tokens(self, codes: Any) -> Any:
    """`[..., levels]` MuLan RVQ codes -> token ids (levels start at 0)."""
    return _levels_to_ids(codes, self.mulan_offset, self.mulan_codebook_size, 0)

  def mulan_codes(self, tokens: Any) -> Any:
    return _ids_to_levels(tokens, self.mulan_offset, self.mulan_codebook_size, 0)

  def melody_tokens(self, codes: Any) -> Any:
    """`[..., levels]` melody RVQ codes (e.g. `[windows, levels]`) -> token ids."""
    return _levels_to_ids(codes, self.melody_offset, self.melody_codebook_size, 0)

  def melody_codes(self, tokens: Any) -> Any:
    return _ids_to_levels(tokens, self.melody_offset, self.melody_codebook_size, 0)

  def semantic_tokens(self, codes: Any) -> Any:
    """`[...]` k-means cluster ids -> token ids."""
    return codes + self.semantic_offset

  def semantic_codes(self, tokens: Any) -> Any:
    return tokens - self.semantic_offset

  def acoustic_tokens(self, codes: Any, first_level: int = 0) -> Any:
    """`[..., levels]` SoundStream codes of levels `first_level..` -> token ids."""
    return _levels_to_ids(codes, self.acoustic_offset, self.acoustic_codebook_size,
                          first_level)

  def acoustic_codes(self, tokens: Any, first_level: int = 0) -> Any:
    """Inverse of `acoustic_tokens`: `[..., levels]` ids -> codes."""
    return _ids_to_levels(tokens, self.acoustic_offset, self.acoustic_codebook_size,
                          first_level)

  # -- validation ------------------------------------------------------------
  def check_tokens(self, tokens: np.ndarray, lo: Any, hi: Any, what: str) -> None:
    """Raises ValueError naming the first id of `tokens` outside [lo, hi)."""
    tokens = np.asarray(tokens)
    bad = (tokens < lo) | (tokens >= hi)
    if np.any(bad):
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      lo_b = np.broadcast_to(lo, tokens.shape)[idx]
      hi_b = np.broadcast_to(hi, tokens.shape)[idx]
      raise ValueError(
          f"{what}: token {int(tokens[idx])} at index {idx} is outside its legal "
          f"range [{int(lo_b)}, {int(hi_b)})")

  # -- (de)serialisation, for checkpoints and bundles --------------------------
  def to_dict(self) -> dict[str, int]:
    """Sizes and derived offsets; without the melody keys when `melody_levels` is
    0, so that layouts written before melody tokens existed compare equal."""
    d = dataclasses.asdict(self)
    d.update(mulan_offset=self.mulan_offset, semantic_offset=self.semantic_offset,
             acoustic_offset=self.acoustic_offset, vocab_size=self.vocab_size)
    if self.melody_levels:
      d["melody_offset"] = self.melody_offset
    else:
      del d["melody_levels"], d["melody_codebook_size"]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, int]) -> "TokenLayout":
    """Inverse of `to_dict` (with or without the melody keys)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields - {"mulan_offset", "semantic_offset",
                                 "acoustic_offset", "melody_offset", "vocab_size"}
    if unknown:
      raise ValueError(f"unknown token layout keys {sorted(unknown)}")
    layout = cls(**{k: v for k, v in d.items() if k in fields})
    derived = layout.to_dict()
    mismatched = {k: (v, derived[k]) for k, v in d.items() if k in derived and derived[k] != v}
    if mismatched:
      raise ValueError(f"inconsistent token layout (stored, derived): {mismatched}")
    return layout


def _check_level(level: int, num_levels: int, what: str) -> None:
  if not 0 <= level < num_levels:
    raise ValueError(f"{what} level {level} is outside 0..{num_levels - 1}")


def _levels_to_ids(codes: Any, offset: int, codebook_size: int, first_level: int) -> Any:
  num_levels = codes.shape[-1]
  levels = np.arange(first_level, first_level + num_levels)
  return codes + (offset + levels * codebook_size).astype(np.int32)


def _ids_to_levels(tokens: Any, offset: int, codebook_size: int, first_level: int) -> Any:
  num_levels = tokens.shape[-1]
  levels = np.arange(first_level, first_level + num_levels)
  return tokens - (offset + levels * codebook_size).astype(np.int32)


LAYOUT = TokenLayout()
