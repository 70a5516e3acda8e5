"""What `musiclm mulan fit_rvq`, `musiclm mulan embed` and `musiclm eval mulan` do.

    musiclm mulan fit_rvq --checkpoint=MODEL_DIR --corpus_dir=DIR [--num_clips=N]
        [--gin_bindings="fit_mulan_rvq.codebook_size=1024"]
    musiclm mulan embed --checkpoint=MODEL_DIR --text="a calm waltz" --audio=clip.wav
    musiclm eval mulan --checkpoint=MODEL_DIR --corpus_dir=DIR --num_clips=1000

These read corpora (TensorFlow) and so are kept out of the model modules.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from musiclm_jax import audio as audio_lib
from musiclm_jax.eval import retrieval
from musiclm_jax.tasks import mulan_task
from musiclm_jax.tokenizers import embedding_rvq
from musiclm_jax.tokenizers import mulan_tokens
from musiclm_jax.training import checkpoints


def embed_split(tokenizer: mulan_tokens.MulanTokenizer, corpus_dir: str, split: str,
                max_clips: int | None = None) -> tuple[np.ndarray, dict[str, list[Any]]]:
  """Clip embeddings `[clips, D]` of a corpus split and the clips' labels (lists)."""
  embeddings, labels = [], {}
  for batch in mulan_task.labelled_clip_batches(corpus_dir, split, tokenizer.batch_size,
                                                max_clips, tokenizer.config.sample_rate):
    embeddings.append(tokenizer.audio_embeddings(batch["audio"], tokenizer.config.sample_rate,
                                                 batch["lengths"]))
    for key in ("caption", "genre", "tempo_bpm", "lead_instrument", "clip_id"):
      labels.setdefault(key, []).extend(batch[key])
  if not embeddings:
    raise ValueError(f"{corpus_dir} split {split!r} has no clips")
  return np.concatenate(embeddings), labels


def fit_rvq(model_dir: str, corpus_dir: str, max_clips: int | None = None) -> dict[str, Any]:
  """Fits the RVQ (sizes from gin `fit_mulan_rvq`) on the train clips' embeddings and
  saves it to `MODEL_DIR/mulan_rvq.npz`; returns the report."""
  tokenizer = mulan_tokens.MulanTokenizer.load(model_dir, with_rvq=False)
  embeddings, _ = embed_split(tokenizer, corpus_dir, "train", max_clips)
  return embedding_rvq.fit_and_save(mulan_tokens.RVQ_FILES, model_dir, embeddings,
                                    mulan_tokens.fit_mulan_rvq,
                                    {"corpus_dir": corpus_dir,
                                     checkpoints.FITTED_STEP: tokenizer.checkpoint_step})


def embed(model_dir: str, texts: Sequence[str], audio_paths: Sequence[str]
          ) -> list[dict[str, Any]]:
  """One row per text and per audio file: its embedding and, when the RVQ is
  fitted, its MuLan tokens (`M_T` for text, `M_A` for audio)."""
  if not texts and not audio_paths:
    raise ValueError("give at least one --text or --audio")
  # With the RVQ, the checkpoint step it was fitted on (`MulanTokenizer.load`).
  with_rvq = os.path.isfile(os.path.join(model_dir, mulan_tokens.RVQ_FILE))
  if not with_rvq:
    print(f"no {mulan_tokens.RVQ_FILE} in {model_dir}: embeddings only", flush=True)
  tokenizer = mulan_tokens.MulanTokenizer.load(model_dir, with_rvq=with_rvq)
  rows = []
  if texts:
    rows += [{"text": t, "embedding": e} for t, e in zip(texts, tokenizer.text_embeddings(texts))]
  for path in audio_paths:
    wav, _ = audio_lib.load(path, sample_rate=tokenizer.config.sample_rate)
    rows.append({"audio": path, "seconds": len(wav) / tokenizer.config.sample_rate,
                 "embedding": tokenizer.audio_embeddings(wav, tokenizer.config.sample_rate)[0]})
  for row in rows:
    if tokenizer.codebooks is not None:
      row["mulan_tokens"] = tokenizer.tokens(row["embedding"][None])[0].tolist()
    row["embedding"] = [round(float(x), 6) for x in row["embedding"]]
  return rows


def evaluate(model_dir: str, corpus_dir: str, split: str = "test",
             max_clips: int | None = 1000) -> dict[str, float]:
  """Retrieval and zero-shot tagging metrics (`retrieval.evaluate_mulan`) on a split."""
  tokenizer = mulan_tokens.MulanTokenizer.load(model_dir, with_rvq=False)
  audio_emb, labels = embed_split(tokenizer, corpus_dir, split, max_clips)
  return retrieval.evaluate_mulan(tokenizer.text_embeddings, audio_emb, labels["caption"],
                                  labels["genre"], labels["tempo_bpm"],
                                  labels["lead_instrument"])
