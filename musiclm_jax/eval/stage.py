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
token, with the standard error of its mean over windows; `first_frame_increase`
the same for the targets of each window's first semantic frame (40 ms), which
nothing earlier in the window predicts, so that there the prefix decides most
(later targets lean on the ones before them). A stage that uses a
part of its prefix predicts worse without it; an increase within its error of
0 means the stage ignores that part (or, for `other_*`, that the windows
swapped in carry the same information: `unchanged` is the fraction of windows
whose borrowed part equals their own). `no_*` variants are inputs the stage
saw in training only as often as its conditioning and melody dropout made them.

Losses and accuracies are over each target's legal ids (`Stage.target_ranges`),
the distribution the sampler draws from; `outside_legal` is the probability the
stage puts on the other ids, which the sampler masks and the trainer's
`eval/loss` (over the whole vocabulary) counts against it.

`evaluate_stage` is numpy and JAX; `evaluate_run`, what `musiclm eval stage`
and the quickstart call, reads a run's windows from its token cache with
`StageTask.eval_windows` and the numpy reader, whichever reader the run
trained with: the windows are SeqIO's, in SeqIO's order, and no TensorFlow
is needed.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
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


def _window_sums_fn(model: Any, first_targets: int):
  """Jitted `(params, batch) -> float32 [batch, 6]`: per window its summed loss,
  correct predictions and target count, the summed loss and count of its first
  `first_targets` targets, and its summed probability outside the legal ids.

  Losses and predictions are over each target's legal ids (`batch["legal_lo"]`,
  `batch["legal_hi"]`, int `[batch, length]`), the distribution the sampler
  draws from."""
  def window_sums(params, batch):
    logits = model.logits(params, batch)
    ids = jnp.arange(logits.shape[-1])
    legal = (ids >= batch["legal_lo"][..., None]) & (ids < batch["legal_hi"][..., None])
    legal_logits = jnp.where(legal, logits, -jnp.inf)
    legal_log_z = jax.nn.logsumexp(legal_logits, axis=-1)
    targets = batch["decoder_target_tokens"]
    loss = legal_log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(legal_logits, axis=-1) == targets).astype(jnp.float32)
    outside = 1.0 - jnp.exp(legal_log_z - jax.nn.logsumexp(logits, axis=-1))
    weights = batch["decoder_loss_weights"]
    loss = jnp.where(weights > 0, loss, 0.0)  # batch filler rows: no legal id, -inf
    first = weights * (jnp.cumsum(weights, axis=1) <= first_targets)
    return jnp.stack([jnp.sum(loss * weights, 1), jnp.sum(correct * weights, 1),
                      jnp.sum(weights, 1), jnp.sum(loss * first, 1), jnp.sum(first, 1),
                      jnp.sum(outside * weights, 1)], 1)
  return jax.jit(window_sums)


def _window_sums(window_sums, params, stage: stages.Stage, prefixes: Sequence[np.ndarray],
                 targets: Sequence[np.ndarray], length: int, batch_size: int) -> np.ndarray:
  """float64 `[windows, 6]` of `_window_sums_fn`, batch by batch."""
  examples = []
  for prefix, target in zip(prefixes, targets):
    example = prefix_lm_example(prefix, target, length)
    example["legal_lo"] = np.zeros(length, np.int32)  # prefix and padding: any id
    example["legal_hi"] = np.full(length, np.iinfo(np.int32).max, np.int32)
    where = slice(len(prefix), len(prefix) + len(target))
    example["legal_lo"][where], example["legal_hi"][where] = stage.target_ranges(len(target))
    examples.append(example)
  empty = {k: np.zeros_like(v) for k, v in examples[0].items()}  # weight 0: fills a batch
  rows = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    chunk = chunk + [empty] * (batch_size - len(chunk))
    batch = {k: np.stack([e[k] for e in chunk]) for k in empty}
    rows.append(np.asarray(window_sums(params, batch)))
  return np.concatenate(rows)[:len(examples)].astype(np.float64)


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values)))


def evaluate_stage(model: Any, params: Any, stage: stages.Stage,
                   prefixes: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                   batch_size: int = BATCH_SIZE) -> dict[str, Any]:
  """Loss and accuracy of each prefix variant on the same windows.

  Besides the whole window, the loss of the targets of its first semantic frame
  (40 ms: `first_frame_*`), which nothing earlier in the window predicts: where
  the prefix decides most, while later targets lean on the ones before them.

  Args:
    model: a `DecoderOnlyModel` (its `logits`).
    params: the stage's trained parameters.
    stage: the stage's window and token layout.
    prefixes, targets: the windows' prefix `[P_i]` and target `[T_i]` ids (at
      least two windows, so that a part can come from another one).
    batch_size: windows per forward pass.
  Returns:
    `windows`, `target_tokens`, `first_frame_targets` (per window) and
    `variants`: name -> `loss`, `accuracy`, `first_frame_loss` (per target
    token, over its legal ids) and `outside_legal` (the mean probability of
    the other ids); except for `own`, `increase` and `first_frame_increase`
    (nats per token over `own`) with their standard errors over windows
    (`*_stderr`); for `other_*`, `unchanged`.
  """
  if len(prefixes) != len(targets) or len(prefixes) < 2:
    raise ValueError(f"the stage evaluation needs at least two windows with targets; got "
                     f"{len(prefixes)} prefixes and {len(targets)} targets")
  length = max(len(p) + len(t) for p, t in zip(prefixes, targets))
  first_targets = stage.lengths(1)[1]
  window_sums = _window_sums_fn(model, first_targets)
  own = None
  report: dict[str, Any] = {"stage": stage.name, "windows": len(prefixes),
                            "first_frame_targets": first_targets, "variants": {}}
  for name, (variant, unchanged) in prefix_variants(stage, prefixes, targets).items():
    sums = _window_sums(window_sums, params, stage, variant, targets, length, batch_size)
    loss, correct, weight, first_loss, first_weight, outside = sums.sum(axis=0)
    row: dict[str, Any] = {"loss": loss / weight, "accuracy": correct / weight,
                           "first_frame_loss": first_loss / first_weight,
                           "outside_legal": outside / weight}
    per_token = np.stack([sums[:, 0] / sums[:, 2], sums[:, 3] / sums[:, 4]], axis=1)
    if own is None:
      own = per_token
      report["target_tokens"] = int(weight)
    else:
      row["increase"], row["increase_stderr"] = _mean_and_stderr(per_token[:, 0] - own[:, 0])
      row["first_frame_increase"], row["first_frame_increase_stderr"] = _mean_and_stderr(
          per_token[:, 1] - own[:, 1])
    if unchanged is not None:
      row["unchanged"] = unchanged
    report["variants"][name] = {k: float(v) for k, v in row.items()}
  return report


def format_increase(row: Mapping[str, float], key: str) -> str:
  """`row[key]` ± its standard error (`increase`, `first_frame_increase`); '' for `own`."""
  return f"{row[key]:+.4f} ± {row[key + '_stderr']:.4f}" if key in row else ""


def format_report(report: Mapping[str, Any]) -> str:
  """A plain-text table of `evaluate_stage`'s report."""
  lines = [f"{report['stage']} stage: {report['windows']} windows, {report['target_tokens']} "
           f"target tokens ({report['first_frame_targets']} in each window's first frame)"
           + (f", step {report['step']}" if "step" in report else ""),
           f"{'prefix':<18}{'loss':>9}{'accuracy':>10}{'increase':>20}"
           f"{'first frame loss':>18}{'increase':>20}{'unchanged':>11}{'outside legal':>15}"]
  for name, row in report["variants"].items():
    increases = [format_increase(row, k) for k in ("increase", "first_frame_increase")]
    unchanged = f"{row['unchanged']:.2f}" if "unchanged" in row else ""
    lines.append(f"{name:<18}{row['loss']:>9.4f}{row['accuracy']:>10.4f}{increases[0]:>20}"
                 f"{row['first_frame_loss']:>18.4f}{increases[1]:>20}{unchanged:>11}"
                 f"{row['outside_legal']:>15.4f}")
  return "\n".join(lines)


def evaluate_run(model_dir: str, split: str = "test", max_windows: int = 0,
                 gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
                 step: int | None = None) -> dict[str, Any]:
  """`evaluate_stage` of a stage run's checkpoint on `split` of the token cache
  it was trained on.

  The stage task is rebuilt from the gin config stored in the checkpoint, which
  replaces the process' gin config; `gin_files` and `gin_bindings` are parsed
  after it (e.g. `TOKENS_DIR = '...'` for a cache that moved). The windows are
  read with the numpy reader (the same windows as SeqIO's, without TensorFlow).

  Args:
    model_dir: the stage's `MODEL_DIR`.
    split: the cache split to read windows from.
    max_windows: the first this many windows of the split (0: all).
    step: the checkpoint to evaluate (default: the newest).
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
  from musiclm_jax import stage_task
  from musiclm_jax.training import checkpoints
  # pylint: enable=g-import-not-at-top
  variables, manifest = checkpoints.load_trained_variables(model_dir, step)
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
  task = stage_task.StageTask(reader="numpy")  # pylint: disable=no-value-for-parameter
  if task.layout.to_dict() != manifest["token_layout"] or task.describe() != described:
    raise ValueError(f"the token cache read ({task.describe()}) is not what {model_dir} was "
                     f"trained on ({described}); point TOKENS_DIR at that cache")
  model = DecoderOnlyModel(DecoderConfig(**manifest["model_config"]))
  report = evaluate_stage(model, variables["params"], task.stage,
                          *task.eval_windows(split, max_windows))
  report.update(step=manifest["step"], split=split)
  return report
