"""MuLan conditioning tokens: an RVQ of the joint embedding.

`M_A` (from audio) and `M_T` (from text) are the codes of one residual
vector quantizer (12 levels x 1024 by default) fitted by k-means on the
training set's audio clip embeddings (`fit_mulan_rvq`). The codebooks are
saved next to the checkpoints as `MODEL_DIR/mulan_rvq.npz`, with a JSON
manifest (`mulan_rvq.json`: sizes, the checkpoint step, how many
embeddings, the reconstruction error per level).

`MulanTokenizer` loads a trained MuLan run and gives embeddings and codes;
the codes are in `[0, codebook_size)` per level, not yet offset into the
stage token space (`vocab.LAYOUT.mulan_tokens` does that).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax import audio as audio_lib
from musiclm_jax.layers import quantizers
from musiclm_jax.tokenizers import embedding_rvq
from musiclm_jax.tokenizers import text as text_lib
from musiclm_jax.tokenizers.mulan import MulanConfig, MulanModel

RVQ_FILES = embedding_rvq.RvqFiles(name="mulan_rvq", what="MuLan",
                                   fit_hint="`musiclm mulan fit_rvq`", gin_name="fit_mulan_rvq")
RVQ_FILE = RVQ_FILES.npz_file
RVQ_MANIFEST_FILE = RVQ_FILES.manifest_file
TEXT_TOKENIZER_FILE = "text_tokenizer.model"


@gin.configurable(denylist=["embeddings"])
def fit_mulan_rvq(embeddings: np.ndarray, num_levels: int = 12, codebook_size: int = 1024,
                  num_iters: int = 20, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """Fits the RVQ on clip embeddings `[N, D]` (`embedding_rvq.fit`): float32
  codebooks `[num_levels, codebook_size, D]` and a report with `relative_error`
  per level."""
  return embedding_rvq.fit(RVQ_FILES, embeddings, num_levels, codebook_size, num_iters, seed)


def save_rvq(model_dir: str, codebooks: np.ndarray, report: dict[str, Any]) -> str:
  """Writes `mulan_rvq.npz` and its manifest atomically; returns the npz path."""
  return embedding_rvq.save(RVQ_FILES, model_dir, codebooks, report)


def load_rvq(model_dir: str) -> np.ndarray:
  """The codebooks `[Q, K, D]` saved by `save_rvq`."""
  return embedding_rvq.load(RVQ_FILES, model_dir)


def config_from_manifest(manifest: dict[str, Any]) -> MulanConfig:
  """The `MulanConfig` a checkpoint manifest recorded."""
  return embedding_rvq.config_from_manifest(manifest, MulanModel.__name__, MulanConfig)


@functools.lru_cache(maxsize=8)
def _jitted_embedders(config: MulanConfig):
  """Jitted clip and text embedding of a config, shared by tokenizers of one process
  (each load of a run would otherwise compile them again)."""
  model = MulanModel(config)
  return jax.jit(model.embed_clips), jax.jit(model.embed_text)


class MulanTokenizer:
  """Embeddings and RVQ codes of audio and text with a trained MuLan.

  Build with `MulanTokenizer.load(model_dir)` for a trained run, or from
  parts (tests, freshly fitted codebooks).
  """

  def __init__(self, model: MulanModel, variables: Any, text_tokenizer: text_lib.TextTokenizer,
               codebooks: np.ndarray | None = None, batch_size: int = 32,
               checkpoint_step: int | None = None):
    self.model = model
    self.config = model.config
    self.variables = {"params": variables["params"]}
    self.text_tokenizer = text_tokenizer
    self.codebooks = None if codebooks is None else jnp.asarray(codebooks, jnp.float32)
    self.batch_size = batch_size
    self.checkpoint_step = checkpoint_step  # the step `load` read; None from parts
    self._embed_clips, self._embed_text = _jitted_embedders(model.config)

  @classmethod
  def load(cls, model_dir: str, step: int | None = None, with_rvq: bool = True,
           batch_size: int = 32) -> "MulanTokenizer":
    """A trained run: its checkpoint, `text_tokenizer.model` and (when
    `with_rvq`) `mulan_rvq.npz`. The step defaults to the one the RVQ was
    fitted on (with the RVQ), else the newest."""
    from musiclm_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
    if step is None and with_rvq:
      step = checkpoints.fitted_step(os.path.join(model_dir, RVQ_MANIFEST_FILE))
    variables, manifest = checkpoints.load_trained_variables(model_dir, step)
    model = MulanModel(config_from_manifest(manifest))
    tokenizer = text_lib.TextTokenizer(os.path.join(model_dir, TEXT_TOKENIZER_FILE))
    return cls(model, variables, tokenizer, load_rvq(model_dir) if with_rvq else None,
               batch_size, checkpoint_step=manifest["step"])

  # -- embeddings --------------------------------------------------------------
  def audio_embeddings(self, wav: np.ndarray, sample_rate: int,
                       lengths: Sequence[int] | None = None) -> np.ndarray:
    """Clip embeddings (windows averaged) of `wav [B, samples]` (or `[samples]`).

    Audio at another rate is resampled to the model's. `lengths` (at
    `sample_rate`) marks real samples per row; default: all.
    Returns float32 `[B, embed_dim]`, L2-normalised.
    """
    wav = np.atleast_2d(np.asarray(wav, np.float32))
    if wav.ndim != 2 or wav.shape[1] == 0:
      raise ValueError(f"audio must be [batch, samples] with samples > 0; got {wav.shape}")
    lengths = np.full(len(wav), wav.shape[1]) if lengths is None else np.asarray(lengths)
    if lengths.shape != (len(wav),) or np.any(lengths <= 0) or np.any(lengths > wav.shape[1]):
      raise ValueError(f"lengths {lengths.tolist()} must be in [1, {wav.shape[1]}] per row")
    rate = self.config.sample_rate
    if sample_rate != rate:
      wav = audio_lib.resample(wav, sample_rate, rate)
      lengths = np.minimum(np.ceil(lengths * rate / sample_rate).astype(int), wav.shape[1])
    out = [self._embed_clips(self.variables, wav[i:i + self.batch_size],
                             jnp.asarray(lengths[i:i + self.batch_size], jnp.int32))
           for i in range(0, len(wav), self.batch_size)]
    return np.concatenate([np.asarray(o) for o in out])

  def text_embeddings(self, texts: str | Sequence[str]) -> np.ndarray:
    """float32 `[B, embed_dim]`, L2-normalised, of prompts or captions."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tokens = self.text_tokenizer.encode(texts, self.config.max_text_length)
    out = [self._embed_text(self.variables, tokens[i:i + self.batch_size])
           for i in range(0, len(tokens), self.batch_size)]
    return np.concatenate([np.asarray(o) for o in out])

  # -- tokens --------------------------------------------------------------------
  def tokens(self, embeddings: np.ndarray) -> np.ndarray:
    """RVQ codes int32 `[B, num_levels]` of embeddings `[B, embed_dim]`."""
    if self.codebooks is None:
      raise ValueError("this MulanTokenizer has no RVQ codebooks; fit them with "
                       "`musiclm mulan fit_rvq`")
    return np.asarray(quantizers.rvq_encode(self.codebooks, jnp.asarray(embeddings)))

  def audio_tokens(self, wav: np.ndarray, sample_rate: int,
                   lengths: Sequence[int] | None = None) -> np.ndarray:
    """`M_A`: int32 `[B, num_levels]` codes of the audio clip embeddings."""
    return self.tokens(self.audio_embeddings(wav, sample_rate, lengths))

  def text_tokens(self, texts: str | Sequence[str]) -> np.ndarray:
    """`M_T`: int32 `[B, num_levels]` codes of the text embeddings."""
    return self.tokens(self.text_embeddings(texts))
