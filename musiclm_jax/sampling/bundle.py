"""Inference bundles: the six (or seven) trained models in one self-describing directory.

    musiclm export --gin_file=gin/export.gin --output=bundles/tiny ...   # writes
    bundle = Bundle.load("bundles/tiny")                                   # reads

Layout (each model directory is laid out like its training run, so the
tokenizer loaders read it unchanged; optimizer state is left out):

    manifest.json   format, package version, token layout, frame rates, each
                    model's config, training step, source run and (stages) window
    soundstream/    checkpoints/<step>/   (parameters and RVQ codebooks)
    w2v_bert/       checkpoints/<step>/, semantic_kmeans.npz, semantic_kmeans.json
    mulan/          checkpoints/<step>/, mulan_rvq.npz, mulan_rvq.json, text_tokenizer.model
    semantic/, coarse/, fine/   checkpoints/<step>/
    melody/         (optional) checkpoints/<step>/, melody_rvq.npz, melody_rvq.json

A bundle with the melody encoder (`BundleRuns.melody`) holds melody-
conditioned semantic and coarse stages (trained on a cache with melody
tokens, `StageTask.melody_conditioning`) and generates from a hummed or
played melody (`Generator.generate(..., melody_audio=...)`).

Export checks that the three stages were trained on tokens of the layout the
tokenizers produce, and `Bundle.load` checks it again, so a bundle whose
token layout does not match its tokenizers is refused with a message naming
the stage. Export writes into `<output>.partial` and renames it at the end:
an interrupted export leaves no half bundle, and an existing bundle is never
overwritten.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from typing import Any, Optional

import gin

import musiclm_jax
from musiclm_jax import stages as stages_lib
from musiclm_jax import vocab
from musiclm_jax.layers.transformer import DecoderConfig
from musiclm_jax.models import DecoderOnlyModel
from musiclm_jax.tokenizers import frozen
from musiclm_jax.tokenizers import melody
from musiclm_jax.tokenizers import mulan_tokens
from musiclm_jax.tokenizers import semantic
from musiclm_jax.training import checkpoints

BUNDLE_FORMAT = "musiclm_jax.bundle/1"
MANIFEST_FILE = "manifest.json"
TOKENIZERS = ("soundstream", "w2v_bert", "mulan")
STAGES = stages_lib.STAGE_NAMES
# Per model, its side files; the first is the manifest naming the checkpoint
# step the side files were fitted on.
FITTED_SIDE_FILES = {
    "w2v_bert": (semantic.KMEANS_MANIFEST_FILE, semantic.KMEANS_FILE),
    "mulan": (mulan_tokens.RVQ_MANIFEST_FILE, mulan_tokens.RVQ_FILE,
              mulan_tokens.TEXT_TOKENIZER_FILE),
    "melody": (melody.RVQ_MANIFEST_FILE, melody.RVQ_FILE),
}


class BundleError(ValueError):
  """A bundle (or the runs exported into one) that cannot be used together."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BundleRuns:
  """MODEL_DIRs of the six training runs a bundle is exported from, and of the
  melody encoder (optional; for melody-conditioned stages)."""

  soundstream: str
  w2v_bert: str
  mulan: str
  semantic: str
  coarse: str
  fine: str
  melody: Optional[str] = None


@dataclasses.dataclass
class StageModel:
  """A trained stage: its decoder, parameters and window."""

  stage: stages_lib.Stage
  model: DecoderOnlyModel
  params: Any


def _copy_model(run_dir: str, name: str, target: str) -> dict[str, Any]:
  """Re-saves a run's variables (no optimizer state) and its side files: of the
  step its k-means or RVQ was fitted on, else of the newest step."""
  side_files = FITTED_SIDE_FILES.get(name, ())
  step = checkpoints.fitted_step(os.path.join(run_dir, side_files[0])) if side_files else None
  variables, manifest = checkpoints.load_trained_variables(run_dir, step)
  step = manifest.pop("step")
  state = {"params": variables["params"]}
  model_state = {k: v for k, v in variables.items() if k != "params"}
  if model_state:
    state["model_state"] = model_state
  ckpt = checkpoints.Checkpointer(os.path.join(target, "checkpoints"), async_save=False)
  ckpt.save(step, state, {}, manifest)
  ckpt.close()
  for filename in side_files:
    source = os.path.join(run_dir, filename)
    if not os.path.isfile(source):
      raise BundleError(f"{name} run {run_dir} has no {filename}; fit it first (see README)")
    shutil.copy2(source, os.path.join(target, filename))
  return {"source": os.path.abspath(run_dir), "step": step, "model": manifest["model"],
          "model_config": manifest["model_config"], "token_layout": manifest["token_layout"],
          "task": manifest.get("task")}


def _check_stages(models: dict[str, dict[str, Any]], layout: vocab.TokenLayout,
                  where: str) -> None:
  for name in STAGES:
    entry = models[name]
    task = entry.get("task") or {}
    if entry["model"] != "DecoderOnlyModel" or task.get("stage") != name:
      raise BundleError(f"{where}: the {name} run holds a {entry['model']} trained on "
                        f"{task.get('stage')!r} examples, not the {name} stage")
    if task.get("melody_conditioning") and not layout.melody_levels:
      raise BundleError(f"{where}: the {name} stage is melody-conditioned but there is no "
                        "melody encoder; export with BundleRuns.melody")
    if entry["token_layout"] != layout.to_dict():
      diff = {k: (v, layout.to_dict()[k]) for k, v in entry["token_layout"].items()
              if layout.to_dict().get(k) != v}
      raise BundleError(f"{where}: the {name} stage was trained on another token layout "
                        f"than its tokenizers produce (stage, tokenizers): {diff}; train it "
                        "on a cache made by these tokenizers")


def export_bundle(runs: BundleRuns, output_dir: str) -> dict[str, Any]:
  """Writes the bundle of `runs` to `output_dir`; returns its manifest."""
  if os.path.exists(output_dir):
    raise FileExistsError(f"{output_dir} exists; export to a new directory")
  partial = f"{output_dir.rstrip('/')}.partial"
  if os.path.exists(partial):
    shutil.rmtree(partial)
  os.makedirs(partial)
  models = {}
  for name in TOKENIZERS + STAGES + (("melody",) if runs.melody else ()):
    print(f"export: {name} from {getattr(runs, name)}", flush=True)
    models[name] = _copy_model(getattr(runs, name), name, os.path.join(partial, name))
  tokenizers = frozen.FrozenTokenizers.load(_tokenizer_dirs(partial))
  _check_stages(models, tokenizers.layout, f"export of {runs}")
  manifest = {"format": BUNDLE_FORMAT, "musiclm_jax_version": musiclm_jax.__version__,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              **tokenizers.describe(), "models": models}
  with open(os.path.join(partial, MANIFEST_FILE), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.rename(partial, output_dir)
  print(f"export: bundle written to {output_dir}", flush=True)
  return manifest


def _tokenizer_dirs(bundle_dir: str) -> frozen.TokenizerDirs:
  melody_dir = os.path.join(bundle_dir, "melody")
  return frozen.TokenizerDirs(soundstream=os.path.join(bundle_dir, "soundstream"),
                              semantic=os.path.join(bundle_dir, "w2v_bert"),
                              mulan=os.path.join(bundle_dir, "mulan"),
                              melody=melody_dir if os.path.isdir(melody_dir) else None)


def read_manifest(bundle_dir: str) -> dict[str, Any]:
  path = os.path.join(bundle_dir, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{bundle_dir} is not a bundle (no {MANIFEST_FILE}); write one "
                            "with `musiclm export`")
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  if manifest.get("format") != BUNDLE_FORMAT:
    raise BundleError(f"{path} has format {manifest.get('format')!r}; this version of "
                      f"musiclm_jax reads {BUNDLE_FORMAT}")
  return manifest


@dataclasses.dataclass
class Bundle:
  """The loaded models of a bundle: frozen tokenizers (with the melody encoder,
  `tokenizers.melody`, when exported with one) and the three stages."""

  directory: str
  manifest: dict[str, Any]
  tokenizers: frozen.FrozenTokenizers
  stages: dict[str, StageModel]

  @property
  def layout(self) -> vocab.TokenLayout:
    return self.tokenizers.layout

  @classmethod
  def load(cls, bundle_dir: str) -> "Bundle":
    """Loads and cross-checks every model; BundleError names what does not fit."""
    manifest = read_manifest(bundle_dir)
    tokenizers = frozen.FrozenTokenizers.load(_tokenizer_dirs(bundle_dir))
    layout = tokenizers.layout
    if manifest["layout"] != layout.to_dict():
      raise BundleError(f"{bundle_dir}: the manifest's token layout {manifest['layout']} is "
                        f"not the one its tokenizers produce {layout.to_dict()}")
    read = {name: checkpoints.load_trained_variables(os.path.join(bundle_dir, name))
            for name in STAGES}
    _check_stages({name: m for name, (_, m) in read.items()}, layout, f"bundle {bundle_dir}")
    loaded = {}
    for name, (variables, stage_manifest) in read.items():
      task = stage_manifest["task"]
      stage = stages_lib.Stage(name=name, window_seconds=task["window_seconds"], layout=layout,
                               coarse_levels=task["coarse_levels"],
                               semantic_rate=tokenizers.semantic_rate,
                               acoustic_rate=tokenizers.acoustic_rate,
                               melody_conditioning=task.get("melody_conditioning", False),
                               melody_hop_seconds=task.get("melody_hop_seconds", 0.0))
      if stage.melody_conditioning and (
          tokenizers.melody.config.hop_seconds != stage.melody_hop_seconds):
        raise BundleError(f"bundle {bundle_dir}: the {name} stage was trained on melody windows "
                          f"every {stage.melody_hop_seconds} s, the bundle's melody encoder "
                          f"makes them every {tokenizers.melody.config.hop_seconds} s")
      config = DecoderConfig(**stage_manifest["model_config"])
      loaded[name] = StageModel(stage, DecoderOnlyModel(config), variables["params"])
    return cls(bundle_dir, manifest, tokenizers, loaded)
