"""The three MusicLM stages: windows of a clip's tokens and their prefix-LM layout.

    stage      prefix (context)                 targets (predicted)
    semantic   M  (MuLan levels)                S window
    coarse     M + S window                     A[:, :coarse_levels] window, frame-major
    fine       A[:, :coarse_levels] window      A[:, coarse_levels:] window, frame-major

A clip's tokens are `ClipTokens`: MuLan codes `[mulan_levels]`, semantic
codes `[frames_s]` at `semantic_rate` and SoundStream codes `[frames_a,
levels]` at `acoustic_rate`, where `frames_a = frames_s * acoustic_rate /
semantic_rate`, so both cover the same time span. A window starts on a
semantic frame (`1 / semantic_rate` s) and covers `window_seconds` of both
streams, so S and A stay aligned in every window.

Everything here is numpy (no TensorFlow): the SeqIO stage tasks call it
through `tf.numpy_function`, and the sampler uses the same layouts and
legal ranges. Ids come from a `vocab.TokenLayout`, never from literals.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import gin
import numpy as np

from musiclm_jax import vocab

STAGE_NAMES = ("semantic", "coarse", "fine")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StageWindows:
  """Seconds of audio per training window of each stage (paper: 30 / 10 / 3)."""

  semantic_seconds: float = 30.0
  coarse_seconds: float = 10.0
  fine_seconds: float = 3.0

  def seconds(self, stage: str) -> float:
    _check_stage_name(stage)
    return getattr(self, f"{stage}_seconds")


@dataclasses.dataclass(frozen=True)
class ClipTokens:
  """The frozen tokenizers' codes of one clip (codes, not token ids).

  Attributes:
    mulan: int `[mulan_levels]`, `M_A` (or `M_T` when sampling).
    semantic: int `[frames_s]`.
    acoustic: int `[frames_a, acoustic_levels]`.
  """

  mulan: np.ndarray
  semantic: np.ndarray
  acoustic: np.ndarray


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage's window and token layout.

  Attributes:
    name: "semantic", "coarse" or "fine".
    window_seconds: audio per window; `window_seconds * semantic_rate` must be
      a whole number of frames.
    layout: the token space.
    coarse_levels: acoustic levels the coarse stage predicts (the fine stage
      predicts the rest).
    semantic_rate, acoustic_rate: frames per second of S and A; A's rate is a
      whole multiple of S's.
  """

  name: str
  window_seconds: float
  layout: vocab.TokenLayout = vocab.LAYOUT
  coarse_levels: int = 4
  semantic_rate: int = 25
  acoustic_rate: int = 50

  def __post_init__(self):
    _check_stage_name(self.name)
    frames = self.window_seconds * self.semantic_rate
    if self.window_seconds <= 0 or abs(frames - round(frames)) > 1e-6:
      raise ValueError(f"{self.name} window of {self.window_seconds} s is not a positive whole "
                       f"number of {self.semantic_rate} Hz semantic frames")
    if self.acoustic_rate % self.semantic_rate:
      raise ValueError(f"acoustic rate {self.acoustic_rate} Hz is not a multiple of the "
                       f"semantic rate {self.semantic_rate} Hz")
    if not 1 <= self.coarse_levels < self.layout.acoustic_levels:
      raise ValueError(f"coarse_levels {self.coarse_levels} must be in "
                       f"1..{self.layout.acoustic_levels - 1}")

  # -- sizes -------------------------------------------------------------------
  @property
  def frames_ratio(self) -> int:
    """Acoustic frames per semantic frame."""
    return self.acoustic_rate // self.semantic_rate

  @property
  def semantic_frames(self) -> int:
    """Semantic frames in a full window."""
    return int(round(self.window_seconds * self.semantic_rate))

  @property
  def acoustic_frames(self) -> int:
    return self.semantic_frames * self.frames_ratio

  @property
  def fine_levels(self) -> int:
    return self.layout.acoustic_levels - self.coarse_levels

  def lengths(self, semantic_frames: Optional[int] = None) -> tuple[int, int]:
    """(prefix length, target length) of a window of `semantic_frames` (default: full)."""
    n_s = self.semantic_frames if semantic_frames is None else semantic_frames
    n_a = n_s * self.frames_ratio
    if self.name == "semantic":
      return self.layout.mulan_levels, n_s
    if self.name == "coarse":
      return self.layout.mulan_levels + n_s, n_a * self.coarse_levels
    return n_a * self.coarse_levels, n_a * self.fine_levels

  # -- layout --------------------------------------------------------------------
  def sequences(self, window: ClipTokens) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (prefix `[P]`, targets `[T]`) of one window's codes."""
    self.check_clip(window)
    layout = self.layout
    if self.name == "semantic":
      return (layout.mulan_tokens(window.mulan).astype(np.int32),
              layout.semantic_tokens(window.semantic).astype(np.int32))
    coarse = layout.acoustic_tokens(window.acoustic[:, :self.coarse_levels]).reshape(-1)
    if self.name == "coarse":
      prefix = np.concatenate([layout.mulan_tokens(window.mulan),
                               layout.semantic_tokens(window.semantic)])
      return prefix.astype(np.int32), coarse.astype(np.int32)
    fine = layout.acoustic_tokens(window.acoustic[:, self.coarse_levels:],
                                  first_level=self.coarse_levels).reshape(-1)
    return coarse.astype(np.int32), fine.astype(np.int32)

  @property
  def conditioned(self) -> bool:
    """Whether the prefix starts with MuLan tokens (semantic and coarse stages)."""
    return self.name != "fine"

  def unconditional(self, prefix: np.ndarray) -> np.ndarray:
    """`prefix [..., P]` with its MuLan tokens replaced by pad: the input of
    conditioning dropout in training and of classifier-free guidance."""
    if not self.conditioned:
      raise ValueError("the fine stage has no MuLan conditioning to drop")
    prefix = np.array(prefix, copy=True)
    prefix[..., :self.layout.mulan_levels] = vocab.PAD_ID
    return prefix

  def codes(self, prefix: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of `sequences`: the codes a (prefix, targets) pair holds.

    Returns `mulan` and `semantic` (semantic and coarse stages) and
    `acoustic` `[frames_a, levels]` (coarse: the coarse levels; fine: all).
    Raises ValueError when an id is outside its legal range.
    """
    layout = self.layout
    prefix, targets = np.asarray(prefix), np.asarray(targets)
    self.check_targets(targets)
    if self.name == "fine":
      lo, hi = layout.acoustic_position_ranges(len(prefix), 0, self.coarse_levels)
      layout.check_tokens(prefix, lo, hi, "fine prefix")
      coarse = layout.acoustic_codes(prefix.reshape(-1, self.coarse_levels))
      fine = layout.acoustic_codes(targets.reshape(-1, self.fine_levels), self.coarse_levels)
      return {"acoustic": np.concatenate([coarse, fine], axis=1)}
    num_mulan = layout.mulan_levels
    mulan_lo = np.array([layout.mulan_range(q)[0] for q in range(num_mulan)])
    layout.check_tokens(prefix[:num_mulan], mulan_lo, mulan_lo + layout.mulan_codebook_size,
                        f"{self.name} prefix")
    out = {"mulan": layout.mulan_codes(prefix[:num_mulan])}
    if self.name == "semantic":
      out["semantic"] = layout.semantic_codes(targets)
      return out
    lo, hi = layout.semantic_range()
    layout.check_tokens(prefix[num_mulan:], lo, hi, "coarse prefix")
    out["semantic"] = layout.semantic_codes(prefix[num_mulan:])
    out["acoustic"] = layout.acoustic_codes(targets.reshape(-1, self.coarse_levels))
    return out

  def target_ranges(self, num_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Legal [lo, hi) ids per target position, int32 `[num_positions]` each."""
    layout = self.layout
    if self.name == "semantic":
      lo, hi = layout.semantic_range()
      return (np.full(num_positions, lo, np.int32), np.full(num_positions, hi, np.int32))
    if self.name == "coarse":
      return layout.acoustic_position_ranges(num_positions, 0, self.coarse_levels)
    return layout.acoustic_position_ranges(num_positions, self.coarse_levels, self.fine_levels)

  def check_targets(self, targets: np.ndarray) -> None:
    lo, hi = self.target_ranges(len(targets))
    self.layout.check_tokens(targets, lo, hi, f"{self.name} targets")

  # -- windows -------------------------------------------------------------------
  def check_clip(self, clip: ClipTokens) -> None:
    """Raises ValueError unless the clip's shapes fit this stage's layout."""
    layout = self.layout
    if np.shape(clip.mulan) != (layout.mulan_levels,):
      raise ValueError(f"MuLan codes must be [{layout.mulan_levels}]; got {np.shape(clip.mulan)}")
    n_s = np.shape(clip.semantic)[0] if np.ndim(clip.semantic) == 1 else -1
    expected = (n_s * self.frames_ratio, layout.acoustic_levels)
    if n_s < 1 or np.shape(clip.acoustic) != expected:
      raise ValueError(f"semantic codes {np.shape(clip.semantic)} and acoustic codes "
                       f"{np.shape(clip.acoustic)} do not cover the same span: expected "
                       f"[n >= 1] and [n * {self.frames_ratio}, {layout.acoustic_levels}]")

  def window_starts(self, num_semantic_frames: int,
                    rng: Optional[np.random.Generator] = None) -> list[int]:
    """Start frames (semantic) of the windows cut from a clip of that many frames.

    With `rng` (training): one window at a uniformly random start. Without
    (evaluation): consecutive non-overlapping full windows from the start. A
    clip shorter than a window gives one window, the whole clip.
    """
    room = num_semantic_frames - self.semantic_frames
    if room <= 0:
      return [0]
    if rng is not None:
      return [int(rng.integers(0, room + 1))]
    return list(range(0, room + 1, self.semantic_frames))

  def window(self, clip: ClipTokens, start: int) -> ClipTokens:
    """The window of `clip` starting at semantic frame `start` (shorter at the end)."""
    n_s = min(self.semantic_frames, len(clip.semantic) - start)
    if start < 0 or n_s < 1:
      raise ValueError(f"window start {start} is outside a clip of {len(clip.semantic)} frames")
    a0 = start * self.frames_ratio
    return ClipTokens(mulan=clip.mulan, semantic=clip.semantic[start:start + n_s],
                      acoustic=clip.acoustic[a0:a0 + n_s * self.frames_ratio])

  def examples(self, clip: ClipTokens, rng: Optional[np.random.Generator] = None,
               conditioning_dropout: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Prefix and target ids of the clip's windows, `[windows, P]` and `[windows, T]`.

    With `rng` (training), each window's MuLan tokens are dropped (`unconditional`)
    with probability `conditioning_dropout`, which teaches the model the
    unconditional distribution that classifier-free guidance needs.
    """
    self.check_clip(clip)
    prefixes, targets = [], []
    for start in self.window_starts(len(clip.semantic), rng):
      prefix, target = self.sequences(self.window(clip, start))
      if rng is not None and self.conditioned and rng.random() < conditioning_dropout:
        prefix = self.unconditional(prefix)
      prefixes.append(prefix)
      targets.append(target)
    return np.stack(prefixes), np.stack(targets)


def make_stage(name: str, windows: StageWindows, layout: vocab.TokenLayout,
               semantic_rate: int, acoustic_rate: int, coarse_levels: int = 4) -> Stage:
  return Stage(name=name, window_seconds=windows.seconds(name), layout=layout,
               coarse_levels=coarse_levels, semantic_rate=semantic_rate,
               acoustic_rate=acoustic_rate)


def _check_stage_name(name: str) -> None:
  if name not in STAGE_NAMES:
    raise ValueError(f"unknown stage {name!r}; expected one of {STAGE_NAMES}")
