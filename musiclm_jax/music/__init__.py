"""Symbolic music: pieces with known attributes, the procedural composer,
music21 arrangements, captions and FluidSynth rendering (no TensorFlow)."""
