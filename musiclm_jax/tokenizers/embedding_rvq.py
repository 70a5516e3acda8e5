"""Residual vector quantizers of trained embeddings, saved next to the checkpoints.

MuLan (`mulan_tokens.py`, `M_A`/`M_T`) and the melody encoder (`melody.py`,
`T_mel`) turn their embeddings into tokens the same way: after training, an
RVQ is fitted by k-means on successive residuals of the training set's
embeddings `[N, D]` (`fit`), and written to `MODEL_DIR/<name>.npz` (the
codebooks) plus `MODEL_DIR/<name>.json` (sizes, the relative reconstruction
error per level and whatever the caller adds). `RvqFiles` names one such
quantizer: its file stem, what it quantizes (for messages) and the command
that fits it. `config_from_manifest` reads back the config dataclass of
the trained model the quantizer belongs to.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.layers import quantizers


@dataclasses.dataclass(frozen=True)
class RvqFiles:
  """One model's quantizer files.

  Attributes:
    name: the file stem (`mulan_rvq` -> `mulan_rvq.npz`, `mulan_rvq.json`).
    what: what the embeddings are, for messages ("MuLan").
    fit_hint: how to fit it, for messages ("`musiclm mulan fit_rvq`").
    gin_name: the gin configurable whose bindings size it ("fit_mulan_rvq").
  """

  name: str
  what: str
  fit_hint: str
  gin_name: str

  @property
  def npz_file(self) -> str:
    return f"{self.name}.npz"

  @property
  def manifest_file(self) -> str:
    return f"{self.name}.json"

  @property
  def format(self) -> str:
    return f"musiclm_jax.{self.name}/1"


def reconstruction_errors(codebooks: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Relative squared error of decoding the first q levels, for q = 1..Q.

  Returns:
    float `[Q]`: `sum |x - decode(codes[:, :q])|^2 / sum |x|^2`.
  """
  codebooks, x = jnp.asarray(codebooks, jnp.float32), jnp.asarray(x, jnp.float32)
  codes = quantizers.rvq_encode(codebooks, x)
  total = jnp.sum(x * x)
  errors = [jnp.sum(jnp.square(x - quantizers.rvq_decode(codebooks, codes[:, :q]))) / total
            for q in range(1, codebooks.shape[0] + 1)]
  return np.asarray(jnp.stack(errors))


def fit(files: RvqFiles, embeddings: np.ndarray, num_levels: int, codebook_size: int,
        num_iters: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
  """Fits an RVQ on embeddings `[N, D]` (k-means on successive residuals).

  Returns:
    float32 codebooks `[num_levels, codebook_size, D]` and a report with the
    sizes and `relative_error` per level (falls as levels are added).
  """
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be [N, D]; got shape {embeddings.shape}")
  if len(embeddings) < codebook_size:
    raise ValueError(f"{len(embeddings)} embeddings cannot fit {codebook_size} clusters; "
                     f"embed more clips or lower {files.gin_name}.codebook_size")
  fit_rvq = jax.jit(quantizers.fit_rvq, static_argnums=(2, 3, 4))
  codebooks = np.asarray(fit_rvq(jax.random.PRNGKey(seed), embeddings, num_levels,
                                 codebook_size, num_iters))
  report = {"format": files.format, "num_levels": num_levels, "codebook_size": codebook_size,
            "embed_dim": int(embeddings.shape[1]), "num_embeddings": int(len(embeddings)),
            "num_iters": num_iters, "seed": seed,
            "relative_error": [float(e) for e in reconstruction_errors(codebooks, embeddings)]}
  return codebooks, report


def save(files: RvqFiles, model_dir: str, codebooks: np.ndarray,
         report: dict[str, Any]) -> str:
  """Writes `<name>.npz` and `<name>.json` atomically; returns the npz path."""
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, files.npz_file)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, codebooks=np.asarray(codebooks, np.float32))
  manifest = os.path.join(model_dir, files.manifest_file)
  with open(manifest + ".tmp", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  os.replace(path + ".tmp", path)
  os.replace(manifest + ".tmp", manifest)
  return path


def load(files: RvqFiles, model_dir: str) -> np.ndarray:
  """The codebooks `[Q, K, D]` written by `save`."""
  path = os.path.join(model_dir, files.npz_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {files.what} RVQ at {path}; fit it with {files.fit_hint}")
  with np.load(path) as data:
    return data["codebooks"]


def fit_and_save(files: RvqFiles, model_dir: str, embeddings: np.ndarray,
                 fit_fn: Callable[[np.ndarray], tuple[np.ndarray, dict[str, Any]]],
                 source: dict[str, Any]) -> dict[str, Any]:
  """Fits with `fit_fn` (a gin-sized `fit_*_rvq`), saves to `model_dir` with
  `source` (where the embeddings came from) in the report; returns the report."""
  print(f"Fitting the {files.what} RVQ on {len(embeddings)} embeddings", flush=True)
  codebooks, report = fit_fn(embeddings)
  report.update(source)
  path = save(files, model_dir, codebooks, report)
  print(f"{files.what} RVQ {report['num_levels']} x {report['codebook_size']} -> {path}; "
        f"relative error after 1 / all levels: {report['relative_error'][0]:.3f} / "
        f"{report['relative_error'][-1]:.3f}", flush=True)
  return report


def config_from_manifest(manifest: dict[str, Any], model_name: str, config_class: type) -> Any:
  """The config dataclass a checkpoint manifest recorded for a `model_name` model.

  Raises ValueError when the checkpoint holds another model or its config has
  fields `config_class` lacks (a run of a newer version of the code).
  """
  if manifest.get("model") != model_name:
    raise ValueError(f"the checkpoint holds a {manifest.get('model')!r}, not a {model_name}")
  stored = manifest["model_config"]
  unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(config_class)})
  if unknown:
    raise ValueError(f"the checkpoint's {config_class.__name__} has fields this code lacks: "
                     f"{unknown}")
  return config_class(**stored)
