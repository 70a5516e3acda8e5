"""Melody evaluation: rendition retrieval of the melody encoder, and how well
generated audio follows a melody.

    musiclm eval melody --checkpoint=MELODY_DIR --data_dir=DIR      # retrieval
    musiclm eval melody --bundle=BUNDLE --data_dir=DIR --prompt=... # generation

Retrieval (`retrieval_accuracy`): each test clip's embedding (its windows'
mean, re-normalised) looks for its nearest neighbour among the clips of up to
100 test melodies; it is right when that neighbour is a rendition of its own
melody. Chance is the share of the other candidates that are, and
`chroma_retrieval_accuracy` the same retrieval by the contour similarity
below, with no model: what a trained encoder should beat.

Generation (`contour_similarity`): a key-invariant pitch-contour similarity,
the largest over the 12 transpositions of the correlation of two chroma
sequences (power on the encoder's semitone grid, `melody.semitone_power`,
folded into 12 pitch classes), frame by frame over their common length.
`evaluate_generation` reports it for samples generated with the melody and,
beside it, for samples of the same prompts and seeds generated without it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from musiclm_jax import audio
from musiclm_jax.tokenizers import melody as melody_lib


def mean_embeddings(window_embeddings: np.ndarray) -> np.ndarray:
  """`[clips, windows, D]` -> L2-normalised window means `[clips, D]`."""
  mean = np.asarray(window_embeddings, np.float64).mean(axis=1)
  return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
          ).astype(np.float32)


def retrieval_accuracy(embeddings: np.ndarray, melody_ids: Sequence[int],
                       max_melodies: int = 100, seed: int = 0) -> dict[str, float]:
  """Nearest-neighbour retrieval of renditions of the same melody.

  Args:
    embeddings: L2-normalised `[clips, D]` clip embeddings.
    melody_ids: int `[clips]`.
    max_melodies: candidates are the clips of at most this many melodies
      (drawn with `seed` when there are more).
  Returns:
    `accuracy` (over clips whose melody has another clip among the
    candidates), `chance`, `num_queries`, `num_melodies`, `num_candidates`.
  """
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be [clips, D]; got shape {embeddings.shape}")
  return _nearest_neighbour_retrieval(embeddings @ embeddings.T, melody_ids, max_melodies,
                                      seed)


def chroma_retrieval_accuracy(config: melody_lib.MelodyConfig, clips: np.ndarray,
                              melody_ids: Sequence[int], max_melodies: int = 100,
                              seed: int = 0) -> dict[str, float]:
  """`retrieval_accuracy` without a model: the clips' similarity is the
  key-invariant chroma correlation of `contour_similarity`. A reference for
  what a trained encoder should beat.

  Args:
    clips: float32 `[clips, samples]` at `config.sample_rate`.
  """
  chromas = np.stack([chroma(config, wav) for wav in np.asarray(clips, np.float32)])
  similarity = _transposition_correlations(chromas, chromas).max(axis=-1)
  return _nearest_neighbour_retrieval(similarity, melody_ids, max_melodies, seed)


def _nearest_neighbour_retrieval(similarity: np.ndarray, melody_ids: Sequence[int],
                                 max_melodies: int, seed: int) -> dict[str, float]:
  """`retrieval_accuracy` of clips with pairwise `similarity [clips, clips]`."""
  ids = np.asarray(melody_ids)
  if similarity.shape != (len(ids), len(ids)):
    raise ValueError(f"{similarity.shape[0]} clips and {len(ids)} melody_ids do not pair")
  melodies = np.unique(ids)
  if len(melodies) > max_melodies:
    melodies = np.sort(np.random.default_rng(seed).choice(melodies, max_melodies,
                                                          replace=False))
  keep = np.isin(ids, melodies)
  similarity, ids = np.array(similarity[np.ix_(keep, keep)], np.float64), ids[keep]
  same = ids[:, None] == ids[None, :]
  np.fill_diagonal(same, False)
  queries = same.any(axis=1)
  if not queries.any():
    raise ValueError("no melody has two clips: retrieval needs several renditions per melody")
  np.fill_diagonal(similarity, -np.inf)
  nearest = np.argmax(similarity, axis=1)
  correct = ids[nearest] == ids
  return {"accuracy": float(np.mean(correct[queries])),
          "chance": float(np.mean(same.sum(axis=1)[queries] / (len(ids) - 1))),
          "num_queries": int(queries.sum()), "num_melodies": int(len(melodies)),
          "num_candidates": int(len(ids))}


def chroma(config: melody_lib.MelodyConfig, wav: np.ndarray) -> np.ndarray:
  """Chroma-like sequence of `wav [samples]` (at `config.sample_rate`).

  Returns:
    float32 `[frames, 12]`: per frame, the semitone-grid power (relative to the
    clip's peak) summed over octaves per pitch class, L2-normalised.
  """
  power = np.asarray(melody_lib.semitone_power(config, jnp.asarray(wav, jnp.float32)[None]))[0]
  power = np.maximum(power / max(float(power.max()), 1e-30),
                     np.exp(-melody_lib.DYNAMIC_RANGE))  # relative power, peak 1
  folded = np.asarray(melody_lib.fold_octaves(config, jnp.asarray(power)), np.float64)
  return (folded / np.maximum(np.linalg.norm(folded, axis=1, keepdims=True), 1e-12)
          ).astype(np.float32)


def contour_similarity(config: melody_lib.MelodyConfig, reference: np.ndarray,
                       other: np.ndarray) -> dict[str, float]:
  """Key-invariant pitch-contour similarity of two recordings (at `config.sample_rate`).

  Returns:
    `similarity`: the largest over transpositions t of the Pearson
    correlation of `chroma(reference)` and `chroma(other)` rolled by t pitch
    classes, over their common frames (1: the same contour in some key); and
    `transposition` (semitones, 0..11) where it is reached.
  """
  a, b = chroma(config, reference), chroma(config, other)
  n = min(len(a), len(b))
  scores = _transposition_correlations(a[None, :n], b[None, :n])[0, 0]
  best = int(np.argmax(scores))
  return {"similarity": float(scores[best]), "transposition": best}


def _transposition_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pearson correlations `[A, B, 12]` of chroma sequences `a [A, frames, 12]` with
  `b [B, frames, 12]` rolled by 0..11 pitch classes."""
  def unit_rows(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  rows = unit_rows(a)
  return np.stack([rows @ unit_rows(np.roll(b, shift, axis=2)).T for shift in range(12)],
                  axis=-1)


def evaluate_retrieval(tokenizer: melody_lib.MelodyTokenizer, clips: np.ndarray,
                       sample_rate: int, melody_ids: Sequence[int], max_melodies: int = 100,
                       seed: int = 0) -> dict[str, float]:
  """`retrieval_accuracy` of a trained encoder on clips `[N, samples]`, and
  `chroma_accuracy`: `chroma_retrieval_accuracy` over the same candidates."""
  rate = tokenizer.config.sample_rate
  clips = audio.resample(np.asarray(clips, np.float32), sample_rate, rate)
  report = retrieval_accuracy(mean_embeddings(tokenizer.embeddings(clips, rate)), melody_ids,
                              max_melodies, seed)
  reference = chroma_retrieval_accuracy(tokenizer.config, clips, melody_ids, max_melodies, seed)
  return dict(report, chroma_accuracy=reference["accuracy"])


def evaluate_generation(generator: Any, melodies: Sequence[np.ndarray], prompt: str,
                        seconds: float, seed: int = 0,
                        sample_rate: Optional[int] = None) -> dict[str, Any]:
  """Contour similarity of audio generated from each melody, with and without it.

  Args:
    generator: a `sampling.hierarchy.Generator` of a bundle with a melody model.
    melodies: recordings `[samples]` at `sample_rate` (default: the melody
      encoder's), each at least one melody window long.
    prompt, seconds: what to generate for every melody (seeds count up from `seed`).
  Returns:
    per side (`with_melody`, `without_melody`) the mean `similarity` and the
    per-melody values, and their difference.
  """
  config = generator.melody_tokenizer().config
  rate = sample_rate or config.sample_rate
  report: dict[str, Any] = {"num_melodies": len(melodies), "prompt": prompt,
                            "seconds": seconds}
  for side in ("with_melody", "without_melody"):
    scores = []
    for i, wav in enumerate(melodies):
      wav = audio.resample(np.asarray(wav, np.float32), rate, config.sample_rate)
      result = generator.generate([[(prompt, seconds)]], [seed + i],
                                  melody_audio=wav if side == "with_melody" else None,
                                  melody_sample_rate=config.sample_rate)
      generated = audio.resample(result.audio[0], audio.SAMPLE_RATE, config.sample_rate)
      scores.append(contour_similarity(config, wav, generated)["similarity"])
    report[side] = {"similarity": float(np.mean(scores)),
                    "per_melody": [round(s, 4) for s in scores]}
  report["difference"] = report["with_melody"]["similarity"] - report["without_melody"][
      "similarity"]
  return report
