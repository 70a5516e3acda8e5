"""Expand a grid of gin bindings into `musiclm train` runs and tabulate their final metrics.

    python3 launch/sweep.py --root runs/lr_sweep --gin_file gin/runs/synthetic_tiny.gin \
        --grid "warmup_cosine.peak_value=[1e-3, 3e-3]" --grid "DecoderConfig.num_layers=[2, 4]"

Every point of the grid (the product of the `--grid` lists) is one run with
its own MODEL_DIR, `ROOT/<binding=value,...>`, started as
`LAUNCHER train --gin_file=... --gin_bindings=MODEL_DIR=... --gin_bindings=<point>`
(`--launcher`, default `launch/local.sh 0`; e.g. a SLURM or TPU wrapper).
Runs go one after another; re-running the sweep resumes each run from its
checkpoint, so an interrupted sweep continues and a finished run costs only
its start-up. At the end `ROOT/sweep.md` and `ROOT/sweep.json` hold one row
per run: its bindings, final step, last train loss and last eval metrics
(from the run's `metrics.jsonl`), and its exit status.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
  """`"name=[v1, v2]"` strings -> [(name, [v1, v2])]; values are Python literals."""
  grid = []
  for spec in specs:
    name, sep, values = spec.partition("=")
    try:
      parsed = ast.literal_eval(values.strip()) if sep else None
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"--grid {spec!r}: the values are not a Python list ({e})") from e
    if not isinstance(parsed, list) or not parsed or not name.strip():
      raise ValueError(f"--grid {spec!r} must look like 'Configurable.param=[v1, v2]'")
    grid.append((name.strip(), parsed))
  names = [n for n, _ in grid]
  if len(set(names)) != len(names):
    raise ValueError(f"a parameter repeats in the grid: {names}")
  return grid


def expand(grid: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
  """Every combination, in grid order, as {binding name: value}."""
  names = [n for n, _ in grid]
  return [dict(zip(names, values)) for values in itertools.product(*(v for _, v in grid))]


def gin_value(value: Any) -> str:
  """A gin literal; strings starting with '@' stay configurable references."""
  return value if isinstance(value, str) and value.startswith("@") else repr(value)


def run_name(point: dict[str, Any]) -> str:
  """A directory name: `param=value` pairs (last component of each name)."""
  parts = [f"{name.split('.')[-1].split('/')[-1]}={value}" for name, value in point.items()]
  return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts)) or "default"


def final_metrics(model_dir: str) -> dict[str, float]:
  """The last train row's step and loss and the last eval row of a run's metrics.jsonl."""
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  out: dict[str, float] = {}
  train = [r for r in rows if "train/loss" in r]
  if train:
    out["step"] = train[-1].get("step", float("nan"))
    out["train/loss"] = train[-1]["train/loss"]
  evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
  if evals:
    out.update({k: v for k, v in evals[-1].items() if k.startswith("eval/")})
  return out


def write_table(root: str, rows: list[dict[str, Any]]) -> str:
  """Writes ROOT/sweep.json and ROOT/sweep.md; returns the markdown."""
  with open(os.path.join(root, "sweep.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  metric_names = sorted({k for r in rows for k in r["metrics"]})
  binding_names = list(rows[0]["bindings"]) if rows else []
  header = ["run", *binding_names, "status", *metric_names]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["name"], *[str(r["bindings"][b]) for b in binding_names], r["status"]]
    cells += [f"{r['metrics'][m]:.4g}" if m in r["metrics"] else "" for m in metric_names]
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(root, "sweep.md"), "w", encoding="utf-8") as f:
    f.write(table)
  return table


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="parent directory of the runs")
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="bindings shared by every run")
  parser.add_argument("--grid", action="append", default=[], required=True,
                      help="'Configurable.param=[v1, v2, ...]' (repeatable)")
  parser.add_argument("--launcher", default="launch/local.sh 0",
                      help="command that takes a musiclm subcommand and its flags")
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  args = parser.parse_args(argv)
  points = expand(parse_grid(args.grid))
  os.makedirs(args.root, exist_ok=True)
  rows = []
  for i, point in enumerate(points):
    name = run_name(point)
    model_dir = os.path.abspath(os.path.join(args.root, name))
    command = [*shlex.split(args.launcher), "train",
               *[f"--gin_file={f}" for f in args.gin_file],
               f"--gin_bindings=MODEL_DIR={model_dir!r}", *[f"--gin_bindings={b}"
                                                           for b in args.gin_bindings],
               *[f"--gin_bindings={k} = {gin_value(v)}" for k, v in point.items()]]
    print(f"sweep {i + 1}/{len(points)}: {name}\n  {shlex.join(command)}", flush=True)
    status = "dry run"
    if not args.dry_run:
      result = subprocess.run(command, cwd=REPO, check=False)
      status = "ok" if result.returncode == 0 else f"exit {result.returncode}"
    rows.append({"name": name, "model_dir": model_dir, "bindings": point, "status": status,
                 "metrics": final_metrics(model_dir)})
  print(write_table(args.root, rows), flush=True)
  return 0 if all(r["status"] in ("ok", "dry run") for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
