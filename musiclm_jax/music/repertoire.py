"""Works of the music21 corpus arranged for General MIDI instruments.

`list_works` names the playable works of each collection (one per file, or one
per tune of a multi-tune abc file); `arrange` parses one with music21, gives
its voices to an ensemble chosen per collection, picks a tempo and writes the
beginning as `pretty_midi` at that fixed tempo, with labels for captions.

Tempo convention: `Piece.tempo_bpm` counts the beat of the time-signature
label: the dotted note in compound meters (6/8, 9/8, 12/8, 6/4 and also 3/8:
dotted quarter, dotted half in 6/4), otherwise the denominator's note
(quarter in 4/4, half in 2/2 and 4/2).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Optional

import music21
import numpy as np
import pretty_midi

from musiclm_jax.music.piece import Part, Piece

COLLECTIONS = ("bach_chorales", "palestrina", "monteverdi", "oneills_1850", "ryans_mammoth",
               "airds_airs", "essen_folksongs", "beethoven", "mozart", "haydn")


@dataclasses.dataclass(frozen=True)
class _Collection:
  """Where a collection's files lie and how to label and arrange them.

  kind: 'chorale', 'polyphony', 'dance_tunes', 'folk_songs' or 'classical';
    selects the tempo rule, the key rule and the genre.
  ensembles: names in ENSEMBLES, drawn uniformly (a repeat weighs double).
  genre: the genre label; for dance tunes its prefix ('irish' -> 'irish reel').
  """
  directory: str
  extensions: tuple[str, ...]
  kind: str
  ensembles: tuple[str, ...]
  era: str
  composer: Optional[str] = None
  genre: str = ""
  exclude: tuple[str, ...] = ()


_SPECS = {
    "bach_chorales": _Collection(
        "bach", (".mxl", ".xml", ".krn"), "chorale",
        ("string quartet", "church organ", "brass quartet", "woodwind quartet", "choir"),
        "Baroque", "Johann Sebastian Bach", "baroque chorale"),
    "palestrina": _Collection(
        "palestrina", (".krn",), "polyphony",
        ("choir", "vocal ensemble", "string consort", "recorder consort"),
        "Renaissance", "Giovanni Pierluigi da Palestrina", "renaissance mass"),
    "monteverdi": _Collection(
        "monteverdi", (".mxl",), "polyphony",
        ("choir", "vocal ensemble", "string consort", "recorder consort"),
        "Renaissance", "Claudio Monteverdi", "renaissance madrigal"),
    "oneills_1850": _Collection(
        "oneills1850", (".abc",), "dance_tunes",
        ("solo fiddle", "solo violin", "solo tin whistle", "solo flute", "solo accordion"),
        "traditional", genre="irish"),
    "ryans_mammoth": _Collection(
        "ryansMammoth", (".abc",), "dance_tunes",
        ("solo fiddle", "solo violin", "solo flute", "solo accordion"),
        "traditional", genre="american fiddle"),
    "airds_airs": _Collection(
        "airdsAirs", (".abc",), "dance_tunes",
        ("solo fiddle", "solo violin", "solo flute", "solo tin whistle"),
        "traditional", genre="scottish"),
    "essen_folksongs": _Collection(
        "essenFolksong", (".abc",), "folk_songs",
        ("solo flute", "solo recorder", "solo clarinet", "solo oboe", "solo accordion"),
        "traditional", exclude=("test0.abc", "test1.abc", "testd.abc", "teste.abc")),
    "beethoven": _Collection(
        "beethoven", (".mxl",), "classical", ("string quartet", "string quartet", "piano"),
        "Classical", "Ludwig van Beethoven", "classical string quartet"),
    "mozart": _Collection(
        "mozart", (".mxl",), "classical", ("string quartet", "string quartet", "piano"),
        "Classical", "Wolfgang Amadeus Mozart", "classical string quartet"),
    "haydn": _Collection(
        "haydn", (".mxl",), "classical", ("string quartet", "string quartet", "piano"),
        "Classical", "Joseph Haydn", "classical string quartet"),
}

# Works that are not string quartets: path prefix -> (genre, ensembles).
_KEYBOARD_WORKS = {"mozart/k545/": ("classical piano sonata", ("piano",))}


@dataclasses.dataclass(frozen=True)
class _Ensemble:
  """Instruments from the top voice down: (GM program name, caption phrase).

  Scores with fewer inner voices than `inner` use its last ones; with more,
  the last is repeated. Keyboard ensembles play every voice on one instrument.
  """
  top: tuple[str, str]
  inner: tuple[tuple[str, str], ...] = ()
  bass: Optional[tuple[str, str]] = None
  keyboard: bool = False


def _solo(program: str, phrase: str) -> _Ensemble:
  return _Ensemble((program, phrase))


ENSEMBLES = {
    "string quartet": _Ensemble(("Violin", "first violin"),
                                (("Violin", "second violin"), ("Viola", "viola")),
                                ("Cello", "cello")),
    "brass quartet": _Ensemble(("Trumpet", "trumpet"),
                               (("Trumpet", "second trumpet"), ("French Horn", "french horn")),
                               ("Trombone", "trombone")),
    "woodwind quartet": _Ensemble(("Flute", "flute"), (("Oboe", "oboe"), ("Clarinet", "clarinet")),
                                  ("Bassoon", "bassoon")),
    "choir": _Ensemble(("Choir Aahs", "soprano voices"),
                       (("Choir Aahs", "alto voices"), ("Choir Aahs", "tenor voices")),
                       ("Choir Aahs", "bass voices")),
    "vocal ensemble": _Ensemble(("Voice Oohs", "soprano oohs"),
                                (("Voice Oohs", "alto oohs"), ("Voice Oohs", "tenor oohs")),
                                ("Voice Oohs", "bass oohs")),
    "string consort": _Ensemble(("Violin", "violin"), (("Viola", "viola"),), ("Cello", "cello")),
    "recorder consort": _Ensemble(("Recorder", "descant recorder"),
                                  (("Recorder", "alto recorder"), ("Recorder", "tenor recorder")),
                                  ("Recorder", "bass recorder")),
    "church organ": _Ensemble(("Church Organ", "church organ"), keyboard=True),
    "piano": _Ensemble(("Acoustic Grand Piano", "piano"), keyboard=True),
    "solo fiddle": _solo("Fiddle", "fiddle"),
    "solo violin": _solo("Violin", "violin"),
    "solo tin whistle": _solo("Whistle", "tin whistle"),
    "solo flute": _solo("Flute", "flute"),
    "solo accordion": _solo("Accordion", "accordion"),
    "solo recorder": _solo("Recorder", "recorder"),
    "solo clarinet": _solo("Clarinet", "clarinet"),
    "solo oboe": _solo("Oboe", "oboe"),
}

# Tempo ranges as the beats/min a quarter-note beat would have ("quarter
# feel"); a beat of b quarters gets bpm * b ** -0.75 (music written in longer
# note values moves faster per note value, though not proportionally).
_FEEL_BPM = {"chorale": (60, 84), "polyphony": (88, 116), "folk_songs": (76, 112),
             "air": (60, 84), "classical": (88, 112)}
# Classical tempo words; the one written first wins (the longest on a tie).
_TEMPO_WORDS = {"grave": (44, 58), "largo": (44, 58), "lento": (48, 62), "adagio": (48, 64),
                "larghetto": (56, 70), "sostenuto": (52, 68), "andante": (66, 84),
                "andantino": (80, 100), "moderato": (88, 108), "menuet": (100, 126),
                "allegretto": (92, 116), "allegro": (116, 144), "allegro molto": (138, 168),
                "allegro assai": (138, 168), "allegro vivace": (138, 168), "vivace": (138, 168),
                "presto": (150, 176)}
# Dance tunes: bars per minute, whatever the notation (2/4, 2/2 and 4/4 reels).
_DANCE_BARS_PER_MIN = {"reel": (50, 60), "hornpipe": (38, 46), "clog": (38, 46),
                       "jig": (56, 64), "slip jig": (38, 44), "strathspey": (30, 36),
                       "fling": (32, 38), "polka": (60, 70), "march": (52, 60),
                       "waltz": (42, 50), "slide": (48, 56)}
_DANCE_WORDS = ("slip jig", "slipjig", "reel", "hornpipe", "clog", "jig", "strathspey", "fling",
                "polka", "march", "waltz", "slide")

_FAST, _SLOW = 108.0, 72.0  # quarter-feel bounds of the "fast" and "slow" moods.
_MAJOR_LIKE = ("major", "ionian", "mixolydian", "lydian")


@dataclasses.dataclass(frozen=True)
class WorkRef:
  """One playable work: a corpus file and, for multi-tune abc files, the tune's
  reference number (its `X:` field)."""
  collection: str
  path: str  # relative to the music21 corpus directory, '/'-separated
  number: Optional[int] = None

  @property
  def source_id(self) -> str:
    suffix = "" if self.number is None else f"#{self.number}"
    return f"music21:{self.path}{suffix}"


def _corpus_dir() -> str:
  return str(music21.common.getCorpusFilePath())


def _abc_tune_numbers(path: str) -> list[int]:
  """Reference numbers of the tunes in an abc file, unique, in file order."""
  with open(path, encoding="utf-8", errors="replace") as f:
    numbers = [int(m) for m in re.findall(r"^X:\s*(\d+)", f.read(), flags=re.M)]
  return list(dict.fromkeys(numbers))


def _collection_works(name: str) -> list[WorkRef]:
  spec, root = _SPECS[name], _corpus_dir()
  works, seen_numbers = [], set()
  for full in sorted(str(p) for p in music21.corpus.getCorePaths()):
    rel = os.path.relpath(full, root).replace(os.sep, "/")
    directory, _, file_name = rel.rpartition("/")
    if (directory.split("/")[0] != spec.directory or not file_name.endswith(spec.extensions)
        or file_name in spec.exclude or "choraleAnalyses" in directory):
      continue
    numbers = _abc_tune_numbers(full) if file_name.endswith(".abc") else []
    if len(numbers) <= 1:
      works.append(WorkRef(name, rel))
      continue
    for number in numbers:
      # O'Neill's numbers are global and some files overlap: keep the first.
      if name == "oneills_1850" and number in seen_numbers:
        continue
      seen_numbers.add(number)
      works.append(WorkRef(name, rel, number))
  return works


@functools.lru_cache(maxsize=None)
def _works(collections: tuple[str, ...]) -> tuple[WorkRef, ...]:
  unknown = set(collections) - set(COLLECTIONS)
  if unknown:
    raise ValueError(f"unknown collections {sorted(unknown)}; known: {COLLECTIONS}")
  works = [w for name in collections for w in _collection_works(name)]
  return tuple(sorted(works, key=lambda w: (w.collection, w.path, w.number or 0)))


def list_works(collections=COLLECTIONS) -> list[WorkRef]:
  """Every playable work of `collections`, sorted by (collection, path, number).

  Cheap: reads only the abc files' `X:` lines (about 0.2 s for all).
  """
  return list(_works(tuple(collections)))


# ---------------------------------------------------------------- parsing


def _parse(work: WorkRef) -> music21.stream.Score:
  path = os.path.join(_corpus_dir(), *work.path.split("/"))
  kwargs = {} if work.number is None else {"number": work.number}
  try:
    score = music21.converter.parse(path, forceSource=True, storePickle=False, **kwargs)
  except Exception as e:  # music21 raises many exception types on bad files.
    raise ValueError(f"music21 cannot parse {work.source_id}: {type(e).__name__}: {e}") from e
  if isinstance(score, music21.stream.Opus):  # a tune number that matched several tunes.
    score = score.scores[0] if score.scores else None
  if not isinstance(score, music21.stream.Score) or not score.parts:
    raise ValueError(f"{work.source_id} has no parts")
  return score


def _abc_fields(work: WorkRef) -> dict[str, str]:
  """Header fields (T, R, ...) of an abc work's tune, first value each."""
  path = os.path.join(_corpus_dir(), *work.path.split("/"))
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  tunes = [t for t in re.split(r"^(?=X:)", text, flags=re.M) if t.startswith("X:")]
  wanted = [t for t in tunes if work.number is None
            or re.match(rf"X:\s*0*{work.number}\s*$", t.split("\n", 1)[0])]
  fields = {}
  for line in (wanted[0] if wanted else "").splitlines():
    match = re.match(r"([A-Za-z]):\s*(.*)", line)
    if match and match.group(1) not in fields:
      fields[match.group(1)] = match.group(2).strip()
  return fields


def _time_signature(score: music21.stream.Score) -> tuple[int, int]:
  first = score.recurse().getElementsByClass(music21.meter.TimeSignature).first()
  return (first.numerator, first.denominator) if first is not None else (4, 4)


def beat_quarters(numerator: int, denominator: int) -> float:
  """Length of the tapped beat in quarter notes (see the module docstring)."""
  compound = (numerator % 3 == 0 and numerator >= 6) or (numerator == 3 and denominator >= 8)
  return (12.0 if compound else 4.0) / denominator


# ---------------------------------------------------------------- labels


def _title(work: WorkRef, score: music21.stream.Score, fields: dict[str, str]) -> Optional[str]:
  """A readable title from the abc/humdrum metadata or the corpus path."""
  stem = work.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
  if work.collection == "bach_chorales":
    return "Chorale BWV " + stem[3:]
  if work.collection == "palestrina":
    md = score.metadata
    mass = md.parentTitle if md is not None else None
    return f"{md.title} from {mass}" if md is not None and mass else stem
  if work.collection == "monteverdi":
    book, number = stem.split(".")[1:3]
    return f"Madrigal Book {book} No. {number}"
  if _SPECS[work.collection].kind == "classical":
    match = re.match(r"(\w+)/(opus|k)(\d+)(?:no(\d+))?(?:/movement(\d+))?", work.path)
    kind = "Piano Sonata" if work.path.startswith(tuple(_KEYBOARD_WORKS)) else "String Quartet"
    catalog = "Op." if match.group(2) == "opus" else "K."
    title = f"{kind} {catalog} {match.group(3)}"
    title += f" No. {match.group(4)}" if match.group(4) else ""
    return title + (f", movement {match.group(5)}" if match.group(5) else "")
  title = fields.get("T") or (score.metadata.title if score.metadata is not None else None)
  if not title:
    return None
  title = re.sub(r",\s*S\.\s*\d.*$", "", title.replace(" -- ", " ")).strip()
  if title.isupper():
    title = " ".join(word[:1] + word[1:].lower() for word in title.split())
  return title.rstrip(".") or None


def _dance_type(fields: dict[str, str], meter: tuple[int, int]) -> str:
  """'reel', 'jig', ... from the abc rhythm field or title, else from the meter."""
  text = f"{fields.get('R', '')} {fields.get('T', '')}".lower()
  for word in _DANCE_WORDS:
    if re.search(rf"\b{word}\b", text):
      return "slip jig" if word == "slipjig" else word
  if re.search(r"\bair\b|\blament\b|\bslow\b", text):
    return "air"
  return {(6, 8): "jig", (9, 8): "slip jig", (2, 2): "reel"}.get(meter, "air")


def _genre_and_ensembles(work: WorkRef, dance: Optional[str]) -> tuple[str, tuple[str, ...]]:
  spec = _SPECS[work.collection]
  for prefix, (genre, ensembles) in _KEYBOARD_WORKS.items():
    if work.path.startswith(prefix):
      return genre, ensembles
  if dance is not None:
    return f"{spec.genre} {dance}", spec.ensembles
  if spec.kind == "folk_songs":
    origin = work.path.rsplit("/", 1)[-1]
    genre = ("chinese folk song" if origin.startswith("han") else
             "irish folk song" if origin.startswith("irl") else "german folk song")
    return genre, spec.ensembles
  return spec.genre, spec.ensembles


def _tempo_words(score: music21.stream.Score) -> str:
  """Lower-cased text of the tempo marks and directions at the start."""
  words = []
  for el in score.parts[0].recurse().getElementsByClass(
      (music21.tempo.TempoText, music21.tempo.MetronomeMark, music21.expressions.TextExpression)):
    if el.getOffsetInHierarchy(score.parts[0]) > 0:
      break
    if not getattr(el, "textImplicit", False):  # music21 names bare numbers ('andante').
      words.append(str(getattr(el, "text", None) or getattr(el, "content", None) or ""))
  return " ".join(words).lower()


def _tempo_word_range(text: str) -> Optional[tuple[int, int]]:
  """The range of the first tempo word in `text`, or None."""
  found = [(text.find(word), -len(word), word) for word in _TEMPO_WORDS if word in text]
  return _TEMPO_WORDS[min(found)[2]] if found else None


def _tempo_bpm(kind: str, dance: Optional[str], score: music21.stream.Score,
               meter: tuple[int, int], rng: np.random.Generator) -> float:
  """Beats/min of the label's beat (see the module docstring), drawn from a
  range by dance type, collection kind or tempo word."""
  beat = beat_quarters(*meter)
  if dance in _DANCE_BARS_PER_MIN:
    beats_per_bar = meter[0] * (4.0 / meter[1]) / beat
    low, high = _DANCE_BARS_PER_MIN[dance]
    return round(float(rng.uniform(low, high)) * beats_per_bar, 1)
  feel = _FEEL_BPM["air" if dance else kind]
  if kind == "classical":
    feel = _tempo_word_range(_tempo_words(score)) or feel
  return round(float(rng.uniform(*feel)) * beat ** -0.75, 1)


def _spell(pitch_name: str) -> str:
  """'F#' -> 'F-sharp', 'B-' -> 'B-flat', 'C##' -> 'C-double-sharp'."""
  letter, accidental = pitch_name[0].upper(), pitch_name[1:]
  names = {"": "", "#": "-sharp", "-": "-flat", "##": "-double-sharp", "--": "-double-flat"}
  return letter + names.get(accidental, "")


_MODE_BY_DEGREE = {0: "ionian", 2: "dorian", 4: "phrygian", 5: "lydian", 7: "mixolydian",
                   9: "aeolian"}


def _final_mode(score: music21.stream.Score) -> Optional[tuple[str, str]]:
  """(final, church mode) from the lowest note sounding at the end and the
  first key signature; None if the final is not a degree of its scale."""
  notes = [n for n in score.flatten().notes if not n.duration.isGrace
           and not isinstance(n, music21.harmony.Harmony)]
  signature = score.recurse().getElementsByClass(music21.key.KeySignature).first()
  if not notes:
    return None
  end = max(n.offset + n.quarterLength for n in notes)
  last = [p for n in notes if n.offset + n.quarterLength >= end - 1e-6 for p in n.pitches]
  final = min(last, key=lambda p: p.ps)
  sharps = signature.sharps if signature is not None else 0
  degree = (final.pitchClass - music21.key.KeySignature(sharps).asKey("major").tonic.pitchClass) % 12
  mode = _MODE_BY_DEGREE.get(degree)
  return (final.name, mode) if mode else None


def _key_and_mode(kind: str, score: music21.stream.Score) -> tuple[str, str]:
  """Tonal music: music21's key analysis ('major'/'minor'). Renaissance
  polyphony: final + church mode ('dorian', 'ionian', ...). Folk tunes: the
  analysis, refined by final + key signature to 'dorian' or 'mixolydian' when
  the analysis agrees on the tonic (tunes often end off their tonic)."""
  modal = _final_mode(score) if kind in ("polyphony", "dance_tunes", "folk_songs") else None
  if kind == "polyphony" and modal is not None:
    return _spell(modal[0]), modal[1]
  analysed = score.analyze("key")
  key, mode = _spell(analysed.tonic.name), analysed.mode
  if modal is not None and modal[1] in ("dorian", "mixolydian"):
    if music21.pitch.Pitch(modal[0]).pitchClass == analysed.tonic.pitchClass:
      key, mode = _spell(modal[0]), modal[1]
  return key, mode


def _mood(kind: str, mode: str, feel_bpm: float) -> str:
  """One word from the mode and the quarter-feel tempo."""
  major = mode in _MAJOR_LIKE
  if kind in ("chorale", "polyphony"):
    return "serene" if major else "solemn"
  if feel_bpm >= _FAST:
    return "lively" if major else "energetic"
  if feel_bpm <= _SLOW:
    return "gentle" if major else "melancholic"
  return "cheerful" if major else "wistful"


# ---------------------------------------------------------------- notes


def _clip_score(score: music21.stream.Score, quarters: float) -> music21.stream.Score:
  """The measures that start before `quarters` (the score itself if short),
  with repeats expanded where music21 can; as written where it cannot."""
  measures = score.parts[0].getElementsByClass(music21.stream.Measure)
  if score.highestTime > quarters + 64 and len(measures) > 1:
    last = [m.number for m in measures if m.offset < quarters][-1]
    score = score.measures(measures[0].number, last)
  try:
    return score.expandRepeats()
  except Exception:  # unmatched or unsupported repeat marks: play as written.
    return score


def _voice_notes(part: music21.stream.Part) -> list[tuple[float, float, int]]:
  """(start, end, MIDI pitch) in quarter lengths, ties merged, grace notes and
  chord symbols skipped."""
  notes, open_ties = [], {}
  for el in part.flatten().notes:
    if el.duration.isGrace or isinstance(el, music21.harmony.Harmony):
      continue
    start, end = float(el.offset), float(el.offset + el.quarterLength)
    for note in (el.notes if isinstance(el, music21.chord.Chord) else [el]):
      pitch = note.pitch.midi
      tie = note.tie or el.tie
      if tie is not None and tie.type in ("continue", "stop") and pitch in open_ties:
        notes[open_ties[pitch]][1] = end
        if tie.type == "stop":
          del open_ties[pitch]
        continue
      if tie is not None and tie.type == "start":
        open_ties[pitch] = len(notes)
      notes.append([start, end, pitch])
  return [tuple(n) for n in notes if n[1] > n[0] and 0 <= n[2] <= 127]


def _assign(ensemble: _Ensemble, voices: int) -> list[tuple[str, str, str]]:
  """(role, program, phrase) for voices ordered from highest to lowest."""
  if ensemble.keyboard:
    return [("chords",) + ensemble.top] * voices
  if voices == 1 or ensemble.bass is None:
    return [("lead",) + ensemble.top] * voices
  inner_count = voices - 2
  inner = list(ensemble.inner[-inner_count:]) if inner_count else []
  inner += [ensemble.inner[-1]] * (inner_count - len(inner))
  assigned = [("lead",) + ensemble.top] + [("counter",) + v for v in inner]
  assigned.append(("bass",) + ensemble.bass)
  counts, unique = {}, []
  for role, program, phrase in assigned:
    counts[phrase] = counts.get(phrase, 0) + 1
    ordinal = ("", "second ", "third ", "fourth ", "fifth ")[min(counts[phrase], 5) - 1]
    unique.append((role, program, ordinal + phrase))
  return unique


def _velocity(role: str, start_q: float, bar_q: float, rng: np.random.Generator) -> int:
  """MIDI velocity: a rise and fall over each 4-bar phrase, the lead a little
  louder, the inner voices softer, and a little random variation."""
  phase = (start_q % (4 * bar_q)) / (4 * bar_q)
  balance = {"lead": 8, "counter": -6, "bass": 0}[role]
  velocity = 66 + balance + 12 * math.sin(math.pi * phase) + rng.normal(0.0, 3.0)
  return int(np.clip(round(velocity), 30, 110))


def _remove_overlaps(instrument: pretty_midi.Instrument) -> None:
  """Cuts a note where the same pitch restarts (overlaps collide in MIDI)."""
  instrument.notes.sort(key=lambda n: (n.pitch, n.start))
  kept = []
  for note in instrument.notes:
    if kept and kept[-1].pitch == note.pitch and kept[-1].end > note.start:
      if note.start - kept[-1].start < 1e-3:
        continue  # unison doubling: keep one.
      kept[-1].end = note.start
    kept.append(note)
  instrument.notes = sorted(kept, key=lambda n: (n.start, n.pitch))


def _to_midi(voices: list[list[tuple[float, float, int]]], assigned, qpm: float,
             meter: tuple[int, int], max_seconds: float,
             rng: np.random.Generator) -> pretty_midi.PrettyMIDI:
  """Voices (quarter lengths) -> MIDI at `qpm` quarters/min, from the first
  onset, cut at `max_seconds`."""
  midi = pretty_midi.PrettyMIDI(initial_tempo=qpm)
  midi.time_signature_changes.append(pretty_midi.TimeSignature(meter[0], meter[1], 0.0))
  origin = min(n[0] for notes in voices for n in notes)
  seconds_per_quarter, bar_q = 60.0 / qpm, meter[0] * 4.0 / meter[1]
  instruments = {}
  for index, (notes, (role, program, phrase)) in enumerate(zip(voices, assigned)):
    balance_role = "lead" if index == 0 else "bass" if index == len(voices) - 1 else "counter"
    key = phrase if role != "chords" else program
    if key not in instruments:
      instruments[key] = pretty_midi.Instrument(pretty_midi.instrument_name_to_program(program),
                                                name=phrase)
    for start_q, end_q, pitch in notes:
      start = (start_q - origin) * seconds_per_quarter
      if start >= max_seconds:
        continue
      end = min((end_q - origin) * seconds_per_quarter, max_seconds)
      velocity = _velocity(balance_role, start_q - origin, bar_q, rng)
      instruments[key].notes.append(pretty_midi.Note(velocity, pitch, start, end))
  for instrument in instruments.values():
    _remove_overlaps(instrument)
    midi.instruments.append(instrument)
  return midi


def arrange(work: WorkRef, rng: np.random.Generator, max_seconds: float) -> Piece:
  """The first `max_seconds` (s) of `work` for an ensemble and tempo drawn
  from `rng`, with its labels. Raises ValueError for works music21 cannot
  parse or that have no notes."""
  spec = _SPECS[work.collection]
  score = _parse(work)
  fields = _abc_fields(work) if work.path.endswith(".abc") else {}
  meter = _time_signature(score)
  dance = _dance_type(fields, meter) if spec.kind == "dance_tunes" else None
  genre, ensemble_names = _genre_and_ensembles(work, dance)
  ensemble_name = str(rng.choice(ensemble_names))
  tempo_bpm = _tempo_bpm(spec.kind, dance, score, meter, rng)
  qpm = tempo_bpm * beat_quarters(*meter)
  clip = _clip_score(score, max_seconds * qpm / 60.0)
  voices = [v for v in (_voice_notes(p) for p in clip.parts) if v]
  if not voices:
    raise ValueError(f"{work.source_id} has no notes")
  voices.sort(key=lambda v: -np.mean([n[2] for n in v]))
  assigned = _assign(ENSEMBLES[ensemble_name], len(voices))
  midi = _to_midi(voices, assigned, qpm, meter, max_seconds, rng)
  key, mode = _key_and_mode(spec.kind, score if spec.kind != "classical" else clip)
  parts = list(dict.fromkeys(Part(role, program, phrase) for role, program, phrase in assigned))
  parts.sort(key=lambda p: ("lead", "chords", "bass", "counter").index(p.role))
  return Piece(midi=midi, genre=genre, tempo_bpm=tempo_bpm, key=key, mode=mode,
               time_signature=f"{meter[0]}/{meter[1]}", parts=tuple(parts),
               mood=_mood(spec.kind, mode, tempo_bpm * beat_quarters(*meter) ** 0.75),
               source_id=work.source_id, composer=spec.composer, era=spec.era,
               ensemble=ensemble_name, title=_title(work, score, fields))
