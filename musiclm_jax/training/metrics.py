"""Where training metrics go: TensorBoard (clu), a JSONL file, a console line.

TensorBoard summaries are written by clu's default writer, which needs
TensorFlow; on a machine without it (the GPU image) a warning says so and
metrics still go to `metrics.jsonl` and the console. The JSONL file is
always written: sweeps and tests read their curves from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, matched on `device.device_kind`.
PEAK_FLOPS = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
)


@dataclasses.dataclass(frozen=True)
class TrainCost:
  """What one optimizer step processes, for throughput and MFU.

  Attributes:
    unit: what is counted, the stem of the `<unit>_per_sec` metric
      ("tokens", "audio_seconds").
    units_per_step: how many of them one global batch holds.
    flops_per_step: model FLOPs of one step (0 when unknown: no MFU).
  """
  unit: str
  units_per_step: float
  flops_per_step: float


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of `device` (default: the first), None when unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops
  return None


class JsonlWriter:
  """Appends `{"step": s, name: value, ...}` lines to `logdir/metrics.jsonl`.

  Follows clu's `MetricWriter` interface for scalars, so it sits inside a
  clu `MultiWriter`.
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, "metrics.jsonl")
    self._file = open(self.path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams  # the checkpoint manifest records the configuration

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    del step, images  # TensorBoard only

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
    del step, audios, sample_rate  # TensorBoard only

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_jsonl_metrics(logdir: str) -> list[dict[str, float]]:
  """Rows written by `JsonlWriter`, in order."""
  with open(os.path.join(logdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def create_writer(logdir: str):
  """clu TensorBoard + logging writer with the JSONL writer, on process 0.

  Other processes only log, as in T5X.
  """
  if jax.process_index() > 0:
    return _LoggingOnly()
  jsonl = JsonlWriter(logdir)
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # clu's TensorBoard writer imports TensorFlow.
    logging.warning("no TensorBoard summaries (%s); metrics go to %s", e, jsonl.path)
    return jsonl
  return metric_writers.MultiWriter(
      [metric_writers.create_default_writer(logdir, asynchronous=False), jsonl])


class _LoggingOnly:
  """Processes other than 0: scalars go to the log, nothing to files."""

  def write_scalars(self, step, scalars):
    logging.info("step %d: %s", step, dict(scalars))

  def write_hparams(self, hparams):
    del hparams

  def write_images(self, step, images):
    del step, images

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def flush(self):
    pass

  def close(self):
    pass


class ProgressLine:
  """Prints `step 120/500 (24%) | loss 3.21 | ... | ETA 1m52s` lines on process 0."""

  def __init__(self, total_steps: int, unit: str = "tokens", stream=None):
    self.total_steps = total_steps
    self.unit = unit
    self.stream = stream or sys.stdout

  def show(self, step: int, metrics: Mapping[str, float], steps_per_sec: float) -> None:
    if jax.process_index() > 0:
      return
    remaining = max(self.total_steps - step, 0)
    eta = _format_seconds(remaining / steps_per_sec) if steps_per_sec > 0 else "?"
    parts = [f"step {step}/{self.total_steps} ({100 * step // max(self.total_steps, 1)}%)"]
    for name, fmt in (("loss", "loss {:.4f}"), ("accuracy", "acc {:.3f}"),
                      ("learning_rate", "lr {:.2e}"), ("grad_norm", "gnorm {:.2f}"),
                      (f"{self.unit}_per_sec", "{:,.1f} " + self.unit + "/s"),
                      ("mfu", "MFU {:.1%}")):
      if name in metrics:
        parts.append(fmt.format(metrics[name]))
    parts.append(f"{steps_per_sec:.2f} step/s")
    parts.append(f"ETA {eta}")
    print(" | ".join(parts), file=self.stream, flush=True)


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Throughput:
  """Steps/s, `<unit>_per_sec` and MFU over the steps since the last `measure`."""

  def __init__(self, cost: TrainCost, peak_flops: float | None, num_devices: int):
    self.cost = cost
    self.peak_flops = peak_flops
    self.num_devices = num_devices
    self._last = None

  def start(self, step: int) -> None:
    self._last = (step, time.perf_counter())

  def measure(self, step: int) -> dict[str, float]:
    """Rates since `start`/the last `measure`; empty when no step passed."""
    now = time.perf_counter()
    last_step, last_time = self._last
    self._last = (step, now)
    if step <= last_step or now <= last_time:
      return {}
    steps_per_sec = (step - last_step) / (now - last_time)
    rates = {"steps_per_sec": steps_per_sec,
             f"{self.cost.unit}_per_sec": steps_per_sec * self.cost.units_per_step}
    if self.cost.flops_per_step:
      rates["tflops_per_device"] = (steps_per_sec * self.cost.flops_per_step
                                    / self.num_devices / 1e12)
      if self.peak_flops:
        rates["mfu"] = (steps_per_sec * self.cost.flops_per_step
                        / (self.peak_flops * self.num_devices))
    return rates


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
