"""Tests of the music21 corpus arrangements (`musiclm_jax.music.repertoire`)."""
import io
import re
import time
import warnings

import music21
import numpy as np
import pretty_midi
import pytest

from musiclm_jax.music import piece as piece_lib
from musiclm_jax.music import repertoire

# One quick work per collection.
SAMPLES = {
    "bach_chorales": "music21:bach/bwv66.6.mxl",
    "palestrina": "music21:palestrina/Agnus_01.krn",
    "monteverdi": "music21:monteverdi/madrigal.3.1.mxl",
    "oneills_1850": "music21:oneills1850/0001-0050.abc#7",
    "ryans_mammoth": "music21:ryansMammoth/AcaciaReel.abc",
    "airds_airs": "music21:airdsAirs/book1.abc#3",
    "essen_folksongs": "music21:essenFolksong/altdeu10.abc#1",
    "beethoven": "music21:beethoven/opus18no1/movement2.mxl",
    "mozart": "music21:mozart/k155/movement2.mxl",
    "haydn": "music21:haydn/opus1no1/movement2.mxl",
}
MAX_SECONDS = 12.0
KEY_PATTERN = re.compile(r"^[A-G](-(sharp|flat|double-sharp|double-flat))?$")
MODES = ("major", "minor", "ionian", "dorian", "phrygian", "lydian", "mixolydian", "aeolian")
ERAS = ("Renaissance", "Baroque", "Classical", "Romantic", "traditional")


@pytest.fixture(autouse=True)
def quiet_music21():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


@pytest.fixture(scope="module")
def works():
  return {w.source_id: w for w in repertoire.list_works()}


@pytest.fixture(scope="module")
def arranged(works):
  """source id -> Piece, arranged once for the module."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return {sid: repertoire.arrange(works[sid], np.random.default_rng(0), MAX_SECONDS)
            for sid in SAMPLES.values()}


def midi_bytes(midi: pretty_midi.PrettyMIDI) -> bytes:
  buffer = io.BytesIO()
  midi.write(buffer)
  return buffer.getvalue()


def test_list_works_is_deterministic_and_complete():
  first = repertoire.list_works()
  repertoire._works.cache_clear()  # pylint: disable=protected-access
  second = repertoire.list_works()
  assert first == second
  assert first == sorted(first, key=lambda w: (w.collection, w.path, w.number or 0))
  assert {w.collection for w in first} == set(repertoire.COLLECTIONS)
  assert len({w.source_id for w in first}) == len(first)
  assert all(not w.path.startswith("/") for w in first)
  only_bach = repertoire.list_works(("bach_chorales",))
  assert only_bach and all(w.collection == "bach_chorales" for w in only_bach)
  with pytest.raises(ValueError, match="unknown"):
    repertoire.list_works(("no_such_collection",))


def test_source_ids_name_files_and_tunes(works):
  assert set(SAMPLES.values()) <= set(works)
  tune = works["music21:oneills1850/0001-0050.abc#7"]
  assert (tune.path, tune.number) == ("oneills1850/0001-0050.abc", 7)
  assert works["music21:bach/bwv66.6.mxl"].number is None


@pytest.mark.parametrize("collection", repertoire.COLLECTIONS)
def test_arranged_labels_and_parts(arranged, collection):
  piece = arranged[SAMPLES[collection]]
  assert piece.source_id == SAMPLES[collection]
  assert 20.0 <= piece.tempo_bpm <= 260.0
  assert KEY_PATTERN.match(piece.key), piece.key
  assert piece.mode in MODES
  assert re.match(r"^\d+/\d+$", piece.time_signature)
  assert piece.era in ERAS and piece.genre and piece.mood and piece.ensemble
  assert piece.ensemble in repertoire.ENSEMBLES
  assert (piece.composer is None) == (piece.era == "traditional")
  assert piece.parts and piece.parts[0].role in ("lead", "chords")
  programs = {pretty_midi.instrument_name_to_program(p.instrument) for p in piece.parts}
  assert {i.program for i in piece.midi.instruments} == programs
  assert not any(i.is_drum for i in piece.midi.instruments)
  assert all(p.role in piece_lib.ROLES for p in piece.parts)


@pytest.mark.parametrize("collection", repertoire.COLLECTIONS)
def test_arranged_notes_start_at_zero_and_stop_in_time(arranged, collection):
  midi = arranged[SAMPLES[collection]].midi
  notes = [n for i in midi.instruments for n in i.notes]
  assert notes
  assert min(n.start for n in notes) < 0.05
  assert max(n.end for n in notes) <= MAX_SECONDS + 1e-6
  assert all(1 <= n.velocity <= 127 and n.end > n.start for n in notes)


def test_midi_lasts_as_long_as_the_piece_or_max_seconds(works):
  work = works["music21:oneills1850/0001-0050.abc#7"]
  whole = repertoire.arrange(work, np.random.default_rng(3), max_seconds=1000.0)
  quarters = music21.converter.parse(
      f"{music21.common.getCorpusFilePath()}/{work.path}", number=7).expandRepeats().highestTime
  qpm = whole.tempo_bpm * repertoire.beat_quarters(*map(int, whole.time_signature.split("/")))
  assert whole.midi.get_end_time() == pytest.approx(quarters * 60.0 / qpm, abs=60.0 / qpm)
  cut = repertoire.arrange(work, np.random.default_rng(3), max_seconds=5.0)
  assert 5.0 - 60.0 / qpm <= cut.midi.get_end_time() <= 5.0
  assert cut.tempo_bpm == whole.tempo_bpm


@pytest.mark.parametrize("source_id", [SAMPLES["bach_chorales"], SAMPLES["oneills_1850"]])
def test_same_seed_same_midi(works, source_id):
  first, second, other = (repertoire.arrange(works[source_id], np.random.default_rng(seed), 8.0)
                          for seed in (5, 5, 6))
  assert midi_bytes(first.midi) == midi_bytes(second.midi)
  assert first == dataclass_without_midi(second, first.midi)
  assert midi_bytes(first.midi) != midi_bytes(other.midi)


def dataclass_without_midi(piece, midi):
  """`piece` with `midi` swapped in, to compare the labels of two pieces."""
  return piece_lib.Piece(**{**piece.__dict__, "midi": midi})


def test_chorale_key_agrees_with_music21_analysis(arranged):
  piece = arranged[SAMPLES["bach_chorales"]]
  analysed = music21.corpus.parse("bach/bwv66.6").analyze("key")
  assert (analysed.tonic.name, analysed.mode) == ("F#", "minor")
  assert (piece.key, piece.mode) == ("F-sharp", "minor")
  assert piece.composer == "Johann Sebastian Bach" and piece.era == "Baroque"
  assert piece.genre == "baroque chorale" and piece.time_signature == "4/4"


def test_multi_tune_abc_parses_only_its_tune(works):
  start = time.perf_counter()
  piece = repertoire.arrange(works[SAMPLES["essen_folksongs"]], np.random.default_rng(0), 10.0)
  assert time.perf_counter() - start < 2.0  # the whole 313-tune file takes ~6 s.
  assert piece.title == "Das Hildebrandslied"
  assert len(piece.parts) == 1 and piece.parts[0].role == "lead"


def test_fiddle_tune_genre_and_modal_labels(arranged):
  reel = arranged[SAMPLES["ryans_mammoth"]]
  assert reel.genre == "american fiddle reel" and reel.era == "traditional"
  assert reel.title == "Acacia Reel" and reel.composer is None
  mass = arranged[SAMPLES["palestrina"]]
  assert mass.mode in MODES[2:] and mass.genre == "renaissance mass"


def test_unparsable_work_raises_value_error():
  missing = repertoire.WorkRef("bach_chorales", "bach/no_such_chorale.mxl")
  with pytest.raises(ValueError, match="no_such_chorale"):
    repertoire.arrange(missing, np.random.default_rng(0), 10.0)
