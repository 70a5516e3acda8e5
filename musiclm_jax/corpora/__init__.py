"""Corpus sources (gm_synth, music21_gm, audio_folder, musiccaps) and the
resumable parallel build that turns them into clips. No TensorFlow here;
`musiclm_jax/tasks/corpora.py` writes the clips as TFDS datasets."""
