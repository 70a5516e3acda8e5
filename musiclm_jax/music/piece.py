"""A piece of music as MIDI plus the attributes that label it.

Every built-in corpus (procedural `gm_synth`, arranged `music21_gm`) produces
`Piece`s; `captions.py` turns their attributes into text and `render.py`
turns their MIDI into a 24 kHz waveform.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import pretty_midi

# Role names used by parts. Captions phrase parts by role ("a walking upright
# bass", "a muted trumpet lead").
ROLES = ("lead", "counter", "chords", "pad", "bass", "drums", "voice")


@dataclasses.dataclass(frozen=True)
class Part:
  """One instrument of a piece.

  role: one of ROLES.
  instrument: the General MIDI program name as `pretty_midi` spells it
    (`pretty_midi.program_to_instrument_name`, e.g. 'Muted Trumpet'); for
    drums a kit name from `DRUM_KITS` (e.g. 'Brush Kit').
  phrase: how captions name the part, e.g. 'walking upright bass',
    'brushed drums', 'muted trumpet lead'.
  """
  role: str
  instrument: str
  phrase: str

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"unknown part role {self.role!r}; expected one of {ROLES}")


# General MIDI percussion kits (bank 128 program numbers of GS/GM2 SoundFonts).
DRUM_KITS = {"Standard Kit": 0, "Room Kit": 8, "Power Kit": 16, "Electronic Kit": 24,
             "TR-808 Kit": 25, "Jazz Kit": 32, "Brush Kit": 40}


@dataclasses.dataclass(frozen=True)
class Piece:
  """MIDI and its labels.

  midi: the score; tempo changes are allowed but `tempo_bpm` is the tempo of
    the beat (quarter note, or dotted quarter in 6/8) that a listener taps.
  genre: style label, e.g. 'jazz swing', 'baroque chorale'.
  key: tonic spelled for readers, e.g. 'B-flat', 'F-sharp', 'C'.
  mode: 'major' or 'minor' (or a church mode name, e.g. 'dorian').
  time_signature: e.g. '4/4', '3/4', '6/8'.
  parts: the instruments, in order of prominence.
  mood: one word, e.g. 'upbeat', 'calm', 'melancholic'.
  source_id: identifies the piece across clips, for splitting; clips cut from
    one piece share it.
  composer, era, ensemble, title: optional, set for arranged repertoire
    (e.g. 'Johann Sebastian Bach', 'Baroque', 'string quartet', 'Chorale BWV 66.6').
  """
  midi: pretty_midi.PrettyMIDI
  genre: str
  tempo_bpm: float
  key: str
  mode: str
  time_signature: str
  parts: tuple[Part, ...]
  mood: str
  source_id: str
  composer: Optional[str] = None
  era: Optional[str] = None
  ensemble: Optional[str] = None
  title: Optional[str] = None

  @property
  def instruments(self) -> tuple[str, ...]:
    """General MIDI names of the parts, without repeats, in part order."""
    return tuple(dict.fromkeys(p.instrument for p in self.parts))

  @property
  def has_drums(self) -> bool:
    return any(p.role == "drums" for p in self.parts)
