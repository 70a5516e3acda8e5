"""The three MusicLM stages: windows of a clip's tokens and their prefix-LM layout.

    stage      prefix (context)                 targets (predicted)
    semantic   M [+ T_mel]                      S window
    coarse     M [+ T_mel] + S window           A[:, :coarse_levels] window, frame-major
    fine       A[:, :coarse_levels] window      A[:, coarse_levels:] window, frame-major

A clip's tokens are `ClipTokens`: MuLan codes `[mulan_levels]`, semantic
codes `[frames_s]` at `semantic_rate` and SoundStream codes `[frames_a,
levels]` at `acoustic_rate`, where `frames_a = frames_s * acoustic_rate /
semantic_rate`, so both cover the same time span. A window starts on a
semantic frame (`1 / semantic_rate` s) and covers `window_seconds` of both
streams, so S and A stay aligned in every window.

Melody conditioning (`melody_conditioning`, semantic and coarse stages only):
the clip also has melody codes `[melody_windows, melody_levels]`, one row per
melody window (`window_seconds` of the melody encoder, every
`melody_hop_seconds`). A stage window starting at time t takes a fixed number
of them, `ceil(window_seconds / melody_hop_seconds)`, from the window in whose
hop t lies (`floor(t / hop)`), so their starts span the stage window;
indices past the clip's last melody window hold the last one. They follow
M in the prefix, window-major and level-minor. Stages without the switch keep
the layout above without T_mel.

Everything here is numpy (no TensorFlow): both stage readers
(`stage_task.StageTask`, SeqIO's through `tf.numpy_function`) cut windows and
make decoder features with it, and the sampler uses the same layouts and
legal ranges. Ids come from a `vocab.TokenLayout`, never from literals.
"""
from __future__ import annotations

import dataclasses
import math
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
    melody: int `[melody_windows, melody_levels]` `T_mel` codes, or None (a
      window of a stage with melody conditioning holds its
      `Stage.melody_windows` rows).
  """

  mulan: np.ndarray
  semantic: np.ndarray
  acoustic: np.ndarray
  melody: Optional[np.ndarray] = None


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
    melody_conditioning: whether the prefix holds T_mel after M (semantic
      and coarse stages; needs `layout.melody_levels > 0`).
    melody_hop_seconds: seconds between the melody encoder's windows.
  """

  name: str
  window_seconds: float
  layout: vocab.TokenLayout = vocab.LAYOUT
  coarse_levels: int = 4
  semantic_rate: int = 25
  acoustic_rate: int = 50
  melody_conditioning: bool = False
  melody_hop_seconds: float = 0.0

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
    if self.melody_conditioning:
      if self.name == "fine":
        raise ValueError("the fine stage takes no melody conditioning")
      if not self.layout.melody_levels or self.melody_hop_seconds <= 0:
        raise ValueError(f"melody conditioning of the {self.name} stage needs melody tokens: "
                         f"a layout with melody_levels > 0 (got {self.layout.melody_levels}) "
                         f"and a positive melody hop (got {self.melody_hop_seconds} s)")

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

  @property
  def melody_windows(self) -> int:
    """Melody windows (rows of T_mel) in a window's prefix; 0 without melody conditioning."""
    if not self.melody_conditioning:
      return 0
    return math.ceil(self.window_seconds / self.melody_hop_seconds - 1e-9)

  @property
  def conditioning_length(self) -> int:
    """Prefix ids before the semantic ones: M, then T_mel (semantic and coarse stages)."""
    return self.layout.mulan_levels + self.melody_windows * self.layout.melody_levels

  def lengths(self, semantic_frames: Optional[int] = None) -> tuple[int, int]:
    """(prefix length, target length) of a window of `semantic_frames` (default: full)."""
    n_s = self.semantic_frames if semantic_frames is None else semantic_frames
    n_a = n_s * self.frames_ratio
    if self.name == "semantic":
      return self.conditioning_length, n_s
    if self.name == "coarse":
      return self.conditioning_length + n_s, n_a * self.coarse_levels
    return n_a * self.coarse_levels, n_a * self.fine_levels

  def melody_window_indices(self, start: int, num_windows: int, loop: bool = False
                            ) -> np.ndarray:
    """Rows of a clip's T_mel for the window starting at semantic frame `start`.

    Args:
      start: the stage window's first semantic frame.
      num_windows: melody windows the clip (or recording) has.
      loop: past the last melody window, wrap around to the first (a melody
        recording shorter than the piece repeats); else hold the last one.
    Returns:
      int `[melody_windows]`.
    """
    if num_windows < 1:
      raise ValueError("the clip has no melody windows")
    first = int(math.floor(start / self.semantic_rate / self.melody_hop_seconds + 1e-9))
    indices = first + np.arange(self.melody_windows)
    return indices % num_windows if loop else np.minimum(indices, num_windows - 1)

  def conditioning_tokens(self, mulan: np.ndarray, melody: Optional[np.ndarray]) -> np.ndarray:
    """Prefix ids of the conditioning, `[..., conditioning_length]`: M of
    `mulan [..., mulan_levels]`, then (melody conditioning) T_mel of
    `melody [..., melody_windows, melody_levels]`, window-major, or pad where
    `melody` is None (a text prompt without a recording, as `without_melody`)."""
    ids = self.layout.mulan_tokens(mulan).astype(np.int32)
    if not self.melody_conditioning:
      return ids
    if melody is None:
      pad = np.full(ids.shape[:-1] + (self.conditioning_length - ids.shape[-1],),
                    vocab.PAD_ID, np.int32)
      return np.concatenate([ids, pad], axis=-1)
    expected = (self.melody_windows, self.layout.melody_levels)
    if np.shape(melody)[-2:] != expected:
      raise ValueError(f"the {self.name} stage takes melody codes [..., {expected[0]}, "
                       f"{expected[1]}]; got {np.shape(melody)}")
    mel = self.layout.melody_tokens(melody)
    mel = mel.reshape(*mel.shape[:-2], -1)
    return np.concatenate([ids, mel], axis=-1).astype(np.int32)

  # -- layout --------------------------------------------------------------------
  def sequences(self, window: ClipTokens) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (prefix `[P]`, targets `[T]`) of one window's codes."""
    self.check_clip(window)
    layout = self.layout
    if self.name == "semantic":
      return (self.conditioning_tokens(window.mulan, window.melody),
              layout.semantic_tokens(window.semantic).astype(np.int32))
    coarse = layout.acoustic_tokens(window.acoustic[:, :self.coarse_levels]).reshape(-1)
    if self.name == "coarse":
      prefix = np.concatenate([self.conditioning_tokens(window.mulan, window.melody),
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
    """`prefix [..., P]` with its MuLan (and melody) tokens replaced by pad: the
    input of conditioning dropout in training and of classifier-free guidance."""
    if not self.conditioned:
      raise ValueError("the fine stage has no MuLan conditioning to drop")
    prefix = np.array(prefix, copy=True)
    prefix[..., :self.conditioning_length] = vocab.PAD_ID
    return prefix

  def without_melody(self, prefix: np.ndarray) -> np.ndarray:
    """`prefix [..., P]` with only its melody tokens replaced by pad: a text prompt
    without a recording, as the sampler gives a melody-conditioned stage."""
    if not self.melody_conditioning:
      raise ValueError(f"the {self.name} stage has no melody conditioning to drop")
    prefix = np.array(prefix, copy=True)
    prefix[..., self.layout.mulan_levels:self.conditioning_length] = vocab.PAD_ID
    return prefix

  def codes(self, prefix: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of `sequences`: the codes a (prefix, targets) pair holds.

    Returns `mulan` and `semantic` (semantic and coarse stages), `melody`
    `[melody_windows, melody_levels]` (with melody conditioning) and
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
    num_conditioning = self.conditioning_length
    if self.melody_conditioning:
      melody = prefix[num_mulan:num_conditioning].reshape(self.melody_windows,
                                                          layout.melody_levels)
      melody_lo = np.array([layout.melody_range(q)[0] for q in range(layout.melody_levels)])
      layout.check_tokens(melody, melody_lo, melody_lo + layout.melody_codebook_size,
                          f"{self.name} prefix (melody)")
      out["melody"] = layout.melody_codes(melody)
    if self.name == "semantic":
      out["semantic"] = layout.semantic_codes(targets)
      return out
    lo, hi = layout.semantic_range()
    layout.check_tokens(prefix[num_conditioning:], lo, hi, "coarse prefix")
    out["semantic"] = layout.semantic_codes(prefix[num_conditioning:])
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

  def decoder_features(self, prefix: np.ndarray, targets: np.ndarray,
                       first_frame_weight: float = 1.0) -> dict[str, np.ndarray]:
    """The decoder-only prefix-LM features of one window, `[length]` each with
    `length = sum(self.lengths())` (T5X's unpacked layout, as SeqIO's
    `PrefixLMFeatureConverter` makes it):

      decoder_target_tokens     int32  prefix, targets, then PAD
      decoder_input_tokens      int32  the same shifted right by one (PAD first)
      decoder_loss_weights      float32  1 on the targets (`first_frame_weight` on
                                those of the first semantic frame, `lengths(1)`),
                                0 on the prefix and the padding
      decoder_causal_attention  bool   the prefix and the first target position:
                                the inputs that attend to the whole prefix

    The weights come from the window's own lengths, not from which ids are
    PAD, so a prefix padded by conditioning dropout is never a target.
    """
    length = sum(self.lengths())
    num_prefix, num_targets = len(prefix), len(targets)
    if num_prefix + num_targets > length:
      raise ValueError(f"a {self.name} window of {num_prefix} + {num_targets} ids does not fit "
                       f"the stage's {length}")
    tokens = np.full(length, vocab.PAD_ID, np.int32)
    tokens[:num_prefix] = prefix
    tokens[num_prefix:num_prefix + num_targets] = targets
    inputs = np.concatenate([[vocab.PAD_ID], tokens[:-1]]).astype(np.int32)
    weights = np.zeros(length, np.float32)
    weights[num_prefix:num_prefix + num_targets] = 1.0
    first = min(self.lengths(1)[1], num_targets)
    weights[num_prefix:num_prefix + first] = first_frame_weight
    causal = np.zeros(length, bool)
    causal[:num_prefix + 1] = True
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens,
            "decoder_loss_weights": weights, "decoder_causal_attention": causal}

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
    if self.melody_conditioning and (np.ndim(clip.melody) != 2 or len(clip.melody) < 1 or
                                     np.shape(clip.melody)[1] != layout.melody_levels):
      raise ValueError(f"the {self.name} stage is melody-conditioned: the clip needs melody "
                       f"codes [windows >= 1, {layout.melody_levels}]; got "
                       f"{None if clip.melody is None else np.shape(clip.melody)}")

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
    """The window of `clip` starting at semantic frame `start` (shorter at the end),
    with its `melody_windows` melody rows when melody-conditioned."""
    n_s = min(self.semantic_frames, len(clip.semantic) - start)
    if start < 0 or n_s < 1:
      raise ValueError(f"window start {start} is outside a clip of {len(clip.semantic)} frames")
    a0 = start * self.frames_ratio
    melody = None
    if self.melody_conditioning:
      melody = clip.melody[self.melody_window_indices(start, len(clip.melody))]
    return ClipTokens(mulan=clip.mulan, semantic=clip.semantic[start:start + n_s],
                      acoustic=clip.acoustic[a0:a0 + n_s * self.frames_ratio], melody=melody)

  def examples(self, clip: ClipTokens, rng: Optional[np.random.Generator] = None,
               conditioning_dropout: float = 0.0, melody_dropout: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Prefix and target ids of the clip's windows, `[windows, P]` and `[windows, T]`.

    With `rng` (training), each window's MuLan (and melody) tokens are dropped
    (`unconditional`) with probability `conditioning_dropout`, which teaches the
    model the unconditional distribution that classifier-free guidance needs.
    A melody-conditioned stage also drops the melody tokens alone
    (`without_melody`) of a `melody_dropout` fraction of the windows that kept
    their conditioning: the text-only prompt of a melody bundle given no
    recording. Stages without melody conditioning ignore `melody_dropout`.
    """
    self.check_clip(clip)
    prefixes, targets = [], []
    for start in self.window_starts(len(clip.semantic), rng):
      prefix, target = self.sequences(self.window(clip, start))
      if rng is not None and self.conditioned:
        if rng.random() < conditioning_dropout:
          prefix = self.unconditional(prefix)
        elif self.melody_conditioning and rng.random() < melody_dropout:
          prefix = self.without_melody(prefix)
      prefixes.append(prefix)
      targets.append(target)
    return np.stack(prefixes), np.stack(targets)


def make_stage(name: str, windows: StageWindows, layout: vocab.TokenLayout,
               semantic_rate: int, acoustic_rate: int, coarse_levels: int = 4,
               melody_conditioning: bool = False, melody_hop_seconds: float = 0.0) -> Stage:
  return Stage(name=name, window_seconds=windows.seconds(name), layout=layout,
               coarse_levels=coarse_levels, semantic_rate=semantic_rate,
               acoustic_rate=acoustic_rate, melody_conditioning=melody_conditioning,
               melody_hop_seconds=melody_hop_seconds)


def _check_stage_name(name: str) -> None:
  if name not in STAGE_NAMES:
    raise ValueError(f"unknown stage {name!r}; expected one of {STAGE_NAMES}")
