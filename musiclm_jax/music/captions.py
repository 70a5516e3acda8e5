"""Text for a `Piece`: varied natural captions, MusicCaps-style aspect lists,
and the phrases by which a caption mentions each label.

Every caption names every label (genre, tempo as '<N> bpm' or '<N> beats per
minute', key and mode, time signature as 'N/M', mood, each part's phrase and,
when set, composer, era and ensemble); `attribute_mentions` lists what a test
may look for. Wording, clause order and instrument order come from the rng.
"""
from __future__ import annotations

import re

import numpy as np

from musiclm_jax.music.piece import Piece

# Other names a genre may go by in captions (all count as mentions).
GENRE_SYNONYMS = {"jazz swing": ("jazz swing", "swing jazz"), "hip-hop": ("hip-hop", "hip hop"),
                  "baroque chorale": ("baroque chorale", "baroque-style chorale"),
                  "irish jig": ("irish jig", "celtic jig")}
# Nouns that follow a genre that is an adjective ("a techno track").
_NOUNS = {"techno": ("track", "instrumental", "piece"),
          "house": ("track", "groove", "instrumental"),
          "ambient": ("piece", "soundscape", "track"), "hip-hop": ("beat", "instrumental", "track"),
          "funk": ("groove", "tune", "track"), "jazz swing": ("tune", "number", "piece"),
          "rock": ("instrumental", "track", "tune")}
_DEFAULT_NOUNS = ("tune", "piece", "track")
# Genres whose last word is already a noun ("an Irish reel").
_GENRE_NOUNS = {"jig", "reel", "chorale", "waltz", "hornpipe", "song", "motet", "mass",
                "madrigal", "quartet", "sonata", "air", "march", "polka", "slide", "fling",
                "strathspey", "clog", "minuet", "fugue", "hymn", "dance"}
_PROPER = {"irish", "scottish", "american", "german", "chinese", "celtic", "baroque", "renaissance",
           "english", "french", "italian", "brazilian", "latin"}
_VOCAL_INSTRUMENTS = {"Choir Aahs", "Voice Oohs", "Synth Choir", "Lead 6 (voice)"}
_INVARIANT = {"bass", "brass", "chorus", "bodhrán"}

_TEMPO = ("at {n} bpm", "at {n} beats per minute", "at a tempo of {n} bpm", "at {n} BPM")
_KEY = ("in {k}", "in the key of {k}", "in {k}")
_METER = ("in {t} time", "in {t}", "with a {t} time signature", "in {t} meter")
_WITH = ("with", "featuring", "that features", "with")


def _choice(options, rng: np.random.Generator):
  return options[rng.integers(len(options))]


def article(phrase: str) -> str:
  """'a' or 'an' for the phrase's first word, by sound ('an 80', 'a one', 'an upright')."""
  word = phrase.split()[0].lower() if phrase.strip() else ""
  digits = re.match(r"\d+", word)
  if digits:
    number = digits.group()
    vowel = number.startswith("8") or number in ("11", "18") or (
        number.startswith(("11", "18")) and len(number) in (5, 6))
  else:
    vowel = word[:1] in "aeiou" and not word.startswith(("uni", "use", "eu", "one", "ukulele"))
    vowel = vowel or word in ("hour", "honest", "fm")
  return "an" if vowel else "a"


def english_list(items: list[str]) -> str:
  """'x', 'x and y', 'x, y and z'."""
  if len(items) <= 1:
    return "".join(items)
  return ", ".join(items[:-1]) + " and " + items[-1]


def _is_plural(phrase: str) -> bool:
  last = phrase.split()[-1].lower()
  return last.endswith("s") and not last.endswith("ss") and last not in _INVARIANT


def _with_article(phrase: str) -> str:
  return phrase if _is_plural(phrase) else f"{article(phrase)} {phrase}"


def _proper_case(text: str) -> str:
  return " ".join(w.capitalize() if w.lower() in _PROPER else w for w in text.split(" "))


def _bpm(piece: Piece) -> int:
  return int(round(piece.tempo_bpm))


def _key(piece: Piece) -> str:
  return f"{piece.key} {piece.mode}"


def _surname(name: str) -> str:
  return name.split()[-1]


def _era_covered(piece: Piece) -> bool:
  return piece.era is not None and piece.era.lower() in piece.genre.lower()


def attribute_mentions(piece: Piece) -> dict[str, tuple[str, ...]]:
  """For each labelled attribute, lowercase phrases of which a caption of the
  piece contains at least one. Keys: 'genre', 'tempo', 'key',
  'time_signature', 'mood', 'instrument:<i>' per part and, when set,
  'composer', 'era', 'ensemble'."""
  n = _bpm(piece)
  mentions = {
      "genre": GENRE_SYNONYMS.get(piece.genre, (piece.genre.lower(),)),
      "tempo": (f"{n} bpm", f"{n} beats per minute"),
      "key": (_key(piece).lower(),),
      "time_signature": (piece.time_signature,),
      "mood": (piece.mood.lower(),),
  }
  for i, part in enumerate(piece.parts):
    mentions[f"instrument:{i}"] = (part.phrase.lower(),)
  if piece.composer:
    mentions["composer"] = (piece.composer.lower(), _surname(piece.composer).lower())
  if piece.era:
    mentions["era"] = (piece.era.lower(),)
  if piece.ensemble:
    mentions["ensemble"] = (piece.ensemble.lower(),)
  return mentions


def aspect_list(piece: Piece) -> list[str]:
  """MusicCaps-style lowercase keywords: genre, mood, tempo, key, meter,
  part phrases, then repertoire labels and 'instrumental' when no voices."""
  aspects = [piece.genre, piece.mood, f"{_bpm(piece)} bpm", _key(piece),
             f"{piece.time_signature} time"]
  aspects += [p.phrase for p in piece.parts]
  aspects += [x for x in (piece.composer, piece.era, piece.ensemble) if x]
  vocal = any(p.role == "voice" or p.instrument in _VOCAL_INSTRUMENTS for p in piece.parts)
  aspects.append("choral" if vocal else "instrumental")
  return list(dict.fromkeys(a.lower() for a in aspects))


def _subject(piece: Piece, mood: bool, rng: np.random.Generator) -> str:
  """'an upbeat jazz swing tune', 'a traditional Irish reel for solo fiddle',
  'a Baroque chorale by Johann Sebastian Bach for string quartet'."""
  genre = _choice(GENRE_SYNONYMS.get(piece.genre, (piece.genre,)), rng)
  words = [_proper_case(genre)]
  if genre.split()[-1].lower() not in _GENRE_NOUNS:
    words.append(_choice(_NOUNS.get(piece.genre, _DEFAULT_NOUNS), rng))
  if piece.era and not _era_covered(piece):
    words.insert(0, "traditional" if piece.era.lower() == "traditional" else f"{piece.era}-era")
  if mood:
    words.insert(0, piece.mood)
  text = " ".join(words)
  text = f"{article(text)} {text}"
  if piece.composer:
    name = piece.composer if rng.random() < 0.6 else _surname(piece.composer)
    text += f" {_choice(('by', 'by', 'composed by'), rng)} {name}"
  if piece.title and rng.random() < 0.3:
    text += f' titled "{piece.title}"'
  if piece.ensemble:
    text += f" {_choice(('for', 'arranged for', 'for'), rng)} {piece.ensemble}"
  return text


def _instruments(piece: Piece, rng: np.random.Generator) -> list[str]:
  """Part phrases not already named by the genre or ensemble, most often in
  part order; with articles unless an ensemble is named."""
  covered = f"{piece.genre} {piece.ensemble or ''}".lower()
  phrases = [p.phrase for p in piece.parts if p.phrase.lower() not in covered]
  phrases = list(dict.fromkeys(phrases))
  if rng.random() < 0.5:
    phrases = [phrases[i] for i in rng.permutation(len(phrases))]
  if piece.ensemble:
    return phrases
  return [_with_article(p) for p in phrases]


def _details(piece: Piece, rng: np.random.Generator) -> list[str]:
  """Tempo, key and meter clauses in random order, e.g. 'at 140 bpm'."""
  clauses = [_choice(_TEMPO, rng).format(n=_bpm(piece)), _choice(_KEY, rng).format(k=_key(piece)),
             _choice(_METER, rng).format(t=piece.time_signature)]
  return [clauses[i] for i in rng.permutation(3)]


def _sentence(text: str) -> str:
  text = re.sub(r"\s+", " ", text).strip()
  return text[0].upper() + text[1:]


def caption(piece: Piece, rng: np.random.Generator) -> str:
  """One natural caption mentioning every label of `piece` (see module doc)."""
  details = _details(piece, rng)
  listed = _instruments(piece, rng)
  with_instruments = f"{_choice(_WITH, rng)} {english_list(listed)}" if listed else ""
  mood, n = piece.mood, _bpm(piece)
  bare = [f"{n} bpm", _key(piece), piece.time_signature]
  templates = [
      lambda: f"{_subject(piece, True, rng)} {details[0]} {details[1]}, {details[2]}"
              + (f", {with_instruments}." if listed else "."),
      lambda: f"{_subject(piece, True, rng)}" + (f" {with_instruments}," if listed else "")
              + f" {english_list(details)}.",
      lambda: f"{_subject(piece, False, rng)}" + (f" {with_instruments}." if listed else ".")
              + f" It is played {english_list(details)}; the mood is {mood}.",
      lambda: f"This is {_subject(piece, True, rng)}" + (f" {with_instruments}." if listed else ".")
              + f" It is played {english_list(details)}.",
      lambda: f"{_subject(piece, False, rng)} with {article(mood)} {mood} mood, "
              + f"{english_list(details)}."
              + (f" The arrangement features {english_list(listed)}." if listed else ""),
      lambda: _subject(piece, True, rng).split(" ", 1)[1]
              + f": {', '.join(bare[i] for i in rng.permutation(3))}"
              + (f"; {english_list(listed)}." if listed else "."),
  ]
  if listed:
    verb = _choice(("play", "perform", "carry") if len(listed) > 1 or _is_plural(listed[0])
                   else ("plays", "performs", "carries"), rng)
    templates.append(lambda: f"{english_list(listed)} {verb} {_subject(piece, True, rng)} "
                             f"{english_list(details)}.")
  return _sentence(_choice(templates, rng)())
