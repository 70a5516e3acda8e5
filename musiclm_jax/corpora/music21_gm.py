"""`music21_gm`: works of the music21 corpus (Bach chorales, Palestrina,
O'Neill's and Ryan's fiddle tunes, Essen folk songs, Beethoven, Mozart,
Haydn, ...) arranged for chosen instruments and tempo, rendered with
FluidSynth."""
from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Optional

import gin
import numpy as np

from musiclm_jax.corpora import base
from musiclm_jax.corpora import rendered
from musiclm_jax.music import render
from musiclm_jax.music import repertoire


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Music21GmSource(base.Source):
  """One clip per work, from its beginning; collections take turns, each in a
  seeded order, so that small builds still span the repertoire.

  soundfont: as for gm_synth. collections: default all of
  `repertoire.COLLECTIONS`.
  """
  soundfont: str = "fluidr3"
  collections: Optional[tuple[str, ...]] = None
  name = "music21_gm"

  def check(self, spec: base.BuildSpec) -> None:
    unknown = set(self.collections or ()) - set(repertoire.COLLECTIONS)
    if unknown:
      raise ValueError(f"unknown music21 collections {sorted(unknown)}; "
                       f"known: {repertoire.COLLECTIONS}")
    render.fluidsynth_binary()
    render.find_soundfont(self.soundfont)

  def items(self, spec: base.BuildSpec) -> list[base.Item]:
    collections = list(self.collections or repertoire.COLLECTIONS)
    works = repertoire.list_works(collections)
    queues = []
    for i, name in enumerate(collections):
      mine = [w for w in works if w.collection == name]
      order = np.random.default_rng([spec.seed, 2, i]).permutation(len(mine))
      queues.append([mine[j] for j in order])
    interleaved = [w for group in itertools.zip_longest(*queues) for w in group if w]
    if spec.num_examples:
      interleaved = interleaved[:spec.num_examples]
    return [base.Item(key=work.source_id, source_id=work.source_id, payload=(work,))
            for work in interleaved]

  def clips(self, item: base.Item, spec: base.BuildSpec) -> list[base.Clip]:
    work, = item.payload
    rng = np.random.default_rng([spec.seed, 3, int(base.stable_hash(item.key)[:8], 16)])
    try:
      with warnings.catch_warnings():  # music21 warns about quirks of some scores
        warnings.simplefilter("ignore")
        piece = repertoire.arrange(work, rng, max_seconds=spec.seconds)
    except ValueError as e:
      raise base.SkipItem("unparsable", str(e)) from e
    return [rendered.render_clip(piece, item.key, spec, self.soundfont, rng)]
