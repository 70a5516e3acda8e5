"""Semantic tokens `S`: k-means clusters of a w2v-BERT MLM layer, 25 per second.

    musiclm train --gin_file=gin/tokenizers/w2v_bert_tiny.gin ...   # w2v-BERT
    fit_semantic_kmeans(model_dir, batches)                         # k-means
    SemanticTokenizer.load(model_dir).semantic_tokens(wav_16k)      # tokens

Features are the hidden states of MLM layer `W2vBertConfig.semantic_layer`
(the paper's 7th of 12, scaled), standardised per dimension with the mean
and standard deviation of the fitting frames (as AudioLM does). The k-means
fit (`layers/kmeans.py`: k-means++ then Lloyd, or mini-batch k-means for
large samples) runs jitted on frames sharded over all devices. The result
goes next to the checkpoint: `MODEL_DIR/semantic_kmeans.npz` (centroids,
mean, std) and `MODEL_DIR/semantic_kmeans.json` (what was fitted on what).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping

import gin
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from musiclm_jax.layers import kmeans
from musiclm_jax.tokenizers.w2v_bert import (FRAME_RATE, SAMPLE_RATE, W2vBertConfig,
                                             W2vBertModel)
from musiclm_jax.training import checkpoints

KMEANS_FILE = "semantic_kmeans.npz"
KMEANS_MANIFEST_FILE = "semantic_kmeans.json"
KMEANS_FORMAT = "musiclm_jax.semantic_kmeans/1"
FEATURE_DTYPE = "float32"


class SemanticKMeansError(ValueError):
  """A model directory without usable semantic k-means (or with a mismatched one)."""


def load_w2v_bert(model_dir: str, step: int | None = None
                  ) -> tuple[W2vBertModel, Any, dict[str, Any]]:
  """The trained w2v-BERT of a run: `(model, params, checkpoint manifest)`."""
  variables, manifest = checkpoints.load_trained_variables(model_dir, step)
  if manifest.get("model") != W2vBertModel.__name__:
    raise SemanticKMeansError(f"{model_dir} holds a {manifest.get('model')!r} checkpoint, "
                              f"not a {W2vBertModel.__name__}")
  config = W2vBertConfig(**manifest["model_config"])
  return W2vBertModel(config), variables["params"], manifest


class FeatureExtractor:
  """Jitted `wav_16k [batch, samples] -> float32 [batch, samples // 640, d_model]`.

  Args:
    model: the w2v-BERT model (its config).
    params: trained parameters.
    mlm_layer: MLM layer of the features; default `config.semantic_layer`.
    dtype: compute dtype. float32 by default, whatever the training dtype:
      in bfloat16 a +3 dB gain moves the features enough to change ~40% of
      the tokens of a tiny model (about 4% in float32).
  """

  def __init__(self, model: W2vBertModel, params: Any, mlm_layer: int | None = None,
               dtype: str = FEATURE_DTYPE):
    self.model = model
    self.params = params
    self.mlm_layer = model.config.semantic_layer if mlm_layer is None else mlm_layer
    self.dtype = dtype
    self._features = jax.jit(self.apply)

  def apply(self, params: Any, wav: jax.Array) -> jax.Array:
    """The features as a pure function of the parameters (to jit or compose)."""
    return self.model.hidden_states(params, wav, self.mlm_layer, self.dtype)

  def __call__(self, wav: np.ndarray) -> jax.Array:
    wav = np.asarray(wav, np.float32)
    if wav.ndim != 2:
      raise ValueError(f"expected 16 kHz audio [batch, samples], got shape {wav.shape}")
    return self._features(self.params, wav)


def sample_frames(extractor: Callable[[np.ndarray], Any],
                  batches: Iterable[Mapping[str, np.ndarray]], num_frames: int,
                  frames_per_clip: int, seed: int = 0) -> np.ndarray:
  """Up to `num_frames` feature frames, `frames_per_clip` drawn at random from each clip.

  Args:
    extractor: `wav [batch, samples] -> [batch, samples // 640, D]`, e.g. a
      `FeatureExtractor`; the frames drawn depend only on the clips' frame
      counts and `seed`, so two extractors given the same batches and seed
      sample the same frame times.
    batches: dicts with `audio` float32 `[batch, samples]` at 16 kHz (e.g.
      `AudioClipTask(sample_rate=16000).iterator("train", n)`); read until
      enough frames are drawn or the iterable ends.
  Returns:
    float32 `[n <= num_frames, d_model]`.
  """
  rng = np.random.default_rng(seed)
  chunks, total = [], 0
  for batch in batches:
    features = np.asarray(extractor(batch["audio"]))  # [b, t, d]
    take = min(frames_per_clip, features.shape[1])
    for clip in features:
      chunks.append(clip[rng.choice(clip.shape[0], take, replace=False)])
      total += take
    if total >= num_frames:
      break
  if not chunks:
    raise ValueError("no audio batches to sample feature frames from")
  return np.concatenate(chunks)[:num_frames]


@dataclasses.dataclass(frozen=True)
class SemanticKMeans:
  """Centroids `[k, D]` in standardised feature space, and the standardisation."""
  centroids: np.ndarray
  mean: np.ndarray
  std: np.ndarray

  @property
  def num_clusters(self) -> int:
    return self.centroids.shape[0]

  def assign(self, features: jax.Array) -> jax.Array:
    """int32 `[...]` cluster of each feature `[..., D]`."""
    standardised = (features - self.mean) / self.std
    return kmeans.assign(jnp.asarray(self.centroids), standardised)[0]

  def save(self, path: str) -> None:
    with open(path, "wb") as f:
      np.savez(f, centroids=self.centroids, mean=self.mean, std=self.std)

  @classmethod
  def load(cls, path: str) -> "SemanticKMeans":
    with np.load(path) as data:
      return cls(centroids=data["centroids"], mean=data["mean"], std=data["std"])


@gin.configurable
def fit_kmeans(rng: jax.Array, frames: np.ndarray, num_clusters: int = 1024,
               num_iters: int = 20, max_lloyd_frames: int = 262144,
               minibatch_size: int = 16384, minibatch_epochs: int = 3
               ) -> tuple[SemanticKMeans, dict[str, float]]:
  """k-means of standardised frames, data-parallel over all devices.

  Up to `max_lloyd_frames` frames: k-means++ then `num_iters` Lloyd steps
  (`kmeans.fit`) on frames sharded over the devices. More: mini-batch
  k-means (k-means++ on the first mini-batch), `minibatch_epochs` passes of
  sharded mini-batches of `minibatch_size` frames.

  Args:
    frames: float `[N, D]`, N >= num_clusters.
  Returns:
    the fitted k-means and `{"inertia": mean squared distance to the nearest
    centroid, "perplexity": exp(entropy of cluster usage), "used_clusters"}`
    on the fitting frames.
  """
  frames = np.asarray(frames, np.float32)
  if frames.ndim != 2 or frames.shape[0] < num_clusters:
    raise ValueError(f"need frames [N >= {num_clusters}, D] to fit {num_clusters} "
                     f"clusters; got shape {frames.shape}")
  mean = frames.mean(axis=0)
  std = frames.std(axis=0) + 1e-5
  x = (frames - mean) / std
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  sharding = NamedSharding(mesh, P("data", None))

  def shard(points):
    usable = points.shape[0] - points.shape[0] % len(devices)
    return jax.device_put(points[:usable], sharding)

  if x.shape[0] <= max_lloyd_frames:
    centroids = jax.jit(kmeans.fit, static_argnums=(2, 3))(rng, shard(x), num_clusters,
                                                           num_iters)
  else:
    batch = max(minibatch_size, num_clusters)
    fitter = kmeans.MiniBatchKMeans(num_clusters, x.shape[1])
    order_rng, init_rng = jax.random.split(rng)
    order = np.asarray(jax.random.permutation(order_rng, x.shape[0]))
    state = jax.jit(fitter.init)(init_rng, shard(x[order[:batch]]))
    update = jax.jit(fitter.update)
    for _ in range(minibatch_epochs):
      for start in range(0, x.shape[0] - batch + 1, batch):
        state = update(state, shard(x[order[start:start + batch]]))
    centroids = state.centroids
  ids, distances = jax.jit(kmeans.assign)(centroids, shard(x))
  counts = np.bincount(np.asarray(ids), minlength=num_clusters)
  stats = {"inertia": float(np.mean(np.asarray(distances))),
           "perplexity": cluster_perplexity(counts),
           "used_clusters": int(np.sum(counts > 0))}
  return SemanticKMeans(np.asarray(centroids), mean, std), stats


def cluster_perplexity(counts: np.ndarray) -> float:
  """exp(entropy) of a cluster-usage histogram: 1 (one cluster) .. k (uniform)."""
  p = np.asarray(counts, np.float64)
  p = p[p > 0] / p.sum()
  return float(np.exp(-np.sum(p * np.log(p))))


@gin.configurable
def fit_semantic_kmeans(model_dir: str, batches: Iterable[Mapping[str, np.ndarray]],
                        num_clusters: int = 1024, num_frames: int = 200_000,
                        frames_per_clip: int = 50, mlm_layer: int | None = None,
                        step: int | None = None, seed: int = 0,
                        data: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Fits the semantic k-means of the w2v-BERT in `model_dir` and saves it there.

  Args:
    model_dir: a w2v-BERT run's `MODEL_DIR`.
    batches: 16 kHz audio batches `{"audio": [batch, samples]}` to sample from.
    num_clusters: k (the paper: 1024).
    num_frames: frames to fit on.
    frames_per_clip: frames drawn from each clip (spreads the sample).
    mlm_layer: feature layer; default the config's `semantic_layer`.
    step: checkpoint step; default the newest.
    seed: frame sampling and k-means++ seeding.
    data: JSON-able description of `batches`, kept in the manifest (so that
      the evaluation can fit its baseline on the same frames).
  Returns:
    the manifest written to `MODEL_DIR/semantic_kmeans.json`.
  """
  model, params, manifest = load_w2v_bert(model_dir, step)
  extractor = FeatureExtractor(model, params, mlm_layer)
  frames = sample_frames(extractor, batches, num_frames, frames_per_clip, seed)
  fitted, stats = fit_kmeans(jax.random.PRNGKey(seed), frames, num_clusters)
  fitted.save(os.path.join(model_dir, KMEANS_FILE))
  kmeans_manifest = {
      "format": KMEANS_FORMAT,
      checkpoints.FITTED_STEP: manifest["step"],
      "checkpoint_manifest_model_config": manifest["model_config"],
      "mlm_layer": extractor.mlm_layer, "feature_dtype": extractor.dtype,
      "num_clusters": num_clusters, "num_frames": int(frames.shape[0]),
      "frames_per_clip": frames_per_clip, "seed": seed,
      "frame_rate": FRAME_RATE, "sample_rate": SAMPLE_RATE, "data": dict(data or {}),
      **stats}
  with open(os.path.join(model_dir, KMEANS_MANIFEST_FILE), "w", encoding="utf-8") as f:
    json.dump(kmeans_manifest, f, indent=2)
  return kmeans_manifest


def read_kmeans_manifest(model_dir: str) -> dict[str, Any]:
  """What `fit_semantic_kmeans` wrote to `MODEL_DIR/semantic_kmeans.json`."""
  kmeans_path = os.path.join(model_dir, KMEANS_FILE)
  manifest_path = os.path.join(model_dir, KMEANS_MANIFEST_FILE)
  if not (os.path.isfile(kmeans_path) and os.path.isfile(manifest_path)):
    raise SemanticKMeansError(f"{model_dir} has no {KMEANS_FILE}/{KMEANS_MANIFEST_FILE}; "
                              "fit them first (`musiclm semantic fit_kmeans`)")
  with open(manifest_path, encoding="utf-8") as f:
    return json.load(f)


class SemanticTokenizer:
  """`semantic_tokens(wav_16k [B, T]) -> int32 [B, T // 640]` (25 Hz, k clusters).

  Build with `SemanticTokenizer.load(model_dir)` after `fit_semantic_kmeans`.
  """
  sample_rate = SAMPLE_RATE
  frame_rate = FRAME_RATE

  def __init__(self, extractor: FeatureExtractor, fitted: SemanticKMeans):
    self.extractor = extractor
    self.kmeans = fitted
    self._tokens = jax.jit(lambda p, wav: fitted.assign(extractor.apply(p, wav)))

  @classmethod
  def load(cls, model_dir: str) -> "SemanticTokenizer":
    """The w2v-BERT checkpoint the k-means was fitted on (the newest for a fit
    that did not record its step) and the k-means."""
    kmeans_manifest = read_kmeans_manifest(model_dir)
    model, params, manifest = load_w2v_bert(model_dir,
                                            kmeans_manifest.get(checkpoints.FITTED_STEP))
    if manifest["model_config"] != kmeans_manifest["checkpoint_manifest_model_config"]:
      raise SemanticKMeansError(f"{KMEANS_FILE} in {model_dir} was fitted on a w2v-BERT "
                                "of another configuration; fit it again")
    return cls(FeatureExtractor(model, params, kmeans_manifest["mlm_layer"],
                                kmeans_manifest.get("feature_dtype", model.config.dtype)),
               SemanticKMeans.load(os.path.join(model_dir, KMEANS_FILE)))

  @property
  def num_clusters(self) -> int:
    return self.kmeans.num_clusters

  def features(self, wav_16k: np.ndarray) -> jax.Array:
    """float32 `[B, T // 640, d_model]` features that the clusters partition."""
    return self.extractor(wav_16k)

  def semantic_tokens(self, wav_16k: np.ndarray) -> jax.Array:
    """int32 `[B, T // 640]` cluster ids in `[0, num_clusters)` of 16 kHz audio `[B, T]`."""
    wav = np.asarray(wav_16k, np.float32)
    if wav.ndim != 2:
      raise ValueError(f"expected 16 kHz audio [batch, samples], got shape {wav.shape}")
    return self._tokens(self.extractor.params, wav)
