"""launch/sweep.py: grid expansion, run names, and a real two-run sweep tabulated."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "launch"))
import sweep  # pylint: disable=wrong-import-position


def test_grid_expands_to_every_combination_with_distinct_names():
  grid = sweep.parse_grid(["warmup_cosine.peak_value=[1e-3, 3e-3]",
                           "DecoderConfig.num_layers=[2, 4, 6]"])
  points = sweep.expand(grid)
  assert len(points) == 6 and points[0] == {"warmup_cosine.peak_value": 1e-3,
                                            "DecoderConfig.num_layers": 2}
  names = {sweep.run_name(p) for p in points}
  assert len(names) == 6 and "peak_value=0.001,num_layers=2" in names
  assert sweep.gin_value("@adafactor") == "@adafactor" and sweep.gin_value("a") == "'a'"
  for bad in (["x=1"], ["x=[]"], ["=[1]"], ["x=[1", "y=[2]"], ["x=[1]", "x=[2]"]):
    with pytest.raises(ValueError):
      sweep.parse_grid(bad)


FAKE_TRAIN = """
import json, os, re, sys
args = sys.argv[2:]  # after the subcommand
model_dir = next(eval(a.split("=", 2)[2]) for a in args if a.startswith("--gin_bindings=MODEL_DIR"))
lr = float(next(a.rsplit("=", 1)[1] for a in args if "=warmup_cosine.peak_value" in a))
if lr > 1:
  sys.exit(3)
os.makedirs(model_dir, exist_ok=True)
with open(os.path.join(model_dir, "metrics.jsonl"), "a") as f:
  for step in (1, 2):
    f.write(json.dumps({"step": step, "train/loss": lr * 1000 / step}) + "\\n")
  f.write(json.dumps({"step": 2, "eval/loss": lr * 400}) + "\\n")
"""


def test_sweep_runs_each_point_through_the_launcher_and_tabulates(tmp_path):
  """A stand-in for `musiclm train` (real training through the CLI is tested in
  test_cli.py) that writes metrics from its bindings and fails for one point."""
  fake = tmp_path / "fake_train.py"
  fake.write_text(FAKE_TRAIN)
  root = str(tmp_path / "sweep")
  code = sweep.main(["--root", root, "--gin_file", "gin/runs/synthetic_tiny.gin",
                     "--gin_bindings", "train.num_steps = 2",
                     "--grid", "warmup_cosine.peak_value=[1e-3, 3e-3, 5.0]",
                     "--launcher", f"{sys.executable} {fake}"])
  assert code == 1  # one run failed
  rows = json.load(open(os.path.join(root, "sweep.json")))
  assert [r["status"] for r in rows] == ["ok", "ok", "exit 3"]
  assert rows[0]["metrics"] == {"step": 2, "train/loss": 0.5, "eval/loss": 0.4}
  assert rows[1]["metrics"]["train/loss"] == pytest.approx(1.5) and rows[2]["metrics"] == {}
  assert rows[0]["model_dir"].endswith("peak_value=0.001")
  table = open(os.path.join(root, "sweep.md")).read().splitlines()
  assert table[0] == "| run | warmup_cosine.peak_value | status | eval/loss | step | train/loss |"
  assert len(table) == 5 and "| exit 3 |" in table[4]
