"""What `musiclm semantic fit_kmeans`, `musiclm semantic tokens` and `musiclm eval semantic` do.

    musiclm semantic fit_kmeans --checkpoint=MODEL_DIR --corpus_dir=DIR \
        [--gin_bindings="fit_semantic_kmeans.num_clusters=1024"] \
        [--gin_bindings="corpus_batches.segment_seconds=10.0"]
    musiclm semantic tokens --checkpoint=MODEL_DIR IN_AUDIO [OUT.npy]
    musiclm eval semantic --checkpoint=MODEL_DIR --corpus_dir=DIR [--split=test \
        --num_clips=32 --output=report.json]

These read corpora (TensorFlow) and so are kept out of the model modules.
"""
from __future__ import annotations

import os
from typing import Any

import gin
import numpy as np

from musiclm_jax import audio as audio_lib
from musiclm_jax.eval import semantic as semantic_eval
from musiclm_jax.tasks import audio_clips
from musiclm_jax.tokenizers import semantic
from musiclm_jax.tokenizers import w2v_bert


@gin.configurable
def corpus_batches(corpus_dir: str, segment_seconds: float = 10.0, batch_size: int = 8,
                   seed: int = 0) -> tuple[Any, dict[str, Any]]:
  """16 kHz training-split batches to fit k-means on, and their JSON description
  (from which `batches_from_description` makes the same batches again)."""
  description = {"corpus_dir": os.path.abspath(corpus_dir), "split": "train",
                 "segment_seconds": segment_seconds, "batch_size": batch_size, "seed": seed}
  return batches_from_description(description), description


def batches_from_description(description: dict[str, Any]):
  task = audio_clips.AudioClipTask(description["corpus_dir"], sample_rate=w2v_bert.SAMPLE_RATE,
                                   segment_seconds=description["segment_seconds"],
                                   seed=description["seed"])
  return task.iterator(description["split"], description["batch_size"])


def fit_kmeans(model_dir: str, corpus_dir: str) -> dict[str, Any]:
  """Fits the semantic k-means (sizes from gin `fit_semantic_kmeans`) on the corpus'
  training clips and saves it to `MODEL_DIR/semantic_kmeans.npz`; returns its manifest."""
  batches, description = corpus_batches(corpus_dir)
  manifest = semantic.fit_semantic_kmeans(model_dir, batches, data=description)
  print(f"semantic k-means: {manifest['num_clusters']} clusters of MLM layer "
        f"{manifest['mlm_layer']} on {manifest['num_frames']} frames; perplexity "
        f"{manifest['perplexity']:.1f}, {manifest['used_clusters']} clusters used -> "
        f"{os.path.join(model_dir, semantic.KMEANS_FILE)}", flush=True)
  return manifest


def tokens(model_dir: str, in_path: str, out_path: str | None = None) -> dict[str, Any]:
  """Semantic tokens (25 Hz) of an audio file: `{"audio", "frame_rate", "tokens": [int]}`;
  also saved as int32 `[frames]` to `out_path` (`.npy`) when given."""
  tokenizer = semantic.SemanticTokenizer.load(model_dir)
  wav, _ = audio_lib.load(in_path, sample_rate=w2v_bert.SAMPLE_RATE)
  if w2v_bert.num_frames(len(wav)) < 1:
    raise ValueError(f"{in_path}: {len(wav) / w2v_bert.SAMPLE_RATE * 1000:.0f} ms of audio "
                     f"is shorter than one {1000 / w2v_bert.FRAME_RATE:.0f} ms token")
  result = np.asarray(tokenizer.semantic_tokens(wav[None]))[0]
  if out_path:
    np.save(out_path, result)
  return {"audio": in_path, "frame_rate": w2v_bert.FRAME_RATE, "tokens": result.tolist()}


def evaluate(model_dir: str, corpus_dir: str, split: str = "test",
             num_clips: int = 32) -> dict[str, Any]:
  """`semantic_eval.evaluate_semantic` on the scored clips of a corpus split; the
  baseline is fitted on the same frames as the semantic k-means when it was fitted
  by `fit_kmeans` (else on this corpus' training split, sampled the same way)."""
  tokenizer = semantic.SemanticTokenizer.load(model_dir)
  fitted = semantic.read_kmeans_manifest(model_dir)
  description = fitted.get("data") or {}
  same_frames = "corpus_dir" in description
  if not same_frames:
    _, description = corpus_batches(corpus_dir)
  clips, without_score = semantic_eval.read_labelled_clips(corpus_dir, split, num_clips)
  report = semantic_eval.evaluate_semantic(
      tokenizer, batches_from_description(description), clips, fitted["num_frames"],
      fitted["frames_per_clip"], fitted["seed"])
  report["baseline_fit"].update(data=description, same_frames_as_semantic=same_frames)
  report.update(corpus_dir=corpus_dir, split=split, clips_without_score=without_score,
                mlm_layer=fitted["mlm_layer"])
  return report
