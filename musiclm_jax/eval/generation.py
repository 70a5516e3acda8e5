"""Generation evaluation (`musiclm eval generation`): adherence to held-out prompts.

For the first N prompts of a corpus' `test_prompts.jsonl` the bundle
generates a clip; the same measures run on the real test clip of each
prompt (the reference a perfect model would match):

  cycle_consistency     cosine of the MuLan text embedding of the prompt and
                        the MuLan audio embedding of the clip (mean)
  text_to_audio_recall@1  the prompt finds its own clip among the N (MuLan)
  genre_accuracy        zero-shot MuLan genre tag == the prompt's genre
  tempo_accuracy        librosa's tempo within 8 % of the prompt's (or of
                        half / double it: `tempo_accuracy_octave`)
  key_accuracy          Krumhansl-Schmuckler key of the mean chroma == the
                        prompt's key (major / minor prompts only)
  frechet_distance      between the generated and the reference clips'
                        MuLan audio embeddings (a Fréchet audio distance in
                        MuLan space; 0 for identical distributions)
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import librosa
import numpy as np
import scipy.linalg

from musiclm_jax import audio
from musiclm_jax.eval import retrieval

# Krumhansl-Kessler key profiles, C first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
PITCH_CLASSES = {"C": 0, "C-sharp": 1, "D-flat": 1, "D": 2, "D-sharp": 3, "E-flat": 3, "E": 4,
                 "F": 5, "F-sharp": 6, "G-flat": 6, "G": 7, "G-sharp": 8, "A-flat": 8, "A": 9,
                 "A-sharp": 10, "B-flat": 10, "B": 11}
PITCH_NAMES = ("C", "D-flat", "D", "E-flat", "E", "F", "F-sharp", "G", "A-flat", "A", "B-flat",
               "B")
TEMPO_TOLERANCE = 0.08


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance of Gaussians fitted to `a [N, D]` and `b [M, D]` (N, M >= 2)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 2 or len(b) < 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"need two sets of >= 2 embeddings of one size; got {a.shape}, {b.shape}")
  mean_a, mean_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = np.real(scipy.linalg.sqrtm(cov_a @ cov_b))
  return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def estimate_tempo(wav: np.ndarray, sample_rate: int = audio.SAMPLE_RATE) -> float:
  """Beats per minute by librosa's beat tracker."""
  tempo, _ = librosa.beat.beat_track(y=np.asarray(wav, np.float32), sr=sample_rate)
  return float(np.atleast_1d(tempo)[0])


def tempo_matches(estimated: float, labelled: float, octave: bool = False) -> bool:
  candidates = (labelled, labelled / 2, labelled * 2) if octave else (labelled,)
  return any(abs(estimated - c) <= TEMPO_TOLERANCE * c for c in candidates)


def estimate_key(wav: np.ndarray, sample_rate: int = audio.SAMPLE_RATE) -> tuple[int, str]:
  """(tonic pitch class 0..11, "major" or "minor") of the clip's mean chroma."""
  chroma = librosa.feature.chroma_cqt(y=np.asarray(wav, np.float32), sr=sample_rate).mean(axis=1)
  best, key = -np.inf, (0, "major")
  for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
    for tonic in range(12):
      score = np.corrcoef(chroma, np.roll(profile, tonic))[0, 1]
      if score > best:
        best, key = score, (tonic, mode)
  return key


def read_prompts(corpus_dir: str, num_clips: int) -> list[dict[str, Any]]:
  path = os.path.join(corpus_dir, "test_prompts.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{corpus_dir} has no test_prompts.jsonl; build it with "
                            "`musiclm prepare`")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if len(rows) < 2:
    raise ValueError(f"{path} has {len(rows)} prompts; the evaluation needs at least 2")
  return rows[:num_clips]


def key_name(tonic: int, mode: str) -> str:
  """'E-flat minor' for (3, 'minor'), in the spelling captions use."""
  return f"{PITCH_NAMES[tonic]} {mode}"


def measure(clips: np.ndarray, prompts: Sequence[dict[str, Any]], mulan,
            genres: tuple[list[str], np.ndarray]) -> dict[str, Any]:
  """The measures of the module docstring for clips `[N, samples]` (24 kHz) and their prompts.

  `genres` is `retrieval.class_embeddings(...)` of the genre prompts. Besides
  the means, `per_clip` holds what was measured in each clip (tempo, key,
  nearest MuLan genre, cycle consistency) for reports.
  """
  texts = [p["prompt"] for p in prompts]
  text_emb = mulan.text_embeddings(texts)
  audio_emb = mulan.audio_embeddings(clips, audio.SAMPLE_RATE)
  ranks = retrieval.paired_ranks(text_emb, audio_emb)
  cycle = retrieval.mulan_cycle_consistency(text_emb, audio_emb)
  genre_names, genre_emb = genres
  labels = [p["attributes"].get("genre", "") for p in prompts]
  genre = retrieval.zero_shot_accuracy(audio_emb, genre_names, genre_emb, labels)
  nearest_genre = retrieval.nearest_classes(audio_emb, genre_emb)
  tempo_hits, octave_hits, key_hits, per_clip = [], [], [], []
  for i, (wav, p) in enumerate(zip(clips, prompts)):
    attributes = p["attributes"]
    tempo = estimate_tempo(wav)
    key = estimate_key(wav)
    per_clip.append({"tempo_bpm": round(tempo, 1), "key": key_name(*key),
                     "genre": genre_names[nearest_genre[i]],
                     "cycle_consistency": round(float(cycle[i]), 4)})
    if attributes.get("tempo_bpm", 0) > 0:
      tempo_hits.append(tempo_matches(tempo, attributes["tempo_bpm"]))
      octave_hits.append(tempo_matches(tempo, attributes["tempo_bpm"], octave=True))
    if attributes.get("mode") in ("major", "minor") and attributes.get("key") in PITCH_CLASSES:
      key_hits.append(key == (PITCH_CLASSES[attributes["key"]], attributes["mode"]))

  def mean(values):
    return float(np.mean(values)) if values else float("nan")
  return {"cycle_consistency": float(np.mean(cycle)),
          "text_to_audio_recall@1": float(np.mean(ranks <= 1)),
          "genre_accuracy": genre["accuracy"], "tempo_accuracy": mean(tempo_hits),
          "tempo_accuracy_octave": mean(octave_hits), "key_accuracy": mean(key_hits),
          "num_tempo_labels": len(tempo_hits), "num_key_labels": len(key_hits),
          "per_clip": per_clip, "audio_embeddings": audio_emb}


def reference_clips(corpus_dir: str, prompts: Sequence[dict[str, Any]],
                    num_samples: int) -> np.ndarray:
  """The real test clips `[N, num_samples]` of the prompts (24 kHz)."""
  from musiclm_jax.tasks import corpora  # pylint: disable=g-import-not-at-top
  real = {ex["clip_id"].decode(): ex["audio"]
          for ex in corpora.load(corpus_dir, "test").as_numpy_iterator()}
  missing = [p["clip_id"] for p in prompts if p["clip_id"] not in real]
  if missing:
    raise ValueError(f"test clips {missing[:3]} of test_prompts.jsonl are not in the corpus")
  return np.stack([real[p["clip_id"]][:num_samples] for p in prompts])


def evaluate_clips(generated: np.ndarray, reference: np.ndarray,
                   prompts: Sequence[dict[str, Any]], mulan) -> dict[str, Any]:
  """Measures generated clips `[N, samples]` beside the real ones of their prompts."""
  genres = retrieval.class_embeddings(mulan.text_embeddings, retrieval.genre_prompts())
  measured = measure(generated, prompts, mulan, genres)
  measured_reference = measure(reference, prompts, mulan, genres)
  fd = frechet_distance(measured.pop("audio_embeddings"),
                        measured_reference.pop("audio_embeddings"))
  return {"num_clips": len(prompts), "seconds": generated.shape[1] / audio.SAMPLE_RATE,
          "generated": measured, "reference": measured_reference, "frechet_distance": fd}


def evaluate_generation(generator, corpus_dir: str, num_clips: int, seconds: float,
                        seed: int = 0) -> dict[str, Any]:
  """Generates one clip per held-out prompt and measures it beside the real clips."""
  prompts = read_prompts(corpus_dir, num_clips)
  reference = reference_clips(corpus_dir, prompts, int(round(seconds * audio.SAMPLE_RATE)))
  result = generator.generate([[(p["prompt"], seconds)] for p in prompts],
                              [seed + i for i in range(len(prompts))])
  report = evaluate_clips(result.audio, reference, prompts, generator.bundle.tokenizers.mulan)
  report["generation_seconds"] = result.seconds
  return report


def format_report(report: dict[str, Any]) -> str:
  keys = [k for k in report["generated"] if not k.startswith("num_") and k != "per_clip"]
  lines = [f"generation: {report['num_clips']} prompts x {report['seconds']} s; MuLan "
           f"Fréchet distance to the real clips {report['frechet_distance']:.4f}",
           f"{'measure':<26}{'generated':>12}{'real clips':>12}"]
  lines += [f"{k:<26}{report['generated'][k]:>12.3f}{report['reference'][k]:>12.3f}"
            for k in keys]
  return "\n".join(lines)

