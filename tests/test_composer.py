"""The procedural composer and the captions: labels in range, music that
fills the clip and follows its key, determinism, captions naming every label."""
import io
import re

import numpy as np
import pretty_midi
import pytest

from musiclm_jax.music import captions
from musiclm_jax.music import composer
from musiclm_jax.music.piece import DRUM_KITS, ROLES, Part, Piece

SECONDS = 12.0
SPELLED = {"C", "C-sharp", "D-flat", "D", "E-flat", "E", "F", "F-sharp", "G", "G-sharp", "A-flat",
           "A", "B-flat", "B"}
PITCH_CLASS = {"C": 0, "C-sharp": 1, "D-flat": 1, "D": 2, "E-flat": 3, "E": 4, "F": 5, "F-sharp": 6,
               "G": 7, "G-sharp": 8, "A-flat": 8, "A": 9, "B-flat": 10, "B": 11}


def midi_bytes(piece):
  buffer = io.BytesIO()
  piece.midi.write(buffer)
  return buffer.getvalue()


def labels(piece):
  return (piece.genre, piece.tempo_bpm, piece.key, piece.mode, piece.time_signature, piece.parts,
          piece.mood, piece.source_id)


def beat_seconds(piece):
  return 60.0 / piece.tempo_bpm


def scale_pitch_classes(piece):
  """The mode's pitch classes, plus the raised seventh in minor (V chords)."""
  tonic = PITCH_CLASS[piece.key]
  steps = set(composer.MODES[piece.mode]) | ({11} if piece.mode == "minor" else set())
  return {(tonic + s) % 12 for s in steps}


@pytest.fixture(scope="module")
def pieces():
  """Four pieces of every genre."""
  return {g: [composer.compose(np.random.default_rng([i, 17]), SECONDS, f"t:{g}:{i}", genre=g)
              for i in range(4)] for g in composer.GENRES}


def test_genre_table():
  assert len(composer.GENRES) >= 8 and len(set(composer.GENRES)) == len(composer.GENRES)
  for genre in composer.GENRE_TABLE:
    low, high = genre.tempo
    assert 60 <= low <= high <= 180, genre.name
    assert not genre.drums or low >= 76, genre.name
    assert genre.meter in composer.METERS and genre.comp in composer.COMPS
    assert genre.bass_line in composer.BASS_LINES
    assert all(g in composer.GROOVES for g in genre.grooves)
    assert bool(genre.drums) == bool(genre.grooves)
    for voice in genre.lead + genre.harmony + genre.bass:
      pretty_midi.instrument_name_to_program(voice.instrument)  # a GM name.
    assert all(v.instrument in DRUM_KITS for v in genre.drums)
    for mode, progressions in genre.progressions.items():
      for numerals in progressions:
        for numeral in numerals:
          composer.chord_tones(numeral, 0, mode)  # parses.


def test_drum_genres_are_the_majority():
  assert sum(bool(g.drums) for g in composer.GENRE_TABLE) >= len(composer.GENRES) // 2 + 1


@pytest.mark.parametrize("genre", composer.GENRES)
def test_labels_in_range(pieces, genre):
  for piece in pieces[genre]:
    assert piece.genre == genre
    assert 60 <= piece.tempo_bpm <= 180 and piece.tempo_bpm == int(piece.tempo_bpm)
    assert not piece.has_drums or piece.tempo_bpm >= 76
    assert piece.mode in composer.MODES and piece.key in SPELLED
    assert piece.time_signature in composer.METERS
    assert re.fullmatch(r"[a-z-]+", piece.mood)
    assert all(p.role in ROLES and p.phrase for p in piece.parts)
    assert [p.role for p in piece.parts][:1] == ["lead"] and "bass" in [p.role for p in piece.parts]
    ts = piece.midi.time_signature_changes[0]
    assert f"{ts.numerator}/{ts.denominator}" == piece.time_signature


@pytest.mark.parametrize("genre", composer.GENRES)
def test_drums_on_the_percussion_channel_iff_labelled(pieces, genre):
  for piece in pieces[genre]:
    assert len(piece.midi.instruments) == len(piece.parts)
    for part, instrument in zip(piece.parts, piece.midi.instruments):
      assert instrument.is_drum == (part.role == "drums")
      if instrument.is_drum:
        assert instrument.program == DRUM_KITS[part.instrument]
      else:
        assert instrument.program == pretty_midi.instrument_name_to_program(part.instrument)
      assert instrument.notes, (genre, part)
    assert piece.has_drums == any(i.is_drum for i in piece.midi.instruments)


@pytest.mark.parametrize("genre", composer.GENRES)
def test_music_fills_the_clip(pieces, genre):
  for piece in pieces[genre]:
    notes = [n for i in piece.midi.instruments for n in i.notes]
    assert min(n.start for n in notes) < beat_seconds(piece)
    assert max(n.end for n in notes) >= SECONDS - beat_seconds(piece)
    assert piece.midi.get_end_time() <= SECONDS + 1e-6
    sounding_until = 0.0  # no silence longer than a beat anywhere.
    for note in sorted(notes, key=lambda n: n.start):
      assert note.start - sounding_until < beat_seconds(piece), (genre, note.start)
      sounding_until = max(sounding_until, note.end)


@pytest.mark.parametrize("genre", composer.GENRES)
def test_bass_below_melody_and_melody_in_key(pieces, genre):
  for piece in pieces[genre]:
    by_role = {p.role: i for p, i in zip(piece.parts, piece.midi.instruments)}
    lead = [n.pitch for n in by_role["lead"].notes]
    bass = [n.pitch for n in by_role["bass"].notes]
    assert np.mean(bass) < np.mean(lead) - 12
    scale = scale_pitch_classes(piece)
    in_key = np.mean([p % 12 in scale for p in lead])
    assert in_key >= 0.85, (genre, piece.key, piece.mode, in_key)


def test_chord_tones():
  assert composer.chord_tones("I", 0, "major") == (0, 4, 7)
  assert composer.chord_tones("V", 0, "minor") == (7, 11, 2)  # the raised third of V.
  assert composer.chord_tones("ii7", 0, "major") == (2, 5, 9, 0)
  assert composer.chord_tones("VII", 9, "minor") == (7, 11, 2)
  with pytest.raises(ValueError):
    composer.chord_tones("X", 0, "major")


def test_same_seed_same_piece():
  for seed in range(12):
    first = composer.compose(np.random.default_rng(seed), 6.0, "s")
    again = composer.compose(np.random.default_rng(seed), 6.0, "s")
    assert midi_bytes(first) == midi_bytes(again) and labels(first) == labels(again)
  one, other = (composer.compose(np.random.default_rng(s), 6.0, "s", genre="rock") for s in (1, 2))
  assert midi_bytes(one) != midi_bytes(other)


def test_genre_drawn_when_not_given_and_unknown_refused():
  drawn = {composer.compose(np.random.default_rng(s), 1.0, "s").genre for s in range(80)}
  assert drawn == set(composer.GENRES)
  with pytest.raises(ValueError, match="rock"):
    composer.compose(np.random.default_rng(0), 1.0, "s", genre="polka-dubstep")


def test_mood_agrees_with_tempo_and_mode():
  happy = {"upbeat", "joyful", "cheerful", "happy"}
  sad = {"melancholic", "somber", "sad", "mournful"}
  for seed in range(300):
    piece = composer.compose(np.random.default_rng([seed, 3]), 1.0, "s")
    if piece.mode in composer.MINOR_LIKE:
      assert piece.mood not in happy, (piece.genre, piece.mode, piece.mood)
    else:
      assert piece.mood not in sad, (piece.genre, piece.mode, piece.mood)
    if piece.tempo_bpm >= 120 and piece.time_signature != "6/8":
      assert piece.mood not in {"calm", "sad", "somber", "mournful", "melancholic"} - (
          {"calm"} if piece.genre == "ambient" else set())


def assert_mentions_everything(piece, text):
  lowered = text.lower()
  for attribute, phrases in captions.attribute_mentions(piece).items():
    assert phrases and all(p == p.lower() for p in phrases)
    assert any(p in lowered for p in phrases), (attribute, phrases, text)


def caption_shape(piece, text):
  """The caption with every mention replaced by its attribute name and
  articles dropped: what is left is the wording."""
  mentions = [(phrase, attribute.split(":")[0])
              for attribute, phrases in captions.attribute_mentions(piece).items()
              for phrase in phrases]
  shape = text.lower()
  for phrase, attribute in sorted(mentions, key=lambda m: -len(m[0])):
    shape = shape.replace(phrase, f"<{attribute}>")
  shape = re.sub(r"\b(a|an) <", "<", shape)
  return re.sub(r"<instrument>((, | and )<instrument>)*", "<instruments>", shape)


def test_captions_mention_every_label_and_vary():
  rng = np.random.default_rng(0)
  texts, shapes = set(), set()
  for i in range(200):
    piece = composer.compose(rng, 1.0, f"s{i}", genre=composer.GENRES[i % len(composer.GENRES)])
    text = captions.caption(piece, rng)
    assert_mentions_everything(piece, text)
    assert text[0].isupper() and text.endswith(".") and "  " not in text
    assert not re.search(r"\ba (?!eu|uni|one)[aeiou]|\ban [b-df-hj-np-tv-z]", text.lower()), text
    texts.add(text)
    shapes.add(caption_shape(piece, text))
  assert len(texts) == 200 and len(shapes) >= 100, len(shapes)


def test_caption_is_deterministic():
  piece = composer.compose(np.random.default_rng(5), 2.0, "s")
  assert (captions.caption(piece, np.random.default_rng(9))
          == captions.caption(piece, np.random.default_rng(9)))


def test_aspect_list():
  piece = composer.compose(np.random.default_rng(2), 2.0, "s", genre="jazz swing")
  aspects = captions.aspect_list(piece)
  assert aspects and all(a == a.lower() for a in aspects)
  assert piece.genre in aspects and f"{int(piece.tempo_bpm)} bpm" in aspects
  assert f"{piece.key} {piece.mode}".lower() in aspects and "instrumental" in aspects
  assert {p.phrase for p in piece.parts} <= set(aspects)


def repertoire_piece(**overrides):
  fields = dict(
      midi=pretty_midi.PrettyMIDI(), genre="baroque chorale", tempo_bpm=72.3, key="F-sharp",
      mode="minor", time_signature="4/4", mood="solemn", source_id="music21:bach/bwv66.6.mxl",
      parts=(Part("lead", "Violin", "first violin"), Part("counter", "Violin", "second violin"),
             Part("counter", "Viola", "viola"), Part("bass", "Cello", "cello")),
      composer="Johann Sebastian Bach", era="Baroque", ensemble="string quartet",
      title="Chorale BWV 66.6")
  fields.update(overrides)
  return Piece(**fields)


@pytest.mark.parametrize("overrides", [
    {},
    dict(genre="irish reel", composer=None, era="traditional", ensemble="solo fiddle",
         parts=(Part("lead", "Fiddle", "fiddle"),), time_signature="2/2", mood="lively"),
    dict(genre="renaissance motet", composer="Giovanni Pierluigi da Palestrina",
         era="Renaissance", ensemble="choir", mood="serene",
         parts=(Part("lead", "Choir Aahs", "soprano voices"),
                Part("bass", "Choir Aahs", "bass voices"))),
    dict(genre="classical string quartet", composer="Joseph Haydn", era="Classical",
         mood="cheerful", key="E-flat", mode="major", time_signature="3/4"),
])
def test_repertoire_captions(overrides):
  piece = repertoire_piece(**overrides)
  mentions = captions.attribute_mentions(piece)
  assert {"composer", "era", "ensemble"} <= set(mentions) or piece.composer is None
  rng = np.random.default_rng(1)
  for _ in range(30):
    text = captions.caption(piece, rng)
    assert_mentions_everything(piece, text)
    assert str(round(piece.tempo_bpm)) in text
  aspects = captions.aspect_list(piece)
  assert piece.ensemble in aspects and piece.era.lower() in aspects


def test_english_helpers():
  assert captions.english_list(["x"]) == "x"
  assert captions.english_list(["x", "y", "z"]) == "x, y and z"
  assert [captions.article(w) for w in ("upbeat", "808 kit", "18", "jazz", "one", "11")] == [
      "an", "an", "an", "a", "a", "an"]
