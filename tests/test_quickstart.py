"""`musiclm quickstart` end to end in miniature (tests/quickstart_micro), resumed
after each stop, and its HTML report loaded in headless Chromium.

The run's first go, up to the last tokenizer, is the one the pipeline tests
share (tests/tiny_tokenizers.py); this file continues a copy of it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import gin
import pytest
import tiny_tokenizers
import xla_env

from musiclm_jax import main as cli
from musiclm_jax import quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = tiny_tokenizers.QUICKSTART_MICRO
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def musiclm(*flags, check=True):
  env = xla_env.subprocess_env(1)
  result = subprocess.run([sys.executable, "-m", "musiclm_jax.main", "quickstart", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  if check:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A micro quickstart run in two goes: up to the tokenizers (shared), then the
  rest in a copy."""
  shared, first = tiny_tokenizers.shared_quickstart()
  assert first.count("finished earlier") == 0, first  # a fresh run
  directory = str(tmp_path_factory.mktemp("quickstart") / "run")
  shutil.copytree(shared, directory)
  second = musiclm(f"--workdir={directory}", f"--size={MICRO}")
  return directory, [first, second.stdout]


def test_phases_run_in_order_and_a_rerun_resumes_after_the_finished_ones(workdir):
  directory, goes = workdir
  # Phase i runs in the go that reaches it, and every later go skips it.
  last_phase_of_go = [tiny_tokenizers.LAST_TOKENIZER_PHASE, quickstart.PHASES[-1]]
  ends = [quickstart.PHASES.index(phase) for phase in last_phase_of_go]
  for number, phase in enumerate(quickstart.PHASES, 1):
    go = next(g for g, end in enumerate(ends) if number - 1 <= end)
    assert re.search(rf"quickstart \[{number}/12\] {phase}: .*ETA of the whole run \d",
                     goes[go]), (phase, goes[go])
    for later in goes[go + 1:]:
      assert f"quickstart: {phase} finished earlier" in later
      assert f"] {phase}:" not in later
    for earlier in goes[:go]:
      assert f"] {phase}:" not in earlier
  with open(os.path.join(directory, quickstart.STATE_FILE), encoding="utf-8") as f:
    state = json.load(f)
  assert list(state["phases"]) == list(quickstart.PHASES)
  assert state["phases"]["soundstream"]["step"] == 2
  assert state["phases"]["tokenize"]["splits"]["test"]["clips"] == 2
  # The run is finished: another go has nothing left to do.
  again = musiclm(f"--workdir={directory}", f"--size={MICRO}").stdout
  assert again.count("finished earlier") == len(quickstart.PHASES)


def test_outputs_of_every_phase_are_where_the_layout_says(workdir):
  directory = workdir[0]
  for model in ("soundstream", "w2v_bert", "mulan", "semantic", "coarse", "fine"):
    assert os.path.isdir(os.path.join(directory, "runs", model, "checkpoints", "2")), model
  assert os.path.isfile(os.path.join(directory, "bundle", "manifest.json"))
  with open(os.path.join(directory, "generated", "manifest.jsonl"), encoding="utf-8") as f:
    generated = [json.loads(line) for line in f]
  assert sorted(row["id"] for row in generated) == ["prompt_00", "prompt_01"]
  with open(os.path.join(directory, "eval", "generation.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report["num_clips"] == 2 and report["seconds"] == pytest.approx(1.0)
  assert [p["prompt"] for p in report["prompts"]] == [row["segments"][0][0] for row in sorted(
      generated, key=lambda row: row["id"])]
  assert len(report["generated"]["per_clip"]) == 2 and report["frechet_distance"] >= 0
  names = set(os.listdir(os.path.join(directory, "eval", "reconstructions")))
  assert names == {f"clip_{i}_{kind}.wav" for i in (0, 1) for kind in ("original", "codec")}
  with open(os.path.join(directory, "eval", "stages.json"), encoding="utf-8") as f:
    stage_reports = json.load(f)
  borrowed = {"semantic": ["other_mulan"], "coarse": ["other_mulan", "other_semantic"],
              "fine": ["other_coarse"]}
  for name, report in stage_reports.items():
    dropped = ["no_conditioning"] if name != "fine" else []
    assert list(report["variants"]) == ["own", *dropped, *borrowed[name]], name
    assert (report["step"], report["split"]) == (2, "test") and report["windows"] >= 2
  with open(os.path.join(directory, "eval", "semantic.json"), encoding="utf-8") as f:
    semantic_report = json.load(f)
  assert semantic_report["split"] == "test" and semantic_report["clips"] == 2
  with open(os.path.join(directory, quickstart.STATE_FILE), encoding="utf-8") as f:
    evaluate = json.load(f)["phases"]["evaluate"]
  within = {label: [None if v is None else pytest.approx(v, abs=1e-4) for v in values]
            for label, values in evaluate["semantic_within_clip_ami"].items()}
  assert within == {label: [semantic_report[m]["within_clip_ami"][label]
                            for m in ("semantic", "log_mel_kmeans")]
                    for label in semantic_report["label_classes"]}
  prefix_use = evaluate["prefix_use"]
  assert prefix_use == {f"{name}.{variant}": pytest.approx(
      [stage_reports[name]["variants"][variant][k] for k in ("increase", "first_frame_increase")],
      abs=1e-4) for name, variants in borrowed.items() for variant in variants}


def test_report_loads_all_its_audio_and_images_in_headless_chromium(workdir, tmp_path):
  chromium = shutil.which("chromium")
  assert chromium, "Chromium is missing: run scripts/install_system_packages.sh"
  page = os.path.join(workdir[0], "report", "index.html")
  with open(page, encoding="utf-8") as f:
    html = f.read()
  num_media = html.count("<audio ") + html.count("<img")
  # 2 prompts x (2 players + 2 spectrograms), 2 reconstructions x 2 x (player +
  # spectrogram), a training curve per model.
  assert num_media == 8 + 8 + 6
  for prompt in ("prompt_00", "prompt_01"):
    assert f'src="media/{prompt}.wav"' in html and f'src="media/{prompt}_real.wav"' in html
  assert "What each stage uses of its prefix" in html and "other_semantic" in html
  assert "Do the semantic tokens follow the notes?" in html and "top_pitch_class" in html

  def load(path):
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", f"file://{path}"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout

  dom = load(page)
  assert dom.count('data-status="ok"') == num_media + 1, dom[:2000]  # + the summary line
  assert f"all {num_media} media files loaded" in dom
  # The page notices missing media: a copy without the media folder says so.
  moved = tmp_path / "moved.html"
  moved.write_text(html, encoding="utf-8")
  dom = load(str(moved))
  assert dom.count('data-status="error"') == num_media + 1
  assert f"{num_media} of {num_media} media files failed to load" in dom


def test_another_plan_unknown_size_and_bad_phase_are_refused(workdir):
  directory = workdir[0]
  result = musiclm(f"--workdir={directory}", f"--size={MICRO}",
                   "--gin_bindings=QuickstartPlan.num_clips = 40", check=False)
  assert result.returncode == 1 and "holds a quickstart of another size or plan" in result.stderr
  result = musiclm(f"--workdir={directory}", "--size=huge", check=False)
  assert result.returncode == 1 and "no quickstart configuration 'huge'" in result.stderr
  assert "small, tiny" in result.stderr
  result = musiclm(f"--workdir={directory}", f"--size={MICRO}", "--until=train", check=False)
  assert result.returncode == 1 and "unknown phase 'train'" in result.stderr


def test_a_run_started_before_a_plan_field_existed_resumes_with_its_default(tmp_path):
  plan = quickstart.QuickstartPlan(num_clips=20)
  state = quickstart.RunState(str(tmp_path), "tiny", plan)
  state.record("corpus", 1.0, {})
  with open(tmp_path / quickstart.STATE_FILE, encoding="utf-8") as f:
    stored = json.load(f)
  del stored["plan"]["stage_eval_windows"]  # as written before the field existed
  with open(tmp_path / quickstart.STATE_FILE, "w", encoding="utf-8") as f:
    json.dump(stored, f)
  assert quickstart.RunState(str(tmp_path), "tiny", plan).finished("corpus") == 1.0
  with pytest.raises(quickstart.QuickstartError, match="another size or plan"):
    quickstart.RunState(str(tmp_path), "tiny",
                        quickstart.QuickstartPlan(num_clips=20, stage_eval_windows=8))


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_every_phase_file_of_the_sizes_parses_with_its_macros(size):
  configs = quickstart.config_dir(size)
  for module in cli.GIN_MODULES["train"]:
    __import__(module)
  gin.clear_config()
  cli.parse_gin([os.path.join(configs, "quickstart.gin")], [])
  plan = quickstart.QuickstartPlan()  # pylint: disable=no-value-for-parameter
  assert set(plan.expected_minutes) == set(quickstart.PHASES)
  if size == "tiny":  # the budget: 30 minutes on 2 CPU cores
    assert sum(plan.expected_minutes.values()) <= 30
  macros = {"MODEL_DIR": "/m", "CORPUS_DIR": "/c", "TOKENS_DIR": "/t",
            "SOUNDSTREAM_DIR": "/s", "SEMANTIC_DIR": "/w", "MULAN_DIR": "/u"}
  for phase in ("soundstream", "w2v_bert", "mulan", "tokenize", "semantic", "coarse", "fine"):
    gin.clear_config()
    cli.parse_gin([os.path.join(configs, f"{phase}.gin")],
                  [f"{k} = {v!r}" for k, v in macros.items()])
    if phase in ("semantic", "coarse", "fine"):
      assert gin.query_parameter("StageTask.stage") == phase
  gin.clear_config()
