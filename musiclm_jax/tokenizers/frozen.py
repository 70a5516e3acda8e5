"""The three frozen tokenizers together: 24 kHz clips -> `S`, `A`, `M_A` (and `T_mel`).

    tokenizers = FrozenTokenizers.load(TokenizerDirs(soundstream=..., semantic=..., mulan=...))
    result = tokenizers.tokenize_clips(wav_24k, num_samples)   # [B, T], [B]

Each directory is a `musiclm train` run: SoundStream (`CodecModel`),
w2v-BERT with its fitted k-means (`musiclm semantic fit_kmeans`) and MuLan
with its fitted RVQ (`musiclm mulan fit_rvq`). Optionally a fourth, the
melody encoder with its RVQ (`musiclm melody fit_rvq`), adds each clip's
melody tokens `T_mel` `[melody_windows, levels]` (melody conditioning). The
token layout follows from what they were trained with (`layout`), so tiny test
tokenizers with small codebooks get a matching, smaller token space.

A clip is cut to whole semantic frames (40 ms: 960 samples at 24 kHz), so
its `frames_s` semantic frames and `2 * frames_s` acoustic frames cover the
same span. Clips that cannot be tokenized (non-finite, silent, clipped,
shorter than `min_seconds`) are reported with a reason instead of tokens.
No TensorFlow here: the SeqIO token task calls this from `tf.numpy_function`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import gin
import numpy as np

from musiclm_jax import audio
from musiclm_jax import vocab
from musiclm_jax.tokenizers import melody as melody_lib
from musiclm_jax.tokenizers import mulan_tokens
from musiclm_jax.tokenizers import semantic
from musiclm_jax.tokenizers import soundstream


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TokenizerDirs:
  """MODEL_DIRs of the three trained tokenizers, and of the melody encoder (optional:
  melody tokens for melody-conditioned stages)."""

  soundstream: str
  semantic: str
  mulan: str
  melody: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TokenizedClips:
  """Codes of a batch of clips; a row with a `skip_reasons` entry has no tokens.

  Attributes:
    semantic: per clip int32 `[frames_s]` (empty when skipped).
    acoustic: per clip int32 `[frames_a, acoustic_levels]`, frames_a = 2 * frames_s.
    mulan: per clip int32 `[mulan_levels]`.
    skip_reasons: per clip "" or why it was skipped (e.g. "silent", "too_short").
    melody: per clip int32 `[melody_windows, melody_levels]` (`T_mel`), or None
      without a melody tokenizer.
  """

  semantic: list[np.ndarray]
  acoustic: list[np.ndarray]
  mulan: list[np.ndarray]
  skip_reasons: list[str]
  melody: Optional[list[np.ndarray]] = None


class FrozenTokenizers:
  """SoundStream, w2v-BERT + k-means and MuLan + RVQ (+ melody encoder + RVQ),
  loaded for inference.

  Args:
    min_seconds: clips with less real audio are skipped as "too_short".
    limits: audio quality limits (silence, clipping, non-finite samples).
    melody_tokenizer: the melody encoder with its RVQ, or None.
  """

  def __init__(self, codec: soundstream.SoundStreamCodec, codec_variables: Any,
               semantic_tokenizer: semantic.SemanticTokenizer,
               mulan_tokenizer: mulan_tokens.MulanTokenizer, min_seconds: float = 1.0,
               limits: audio.QualityLimits = audio.QualityLimits(),
               melody_tokenizer: Optional[melody_lib.MelodyTokenizer] = None):
    if mulan_tokenizer.codebooks is None:
      raise ValueError("the MuLan tokenizer has no RVQ codebooks; fit them with "
                       "`musiclm mulan fit_rvq`")
    if melody_tokenizer is not None and melody_tokenizer.codebooks is None:
      raise ValueError("the melody tokenizer has no RVQ codebooks; fit them with "
                       "`musiclm melody fit_rvq`")
    self.codec = codec
    self.codec_variables = codec_variables
    self.semantic = semantic_tokenizer
    self.mulan = mulan_tokenizer
    self.melody = melody_tokenizer
    self.min_seconds = min_seconds
    self.limits = limits
    self.semantic_rate = int(round(semantic.SemanticTokenizer.frame_rate))
    self.acoustic_rate = int(round(soundstream.SAMPLE_RATE / soundstream.HOP_LENGTH))
    self.samples_per_frame = soundstream.SAMPLE_RATE // self.semantic_rate  # 960 at 24 kHz

  @classmethod
  def load(cls, dirs: TokenizerDirs, min_seconds: float = 1.0) -> "FrozenTokenizers":
    """Loads the runs; errors name the tokenizer whose directory is at fault."""
    loaded = {"melody": None}
    for name, load in (("soundstream", soundstream.load_codec),
                       ("semantic", semantic.SemanticTokenizer.load),
                       ("mulan", mulan_tokens.MulanTokenizer.load),
                       ("melody", melody_lib.MelodyTokenizer.load)):
      path = getattr(dirs, name)
      if path is None:
        continue
      try:
        loaded[name] = load(path)
      except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{name} tokenizer at {path}: {e}") from e
    codec, codec_variables = loaded["soundstream"]
    return cls(codec, codec_variables, loaded["semantic"], loaded["mulan"], min_seconds,
               melody_tokenizer=loaded["melody"])

  @property
  def layout(self) -> vocab.TokenLayout:
    """The token space these tokenizers' codes live in."""
    codebooks = np.shape(self.mulan.codebooks)
    melody = (0, 0) if self.melody is None else np.shape(self.melody.codebooks)
    return vocab.TokenLayout(
        mulan_levels=codebooks[0], mulan_codebook_size=codebooks[1],
        semantic_codebook_size=self.semantic.num_clusters,
        acoustic_levels=self.codec.config.num_levels,
        acoustic_codebook_size=self.codec.config.codebook_size,
        melody_levels=melody[0], melody_codebook_size=melody[1])

  def describe(self) -> dict[str, Any]:
    """What the tokens are, for manifests: layout, rates and the tokenizers' configs."""
    described = {"layout": self.layout.to_dict(), "semantic_rate": self.semantic_rate,
                 "acoustic_rate": self.acoustic_rate, "sample_rate": soundstream.SAMPLE_RATE,
                 "soundstream_config": dataclasses.asdict(self.codec.config),
                 "semantic_mlm_layer": self.semantic.extractor.mlm_layer,
                 "mulan_config": dataclasses.asdict(self.mulan.config)}
    if self.melody is not None:
      described["melody_config"] = dataclasses.asdict(self.melody.config)
    return described

  def skip_reason(self, wav: np.ndarray, num_samples: int) -> str:
    """"" if `wav[:num_samples]` (24 kHz) can be tokenized, else a short reason."""
    if num_samples < self.min_seconds * soundstream.SAMPLE_RATE:
      return "too_short"
    try:
      audio.check_and_repair(wav[:num_samples], audio.Repairs(), self.limits)
    except audio.AudioError as e:
      return e.reason
    return ""

  def tokenize_clips(self, wav: np.ndarray, num_samples: Sequence[int]) -> TokenizedClips:
    """Tokens of clips `wav [B, T]` (24 kHz, zero-padded) with real lengths `num_samples [B]`.

    Clips are cut to whole semantic frames; clips of equal length are
    tokenized together, so the result does not depend on padding.
    """
    wav = np.asarray(wav, np.float32)
    if wav.ndim != 2:
      raise ValueError(f"expected 24 kHz audio [batch, samples], got shape {wav.shape}")
    num_samples = np.minimum(np.asarray(num_samples, np.int64), wav.shape[1])
    batch = len(wav)
    reasons = [self.skip_reason(wav[i], int(num_samples[i])) for i in range(batch)]
    frames = num_samples // self.samples_per_frame
    out_s: list[np.ndarray] = [np.zeros([0], np.int32)] * batch
    out_a: list[np.ndarray] = [np.zeros([0, self.codec.config.num_levels], np.int32)] * batch
    out_m: list[np.ndarray] = [np.zeros([0], np.int32)] * batch
    out_t: Optional[list[np.ndarray]] = None
    if self.melody is not None:
      out_t = [np.zeros([0, self.layout.melody_levels], np.int32)] * batch
    good = [i for i in range(batch) if not reasons[i]]
    for n in sorted({int(frames[i]) for i in good}):
      rows = [i for i in good if frames[i] == n]
      clips = wav[rows, :n * self.samples_per_frame]
      s, a, m = self._tokenize_equal_length(clips)
      t = None if out_t is None else self.melody.tokens(clips, soundstream.SAMPLE_RATE)
      for j, i in enumerate(rows):
        out_s[i], out_a[i], out_m[i] = s[j], a[j], m[j]
        if out_t is not None:
          out_t[i] = np.asarray(t[j], np.int32)
    return TokenizedClips(out_s, out_a, out_m, reasons, out_t)

  def _tokenize_equal_length(self, clips: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[B, n * 960]` 24 kHz -> S `[B, n]`, A `[B, 2n, levels]`, M_A `[B, mulan_levels]`."""
    n = clips.shape[1] // self.samples_per_frame
    wav_16k = audio.resample(clips, soundstream.SAMPLE_RATE, semantic.SAMPLE_RATE)
    s = np.asarray(self.semantic.semantic_tokens(wav_16k), np.int32)[:, :n]
    a = np.asarray(self.codec.encode(self.codec_variables, clips), np.int32)
    m = np.asarray(self.mulan.audio_tokens(clips, soundstream.SAMPLE_RATE), np.int32)
    ratio = self.acoustic_rate // self.semantic_rate
    if s.shape[1] != n or a.shape[1] != ratio * n:
      raise RuntimeError(f"tokenizers disagree on the span of {n} semantic frames: semantic "
                         f"{s.shape[1]}, acoustic {a.shape[1]} frames")
    return s, a, m
