"""`gm_synth`: procedurally composed multi-track pieces with known attributes,
rendered with FluidSynth and a General MIDI SoundFont."""
from __future__ import annotations

import dataclasses
from typing import Optional

import gin
import numpy as np

from musiclm_jax.corpora import base
from musiclm_jax.corpora import rendered
from musiclm_jax.music import composer
from musiclm_jax.music import render
from musiclm_jax.music.piece import Piece


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GmSynthSource(base.Source):
  """One piece per clip; genres take turns so that every build is balanced.

  soundfont: 'fluidr3' (FluidR3_GM, the default), 'timgm6mb' (small, for
    tests) or a path to a .sf2 file.
  genres: the genre templates to use (default: all of `composer.GENRES`).
  """
  soundfont: str = "fluidr3"
  genres: Optional[tuple[str, ...]] = None
  name = "gm_synth"

  def check(self, spec: base.BuildSpec) -> None:
    if spec.num_examples <= 0:
      raise ValueError("gm_synth composes new pieces: pass --num_examples > 0")
    unknown = set(self.genres or ()) - set(composer.GENRES)
    if unknown:
      raise ValueError(f"unknown gm_synth genres {sorted(unknown)}; known: {composer.GENRES}")
    render.fluidsynth_binary()
    render.find_soundfont(self.soundfont)

  def items(self, spec: base.BuildSpec) -> list[base.Item]:
    genres = list(self.genres or composer.GENRES)
    order = np.random.default_rng([spec.seed, 0]).permutation(len(genres))
    return [base.Item(key=f"gm_synth/seed{spec.seed}/{i:07d}",
                      source_id=f"gm_synth:seed{spec.seed}:{i}",
                      payload=(i, genres[order[i % len(genres)]]))
            for i in range(spec.num_examples)]

  def piece(self, item: base.Item, spec: base.BuildSpec) -> tuple[Piece, np.random.Generator]:
    """The item's piece, and the generator in the state its caption draws from."""
    index, genre = item.payload
    rng = np.random.default_rng([spec.seed, 1, index])
    return composer.compose(rng, spec.seconds, item.source_id, genre=genre), rng

  def clips(self, item: base.Item, spec: base.BuildSpec) -> list[base.Clip]:
    piece, rng = self.piece(item, spec)
    return [rendered.render_clip(piece, item.key, spec, self.soundfont, rng)]
