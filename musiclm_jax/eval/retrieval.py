"""MuLan evaluation: cross-modal retrieval, zero-shot tagging, cycle consistency.

All functions take L2-normalised embeddings (numpy or jax, `[N, D]`), so
they work for any embedding model; `evaluate_mulan` runs them on a labelled
split (text -> audio and audio -> text recall@1/5/10 and median rank among
all clips of the split, and zero-shot accuracy of genre, tempo class and lead
instrument from text prompts built from the label vocabulary of
`musiclm_jax.music`).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from musiclm_jax.music import captions as captions_lib
from musiclm_jax.music import composer

RECALL_AT = (1, 5, 10)
# Tempo classes by tapped bpm: [low, high).
TEMPO_CLASSES = {"slow": (0.0, 90.0), "medium": (90.0, 120.0), "fast": (120.0, 1000.0)}
# bpm values whose prompts describe a tempo class ('... at 96 bpm').
_TEMPO_PROMPT_BPM = {"slow": range(60, 90, 5), "medium": range(90, 120, 5),
                     "fast": range(120, 180, 8)}
_GENRE_TEMPLATES = ("{a} {genre} piece.", "This is {a} {genre} track.", "{a} {genre} tune.")
_INSTRUMENT_TEMPLATES = ("A piece featuring {a} {phrase}.", "Music with {a} {phrase}.")

EmbedText = Callable[[Sequence[str]], np.ndarray]


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mulan_cycle_consistency(text_emb: np.ndarray, audio_emb: np.ndarray) -> np.ndarray:
  """Cosine of paired rows: how well audio `[B, D]` matches its text `[B, D]`.

  Generation evaluation uses it as MuLan cycle consistency (the text prompt
  against the generated audio). Returns float32 `[B]` in [-1, 1].
  """
  text_emb, audio_emb = np.asarray(text_emb), np.asarray(audio_emb)
  if text_emb.shape != audio_emb.shape:
    raise ValueError(f"text embeddings {text_emb.shape} and audio embeddings "
                     f"{audio_emb.shape} must pair row by row")
  return np.sum(_normalize(text_emb) * _normalize(audio_emb), axis=-1)


def paired_ranks(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """1-based rank of candidate i among all candidates for query i (by cosine).

  Ties count against the query (a tie with the paired candidate ranks it
  behind the other), so a constant embedding cannot look good.

  Args:
    queries, candidates: `[N, D]`, row i of each a pair.
  Returns:
    int `[N]`.
  """
  similarity = _normalize(queries) @ _normalize(candidates).T
  paired = np.diag(similarity)
  return np.sum(similarity >= paired[:, None], axis=1)


def retrieval_metrics(text_emb: np.ndarray, audio_emb: np.ndarray) -> dict[str, float]:
  """Recall@1/5/10 and median rank, text -> audio and audio -> text.

  Row i of `text_emb` and `audio_emb` (`[N, D]`) describe the same clip; the
  candidates are all N clips (or texts).
  """
  metrics = {"num_candidates": float(len(text_emb))}
  for name, ranks in (("text_to_audio", paired_ranks(text_emb, audio_emb)),
                      ("audio_to_text", paired_ranks(audio_emb, text_emb))):
    for k in RECALL_AT:
      metrics[f"{name}_recall@{k}"] = float(np.mean(ranks <= k))
    metrics[f"{name}_median_rank"] = float(np.median(ranks))
  return metrics


# ---------------------------------------------------------------- zero-shot tagging


def tempo_class(bpm: float) -> str:
  """'slow', 'medium' or 'fast' (see `TEMPO_CLASSES`); '' for an unknown tempo (0)."""
  if bpm <= 0:
    return ""
  return next(name for name, (low, high) in TEMPO_CLASSES.items() if low <= bpm < high)


def genre_prompts() -> dict[str, list[str]]:
  """Prompts per genre of the built-in composer, using the captions' synonyms."""
  prompts = {}
  for genre in composer.GENRES:
    names = captions_lib.GENRE_SYNONYMS.get(genre, (genre,))
    prompts[genre] = [t.format(a=captions_lib.article(n), genre=n).capitalize()
                      for n in names for t in _GENRE_TEMPLATES]
  return prompts


def tempo_prompts() -> dict[str, list[str]]:
  """Prompts per tempo class: the bpm phrases captions use, across the class' range."""
  return {name: [f"A {name} piece at {bpm} bpm." for bpm in _TEMPO_PROMPT_BPM[name]]
          for name in TEMPO_CLASSES}


def lead_instrument_prompts() -> dict[str, list[str]]:
  """Prompts per lead instrument (General MIDI name) from the composer's lead phrases."""
  phrases: dict[str, set[str]] = {}
  for genre in composer.GENRE_TABLE:
    for voice in genre.lead:
      phrases.setdefault(voice.instrument, set()).add(voice.phrase)
  return {instrument: [t.format(a=captions_lib.article(p), phrase=p)
                       for p in sorted(names) for t in _INSTRUMENT_TEMPLATES]
          for instrument, names in sorted(phrases.items())}


def class_embeddings(embed_text: EmbedText, prompts: Mapping[str, Sequence[str]]
                     ) -> tuple[list[str], np.ndarray]:
  """Class names and `[classes, D]` embeddings: each the normalised mean of its prompts'."""
  names = list(prompts)
  if not names or any(not prompts[n] for n in names):
    raise ValueError("every class needs at least one prompt")
  flat = [p for n in names for p in prompts[n]]
  emb = _normalize(embed_text(flat))
  out, start = [], 0
  for n in names:
    out.append(np.mean(emb[start:start + len(prompts[n])], axis=0))
    start += len(prompts[n])
  return names, _normalize(np.stack(out))


def nearest_classes(audio_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
  """int `[N]`: for each clip `[N, D]` the class `[classes, D]` of highest cosine."""
  return np.argmax(_normalize(audio_emb) @ class_emb.T, axis=1)


def zero_shot_accuracy(audio_emb: np.ndarray, class_names: Sequence[str],
                       class_emb: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
  """Accuracy of `argmax_c cos(audio, class c)` on the clips whose label is a class.

  Returns:
    `accuracy`, `num_clips` (labelled clips scored), `num_classes` and
    `chance` (the majority class' share, the best constant guess).
  """
  index = {name: i for i, name in enumerate(class_names)}
  scored = np.array([label in index for label in labels])
  if not scored.any():
    return {"accuracy": float("nan"), "num_clips": 0.0, "num_classes": float(len(class_names)),
            "chance": float("nan")}
  targets = np.array([index[label] for label in labels if label in index])
  predictions = nearest_classes(np.asarray(audio_emb)[scored], class_emb)
  return {"accuracy": float(np.mean(predictions == targets)), "num_clips": float(len(targets)),
          "num_classes": float(len(class_names)),
          "chance": float(np.max(np.bincount(targets)) / len(targets))}


def evaluate_mulan(embed_text: EmbedText, audio_emb: np.ndarray, captions: Sequence[str],
                   genres: Sequence[str], tempos_bpm: Sequence[float],
                   lead_instruments: Sequence[str]) -> dict[str, float]:
  """Retrieval of each clip's caption and zero-shot genre, tempo and lead tagging.

  Args:
    embed_text: texts -> `[n, D]` embeddings (e.g. `MulanTokenizer.text_embeddings`).
    audio_emb: `[N, D]` clip embeddings.
    captions, genres, tempos_bpm, lead_instruments: per clip (labels outside
      a task's class vocabulary are left out of that task).
  Returns:
    flat metrics: `retrieval_metrics` plus `<task>_accuracy`, `<task>_chance`
    and `<task>_num_clips` for `genre`, `tempo`, `lead_instrument`, and the
    mean caption cycle consistency.
  """
  text_emb = embed_text(list(captions))
  metrics = retrieval_metrics(text_emb, audio_emb)
  metrics["cycle_consistency"] = float(np.mean(mulan_cycle_consistency(text_emb, audio_emb)))
  tasks = {"genre": (genre_prompts(), list(genres)),
           "tempo": (tempo_prompts(), [tempo_class(b) for b in tempos_bpm]),
           "lead_instrument": (lead_instrument_prompts(), list(lead_instruments))}
  for task, (prompts, labels) in tasks.items():
    names, emb = class_embeddings(embed_text, prompts)
    for key, value in zero_shot_accuracy(audio_emb, names, emb, labels).items():
      if key != "num_classes":
        metrics[f"{task}_{key}"] = value
  return metrics
