"""Corpus name -> source class, for `musiclm prepare CORPUS`."""
from musiclm_jax.corpora import audio_folder
from musiclm_jax.corpora import gm_synth
from musiclm_jax.corpora import music21_gm
from musiclm_jax.corpora import musiccaps

SOURCES = {
    "gm_synth": gm_synth.GmSynthSource,
    "music21_gm": music21_gm.Music21GmSource,
    "audio_folder": audio_folder.AudioFolderSource,
    "musiccaps": musiccaps.MusicCapsSource,
}
