"""What `musiclm melody {prepare|fit_rvq}` and `musiclm eval melody` do.

    musiclm melody prepare --data_dir=data/melodies --num_melodies=1000 --renditions=8 \
        --seconds=10 --soundfont=fluidr3 --workers=8
    musiclm train --gin_file=gin/tokenizers/melody_tiny.gin \
        --gin_bindings="MODEL_DIR='runs/melody'" --gin_bindings="DATA_DIR='data/melodies'"
    musiclm melody fit_rvq --checkpoint=runs/melody --data_dir=data/melodies
    musiclm eval melody --checkpoint=runs/melody --data_dir=data/melodies     # retrieval
    musiclm eval melody --bundle=BUNDLE --data_dir=data/melodies --prompt="a jazz trio"
"""
from __future__ import annotations

import collections
from typing import Any, Optional

import numpy as np

from musiclm_jax import audio
from musiclm_jax.corpora import melody_pairs
from musiclm_jax.eval import melody as melody_eval
from musiclm_jax.tokenizers import melody


def prepare(out_dir: str, num_melodies: int, renditions: int, seconds: float, seed: int,
            soundfont: Optional[str], workers: int) -> dict[str, Any]:
  """Builds a `melody_renditions` corpus (`melody_pairs.build_melody_renditions`);
  returns its clip counts per split and the build time."""
  manifest = melody_pairs.build_melody_renditions(
      out_dir, num_melodies=num_melodies, renditions_per_melody=renditions, seconds=seconds,
      seed=seed, soundfont=soundfont or None, workers=max(workers, 1))
  return {"data_dir": out_dir, "clips": {s: v["clips"] for s, v in manifest["splits"].items()},
          "seconds_elapsed": manifest["seconds_elapsed"]}


def fit_rvq(model_dir: str, data_dir: str, max_clips: Optional[int] = None) -> dict[str, Any]:
  """`melody.fit_rvq`: the melody RVQ (sizes from gin `fit_melody_rvq`) on the train
  clips' window embeddings, saved to `MODEL_DIR/melody_rvq.npz`."""
  return melody.fit_rvq(model_dir, data_dir, max_clips)


def evaluate_retrieval(model_dir: str, data_dir: str, split: str = "test",
                       max_melodies: int = 100) -> dict[str, Any]:
  """Rendition retrieval among up to `max_melodies` melodies of a split, and beside
  it `chroma_accuracy`, the same retrieval by key-invariant chroma correlation
  (no model)."""
  tokenizer = melody.MelodyTokenizer.load(model_dir, with_rvq=False)
  data = melody_pairs.load_split(data_dir, split)
  rate = melody_pairs.read_manifest(data_dir)["sample_rate"]
  report = melody_eval.evaluate_retrieval(tokenizer, data["audio"], rate, data["melody_id"],
                                          max_melodies)
  return dict(report, split=split)


def evaluate_generation(generator: Any, data_dir: str, prompt: str, seconds: float,
                        split: str = "test", num_melodies: int = 8, seed: int = 0
                        ) -> dict[str, Any]:
  """Contour similarity of generated audio to the first usable rendition of each of
  up to `num_melodies` melodies of a split, with the melody and without it.

  A rendition that `melody.check_melody_recording` refuses (silent, too short,
  unpitched) is skipped and counted by reason in `skipped_renditions`; the
  melody's next rendition stands in for it.
  """
  tokenizer = generator.melody_tokenizer()
  data = melody_pairs.load_split(data_dir, split)
  rate = melody_pairs.read_manifest(data_dir)["sample_rate"]
  melodies, skipped = {}, collections.Counter()
  for i in np.lexsort((data["rendition"], data["melody_id"])):
    melody_id = int(data["melody_id"][i])
    if melody_id in melodies:
      continue
    if len(melodies) == num_melodies:
      break
    wav = audio.resample(data["audio"][i], rate, tokenizer.config.sample_rate)
    try:
      melodies[melody_id] = melody.check_melody_recording(tokenizer.config, wav)
    except audio.AudioError as e:
      skipped[e.reason] += 1
  if not melodies:
    raise ValueError(f"no usable rendition in split {split!r} of {data_dir} "
                     f"(skipped: {dict(skipped)})")
  report = melody_eval.evaluate_generation(generator, list(melodies.values()), prompt, seconds,
                                           seed)
  return dict(report, split=split, skipped_renditions=dict(skipped))
