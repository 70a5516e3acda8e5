"""What a trained stage uses of its prefix (`musiclm eval stage`).

The eval loss of a stage on held-out windows, first with each window's own
prefix, then with one part of it dropped or taken from another window:

    variant            prefix of each window
    own                as trained: M [+ T_mel] [+ S] (fine: the coarse A)
    no_conditioning    M and T_mel replaced by pad: classifier-free guidance's
                       unconditional input (`Stage.unconditional`)
    no_melody          T_mel alone replaced by pad: a text prompt without a
                       recording (`Stage.without_melody`)
    other_mulan        M of another window (of another clip, as far as the
                       split allows), the rest its own
    other_melody       T_mel of another window
    other_semantic     (coarse) S of another window
    other_coarse       (fine) the coarse acoustic tokens of another window

`increase` is a variant's loss minus the own-prefix loss, in nats per target
token, with the standard error of its mean over windows. A stage that uses a
part of its prefix predicts worse without it; an increase within its error of
0 means the stage ignores that part (or, for `other_*`, that the windows
swapped in carry the same information: `unchanged` is the fraction of windows
whose borrowed part equals their own). `no_*` variants are inputs the stage
saw in training only as often as its conditioning and melody dropout made them.

`evaluate_stage` is numpy and JAX (no TensorFlow); `evaluate_run`, what
`musiclm eval stage` and the quickstart call, reads a run's windows from its
token cache with `StageTask.eval_windows` (TensorFlow, imported there).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import jax
import numpy as np

from musiclm_jax import stages
from musiclm_jax.models import prefix_lm_example

BATCH_SIZE = 16


def prefix_parts(stage: stages.Stage, prefix_length: int) -> dict[str, slice]:
  """The named parts of a `[prefix_length]` prefix of `stage`, as index slices."""
  if stage.name == "fine":
    return {"coarse": slice(0, prefix_length)}
  mulan = stage.layout.mulan_levels
  parts = {"mulan": slice(0, mulan)}
  if stage.melody_conditioning:
    parts["melody"] = slice(mulan, stage.conditioning_length)
  if stage.name == "coarse":
    parts["semantic"] = slice(stage.conditioning_length, prefix_length)
  return parts


def partners(prefixes: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> np.ndarray:
  """For each window, the window whose prefix parts it borrows: among the windows
  of its (prefix, target) lengths, the one half their number further on (windows
  of a clip are read one after another, so that one is of another clip unless a
  clip has more than half of them). int `[windows]`."""
  lengths = [(len(p), len(t)) for p, t in zip(prefixes, targets)]
  partner = np.arange(len(lengths))
  for shape in set(lengths):
    group = np.array([i for i, s in enumerate(lengths) if s == shape])
    partner[group] = np.roll(group, -(len(group) // 2))
  return partner


def prefix_variants(stage: stages.Stage, prefixes: Sequence[np.ndarray],
                    targets: Sequence[np.ndarray]
                    ) -> dict[str, tuple[list[np.ndarray], float | None]]:
  """Each variant's prefixes (see the module doc) and, for `other_*`, the
  fraction of windows whose borrowed part equals their own (else None)."""
  variants: dict[str, tuple[list[np.ndarray], float | None]] = {"own": (list(prefixes), None)}
  if stage.conditioned:
    variants["no_conditioning"] = ([stage.unconditional(p) for p in prefixes], None)
  if stage.melody_conditioning:
    variants["no_melody"] = ([stage.without_melody(p) for p in prefixes], None)
  partner = partners(prefixes, targets)
  for part in prefix_parts(stage, len(prefixes[0])):
    borrowed, unchanged = [], 0
    for prefix, other in zip(prefixes, (prefixes[j] for j in partner)):
      where = prefix_parts(stage, len(prefix))[part]  # partners have the same length
      unchanged += np.array_equal(other[where], prefix[where])
      prefix = np.array(prefix, copy=True)
      prefix[where] = other[where]
      borrowed.append(prefix)
    variants[f"other_{part}"] = (borrowed, unchanged / len(prefixes))
  return variants


def _window_sums_fn(model: Any):
  """Jitted `(params, batch) -> per-window (loss, correct, weight) sums, [batch] each`."""
  def one_window(params, example):
    _, sums = model.loss_sums(params, jax.tree.map(lambda x: x[None], example))
    return sums["loss"], sums["correct"], sums["weight"]
  return jax.jit(jax.vmap(one_window, in_axes=(None, 0)))


def _window_sums(window_sums, params, prefixes: Sequence[np.ndarray],
                 targets: Sequence[np.ndarray], length: int, batch_size: int) -> np.ndarray:
  """float64 `[windows, 3]`: each window's summed loss, correct predictions, targets."""
  examples = [prefix_lm_example(p, t, length) for p, t in zip(prefixes, targets)]
  empty = {k: np.zeros_like(v) for k, v in examples[0].items()}  # weight 0: fills a batch
  rows = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    chunk = chunk + [empty] * (batch_size - len(chunk))
    batch = {k: np.stack([e[k] for e in chunk]) for k in empty}
    rows.append(np.stack(jax.device_get(window_sums(params, batch)), axis=1))
  return np.concatenate(rows)[:len(examples)].astype(np.float64)


def evaluate_stage(model: Any, params: Any, stage: stages.Stage,
                   prefixes: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                   batch_size: int = BATCH_SIZE) -> dict[str, Any]:
  """Loss and accuracy of each prefix variant on the same windows.

  Args:
    model: a `DecoderOnlyModel` (its `loss_sums`).
    params: the stage's trained parameters.
    stage: the stage's window and token layout.
    prefixes, targets: the windows' prefix `[P_i]` and target `[T_i]` ids (at
      least two windows, so that a part can come from another one).
    batch_size: windows per forward pass.
  Returns:
    `windows`, `target_tokens` and `variants`: name -> `loss` and `accuracy`
    (per target token), `increase` and `increase_stderr` (nats per token over
    `own`; not for `own`), `unchanged` (`other_*`).
  """
  if len(prefixes) != len(targets) or len(prefixes) < 2:
    raise ValueError(f"the stage evaluation needs at least two windows with targets; got "
                     f"{len(prefixes)} prefixes and {len(targets)} targets")
  length = max(len(p) + len(t) for p, t in zip(prefixes, targets))
  window_sums = _window_sums_fn(model)
  own = None
  report: dict[str, Any] = {"stage": stage.name, "windows": len(prefixes), "variants": {}}
  for name, (variant, unchanged) in prefix_variants(stage, prefixes, targets).items():
    sums = _window_sums(window_sums, params, variant, targets, length, batch_size)
    loss, correct, weight = sums.sum(axis=0)
    row: dict[str, Any] = {"loss": loss / weight, "accuracy": correct / weight}
    per_token = sums[:, 0] / sums[:, 2]
    if own is None:
      own = per_token
      report["target_tokens"] = int(weight)
    else:
      increase = per_token - own
      row["increase"] = float(np.mean(increase))
      row["increase_stderr"] = float(np.std(increase, ddof=1) / np.sqrt(len(increase)))
    if unchanged is not None:
      row["unchanged"] = unchanged
    report["variants"][name] = {k: float(v) for k, v in row.items()}
  return report


def format_report(report: Mapping[str, Any]) -> str:
  """A plain-text table of `evaluate_stage`'s report."""
  lines = [f"{report['stage']} stage: {report['windows']} windows, {report['target_tokens']} "
           f"target tokens" + (f", step {report['step']}" if "step" in report else ""),
           f"{'prefix':<18}{'loss':>9}{'accuracy':>10}{'increase':>20}{'unchanged':>11}"]
  for name, row in report["variants"].items():
    increase = (f"{row['increase']:+.4f} ± {row['increase_stderr']:.4f}"
                if "increase" in row else "")
    unchanged = f"{row['unchanged']:.2f}" if "unchanged" in row else ""
    lines.append(f"{name:<18}{row['loss']:>9.4f}{row['accuracy']:>10.4f}{increase:>20}"
                 f"{unchanged:>11}")
  return "\n".join(lines)


def evaluate_run(model_dir: str, split: str = "test", max_windows: int = 0,
                 gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()
                 ) -> dict[str, Any]:
  """`evaluate_stage` of a stage run's newest checkpoint on `split` of the token
  cache it was trained on.

  The stage task is rebuilt from the gin config stored in the checkpoint;
  `gin_files` and `gin_bindings` are parsed after it (e.g. `TOKENS_DIR = '...'`
  for a cache that moved). Reads windows with TensorFlow (`StageTask`).

  Args:
    model_dir: the stage's `MODEL_DIR`.
    split: the cache split to read windows from.
    max_windows: the first this many windows of the split (0: all).
  Returns:
    `evaluate_stage`'s report with the checkpoint `step` and the `split`.
  Raises:
    ValueError: the run is not a stage, or the cache read is not the one it
      was trained on.
  """
  # pylint: disable=g-import-not-at-top
  from musiclm_jax import main as cli
  from musiclm_jax.layers.transformer import DecoderConfig
  from musiclm_jax.models import DecoderOnlyModel
  from musiclm_jax.tasks import stage_tasks
  from musiclm_jax.training import checkpoints
  # pylint: enable=g-import-not-at-top
  variables, manifest = checkpoints.load_trained_variables(model_dir)
  described = manifest.get("task") or {}
  if manifest.get("model") != "DecoderOnlyModel" or "stage" not in described:
    raise ValueError(f"{model_dir} holds a {manifest.get('model')} run, not a MusicLM stage")
  cli.import_configurables("train")
  gin.clear_config()
  try:
    gin.parse_config(manifest["gin_config"], skip_unknown=True)
  except Exception as e:  # gin raises IOError, ValueError, SyntaxError, ...
    raise cli.GinConfigError(f"the gin config stored in {model_dir}: {e}") from e
  cli.parse_gin(gin_files, gin_bindings)
  task = stage_tasks.StageTask()  # pylint: disable=no-value-for-parameter
  if task.layout.to_dict() != manifest["token_layout"] or task.describe() != described:
    raise ValueError(f"the token cache read ({task.describe()}) is not what {model_dir} was "
                     f"trained on ({described}); point TOKENS_DIR at that cache")
  model = DecoderOnlyModel(DecoderConfig(**manifest["model_config"]))
  report = evaluate_stage(model, variables["params"], task.stage,
                          *task.eval_windows(split, max_windows))
  report.update(step=manifest["step"], split=split)
  return report
