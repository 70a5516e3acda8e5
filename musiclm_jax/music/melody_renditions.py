"""One melody, many renditions: training pairs for the melody encoder.

MusicLM's melody conditioning (appendix C of the paper) learns an embedding
in which renditions of one melody lie close together and other melodies far
away. This module takes the lead line of a composed `Piece` (`melody_line`)
and re-performs it (`draw_specs`, `render_rendition_midi`):

* another General MIDI instrument, including "hummed/whistled" voices
  (Whistle, Voice Oohs, Ocarina, Flute) and a pure-numpy `sine_voice`
  (sine + 2 harmonics, 5 Hz vibrato, breath noise) that needs no SoundFont;
* another key (-5..+6 semitones) and register (octaves, to suit the voice);
* another tempo (x0.9..1.1), with or without the piece's accompaniment;
* mild performance noise: detune and per-note pitch drift in cents (MIDI
  pitch bend), +-20 ms timing jitter, velocity variation.

The melody's identity is kept: the interval sequence is unchanged (one
transposition for all notes) and the rhythm only scales with the tempo, up
to the timing jitter. Everything is drawn from seeds, so a seed fixes the
MIDI and the sine-voice audio.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import pretty_midi

from musiclm_jax.music import composer
from musiclm_jax.music.piece import Piece

SINE_VOICE = "Sine Voice"  # not a GM program: synthesised by `sine_voice`
HUMMED_VOICES = ("Whistle", "Voice Oohs", "Ocarina", "Flute", SINE_VOICE)
# Melody instruments and their comfortable range (lowest, highest MIDI pitch).
VOICE_RANGES = {
    "Whistle": (67, 96), "Voice Oohs": (48, 79), "Ocarina": (60, 91), "Flute": (60, 96),
    SINE_VOICE: (45, 81), "Acoustic Grand Piano": (36, 96), "Violin": (55, 100),
    "Cello": (36, 76), "Trumpet": (55, 82), "Alto Sax": (49, 81), "Clarinet": (50, 91),
    "Oboe": (58, 91), "Vibraphone": (53, 89), "Marimba": (45, 96),
    "Electric Guitar (clean)": (40, 86), "Acoustic Guitar (nylon)": (40, 83),
    "Drawbar Organ": (36, 96), "String Ensemble 1": (40, 96),
}
# Genres whose lead is a melody (the techno lead is an arpeggio of the chords).
MELODIC_GENRES = tuple(g.name for g in composer.GENRE_TABLE if not g.melody.arpeggio)
LEAD_ROLES = ("lead", "voice")
PITCH_BEND_RANGE_CENTS = 200.0  # the General MIDI default, +-2 semitones
MAX_TIMING_JITTER_S = 0.02


@dataclasses.dataclass(frozen=True)
class MelodyLine:
  """A monophonic line: notes in time order, times in seconds.

  pitches: int `[notes]` MIDI pitches; starts, ends: float `[notes]`;
  velocities: int `[notes]`; cents: float `[notes]` detuning of each note
  (pitch bend), zero for a score.
  """
  pitches: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  velocities: np.ndarray
  cents: Optional[np.ndarray] = None

  def __post_init__(self):
    n = len(self.pitches)
    if n == 0:
      raise ValueError("a melody line needs at least one note")
    if self.cents is None:
      object.__setattr__(self, "cents", np.zeros(n))
    for name in ("starts", "ends", "velocities", "cents"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"melody line: {name} has {len(getattr(self, name))} entries for "
                         f"{n} pitches")

  def __len__(self) -> int:
    return len(self.pitches)

  def intervals(self) -> np.ndarray:
    """Semitones from each note to the next: int `[notes - 1]`."""
    return np.diff(self.pitches)

  def inter_onsets(self) -> np.ndarray:
    """Seconds from each onset to the next: `[notes - 1]`."""
    return np.diff(self.starts)


def melody_line(piece: Piece) -> MelodyLine:
  """The piece's lead line (first part with role 'lead' or 'voice') made monophonic.

  Of notes starting together the highest is kept; a note still sounding when
  the next starts is cut there.
  """
  index = next((i for i, p in enumerate(piece.parts) if p.role in LEAD_ROLES), None)
  if index is None:
    raise ValueError(f"piece {piece.source_id!r} has no lead or voice part "
                     f"(roles: {[p.role for p in piece.parts]})")
  notes = sorted(piece.midi.instruments[index].notes, key=lambda n: (n.start, -n.pitch))
  kept: list[pretty_midi.Note] = []
  for note in notes:
    if kept and note.start - kept[-1].start < 1e-3:
      continue
    kept.append(note)
  if not kept:
    raise ValueError(f"the lead part of piece {piece.source_id!r} has no notes")
  starts = np.array([n.start for n in kept])
  ends = np.array([n.end for n in kept])
  ends[:-1] = np.minimum(ends[:-1], starts[1:])
  return MelodyLine(pitches=np.array([n.pitch for n in kept]), starts=starts, ends=ends,
                    velocities=np.array([n.velocity for n in kept]))


def compose_melody_piece(seed: int, seconds: float, genre: Optional[str] = None) -> Piece:
  """A gm_synth piece of `seconds` whose lead is a melody (genre drawn from
  MELODIC_GENRES when None)."""
  rng = np.random.default_rng(seed)
  if genre is None:
    genre = MELODIC_GENRES[rng.integers(len(MELODIC_GENRES))]
  if genre not in MELODIC_GENRES:
    raise ValueError(f"genre {genre!r} has no melodic lead; use one of {MELODIC_GENRES}")
  return composer.compose(rng, seconds, f"melody:seed{seed}", genre=genre)


@dataclasses.dataclass(frozen=True)
class RenditionSpec:
  """How one rendition re-performs a melody.

  voice: a `VOICE_RANGES` name (GM program name, or SINE_VOICE).
  key_shift: semitones of transposition, -5..+6; octave_shift: octaves
    added on top, to put the line in the voice's range.
  tempo_factor: playback speed (1.1 = 10% faster); times scale by 1/factor.
  accompaniment: keep the piece's other parts (transposed by key_shift,
    drums untouched); never for the sine voice.
  detune_cents: offset of every note; wobble_cents: std of each note's own
    offset on top; timing_jitter_s: most onset/offset shift per note;
    velocity_scale: loudness of the line (MIDI velocity factor).
  seed: the per-note draws.
  """
  voice: str
  key_shift: int
  octave_shift: int
  tempo_factor: float
  accompaniment: bool
  detune_cents: float
  wobble_cents: float
  timing_jitter_s: float
  velocity_scale: float
  seed: int

  def __post_init__(self):
    if self.voice not in VOICE_RANGES:
      raise ValueError(f"unknown rendition voice {self.voice!r}; known: {sorted(VOICE_RANGES)}")
    if not 0.5 <= self.tempo_factor <= 2.0:
      raise ValueError(f"tempo_factor {self.tempo_factor} is outside [0.5, 2]")
    if not 0 <= self.timing_jitter_s <= 0.1:
      raise ValueError(f"timing_jitter_s {self.timing_jitter_s} is outside [0, 0.1] s")
    if self.accompaniment and self.voice == SINE_VOICE:
      raise ValueError("the sine voice is rendered without accompaniment")

  @property
  def transpose(self) -> int:
    return self.key_shift + 12 * self.octave_shift

  @property
  def is_sine_voice(self) -> bool:
    return self.voice == SINE_VOICE


def fitting_octave_shift(pitches: np.ndarray, voice: str, rng: np.random.Generator) -> int:
  """An octave shift putting every pitch in the voice's range (one drawn at
  random when several fit; the one closest to the range's middle when none does)."""
  low, high = VOICE_RANGES[voice]
  shifts = np.arange(-4, 5)
  fits = [int(k) for k in shifts
          if pitches.min() + 12 * k >= low and pitches.max() + 12 * k <= high]
  if fits:
    return int(fits[rng.integers(len(fits))])
  middle = (low + high) / 2
  return int(shifts[np.argmin(np.abs(pitches.mean() + 12 * shifts - middle))])


def draw_specs(line: MelodyLine, num: int, rng: np.random.Generator,
               voices: Sequence[str] = tuple(VOICE_RANGES), hummed_fraction: float = 0.4,
               accompaniment_probability: float = 0.3) -> list[RenditionSpec]:
  """`num` rendition specs of `line`: about `hummed_fraction` of them by a
  HUMMED_VOICES voice (those among `voices`), the rest by the other `voices`."""
  unknown = sorted(set(voices) - set(VOICE_RANGES))
  if unknown:
    raise ValueError(f"unknown rendition voices {unknown}; known: {sorted(VOICE_RANGES)}")
  hummed = [v for v in voices if v in HUMMED_VOICES]
  played = [v for v in voices if v not in HUMMED_VOICES]
  specs = []
  for _ in range(num):
    pool = hummed if (rng.random() < hummed_fraction and hummed) or not played else played
    voice = str(pool[rng.integers(len(pool))])
    key_shift = int(rng.integers(-5, 7))
    specs.append(RenditionSpec(
        voice=voice, key_shift=key_shift,
        octave_shift=fitting_octave_shift(line.pitches + key_shift, voice, rng),
        tempo_factor=float(rng.uniform(0.9, 1.1)),
        accompaniment=voice != SINE_VOICE and bool(rng.random() < accompaniment_probability),
        detune_cents=float(rng.uniform(-15, 15)) if rng.random() < 0.7 else 0.0,
        wobble_cents=float(rng.uniform(0, 12)),
        timing_jitter_s=float(rng.uniform(0.0, MAX_TIMING_JITTER_S)),
        velocity_scale=float(rng.uniform(0.75, 1.1)),
        seed=int(rng.integers(2**31))))
  return specs


def perform(line: MelodyLine, spec: RenditionSpec) -> MelodyLine:
  """The line as the rendition plays it: transposed, time-scaled, jittered,
  detuned and with varied velocities (onsets stay in order; each note ends
  before the next starts unless both fall within 30 ms)."""
  rng = np.random.default_rng([spec.seed, 0])
  n = len(line)
  jitter = spec.timing_jitter_s
  starts = line.starts / spec.tempo_factor + rng.uniform(-jitter, jitter, n)
  starts = np.maximum.accumulate(np.maximum(starts, 0.0))
  ends = line.ends / spec.tempo_factor + rng.uniform(-jitter, jitter, n)
  next_starts = np.append(starts[1:], np.inf)
  ends = np.clip(ends, starts + 0.03, np.maximum(next_starts - 0.005, starts + 0.03))
  velocities = np.clip(np.round(line.velocities * spec.velocity_scale
                                * rng.normal(1.0, 0.08, n)), 20, 127).astype(int)
  cents = np.clip(spec.detune_cents + rng.normal(0.0, spec.wobble_cents, n),
                  -PITCH_BEND_RANGE_CENTS + 1, PITCH_BEND_RANGE_CENTS - 1)
  pitches = line.pitches + spec.transpose
  if pitches.min() < 0 or pitches.max() > 127:
    raise ValueError(f"transposing by {spec.transpose} puts pitches outside MIDI 0..127")
  return MelodyLine(pitches=pitches, starts=starts, ends=ends, velocities=velocities,
                    cents=cents)


@dataclasses.dataclass(frozen=True)
class Rendition:
  """A performed melody: its spec, its notes and its MIDI.

  midi: instrument 0 (named 'melody') plays `line` with pitch bends for its
    cents; further instruments are the accompaniment. A SINE_VOICE rendition
    carries its line as a Flute track (for inspection); `sine_voice`
    synthesises its audio.
  """
  spec: RenditionSpec
  line: MelodyLine
  midi: pretty_midi.PrettyMIDI


def _accompaniment(piece: Piece, spec: RenditionSpec) -> list[pretty_midi.Instrument]:
  """The piece's non-lead parts, transposed by the key shift (drums kept) and
  time-scaled by the tempo factor, a little softer than the piece."""
  lead = next(i for i, p in enumerate(piece.parts) if p.role in LEAD_ROLES)
  tracks = []
  for index, source in enumerate(piece.midi.instruments):
    if index == lead:
      continue
    track = pretty_midi.Instrument(program=source.program, is_drum=source.is_drum,
                                   name=source.name)
    shift = 0 if source.is_drum else spec.key_shift
    for note in source.notes:
      pitch = note.pitch + shift
      if 0 <= pitch <= 127:
        track.notes.append(pretty_midi.Note(
            velocity=max(1, int(note.velocity * 0.8)), pitch=pitch,
            start=note.start / spec.tempo_factor, end=note.end / spec.tempo_factor))
    tracks.append(track)
  return tracks


def render_rendition_midi(piece: Piece, spec: RenditionSpec,
                          line: Optional[MelodyLine] = None) -> Rendition:
  """The rendition `spec` of the piece's melody (`line`, default `melody_line(piece)`)."""
  line = melody_line(piece) if line is None else line
  performed = perform(line, spec)
  program = pretty_midi.instrument_name_to_program(
      "Flute" if spec.is_sine_voice else spec.voice)
  melody = pretty_midi.Instrument(program=program, name="melody")
  for i in range(len(performed)):
    start = float(performed.starts[i])
    bend = int(round(performed.cents[i] / PITCH_BEND_RANGE_CENTS * 8191))
    melody.pitch_bends.append(pretty_midi.PitchBend(pitch=bend, time=max(start - 0.002, 0.0)))
    melody.notes.append(pretty_midi.Note(velocity=int(performed.velocities[i]),
                                         pitch=int(performed.pitches[i]), start=start,
                                         end=float(performed.ends[i])))
  midi = pretty_midi.PrettyMIDI(initial_tempo=120.0)
  midi.instruments.append(melody)
  if spec.accompaniment:
    midi.instruments.extend(_accompaniment(piece, spec))
  return Rendition(spec=spec, line=performed, midi=midi)


def renditions(piece: Piece, num: int, seed: int, **draw_kwargs) -> list[Rendition]:
  """`num` renditions of the piece's melody, fixed by `seed` (see `draw_specs`)."""
  line = melody_line(piece)
  specs = draw_specs(line, num, np.random.default_rng([seed, 1]), **draw_kwargs)
  return [render_rendition_midi(piece, spec, line) for spec in specs]


def sine_voice(line: MelodyLine, sample_rate: int, seconds: float, seed: int,
               vibrato_hz: float = 5.0, vibrato_cents: float = 30.0,
               harmonics: Sequence[float] = (1.0, 0.35, 0.15),
               breath_level: float = 0.04) -> np.ndarray:
  """A hum-like voice singing `line`: float32 `[round(seconds * sample_rate)]`.

  A sine with two harmonics (amplitudes `harmonics`), continuous phase across
  notes, a 5 Hz vibrato that fades in over each note, 20 ms attack and 40 ms
  release, and breath noise (low-passed white noise) following the envelope.
  Peak-normalised to 0.5.
  """
  num_samples = int(round(seconds * sample_rate))
  rng = np.random.default_rng([seed, 2])
  t = np.arange(num_samples) / sample_rate
  midi_pitch = np.zeros(num_samples)
  envelope = np.zeros(num_samples)
  vibrato_depth = np.zeros(num_samples)
  attack, release = 0.02, 0.04
  for i in range(len(line)):
    first = int(line.starts[i] * sample_rate)
    last = min(int((line.ends[i] + release) * sample_rate), num_samples)
    if first >= num_samples:
      break
    local = t[first:last] - line.starts[i]
    length = line.ends[i] - line.starts[i]
    gain = (line.velocities[i] / 127.0) ** 1.5
    shape = np.minimum(local / attack, 1.0) * np.clip((length + release - local) / release,
                                                      0.0, 1.0)
    envelope[first:last] = np.maximum(envelope[first:last], gain * shape)
    midi_pitch[first:last] = line.pitches[i] + line.cents[i] / 100.0
    vibrato_depth[first:last] = vibrato_cents / 100.0 * np.minimum(local / 0.25, 1.0)
  phase_offset = rng.uniform(0, 2 * np.pi)
  vibrato = vibrato_depth * np.sin(2 * np.pi * vibrato_hz * t + phase_offset)
  f0 = 440.0 * 2.0 ** ((midi_pitch + vibrato - 69.0) / 12.0)
  phase = 2 * np.pi * np.cumsum(f0) / sample_rate
  wav = sum(a * np.sin((k + 1) * phase) for k, a in enumerate(harmonics)
            if (k + 1) * f0.max(initial=0.0) < sample_rate / 2)
  # Breath: white noise smoothed by a short Hann kernel (a low-pass near 3 kHz at 24 kHz).
  kernel = np.hanning(max(3, sample_rate // 3000 + 2))
  breath = np.convolve(rng.normal(0.0, 1.0, num_samples), kernel / kernel.sum(), mode="same")
  wav = envelope * (wav + breath_level * breath / max(np.std(breath), 1e-9))
  peak = np.max(np.abs(wav))
  return (0.5 * wav / peak if peak > 0 else wav).astype(np.float32)

