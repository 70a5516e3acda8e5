"""Procedural composer of the `gm_synth` corpus: labelled multi-track MIDI.

`compose` draws a genre template, a tempo, a key and mode, a chord
progression and instruments, and writes a piece as General MIDI: a bass line
on the chord roots, comping or a pad on voice-led chords, a phrased melody
with chord tones on strong beats and, for most genres, a drum groove with
fills. Everything is drawn from the one `np.random.Generator`, so a seed
fixes the MIDI bytes and the labels.

Time inside this module is counted in beats: the beat a listener taps (a
quarter note in 4/4 and 3/4, a dotted quarter in 6/8), which is also the
beat of `Piece.tempo_bpm`. Genres with drums keep tempos >= 76 bpm and put
kick or snare on every beat so that tempo estimators lock onto the label.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import numpy as np
import pretty_midi

from musiclm_jax.music.piece import DRUM_KITS, Part, Piece

# ---------------------------------------------------------------- pitch

MODES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10),
         "dorian": (0, 2, 3, 5, 7, 9, 10), "mixolydian": (0, 2, 4, 5, 7, 9, 10)}
MINOR_LIKE = ("minor", "dorian")
# Tonic spellings by pitch class: flat keys as usual for major-like modes,
# C-sharp / G-sharp rather than D-flat / A-flat for minor-like ones.
_SPELLINGS = {
    "major": ("C", "D-flat", "D", "E-flat", "E", "F", "F-sharp", "G", "A-flat", "A", "B-flat", "B"),
    "minor": ("C", "C-sharp", "D", "E-flat", "E", "F", "F-sharp", "G", "G-sharp", "A", "B-flat",
              "B"),
}
_NUMERALS = {"i": 0, "ii": 1, "iii": 2, "iv": 3, "v": 4, "vi": 5, "vii": 6}

# Meter: (beats per bar, quarter notes per beat, beats between strong beats,
# drum steps per beat).
METERS = {"4/4": (4, 1.0, 2, 4), "3/4": (3, 1.0, 3, 4), "6/8": (2, 1.5, 1, 3)}

# General MIDI percussion keys.
KICK, RIM, SNARE, CLAP, FLOOR_TOM, HAT, PEDAL_HAT = 36, 37, 38, 39, 41, 42, 44
LOW_TOM, OPEN_HAT, MID_TOM, CRASH, HIGH_TOM, RIDE, SHAKER = 45, 46, 47, 49, 50, 51, 70

# Velocities of the drum pattern letters and base velocities of the roles.
_HIT = {"X": 110, "x": 86, "o": 50}
_ROLE_VELOCITY = {"lead": 100, "chords": 72, "pad": 68, "bass": 84}


# ---------------------------------------------------------------- templates


@dataclasses.dataclass(frozen=True)
class Voice:
  """An instrument a role may get: GM program name (a `DRUM_KITS` name for
  drums), its caption phrase, and the centre of its register (MIDI pitch)."""
  instrument: str
  phrase: str
  center: int = 60


@dataclasses.dataclass(frozen=True)
class Melody:
  """How a lead line moves.

  durations, weights: note lengths (beats) and their chances.
  phrase_bars: bars per phrase; phrases come in fours, A A' B A'.
  rest: chance that a note slot is silent.
  breath: beats of silence that end each phrase.
  strong: beats between chord-tone beats (None: the meter's strong beats).
  arpeggio: play chord tones in 16ths instead (ignores the rest).
  """
  durations: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
  weights: tuple[float, ...] = (0.35, 0.35, 0.15, 0.15)
  phrase_bars: int = 2
  rest: float = 0.08
  breath: float = 1.0
  strong: Optional[float] = None
  arpeggio: bool = False


@dataclasses.dataclass(frozen=True)
class Groove:
  """One bar of drums: (GM key, hits) lanes; a hit per step is 'X' (accent),
  'x', 'o' (ghost) or '.'; steps per beat come from the meter."""
  lanes: tuple[tuple[int, str], ...]


@dataclasses.dataclass(frozen=True)
class Genre:
  """A genre template.

  tempo: (low, high) tapped bpm, inclusive.
  progressions: mode -> roman-numeral progressions (one chord per
    `chord_bars` bars); uppercase numerals force a major triad (V in minor),
    '7' adds the diatonic seventh.
  harmony_role: 'chords' (comping, `comp`) or 'pad' (held chords).
  comp, bass_line: keys of `COMPS` and `BASS_LINES`.
  grooves: keys of `GROOVES`; none for genres without drums.
  swing: where the off-beat eighth falls in the beat (0.5 straight, 2/3
    triplet swing); swing_unit: 1 for eighth swing, 0.5 for sixteenth swing.
  moods: genre-specific moods by brightness ('bright', 'dark'), added to the
    tempo-and-mode moods (or replacing them with replace_moods).
  """
  name: str
  tempo: tuple[int, int]
  meter: str
  progressions: dict[str, tuple[tuple[str, ...], ...]]
  lead: tuple[Voice, ...]
  harmony: tuple[Voice, ...]
  bass: tuple[Voice, ...]
  melody: Melody
  comp: str
  bass_line: str
  drums: tuple[Voice, ...] = ()
  grooves: tuple[str, ...] = ()
  harmony_role: str = "chords"
  chord_bars: float = 1.0
  swing: float = 0.5
  swing_unit: float = 1.0
  fill_every: int = 4
  moods: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  replace_moods: bool = False


# Comping patterns, one bar each: (onset, length, accent, tone) with onset and
# length in beats; tone None plays the voiced chord, 'P' a power chord
# (root, fifth, octave).
# A pattern of None holds each chord for as long as it lasts.
_EIGHTHS = tuple(i / 2 for i in range(8))
COMPS = {
    "hold": (None,),
    "power8": (tuple((t, 0.45, 1.0 if t % 1 == 0 else 0.8, "P") for t in _EIGHTHS),),
    "jazz": (((0, 0.9, 1.0, None), (1.5, 0.4, 0.9, None)),
             ((0.5, 0.4, 0.9, None), (2, 0.9, 1.0, None)),
             ((0, 1.4, 1.0, None), (2.5, 0.4, 0.9, None)),
             ((1, 0.4, 0.9, None), (2.5, 1.2, 1.0, None))),
    "stabs": (((0.5, 0.3, 0.85, None), (1.5, 0.3, 0.75, None), (2.5, 0.3, 0.85, None),
               (3.5, 0.3, 0.75, None)),
              ((0.5, 0.3, 0.85, None), (1.5, 0.3, 0.75, None), (2.5, 0.3, 0.85, None),
               (3.5, 0.2, 0.75, None), (3.75, 0.2, 0.7, None))),
    "bossa": (((0, 0.7, 1.0, None), (1.5, 0.4, 0.85, None), (3, 0.4, 0.9, None)),
              ((0.5, 0.4, 0.85, None), (2, 0.7, 1.0, None), (3.5, 0.4, 0.85, None))),
    "waltz": (((1, 0.7, 0.9, None), (2, 0.7, 0.8, None)),),
    "funk": (((0, 0.15, 1.0, None), (0.75, 0.15, 0.7, None), (1.5, 0.15, 0.9, None),
              (2.25, 0.15, 0.7, None), (2.5, 0.15, 1.0, None), (3.5, 0.15, 0.8, None),
              (3.75, 0.15, 0.7, None)),),
    "strum": (((0, 0.45, 1.0, None), (1, 0.45, 0.75, None), (1.5, 0.45, 0.8, None),
               (2, 0.45, 0.95, None), (3, 0.45, 0.75, None), (3.5, 0.45, 0.8, None)),),
    "jig": (((0, 0.3, 1.0, None), (2 / 3, 0.3, 0.75, None), (1, 0.3, 0.9, None),
             (5 / 3, 0.3, 0.75, None)),),
}

# Bass lines, one bar each, cycled bar by bar: (onset, length, tone) with
# tone 'R' root, '5' fifth, '8' octave, '3' third, 'W' a walking step,
# 'A' an approach to the next chord's root. None holds each chord's root.
BASS_LINES = {
    "hold": (None,),
    "eighths": (tuple((t, 0.42, "R") for t in _EIGHTHS),),
    "pump": (tuple((t, 0.45, "R") for t in range(4)) + ((3.5, 0.3, "8"),),),
    "pulse": (tuple((t + s, 0.2 if s else 0.4, "R") for t in range(4) for s in (0, 0.75)),),
    "walking": (((0, 0.9, "R"), (1, 0.9, "W"), (2, 0.9, "W"), (3, 0.9, "A")),),
    "bossa": (((0, 1.4, "R"), (1.5, 0.45, "5"), (2, 1.4, "5"), (3.5, 0.45, "R")),),
    "boom_bap": (((0, 1.4, "R"), (1.75, 0.5, "R"), (2.5, 1.0, "R"), (3.5, 0.4, "5")),),
    "funk": (((0, 0.4, "R"), (0.75, 0.2, "R"), (1.5, 0.2, "8"), (2, 0.3, "R"), (2.75, 0.2, "5"),
              (3.5, 0.2, "8"), (3.75, 0.2, "R")),),
    "two_beat": (((0, 0.9, "R"), (2, 0.9, "5")), ((0, 0.9, "R"), (2, 0.9, "3"))),
    "waltz": (((0, 0.9, "R"),), ((0, 0.9, "5"),)),
    "jig": (((0, 0.6, "R"), (1, 0.6, "5")),),
}

GROOVES = {
    "rock": Groove(((KICK, "X.......X.x....."), (SNARE, "....X.......X..."),
                    (HAT, "x.o.x.o.x.o.x.o."))),
    "rock_drive": Groove(((KICK, "X.....x.X......."), (SNARE, "....X.......X..."),
                          (HAT, "x.x.x.x.x.x.x.x."))),
    "jazz_ride": Groove(((RIDE, "X...x.o.X...x.o."), (PEDAL_HAT, "....x.......x..."),
                         (KICK, "o...o...o...o..."), (SNARE, "..........o....."))),
    "four_floor": Groove(((KICK, "X...X...X...X..."), (CLAP, "....x.......x..."),
                          (OPEN_HAT, "..o...o...o...o."), (HAT, "o.o.o.o.o.o.o.o."))),
    "techno": Groove(((KICK, "X...X...X...X..."), (CLAP, "....x.......x..."),
                      (OPEN_HAT, "..o...o...o...o."), (HAT, "oooooooooooooooo"))),
    "house": Groove(((KICK, "X...X...X...X..."), (CLAP, "....X.......X..."),
                     (OPEN_HAT, "..x...x...x...x."), (SHAKER, "oxoxoxoxoxoxoxox"))),
    "boom_bap": Groove(((KICK, "X.....o.X......."), (SNARE, "....X.......X..."),
                        (HAT, "x.o.x.o.x.o.x.o."))),
    "bossa": Groove(((KICK, "x.....x.x.....x."), (RIM, "....x..x....x..."),
                     (HAT, "x.o.x.o.x.o.x.o."))),
    "funk": Groove(((KICK, "X.x.....X.x....."), (SNARE, "....X..o.o..X..o"),
                    (HAT, "xoxoxoxoxoxoxoxo"))),
    "train": Groove(((KICK, "X.......X......."), (SNARE, "o.o.X.o.o.o.X.o."),
                     (HAT, "x.x.x.x.x.x.x.x."))),
}

_SONG = Melody()
_HYMN = Melody(durations=(1.0, 2.0), weights=(0.85, 0.15), phrase_bars=2, rest=0.0, breath=0.0,
               strong=1.0)

GENRE_TABLE = (
    Genre(
        "rock", (100, 176), "4/4",
        {"major": (("I", "V", "vi", "IV"), ("I", "IV", "V", "IV"), ("vi", "IV", "I", "V")),
         "minor": (("i", "VI", "III", "VII"), ("i", "VII", "VI", "VII"), ("i", "iv", "VI", "V")),
         "mixolydian": (("I", "VII", "IV", "I"), ("I", "VII", "IV", "IV"))},
        lead=(Voice("Overdriven Guitar", "overdriven lead guitar", 69),
              Voice("Distortion Guitar", "distorted lead guitar", 69),
              Voice("Electric Guitar (clean)", "clean electric guitar melody", 69)),
        harmony=(Voice("Distortion Guitar", "distorted power chords", 52),
                 Voice("Overdriven Guitar", "crunchy rhythm guitar", 52)),
        bass=(Voice("Electric Bass (pick)", "driving picked bass", 40),
              Voice("Electric Bass (finger)", "electric bass", 40)),
        melody=_SONG, comp="power8", bass_line="eighths",
        drums=(Voice("Standard Kit", "rock drums"), Voice("Power Kit", "punchy rock drums"),
               Voice("Room Kit", "live room drums")),
        grooves=("rock", "rock_drive"), moods={"dark": ("aggressive",)}),
    Genre(
        "jazz swing", (104, 156), "4/4",
        {"major": (("ii7", "V7", "I7", "vi7"), ("I7", "vi7", "ii7", "V7"),
                   ("iii7", "vi7", "ii7", "V7")),
         "minor": (("i7", "iv7", "ii7", "V7"), ("i7", "VI7", "ii7", "V7"))},
        lead=(Voice("Muted Trumpet", "muted trumpet lead", 70),
              Voice("Tenor Sax", "tenor sax lead", 64), Voice("Alto Sax", "alto sax lead", 68),
              Voice("Vibraphone", "vibraphone melody", 72)),
        harmony=(Voice("Acoustic Grand Piano", "comping piano", 62),
                 Voice("Electric Guitar (jazz)", "comping jazz guitar", 60)),
        bass=(Voice("Acoustic Bass", "walking upright bass", 41),),
        melody=Melody(durations=(0.5, 1.0, 1.5), weights=(0.6, 0.3, 0.1), rest=0.1),
        comp="jazz", bass_line="walking",
        drums=(Voice("Jazz Kit", "jazz drums"), Voice("Brush Kit", "brushed drums")),
        grooves=("jazz_ride",), swing=2 / 3),
    Genre(
        "techno", (124, 140), "4/4",
        {"minor": (("i", "i", "VI", "VII"), ("i", "iv", "i", "VII"), ("i", "i", "i", "VI")),
         "dorian": (("i", "IV", "i", "IV"), ("i", "i", "IV", "ii"))},
        lead=(Voice("Lead 2 (sawtooth)", "sawtooth synth arpeggio", 67),
              Voice("Lead 1 (square)", "square-wave synth arpeggio", 67)),
        harmony=(Voice("Pad 3 (polysynth)", "polysynth pad", 60),
                 Voice("Synth Strings 1", "synth string pad", 60)),
        bass=(Voice("Synth Bass 1", "pulsing synth bass", 38),
              Voice("Synth Bass 2", "throbbing synth bass", 38)),
        melody=Melody(arpeggio=True), comp="hold", bass_line="pulse", harmony_role="pad",
        drums=(Voice("TR-808 Kit", "808 drum machine"),
               Voice("Electronic Kit", "electronic drums")),
        grooves=("techno", "four_floor"), fill_every=8,
        moods={"dark": ("hypnotic", "dark")}),
    Genre(
        "house", (118, 128), "4/4",
        {"major": (("ii7", "V7", "I7", "vi7"), ("I", "vi", "IV", "V"),
                   ("IV7", "V7", "iii7", "vi7")),
         "minor": (("i7", "iv7", "VII7", "III7"), ("i7", "VI7", "VII7", "i7"))},
        lead=(Voice("Lead 1 (square)", "square synth hook", 72),
              Voice("Alto Sax", "alto sax hook", 68), Voice("Vibraphone", "vibraphone hook", 72)),
        harmony=(Voice("Acoustic Grand Piano", "house piano chords", 64),
                 Voice("Electric Piano 1", "electric piano stabs", 62),
                 Voice("Drawbar Organ", "organ stabs", 62)),
        bass=(Voice("Synth Bass 2", "pumping synth bass", 38),
              Voice("Electric Bass (finger)", "punchy electric bass", 40)),
        melody=Melody(durations=(0.5, 1.0, 0.25), weights=(0.5, 0.3, 0.2), phrase_bars=1,
                      rest=0.25, breath=0.5),
        comp="stabs", bass_line="pump",
        drums=(Voice("TR-808 Kit", "four-on-the-floor drum machine"),
               Voice("Electronic Kit", "four-on-the-floor electronic drums")),
        grooves=("house", "four_floor"), fill_every=8, moods={"bright": ("groovy",)}),
    Genre(
        "ambient", (60, 80), "4/4",
        {"major": (("I", "IV", "vi", "IV"), ("I", "iii", "IV", "I")),
         "minor": (("i", "VI", "III", "VII"), ("i", "iv", "i", "VI")),
         "dorian": (("i", "IV", "i", "ii"),)},
        lead=(Voice("Celesta", "celesta melody", 79), Voice("Music Box", "music box melody", 79),
              Voice("Flute", "soft flute", 74), Voice("Vibraphone", "soft vibraphone", 72)),
        harmony=(Voice("Pad 2 (warm)", "warm synth pad", 60),
                 Voice("Pad 8 (sweep)", "sweeping synth pad", 60),
                 Voice("Pad 1 (new age)", "shimmering new age pad", 60),
                 Voice("String Ensemble 2", "slow string pad", 60)),
        bass=(Voice("Synth Bass 2", "deep synth drone", 38),
              Voice("Contrabass", "low string drone", 40)),
        melody=Melody(durations=(1.0, 2.0, 3.0, 4.0), weights=(0.2, 0.4, 0.2, 0.2),
                      phrase_bars=4, rest=0.2, breath=2.0),
        comp="hold", bass_line="hold", harmony_role="pad", chord_bars=2.0, replace_moods=True,
        moods={"bright": ("calm", "dreamy", "serene", "ethereal"),
               "dark": ("dreamy", "mysterious", "haunting", "melancholic")}),
    Genre(
        "baroque chorale", (60, 84), "4/4",
        {"major": (("I", "IV", "V", "I", "vi", "ii", "V", "I"),
                   ("I", "V", "vi", "iii", "IV", "I", "V", "I"),
                   ("I", "ii", "V", "vi", "IV", "V", "I", "I")),
         "minor": (("i", "iv", "V", "i", "VI", "iio", "V", "i"),
                   ("i", "V", "i", "VI", "iv", "i", "V", "i"))},
        lead=(Voice("Violin", "violin melody", 74), Voice("Oboe", "oboe melody", 72),
              Voice("Trumpet", "baroque trumpet", 72), Voice("Flute", "flute melody", 76)),
        harmony=(Voice("Church Organ", "church organ", 60),
                 Voice("String Ensemble 1", "string ensemble", 60),
                 Voice("Harpsichord", "harpsichord", 60)),
        bass=(Voice("Cello", "cello", 45), Voice("Bassoon", "bassoon", 45),
              Voice("Contrabass", "double bass", 40)),
        melody=_HYMN, comp="hold", bass_line="hold", chord_bars=0.5, replace_moods=True,
        moods={"bright": ("serene", "reverent", "peaceful"),
               "dark": ("solemn", "somber", "reverent")}),
    Genre(
        "irish jig", (100, 126), "6/8",
        {"major": (("I", "IV", "I", "V"), ("I", "I", "IV", "V"), ("I", "V", "IV", "V")),
         "dorian": (("i", "VII", "i", "VII"), ("i", "IV", "i", "VII")),
         "mixolydian": (("I", "VII", "I", "VII"), ("I", "IV", "VII", "I")),
         "minor": (("i", "VII", "VI", "VII"), ("i", "VII", "i", "v"))},
        lead=(Voice("Fiddle", "fiddle", 76), Voice("Whistle", "tin whistle", 84),
              Voice("Flute", "wooden flute", 79), Voice("Accordion", "button accordion", 72)),
        harmony=(Voice("Acoustic Guitar (steel)", "strummed acoustic guitar", 57),
                 Voice("Acoustic Grand Piano", "vamping piano", 60)),
        bass=(Voice("Acoustic Bass", "upright bass", 41), Voice("Cello", "cello drone", 45)),
        melody=Melody(durations=(1 / 3, 2 / 3, 1.0), weights=(0.7, 0.25, 0.05), phrase_bars=2,
                      rest=0.0, breath=1 / 3),
        comp="jig", bass_line="jig", moods={"bright": ("lively", "spirited")}),
    Genre(
        "hip-hop", (86, 100), "4/4",
        {"minor": (("i7", "VI7", "iv7", "v7"), ("i7", "iv7", "i7", "VI7"),
                   ("i7", "i7", "VI7", "VII7")),
         "dorian": (("i7", "IV7", "i7", "IV7"),),
         "major": (("ii7", "V7", "I7", "vi7"), ("IV7", "iii7", "ii7", "I7"))},
        lead=(Voice("Electric Piano 1", "electric piano riff", 67),
              Voice("Vibraphone", "vibraphone loop", 72), Voice("Flute", "flute sample", 76)),
        harmony=(Voice("Electric Piano 2", "mellow electric piano", 60),
                 Voice("String Ensemble 1", "sampled strings", 62)),
        bass=(Voice("Synth Bass 1", "deep 808 bass", 36),
              Voice("Electric Bass (finger)", "deep bass", 38)),
        melody=Melody(durations=(0.25, 0.5, 0.75, 1.0), weights=(0.25, 0.4, 0.15, 0.2),
                      phrase_bars=1, rest=0.3, breath=0.5),
        comp="hold", bass_line="boom_bap",
        drums=(Voice("TR-808 Kit", "808 drums"), Voice("Standard Kit", "boom-bap drums")),
        grooves=("boom_bap",), swing=0.6, swing_unit=0.5, fill_every=8,
        moods={"bright": ("laid-back",), "dark": ("laid-back", "gritty")}),
    Genre(
        "bossa nova", (116, 144), "4/4",
        {"major": (("I7", "vi7", "ii7", "V7"), ("I7", "IV7", "iii7", "vi7"),
                   ("ii7", "V7", "I7", "I7")),
         "minor": (("i7", "iv7", "V7", "i7"), ("i7", "iio", "V7", "i7"))},
        lead=(Voice("Flute", "breathy flute", 76), Voice("Tenor Sax", "tenor sax", 64),
              Voice("Acoustic Guitar (nylon)", "nylon-string guitar melody", 67)),
        harmony=(Voice("Acoustic Guitar (nylon)", "nylon-string guitar", 58),
                 Voice("Electric Piano 1", "electric piano", 60)),
        bass=(Voice("Acoustic Bass", "upright bass", 41),
              Voice("Fretless Bass", "fretless bass", 41)),
        melody=Melody(durations=(0.5, 1.0, 1.5, 2.0), weights=(0.3, 0.35, 0.2, 0.15),
                      phrase_bars=2),
        comp="bossa", bass_line="bossa",
        drums=(Voice("Brush Kit", "brushed bossa nova drums"),
               Voice("Jazz Kit", "light bossa nova drums")),
        grooves=("bossa",), moods={"bright": ("breezy", "relaxed"), "dark": ("wistful",)}),
    Genre(
        "waltz", (84, 160), "3/4",
        {"major": (("I", "IV", "V", "I"), ("I", "vi", "ii", "V"), ("I", "V", "V", "I")),
         "minor": (("i", "iv", "V", "i"), ("i", "VI", "iv", "V"))},
        lead=(Voice("Accordion", "accordion melody", 72), Voice("Violin", "violin melody", 74),
              Voice("Flute", "flute melody", 76), Voice("Clarinet", "clarinet melody", 67)),
        harmony=(Voice("Acoustic Grand Piano", "oom-pah-pah piano", 62),
                 Voice("Pizzicato Strings", "pizzicato strings", 62)),
        bass=(Voice("Tuba", "tuba", 38), Voice("Contrabass", "double bass", 40)),
        melody=Melody(durations=(1.0, 2.0, 3.0, 0.5), weights=(0.45, 0.3, 0.1, 0.15),
                      phrase_bars=4, rest=0.05),
        comp="waltz", bass_line="waltz", moods={"bright": ("elegant", "graceful")}),
    Genre(
        "funk", (96, 118), "4/4",
        {"dorian": (("i7", "IV7"), ("i7", "i7", "IV7", "i7")),
         "mixolydian": (("I7", "IV7"), ("I7", "I7", "VII7", "IV7")),
         "minor": (("i7", "iv7", "i7", "VII7"),)},
        lead=(Voice("Brass Section", "brass section riffs", 67),
              Voice("Alto Sax", "alto sax riffs", 67),
              Voice("Clavinet", "clavinet riff", 64)),
        harmony=(Voice("Electric Guitar (muted)", "muted funk guitar", 62),
                 Voice("Electric Guitar (clean)", "scratchy clean guitar", 62)),
        bass=(Voice("Slap Bass 1", "slap bass", 38),
              Voice("Electric Bass (finger)", "funky fingered bass", 38)),
        melody=Melody(durations=(0.25, 0.5, 0.75, 1.0), weights=(0.3, 0.4, 0.15, 0.15),
                      phrase_bars=1, rest=0.3, breath=0.5),
        comp="funk", bass_line="funk",
        drums=(Voice("Standard Kit", "funky drums"), Voice("Room Kit", "tight funk drums")),
        grooves=("funk",), moods={"bright": ("groovy", "funky"), "dark": ("groovy", "funky")}),
    Genre(
        "country", (100, 140), "4/4",
        {"major": (("I", "IV", "I", "V"), ("I", "V", "IV", "I"), ("I", "IV", "V", "I")),
         "mixolydian": (("I", "VII", "IV", "I"),)},
        lead=(Voice("Fiddle", "country fiddle", 74), Voice("Banjo", "banjo", 67),
              Voice("Harmonica", "harmonica", 72)),
        harmony=(Voice("Acoustic Guitar (steel)", "strummed acoustic guitar", 57),
                 Voice("Honky-tonk Piano", "honky-tonk piano", 62)),
        bass=(Voice("Acoustic Bass", "upright bass", 41),
              Voice("Electric Bass (finger)", "electric bass", 40)),
        melody=_SONG, comp="strum", bass_line="two_beat",
        drums=(Voice("Brush Kit", "brushed train beat"), Voice("Standard Kit", "country drums")),
        grooves=("train",), moods={"bright": ("carefree", "twangy")}),
)
GENRES = tuple(g.name for g in GENRE_TABLE)
_BY_NAME = {g.name: g for g in GENRE_TABLE}

# Moods by brightness of the mode and pace (quarter-feel tempo).
_MOODS = {("bright", "fast"): ("upbeat", "joyful", "energetic", "cheerful"),
          ("bright", "medium"): ("happy", "warm", "playful", "relaxed"),
          ("bright", "slow"): ("calm", "peaceful", "tender", "gentle"),
          ("dark", "fast"): ("intense", "driving", "urgent", "tense"),
          ("dark", "medium"): ("moody", "brooding", "mysterious", "wistful"),
          ("dark", "slow"): ("melancholic", "somber", "sad", "mournful")}

_STEPS = np.array([-3, -2, -1, 0, 1, 2, 3, 4])
_STEP_P = np.array([0.06, 0.16, 0.28, 0.06, 0.26, 0.12, 0.04, 0.02])
_ARP_SHAPES = ((0, 1, 2, 3), (0, 2, 1, 3), (3, 2, 1, 0), (0, 1, 2, 1), (0, 2, 3, 2), (0, 3, 1, 2))
_ARP_MASKS = ("xxxxxxxxxxxxxxxx", "x.xxx.xxx.xxx.xx", "xx.xxx.xxx.xx.x.", "x.x.xxx.x.x.xxx.")


# ---------------------------------------------------------------- harmony


def chord_tones(numeral: str, tonic: int, mode: str) -> tuple[int, ...]:
  """Pitch classes of a roman-numeral chord, root first: the diatonic triad
  (or seventh with '7') on the degree; case sets the third's quality ('o',
  as in 'iio', only marks a chord that is diminished in the mode anyway)."""
  match = re.fullmatch(r"([ivIV]+)(o?)(7?)", numeral)
  if match is None:
    raise ValueError(f"bad roman numeral {numeral!r}")
  degree, scale = _NUMERALS[match[1].lower()], MODES[mode]
  tones = [scale[(degree + 2 * k) % 7] for k in range(4 if match[3] else 3)]
  third = (tones[1] - tones[0]) % 12
  if match[1].isupper() and third == 3:
    tones[1] += 1
  elif match[1].islower() and third == 4:
    tones[1] -= 1
  return tuple((tonic + t) % 12 for t in tones)


def melodic_scale(scale: tuple[int, ...], chord: tuple[int, ...]) -> tuple[int, ...]:
  """The scale's pitch classes with chromatic chord tones (the raised seventh
  of V in minor) replacing the scale tones a semitone away."""
  pcs = set(scale)
  for tone in chord:
    if tone not in pcs:
      pcs -= {(tone - 1) % 12, (tone + 1) % 12}
      pcs.add(tone)
  return tuple(sorted(pcs))


def _ladder(pcs: tuple[int, ...], low: int, high: int) -> list[int]:
  """MIDI pitches in [low, high] whose pitch class is in pcs, ascending."""
  return [p for p in range(low, high + 1) if p % 12 in pcs]


def _nearest(pitches: list[int], target: float) -> int:
  return min(pitches, key=lambda p: (abs(p - target), p))


def _voicing(chord: tuple[int, ...], center: int, previous: Optional[list[int]]) -> list[int]:
  """A close-position voicing (ascending MIDI pitches) near `center`, the
  inversion that moves least from the previous voicing."""
  candidates = []
  for inversion in range(len(chord)):
    pcs = chord[inversion:] + chord[:inversion]
    first = _nearest(_ladder((pcs[0],), center - 8, center + 4), center - 4)
    notes = [first]
    for pc in pcs[1:]:
      notes.append(notes[-1] + (pc - notes[-1]) % 12)
    candidates.append(notes)

  def cost(notes):
    drift = abs(np.mean(notes) - center) * 0.5
    if not previous:
      return drift
    return drift + sum(min(abs(n - p) for p in previous) for n in notes)

  return min(candidates, key=cost)


@dataclasses.dataclass(frozen=True)
class Harmony:
  """The chord of every moment: `chords[i]` (pitch classes, root first) lasts
  beats [i * span, (i + 1) * span)."""
  chords: tuple[tuple[int, ...], ...]
  span: float

  def at(self, beat: float) -> tuple[int, ...]:
    return self.chords[min(int(beat / self.span + 1e-9), len(self.chords) - 1)]

  def next_chord(self, beat: float) -> tuple[int, ...]:
    """The chord after the one at `beat`."""
    return self.at((int(beat / self.span + 1e-9) + 1) * self.span)

  def segments(self):
    """(start, end, chord) per chord, in beats."""
    return [(i * self.span, (i + 1) * self.span, c) for i, c in enumerate(self.chords)]


def _harmony(genre: Genre, mode: str, tonic: int, total_beats: float, beats_per_bar: int,
             rng: np.random.Generator) -> Harmony:
  """Progressions A and B from the pool in the form A A B A, repeated."""
  pool = genre.progressions[mode]
  first, second = rng.choice(len(pool), size=2, replace=len(pool) < 2)
  span = genre.chord_bars * beats_per_bar
  numerals = []
  while len(numerals) * span < total_beats + span:
    for section in (first, first, second, first):
      numerals.extend(pool[section])
  return Harmony(tuple(chord_tones(n, tonic, mode) for n in numerals), span)


# ---------------------------------------------------------------- parts
# A note is (MIDI pitch, onset beat, end beat, velocity).


def _arc(beat: float, phrase_beats: float) -> float:
  """Velocity factor rising and falling over each phrase: 0.88 .. 1.0."""
  return 0.88 + 0.12 * math.sin(math.pi * (beat % phrase_beats) / phrase_beats)


def _velocity(base: float, rng: np.random.Generator) -> int:
  return int(np.clip(round(base + rng.normal(0, 3)), 1, 127))


def _phrase_rhythm(style: Melody, beats: float,
                   rng: np.random.Generator) -> list[tuple[float, float]]:
  """(onset, length) in beats of one phrase's notes, ending in a breath."""
  notes, t, end = [], 0.0, beats - style.breath
  p = np.array(style.weights) / np.sum(style.weights)
  while t < end - 1e-6:
    length = min(float(rng.choice(style.durations, p=p)), end - t)
    if not notes or rng.random() >= style.rest:
      notes.append((t, length))
    t += length
  if notes and style.breath == 0.0:
    notes[-1] = (notes[-1][0], beats - notes[-1][0])
  return notes


def _realize(rhythm, steps, offset: float, harmony: Harmony, scale, voice: Voice, strong: float,
             arc_beats: float, rng: np.random.Generator) -> list[tuple]:
  """Pitches for a rhythm: chord tones on strong beats, scale steps between."""
  notes, previous = [], voice.center
  for index, ((onset, length), step) in enumerate(zip(rhythm, steps)):
    beat = offset + onset
    chord = harmony.at(beat)
    ladder = _ladder(melodic_scale(scale, chord), voice.center - 8, voice.center + 10)
    if (step > 0 and previous > voice.center + 5) or (step < 0 and previous < voice.center - 5):
      step = -step
    on_strong = abs(beat / strong - round(beat / strong)) < 1e-6
    if index == 0 or on_strong:
      tones = [p for p in ladder if p % 12 in chord]
      pitch = _nearest(tones, previous + 1.5 * step)
    else:
      position = ladder.index(_nearest(ladder, previous)) + int(step)
      pitch = ladder[int(np.clip(position, 0, len(ladder) - 1))]
    accent = 1.0 if on_strong else 0.9
    velocity = _velocity(_ROLE_VELOCITY["lead"] * accent * _arc(beat, arc_beats), rng)
    notes.append((pitch, beat, beat + length * 0.95, velocity))
    previous = pitch
  return notes


def _melody(genre: Genre, voice: Voice, harmony: Harmony, scale, total_beats: float,
            rng: np.random.Generator) -> list[tuple]:
  """Phrases in groups of four, A A' B A': A' repeats A's rhythm and steps
  on the chords under it (the last one varies a few steps); B is new."""
  beats_per_bar, _, meter_strong, _ = METERS[genre.meter]
  style = genre.melody
  strong = style.strong or meter_strong
  phrase_beats = style.phrase_bars * beats_per_bar
  arc_beats = max(phrase_beats, 4 * beats_per_bar)
  motifs, notes = {}, []
  for index in range(math.ceil(total_beats / phrase_beats)):
    label = "AABA"[index % 4]
    if label not in motifs or label == "B":  # A stays for the piece, B is new each time.
      rhythm = _phrase_rhythm(style, phrase_beats, rng)
      motifs[label] = (rhythm, rng.choice(_STEPS, p=_STEP_P, size=len(rhythm)))
    rhythm, steps = motifs[label]
    if index % 4 == 3:  # the last A' varies a few steps.
      fresh = rng.choice(_STEPS, p=_STEP_P, size=len(steps))
      steps = np.where(rng.random(len(steps)) < 0.25, fresh, steps)
    notes += _realize(rhythm, steps, index * phrase_beats, harmony, scale, voice, strong,
                      arc_beats, rng)
  return notes


def _arpeggio(voice: Voice, harmony: Harmony, total_beats: float, beats_per_bar: int,
              rng: np.random.Generator) -> list[tuple]:
  """A 16th-note arpeggio of the chord tones in a shape and rhythm fixed for the piece."""
  shape = _ARP_SHAPES[rng.integers(len(_ARP_SHAPES))]
  mask = _ARP_MASKS[rng.integers(len(_ARP_MASKS))]
  notes, voicing = [], None
  for step in range(int(total_beats * 4)):
    beat = step / 4
    if mask[step % len(mask)] != "x":
      continue
    voicing = _voicing(harmony.at(beat)[:3], voice.center, voicing)
    tones = voicing + [voicing[0] + 12]
    accent = 1.0 if step % 4 == 0 else 0.8
    velocity = _ROLE_VELOCITY["lead"] * 0.85 * accent * _arc(beat, 4 * beats_per_bar)
    notes.append((tones[shape[step % len(shape)]], beat, beat + 0.22, _velocity(velocity, rng)))
  return notes


def _comp(genre: Genre, voice: Voice, harmony: Harmony, total_beats: float,
          rng: np.random.Generator) -> list[tuple]:
  """Chords in the genre's comping pattern, or held for each chord."""
  beats_per_bar = METERS[genre.meter][0]
  base = _ROLE_VELOCITY[genre.harmony_role]
  patterns, notes, voicing = COMPS[genre.comp], [], None
  if patterns[0] is None:
    for start, end, chord in harmony.segments():
      if start >= total_beats:
        break
      voicing = _voicing(chord, voice.center, voicing)
      velocity = base * _arc(start, 4 * beats_per_bar)
      notes += [(p, start, end - 0.05, _velocity(velocity, rng)) for p in voicing]
    return notes
  for bar in range(math.ceil(total_beats / beats_per_bar)):
    bar_start = bar * beats_per_bar
    for onset, length, accent, tone in patterns[rng.integers(len(patterns))]:
      beat = bar_start + onset
      chord = harmony.at(beat)
      voicing = _voicing(chord, voice.center, voicing)
      if tone == "P":
        root = _nearest(_ladder((chord[0],), voice.center - 12, voice.center), voice.center - 7)
        pitches = [root, root + 7, root + 12]
      else:
        pitches = voicing
      velocity = base * accent * _arc(beat, 4 * beats_per_bar)
      notes += [(p, beat, beat + length, _velocity(velocity, rng)) for p in pitches]
  return notes


def _bass_tone(tone: str, beat: float, harmony: Harmony, scale, voice: Voice,
               previous: int, rng: np.random.Generator) -> int:
  """MIDI pitch of one bass-line tone (see `BASS_LINES`)."""
  chord = harmony.at(beat)
  root = _nearest(_ladder((chord[0],), voice.center - 6, voice.center + 6), voice.center)
  if tone == "R":
    return root
  if tone == "5":
    return root + (chord[2] - chord[0]) % 12
  if tone == "3":
    return root + (chord[1] - chord[0]) % 12
  if tone == "8":
    return root + 12
  target = _nearest(_ladder((harmony.next_chord(beat)[0],), voice.center - 6, voice.center + 6),
                    previous)
  if tone == "A":  # a half step below or above the next chord's root.
    return target + (-1 if rng.random() < 0.6 else 1)
  ladder = _ladder(melodic_scale(scale, chord), voice.center - 8, voice.center + 10)
  direction = 1 if target > previous else -1
  moves = [p for p in ladder if 0 < (p - previous) * direction <= 4] or ladder
  return int(rng.choice(moves))


def _bass(genre: Genre, voice: Voice, harmony: Harmony, scale, total_beats: float,
          rng: np.random.Generator) -> list[tuple]:
  """The bass line: the genre's bar pattern on each chord, or held roots."""
  beats_per_bar = METERS[genre.meter][0]
  patterns, notes, previous = BASS_LINES[genre.bass_line], [], voice.center
  base = _ROLE_VELOCITY["bass"]
  if patterns[0] is None:
    for start, end, chord in harmony.segments():
      if start >= total_beats:
        break
      pitch = _bass_tone("R", start, harmony, scale, voice, previous, rng)
      notes.append((pitch, start, end - 0.05, _velocity(base, rng)))
    return notes
  for bar in range(math.ceil(total_beats / beats_per_bar)):
    for onset, length, tone in patterns[bar % len(patterns)]:
      beat = bar * beats_per_bar + onset
      previous = _bass_tone(tone, beat, harmony, scale, voice, previous, rng)
      accent = 1.0 if abs(onset - round(onset)) < 1e-6 else 0.85
      notes.append((previous, beat, beat + length, _velocity(base * accent, rng)))
  return notes


def _drums(genre: Genre, groove: Groove, total_beats: float,
           rng: np.random.Generator) -> list[tuple]:
  """The groove in every bar, a fill closing every `fill_every` bars (toms
  and snare over the last half bar, kick kept on the beats) and a crash on
  the downbeat after it."""
  beats_per_bar, _, _, steps_per_beat = METERS[genre.meter]
  steps_per_bar = beats_per_bar * steps_per_beat
  fill_from = steps_per_bar - steps_per_beat * max(1, beats_per_bar // 2)
  stride = 2 if genre.swing > 0.5 and steps_per_beat == 4 else 1
  toms = (SNARE, SNARE, HIGH_TOM, HIGH_TOM, MID_TOM, MID_TOM, LOW_TOM, FLOOR_TOM)
  notes = []
  for bar in range(math.ceil(total_beats / beats_per_bar)):
    fill = bar % genre.fill_every == genre.fill_every - 1
    hits = []
    for key, pattern in groove.lanes:
      for step, mark in enumerate(pattern[:steps_per_bar]):
        in_fill = fill and step >= fill_from and not (key == KICK and step % steps_per_beat == 0)
        if mark != "." and not in_fill:
          hits.append((key, step, _HIT[mark]))
    if fill:
      fill_steps = range(fill_from, steps_per_bar, stride)
      for n, step in enumerate(fill_steps):
        key = toms[n * len(toms) // len(fill_steps)]
        hits.append((key, step, 70 + 40 * n / len(fill_steps)))
    if bar % genre.fill_every == 0:
      hits.append((CRASH, 0, _HIT["x"]))
    for key, step, velocity in hits:
      beat = bar * beats_per_bar + step / steps_per_beat
      notes.append((key, beat, beat + 0.1, _velocity(velocity, rng)))
  return notes


# ---------------------------------------------------------------- assembly


def _swing(beat: float, ratio: float, unit: float) -> float:
  """Delays off-beat subdivisions: the middle of each `unit` moves to `ratio`."""
  whole, frac = divmod(beat / unit, 1.0)
  frac = frac * 2 * ratio if frac <= 0.5 else ratio + (frac - 0.5) * 2 * (1 - ratio)
  return (whole + frac) * unit


def _instrument(voice: Voice, role: str, notes: list[tuple], genre: Genre, bpm: float,
                seconds: float) -> pretty_midi.Instrument:
  """A pretty_midi instrument from beat-time notes, swung and cut at `seconds`."""
  drums = role == "drums"
  program = DRUM_KITS[voice.instrument] if drums else pretty_midi.instrument_name_to_program(
      voice.instrument)
  instrument = pretty_midi.Instrument(program=program, is_drum=drums, name=voice.phrase)
  seconds_per_beat = 60.0 / bpm
  for pitch, onset, end, velocity in sorted(notes, key=lambda n: (n[1], n[0])):
    start = _swing(onset, genre.swing, genre.swing_unit) * seconds_per_beat
    stop = min(_swing(end, genre.swing, genre.swing_unit) * seconds_per_beat, seconds)
    if start < seconds - 0.02 and stop - start > 0.01:
      instrument.notes.append(pretty_midi.Note(velocity=velocity, pitch=int(pitch),
                                               start=round(start, 4), end=round(stop, 4)))
  return instrument


def _mood(genre: Genre, mode: str, bpm: float, rng: np.random.Generator) -> str:
  """A mood word agreeing with the mode's brightness and the tempo."""
  brightness = "dark" if mode in MINOR_LIKE else "bright"
  feel = bpm * METERS[genre.meter][1] ** 0.75
  pace = "fast" if feel >= 120 else "slow" if feel < 90 else "medium"
  extra = genre.moods.get(brightness, ())
  pool = extra if genre.replace_moods else _MOODS[(brightness, pace)] + extra
  return str(pool[rng.integers(len(pool))])


def _pick(voices: tuple[Voice, ...], rng: np.random.Generator) -> Voice:
  return voices[rng.integers(len(voices))]


def compose(rng: np.random.Generator, seconds: float, source_id: str,
            genre: Optional[str] = None) -> Piece:
  """A piece of `seconds` (s) in `genre` (None: drawn uniformly from GENRES).

  The music starts at 0 s and plays to `seconds`, where it is cut.
  """
  if genre is None:
    genre = GENRES[rng.integers(len(GENRES))]
  if genre not in _BY_NAME:
    raise ValueError(f"unknown genre {genre!r}; expected one of {GENRES}")
  template = _BY_NAME[genre]
  beats_per_bar, quarters_per_beat, _, _ = METERS[template.meter]
  bpm = int(rng.integers(template.tempo[0], template.tempo[1] + 1))
  modes = sorted(template.progressions)
  mode = modes[rng.integers(len(modes))]
  tonic = int(rng.integers(12))
  key = _SPELLINGS["minor" if mode in MINOR_LIKE else "major"][tonic]
  scale = tuple((tonic + step) % 12 for step in MODES[mode])
  total_beats = seconds * bpm / 60.0
  harmony = _harmony(template, mode, tonic, total_beats, beats_per_bar, rng)

  lead, harmony_voice, bass = (_pick(voices, rng)
                               for voices in (template.lead, template.harmony, template.bass))
  if template.melody.arpeggio:
    lead_notes = _arpeggio(lead, harmony, total_beats, beats_per_bar, rng)
  else:
    lead_notes = _melody(template, lead, harmony, scale, total_beats, rng)
  tracks = [("lead", lead, lead_notes),
            (template.harmony_role, harmony_voice, _comp(template, harmony_voice, harmony,
                                                         total_beats, rng)),
            ("bass", bass, _bass(template, bass, harmony, scale, total_beats, rng))]
  if template.drums:
    kit = _pick(template.drums, rng)
    groove = GROOVES[template.grooves[rng.integers(len(template.grooves))]]
    tracks.append(("drums", kit, _drums(template, groove, total_beats, rng)))

  midi = pretty_midi.PrettyMIDI(initial_tempo=bpm * quarters_per_beat)
  numerator, denominator = (int(x) for x in template.meter.split("/"))
  midi.time_signature_changes.append(pretty_midi.TimeSignature(numerator, denominator, 0.0))
  for role, voice, notes in tracks:
    midi.instruments.append(_instrument(voice, role, notes, template, bpm, seconds))
  parts = tuple(Part(role, voice.instrument, voice.phrase) for role, voice, _ in tracks)
  return Piece(midi=midi, genre=genre, tempo_bpm=float(bpm), key=key, mode=mode,
               time_signature=template.meter, parts=parts,
               mood=_mood(template, mode, bpm, rng), source_id=source_id)
