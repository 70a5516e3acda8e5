"""Text -> 24 kHz waveform through the MusicLM hierarchy, of any length.

    generator = Generator(Bundle.load("bundles/tiny"))
    result = generator.generate([[("a calm piano waltz", 30.0)]], seeds=[0])
    result.audio  # float32 [batch, samples]

Per batch row: the prompt's MuLan text tokens `M_T` -> semantic tokens ->
coarse acoustic tokens (levels 0..3) -> fine acoustic tokens (4..11) ->
SoundStream decoder. Every stage is sampled by `decoding.sample`.

Long-form: the semantic and coarse stages slide their window over time;
each new window starts `overlap` of a window before the end of what exists,
and that overlap is fed as the window's target prompt (fed causally, as in
training), so the music continues rather than restarting. The fine stage
works on consecutive windows, all windows of all rows in one batch, or, past
`fine_rows_per_call` rows (minutes of audio, large batches), in calls of that
many rows, the last filled up with copies of a row: its KV caches stay
bounded, and every call, whatever the length, runs one compiled sampler.
Likewise the codec decodes a piece longer than `decode_frames_per_call`
frames as a stream of chunks of that many frames.

Windows sit on a fixed grid and are whole: a piece longer than a window is
generated up to the end of its last window and cut to length at the end (each
stage reaching far enough for the next), so all windows of a stage share one
compiled sampler, and a shorter piece is exactly the start of a longer one
with the same seed. A piece that fits in one window is one window of its
own length.

Story mode: a row is a list of (prompt, seconds) segments; a window is
conditioned on the segment in which its first new frame lies, and the
overlap carries the music across the change without a break.

Continuation: `prompt_audio` (24 kHz) is tokenized by the bundle's
tokenizers and its S and A tokens are the start the windows continue from;
its own audio is decoded from its tokens in the output.

Melody: with a bundle holding the melody encoder and melody-conditioned
stages, `melody_audio` (a hummed, whistled or played tune) is checked
(`melody.check_melody_recording`: at least one melody window long, not
silent, not noise only) and tokenized into T_mel, one row per melody window
(`window_seconds` every `hop_seconds` of the encoder). A semantic or coarse
window starting t seconds after the start of the new music takes the melody
windows from `floor(t / hop)` on (`Stage.melody_window_indices`); a recording
shorter than the piece loops: past its last window the melody starts again
from its first. Without `melody_audio`, such a bundle pads T_mel and keeps
M_T: the prefix of training's melody dropout (`StageTask.melody_dropout`).
`Generator.load_melody` reads and checks a recording file.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence, Union

import gin
import jax
import numpy as np

from musiclm_jax import audio
from musiclm_jax import stages as stages_lib
from musiclm_jax.partitioning import Partitioner
from musiclm_jax.sampling import decoding
from musiclm_jax.sampling.bundle import Bundle
from musiclm_jax.tokenizers import melody as melody_lib

Segments = Sequence[tuple[str, float]]
MelodyAudio = Union[np.ndarray, Sequence[np.ndarray]]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class HierarchyConfig:
  """Sampling of each stage and the window overlap.

  Attributes:
    temperatures: semantic, coarse, fine (MusicLM's 1.0, 0.95, 0.4).
    top_k, top_p: for every stage (0 and 1: off).
    guidance_scale: classifier-free guidance of the semantic and coarse stages
      (stages trained with conditioning dropout); 1 is off.
    overlap: fraction of a window fed as the next window's prompt.
    fine_rows_per_call: the most fine windows (of all batch rows) sampled in
      one call; each holds a KV cache (about 180 MB at `base` size in bf16).
    decode_frames_per_call: the longest piece (in 50 Hz frames) that the
      codec decodes in one call; a longer one is decoded as a stream of
      chunks of that many frames, which bounds the decoder's activations.
  """

  temperatures: tuple[float, float, float] = (1.0, 0.95, 0.4)
  top_k: int = 0
  top_p: float = 1.0
  guidance_scale: float = 1.0
  overlap: float = 0.5
  fine_rows_per_call: int = 64
  decode_frames_per_call: int = 1500

  def __post_init__(self):
    if not 0.0 <= self.overlap < 1.0:
      raise ValueError(f"overlap {self.overlap} must be in [0, 1)")
    for name in ("fine_rows_per_call", "decode_frames_per_call"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} {getattr(self, name)} must be at least 1")

  def sampling(self, stage: str) -> decoding.SamplingConfig:
    index = stages_lib.STAGE_NAMES.index(stage)
    guidance = self.guidance_scale if stage != "fine" else 1.0
    return decoding.SamplingConfig(temperature=self.temperatures[index], top_k=self.top_k,
                                   top_p=self.top_p, guidance_scale=guidance)


@dataclasses.dataclass
class Generation:
  """What `Generator.generate` returns.

  Attributes:
    audio: float32 `[batch, samples]`, 24 kHz.
    semantic: int32 `[batch, frames_s]` codes.
    acoustic: int32 `[batch, 2 * frames_s, levels]` codes.
    mulan: int32 `[batch, segments, mulan_levels]` codes of each segment's prompt.
    seconds: wall time per phase.
    melody: int32 `[batch, melody_windows, melody_levels]` T_mel of the melody
      recording (looped to the longest row's windows), or None.
  """

  audio: np.ndarray
  semantic: np.ndarray
  acoustic: np.ndarray
  mulan: np.ndarray
  seconds: dict[str, float]
  melody: Optional[np.ndarray] = None


def _filled_up(rows: np.ndarray, pad: int) -> np.ndarray:
  """`rows [n, ...]` and `pad` copies of its last row: extra rows of a batch whose
  outputs are dropped (rows are sampled independently, so they change nothing)."""
  return np.concatenate([rows, np.repeat(rows[-1:], pad, axis=0)])


class Generator:
  """Samples a bundle's hierarchy; see the module docstring.

  With a `partitioner`, every stage samples its batch data-parallel over the
  partitioner's devices (rows are padded to a multiple of its data-parallel
  size; rows are independent, so padding changes nothing).
  """

  def __init__(self, bundle: Bundle, config: Optional[HierarchyConfig] = None,
               partitioner: Optional[Partitioner] = None):
    self.bundle = bundle
    self.config = config or HierarchyConfig()
    self.partitioner = partitioner
    # Parameters replicated over the partitioner's devices (loaded onto one device).
    self._params = {name: stage.params if partitioner is None else
                    jax.device_put(stage.params, partitioner.replicated())
                    for name, stage in bundle.stages.items()}
    self.layout = bundle.layout
    self.ratio = bundle.tokenizers.acoustic_rate // bundle.tokenizers.semantic_rate
    self.samples_per_frame = bundle.tokenizers.samples_per_frame
    self.melody_conditioned = any(model.stage.melody_conditioning
                                  for model in bundle.stages.values())

  def generate(self, rows: Sequence[Segments], seeds: Sequence[int],
               prompt_audio: Optional[np.ndarray] = None,
               melody_audio: Optional[MelodyAudio] = None,
               melody_sample_rate: int = 16000) -> Generation:
    """Audio for each row of (prompt, seconds) segments; one seed per row.

    All rows must have the same total length. `prompt_audio` (float32
    `[batch, samples]`, 24 kHz) is continued instead of starting from silence;
    the segments then describe what follows it. `melody_audio` (float32 at
    `melody_sample_rate`: one `[samples]` for every row, or one per row as
    `[batch, samples]` or a list of recordings of any lengths) is the melody
    the new music follows (see the module docstring).
    """
    if len(rows) != len(seeds) or not rows:
      raise ValueError(f"{len(rows)} rows of prompts but {len(seeds)} seeds")
    totals = {round(sum(s for _, s in row), 6) for row in rows}
    if len(totals) != 1:
      raise ValueError(f"all rows must last equally long; got {sorted(totals)} seconds")
    for row in rows:
      for prompt, seconds in row:
        if not prompt.strip():
          raise ValueError("a prompt is empty; describe the music to generate")
        if seconds <= 0:
          raise ValueError(f"segment {prompt!r} lasts {seconds} s; it must be positive")
    timings = {}
    started = time.time()
    mulan, frame_segment = self._conditioning(rows)
    melody = self._melody_codes(melody_audio, melody_sample_rate, len(rows))
    seeds = np.asarray(seeds, np.uint32)
    semantic, acoustic = self._prompt_tokens(prompt_audio, len(rows))
    given = semantic.shape[1]
    total = given + frame_segment.shape[0]
    timings["mulan"] = time.time() - started
    # How far each stage reaches: whole windows, each covering what the next needs.
    fine_end = self._reach("fine", given, total)
    coarse_end = self._reach("coarse", given, fine_end)
    semantic_end = self._reach("semantic", given, coarse_end)

    started = time.time()
    semantic = self._semantic(mulan, melody, frame_segment, semantic, semantic_end, seeds)
    timings["semantic"] = time.time() - started
    started = time.time()
    coarse = self._coarse(mulan, melody, frame_segment, semantic, acoustic, coarse_end, seeds)
    timings["coarse"] = time.time() - started
    started = time.time()
    acoustic = self._fine(coarse, acoustic, given, fine_end, seeds)
    timings["fine"] = time.time() - started
    started = time.time()
    semantic, acoustic = semantic[:, :total], acoustic[:, :total * self.ratio]
    audio = self._decode(acoustic)
    timings["decode"] = time.time() - started
    return Generation(audio=audio, semantic=semantic, acoustic=acoustic, mulan=mulan,
                      seconds=timings, melody=melody)

  # -- conditioning and prompts ---------------------------------------------------
  def _conditioning(self, rows: Sequence[Segments]) -> tuple[np.ndarray, np.ndarray]:
    """MuLan codes `[B, segments, levels]` and the segment of each new frame `[frames]`."""
    num_segments = max(len(row) for row in rows)
    texts = [row[min(i, len(row) - 1)][0] for row in rows for i in range(num_segments)]
    codes = self.bundle.tokenizers.mulan.text_tokens(texts)
    mulan = codes.reshape(len(rows), num_segments, -1)
    rate = self.bundle.tokenizers.semantic_rate
    bounds = np.cumsum([int(round(s * rate)) for _, s in rows[0]])
    frame_segment = np.searchsorted(bounds, np.arange(bounds[-1]), side="right")
    if len({len(row) for row in rows}) != 1:
      raise ValueError("all rows must have the same number of segments")
    return mulan, frame_segment

  def _prompt_tokens(self, prompt_audio: Optional[np.ndarray], batch: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    levels = self.layout.acoustic_levels
    if prompt_audio is None:
      return np.zeros([batch, 0], np.int32), np.zeros([batch, 0, levels], np.int32)
    wav = np.atleast_2d(np.asarray(prompt_audio, np.float32))
    if len(wav) != batch:
      raise ValueError(f"{len(wav)} prompt audios for {batch} rows")
    out = self.bundle.tokenizers.tokenize_clips(wav, [wav.shape[1]] * batch)
    bad = [r for r in out.skip_reasons if r]
    if bad:
      raise ValueError(f"the prompt audio cannot be continued: {bad[0]}")
    return np.stack(out.semantic), np.stack(out.acoustic)

  def melody_tokenizer(self) -> melody_lib.MelodyTokenizer:
    """The bundle's melody encoder; ValueError when it cannot follow a melody."""
    tokenizer = self.bundle.tokenizers.melody
    if tokenizer is None or not self.melody_conditioned:
      raise ValueError(f"the bundle {self.bundle.directory} has no melody model, so it cannot "
                       "follow a melody; export one with BundleRuns.melody and stages trained "
                       "with StageTask.melody_conditioning")
    return tokenizer

  def load_melody(self, path: str) -> tuple[np.ndarray, int]:
    """A melody recording file (any common format, rate and channel count) as
    (float32 `[samples]`, rate) at the melody encoder's rate. Raises ValueError
    naming the problem (an `audio.AudioError` for an unreadable, silent, too
    short or unpitched recording; also a bundle without a melody model)."""
    tokenizer = self.melody_tokenizer()
    rate = tokenizer.config.sample_rate
    wav = audio.load(path, sample_rate=rate)[0]
    return melody_lib.check_melody_recording(tokenizer.config, wav, name=path), rate

  def _melody_codes(self, melody_audio: Optional[MelodyAudio], sample_rate: int, batch: int
                    ) -> Optional[np.ndarray]:
    """T_mel `[batch, windows, melody_levels]` of the melody recording(s), each row's
    windows looped to the longest row's count; None without a recording."""
    if melody_audio is None:
      return None
    tokenizer = self.melody_tokenizer()
    single = isinstance(melody_audio, np.ndarray) and melody_audio.ndim != 2
    recordings = [np.asarray(w, np.float32) for w in ([melody_audio] if single
                                                      else melody_audio)]
    if len(recordings) not in (1, batch) or any(w.ndim != 1 for w in recordings):
      raise ValueError(f"give one melody recording [samples] or one per row ({batch}); got "
                       f"{len(recordings)} of shapes {sorted({w.shape for w in recordings})}")
    rate = tokenizer.config.sample_rate
    codes = []
    for i, recording in enumerate(recordings):
      recording = melody_lib.check_melody_recording(
          tokenizer.config, audio.resample(recording, sample_rate, rate),
          name="the melody recording" + (f" of row {i}" if len(recordings) > 1 else ""))
      codes.append(tokenizer.tokens(recording[None], rate)[0])
    windows = max(len(c) for c in codes)
    codes = np.stack([c[np.arange(windows) % len(c)] for c in codes]).astype(np.int32)
    return np.repeat(codes, batch // len(codes), axis=0)

  def _conditioning_ids(self, stage: stages_lib.Stage, mulan: np.ndarray, segment: int,
                        melody: Optional[np.ndarray], start: int) -> np.ndarray:
    """The prefix's conditioning `[B, stage.conditioning_length]` of a window starting
    `start` semantic frames after the new music's start: M, then T_mel (padded
    when there is no melody recording)."""
    if melody is not None and stage.melody_conditioning:
      melody = melody[:, stage.melody_window_indices(max(start, 0), melody.shape[1], loop=True)]
    return stage.conditioning_tokens(mulan[:, segment], melody)

  def _seeds(self, seeds: np.ndarray, stage: int, window: int) -> np.ndarray:
    return (seeds * np.uint32(1_000_003) + np.uint32(7919 * (3 * window + stage))
            ).astype(np.uint32)

  def _prefix(self, stage: stages_lib.Stage, prefix: np.ndarray
              ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    if self.config.sampling(stage.name).guided:
      return prefix, stage.unconditional(prefix)
    return prefix, None

  def _windows(self, name: str, have: int, total: int):
    """(start, end) semantic frames of the windows of stage `name` that extend `have`
    frames to `total` or beyond: one window of exactly what is missing if it fits,
    else whole windows, each starting `context` frames before the last one's end."""
    width = self.bundle.stages[name].stage.semantic_frames
    context = 0 if name == "fine" else min(int(round(self.config.overlap * width)), width - 1)
    start = max(0, have - context) if have else 0
    if have < total <= start + width:
      yield start, total
      return
    while have < total:
      yield start, start + width
      have = start + width
      start = have - context

  def _reach(self, name: str, have: int, total: int) -> int:
    """Semantic frames that the windows of `name` extending `have` to `total` end at."""
    return max([have] + [end for _, end in self._windows(name, have, total)])

  def _sample(self, name: str, prefix: np.ndarray, lo: np.ndarray, hi: np.ndarray,
              seeds: np.ndarray, unconditional: Optional[np.ndarray] = None,
              prompt: Optional[np.ndarray] = None) -> np.ndarray:
    """`decoding.sample` of stage `name`, data-parallel when there is a partitioner."""
    model, params = self.bundle.stages[name].model, self._params[name]
    args = [prefix, seeds, unconditional, prompt]
    if self.partitioner is None:
      return np.asarray(decoding.sample(model, params, prefix, lo, hi, seeds,
                                        self.config.sampling(name), unconditional, prompt))
    rows = len(prefix)
    pad = -rows % self.partitioner.data_parallel_size
    args = [None if a is None else _filled_up(a, pad) for a in args]
    prefix, seeds, unconditional, prompt = args
    with self.partitioner.activate():
      ids = decoding.sample(model, params, prefix, lo, hi, seeds, self.config.sampling(name),
                            unconditional, prompt)
    return np.asarray(ids)[:rows]

  # -- stages ---------------------------------------------------------------------
  def _semantic(self, mulan, melody, frame_segment, semantic, total, seeds) -> np.ndarray:
    """Semantic tokens `[B, end]`, the windows' end at or after `total`."""
    model = self.bundle.stages["semantic"]
    stage, given = model.stage, semantic.shape[1]
    for k, (start, end) in enumerate(self._windows("semantic", given, total)):
      have = semantic.shape[1]
      segment = frame_segment[min(max(have - given, 0), len(frame_segment) - 1)]
      prefix, uncond = self._prefix(
          stage, self._conditioning_ids(stage, mulan, segment, melody, start - given))
      lo, hi = stage.target_ranges(end - start)
      prompt = self.layout.semantic_tokens(semantic[:, start:have]).astype(np.int32)
      ids = self._sample("semantic", prefix, lo, hi, self._seeds(seeds, 0, k), uncond, prompt)
      new = self.layout.semantic_codes(ids[:, have - start:])
      semantic = np.concatenate([semantic, new.astype(np.int32)], axis=1)
    return semantic

  def _coarse(self, mulan, melody, frame_segment, semantic, acoustic, total, seeds
              ) -> np.ndarray:
    """Coarse codes `[B, 2 * total, coarse_levels]` (`semantic` reaches at least `total`)."""
    model = self.bundle.stages["coarse"]
    stage, levels = model.stage, model.stage.coarse_levels
    coarse = acoustic[:, :, :levels]
    given = coarse.shape[1] // self.ratio
    for k, (start, end) in enumerate(self._windows("coarse", given, total)):
      have = coarse.shape[1] // self.ratio
      segment = frame_segment[min(max(have - given, 0), len(frame_segment) - 1)]
      prefix = np.concatenate([self._conditioning_ids(stage, mulan, segment, melody,
                                                      start - given),
                               self.layout.semantic_tokens(semantic[:, start:end])], axis=1)
      prefix, uncond = self._prefix(stage, prefix.astype(np.int32))
      lo, hi = stage.target_ranges((end - start) * self.ratio * levels)
      known = coarse[:, start * self.ratio:]
      prompt = self.layout.acoustic_tokens(known).reshape(len(known), -1).astype(np.int32)
      ids = self._sample("coarse", prefix, lo, hi, self._seeds(seeds, 1, k), uncond, prompt)
      window = self.layout.acoustic_codes(ids.reshape(len(ids), -1, levels))
      coarse = np.concatenate([coarse, window[:, known.shape[1]:].astype(np.int32)], axis=1)
    return coarse

  def _decode(self, acoustic: np.ndarray) -> np.ndarray:
    """Waveform `[B, frames * 480]` of all levels `[B, frames, levels]`: one call when
    the piece fits in `decode_frames_per_call` frames, else the decoder's stream
    (its causal context carried from chunk to chunk) over chunks of that many
    frames, the last padded with code 0 and cut: one compiled decoder for any
    length, and activations bounded by the chunk."""
    tokenizers = self.bundle.tokenizers
    codec, variables = tokenizers.codec, tokenizers.codec_variables
    frames, per_call = acoustic.shape[1], self.config.decode_frames_per_call
    if frames <= per_call:
      return np.asarray(codec.decode(variables, acoustic))
    codes = np.pad(acoustic, ((0, 0), (0, -frames % per_call), (0, 0)))
    state, chunks = None, []
    for start in range(0, codes.shape[1], per_call):
      chunk, state = codec.decode_stream(variables, codes[:, start:start + per_call], state)
      chunks.append(np.asarray(chunk))
    samples_per_frame = chunks[0].shape[1] // per_call
    return np.concatenate(chunks, axis=1)[:, :frames * samples_per_frame]

  def _fine(self, coarse, acoustic, given, total, seeds) -> np.ndarray:
    """All levels `[B, 2 * total, levels]`: the prompt's, then fine windows over the
    rest, all windows (of one length) of all rows sampled together, in calls of at
    most `fine_rows_per_call` rows (the last filled up with copies of a row)."""
    stage = self.bundle.stages["fine"].stage
    batch = coarse.shape[0]
    windows = [(start * self.ratio, end * self.ratio)
               for start, end in self._windows("fine", given, total)]
    if not windows:
      return acoustic
    length = windows[0][1] - windows[0][0]
    prefix = np.concatenate([self.layout.acoustic_tokens(coarse[:, s:e]).reshape(batch, -1)
                             for s, e in windows]).astype(np.int32)  # [windows * B, ...]
    lo, hi = stage.target_ranges(length * stage.fine_levels)
    row_seeds = np.concatenate([self._seeds(seeds, 2, s) for s, _ in windows])
    rows = len(prefix)
    per_call = min(rows, self.config.fine_rows_per_call)
    pad = -rows % per_call  # the last call filled up: one shape for every call
    prefix, row_seeds = _filled_up(prefix, pad), _filled_up(row_seeds, pad)
    ids = np.concatenate([
        self._sample("fine", prefix[i:i + per_call], lo, hi, row_seeds[i:i + per_call])
        for i in range(0, len(prefix), per_call)])[:rows]
    fine = self.layout.acoustic_codes(ids.reshape(len(ids), length, stage.fine_levels),
                                      stage.coarse_levels)
    pieces = [np.concatenate([coarse[:, s:e], fine[i * batch:(i + 1) * batch]], axis=2)
              for i, (s, e) in enumerate(windows)]
    return np.concatenate([acoustic] + [p.astype(np.int32) for p in pieces], axis=1)
