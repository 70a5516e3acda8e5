"""`musiclm quickstart --workdir DIR`: all of MusicLM on the built-in corpus.

    musiclm quickstart --workdir=runs/quickstart                # tiny, ~30 min on 2 CPU cores
    musiclm quickstart --workdir=runs/quickstart_small --size=small   # a GPU

Eleven phases, each one of the project's own commands with the experiment
in `gin/quickstart/<size>/` (one gin file per phase, runnable on its own):

  corpus       `musiclm prepare gm_synth`: composed and rendered pieces with captions
  soundstream  `musiclm train` the codec (acoustic tokens A)
  w2v_bert     `musiclm train` w2v-BERT, then `semantic fit_kmeans` (semantic tokens S)
  mulan        `musiclm train` MuLan, then `mulan fit_rvq` (conditioning tokens M)
  tokenize     `musiclm tokenize`: SeqIO's Beam cache job of S, A, M_A
  semantic, coarse, fine   `musiclm train` the three stages on the cache
  export       `musiclm export`: the six models as one bundle
  generate     `musiclm infer` on the corpus' held-out test prompts
  evaluate     generation measures beside the real clips; codec reconstructions;
               whether the semantic tokens follow the notes (`musiclm eval
               semantic`); what each stage uses of its prefix (`musiclm eval stage`)
  report       DIR/report/index.html (see `report.py`)

What each phase finished is recorded in DIR/quickstart.json; a re-run skips
finished phases and resumes an interrupted one where its command resumes
(training from its last checkpoint, the cache job from its finished tasks,
generation from its finished items). Every phase prints a line with its
place in the run and an ETA for the whole run, from the typical phase times
of `QuickstartPlan.expected_minutes` scaled by how fast this machine has
been so far; training phases print their own progress lines with ETA.

Layout of DIR: data/ (corpus), runs/<model>/ (training runs), tokens/
(token cache), bundle/, generated/ (wavs, tokens, manifest.jsonl), eval/
(JSON reports, reconstructions), report/ (HTML with its media).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Callable

import gin
import numpy as np

from musiclm_jax import stages

PHASES = ("corpus", "soundstream", "w2v_bert", "mulan", "tokenize", "semantic", "coarse",
          "fine", "export", "generate", "evaluate", "report")
STATE_FILE = "quickstart.json"
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin",
                           "quickstart")


class QuickstartError(ValueError):
  """A work directory or plan the quickstart cannot go on with."""


class QuickstartStopped(RuntimeError):
  """A phase was stopped (SIGTERM) after saving what it had; run again to resume."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class QuickstartPlan:
  """What the quickstart builds; `gin/quickstart/<size>/quickstart.gin` sets it.

  Attributes:
    num_clips: clips of the `gm_synth` corpus (80 % train, 10 % validation,
      10 % test).
    clip_seconds: length of each clip.
    seed: seed of composition, splits and sampling.
    num_prompts: held-out test prompts to generate (at most the test split).
    generate_seconds: seconds of audio per prompt.
    num_reconstructions: test clips shown through the codec in the report.
    stage_eval_windows: test windows (at most) on which each stage's use of
      its prefix is measured (`musiclm eval stage`).
    semantic_eval_clips: test clips (at most) on which the semantic tokens are
      scored against the score's notes (`musiclm eval semantic`).
    expected_minutes: typical minutes per phase on the machine the size is
      meant for; the basis of the ETA.
  """
  num_clips: int = 120
  clip_seconds: float = 10.0
  seed: int = 0
  num_prompts: int = 6
  generate_seconds: float = 8.0
  num_reconstructions: int = 4
  stage_eval_windows: int = 64
  semantic_eval_clips: int = 32
  expected_minutes: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where each phase of a quickstart in `workdir` writes."""
  workdir: str

  @property
  def data(self) -> str:
    return os.path.join(self.workdir, "data")

  def run(self, model: str) -> str:
    return os.path.join(self.workdir, "runs", model)

  @property
  def tokens(self) -> str:
    return os.path.join(self.workdir, "tokens")

  @property
  def bundle(self) -> str:
    return os.path.join(self.workdir, "bundle")

  @property
  def generated(self) -> str:
    return os.path.join(self.workdir, "generated")

  @property
  def eval(self) -> str:
    return os.path.join(self.workdir, "eval")

  @property
  def report(self) -> str:
    return os.path.join(self.workdir, "report")

  @property
  def prompts(self) -> str:
    return os.path.join(self.workdir, "prompts.jsonl")


def _format_minutes(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _default_plan() -> dict[str, Any]:
  return {field.name: field.default for field in dataclasses.fields(QuickstartPlan)
          if field.default is not dataclasses.MISSING}


class RunState:
  """DIR/quickstart.json: the size and plan of the run and each finished phase's time."""

  def __init__(self, workdir: str, size: str, plan: QuickstartPlan):
    self.path = os.path.join(workdir, STATE_FILE)
    identity = {"size": size, "plan": dataclasses.asdict(plan)}
    identity["plan"].pop("expected_minutes")
    if os.path.isfile(self.path):
      with open(self.path, encoding="utf-8") as f:
        self.state = json.load(f)
      # A plan field added since the run started counts as its default.
      self.state["plan"] = {**_default_plan(), **self.state.get("plan", {})}
      if {k: self.state.get(k) for k in identity} != identity:
        raise QuickstartError(
            f"{workdir} holds a quickstart of another size or plan ({self.state.get('size')}, "
            f"{self.state.get('plan')}); resume it with the same settings or use a new --workdir")
    else:
      self.state = {**identity, "phases": {}}

  def finished(self, phase: str) -> float | None:
    """Seconds the phase took, or None if it has not finished."""
    return self.state["phases"].get(phase, {}).get("seconds")

  def record(self, phase: str, seconds: float, summary: dict[str, Any]) -> None:
    self.state["phases"][phase] = {
        "seconds": round(seconds, 1), "finished": datetime.datetime.now().isoformat(
            timespec="seconds"), **summary}
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.state, f, indent=1)
    os.replace(tmp, self.path)


class PhaseClock:
  """Prints each phase's place in the run and the ETA of the whole run.

  The ETA is the typical time of the phases left, scaled by how much slower
  (or faster) than typical this machine ran the phases finished in this run.
  """

  def __init__(self, expected_minutes: dict[str, float]):
    self.expected = {p: 60.0 * expected_minutes.get(p, 1.0) for p in PHASES}
    self.actual_s = 0.0
    self.expected_done_s = 0.0
    self.started = time.time()

  def eta_s(self, phase: str) -> float:
    left = sum(self.expected[p] for p in PHASES[PHASES.index(phase):])
    speed = self.actual_s / self.expected_done_s if self.expected_done_s > 0 else 1.0
    return left * speed

  def begin(self, phase: str, what: str) -> None:
    number = PHASES.index(phase) + 1
    print(f"quickstart [{number}/{len(PHASES)}] {phase}: {what} (typically "
          f"{_format_minutes(self.expected[phase])}; {_format_minutes(time.time() - self.started)}"
          f" elapsed, ETA of the whole run {_format_minutes(self.eta_s(phase))})", flush=True)

  def end(self, phase: str, seconds: float) -> None:
    self.actual_s += seconds
    self.expected_done_s += self.expected[phase]


def config_dir(size: str) -> str:
  """`gin/quickstart/<size>` for a size name, else `size` itself as a directory of phase files."""
  directory = os.path.join(CONFIG_ROOT, size) if os.sep not in size else size
  if not os.path.isfile(os.path.join(directory, "quickstart.gin")):
    sizes = sorted(n for n in os.listdir(CONFIG_ROOT)
                   if os.path.isfile(os.path.join(CONFIG_ROOT, n, "quickstart.gin")))
    raise QuickstartError(f"no quickstart configuration {size!r} ({directory}/quickstart.gin "
                          f"is missing); sizes: {', '.join(sizes)}, or a directory of phase "
                          "gin files")
  return directory


def _parse_phase_gin(configs: str, phase: str, macros: dict[str, Any]) -> None:
  """Clears gin and parses `<configs>/<phase>.gin` with its macros."""
  from musiclm_jax import main as cli  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  cli.parse_gin([os.path.join(configs, f"{phase}.gin")],
                [f"{name} = {value!r}" for name, value in macros.items()])


def _train(configs: str, phase: str, macros: dict[str, Any]) -> dict[str, Any]:
  """`musiclm train` of the phase's gin file; returns its last metrics."""
  from musiclm_jax.training import trainer  # pylint: disable=g-import-not-at-top
  _parse_phase_gin(configs, phase, macros)
  result = trainer.train()  # pylint: disable=no-value-for-parameter
  if result.preempted:
    raise QuickstartStopped(f"{phase} training stopped at step {result.step} (checkpoint "
                            "saved); run the same command again to resume")
  return {"step": result.step,
          **{k: round(float(v), 5) for k, v in result.metrics.items()
             if k in ("loss", "eval_loss", "eval_accuracy")}}


class Quickstart:
  """The phases of one quickstart run in `workdir` (see the module docstring)."""

  def __init__(self, workdir: str, size: str, plan: QuickstartPlan):
    self.configs = config_dir(size)
    self.size, self.plan = size, plan
    self.paths = Paths(os.path.abspath(workdir))
    os.makedirs(self.paths.workdir, exist_ok=True)
    self.state = RunState(self.paths.workdir, size, plan)
    self.corpus_dir = ""

  def run(self, until: str | None = None) -> dict[str, Any]:
    """Runs (or resumes) every phase up to and including `until` (default: all)."""
    if until is not None and until not in PHASES:
      raise QuickstartError(f"unknown phase {until!r}; phases: {', '.join(PHASES)}")
    from musiclm_jax import main as cli  # pylint: disable=g-import-not-at-top
    cli.import_configurables("train")  # what every phase's gin file binds
    clock = PhaseClock(self.plan.expected_minutes)
    steps: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
        "corpus": ("build the gm_synth corpus", self.corpus),
        "soundstream": ("train the SoundStream codec", lambda: self.tokenizer("soundstream")),
        "w2v_bert": ("train w2v-BERT and fit k-means", lambda: self.tokenizer("w2v_bert")),
        "mulan": ("train MuLan and fit its RVQ", lambda: self.tokenizer("mulan")),
        "tokenize": ("pre-tokenize the corpus (Beam)", self.tokenize),
        "semantic": ("train the semantic stage", lambda: self.stage("semantic")),
        "coarse": ("train the coarse acoustic stage", lambda: self.stage("coarse")),
        "fine": ("train the fine acoustic stage", lambda: self.stage("fine")),
        "export": ("export the bundle", self.export),
        "generate": ("generate clips for held-out prompts", self.generate),
        "evaluate": ("evaluate generation, the codec, the semantic tokens and the stages",
                     self.evaluate),
        "report": ("write the HTML report", self.report),
    }
    self.corpus_dir = self._corpus_dir()
    for phase in PHASES:
      done = self.state.finished(phase)
      if done is not None:
        print(f"quickstart: {phase} finished earlier (in {_format_minutes(done)}); skipped",
              flush=True)
      else:
        what, step = steps[phase]
        clock.begin(phase, what)
        start = time.time()
        try:
          summary = step() or {}
        except (ValueError, FileNotFoundError) as e:  # bad input or state, with its message
          raise QuickstartError(f"phase {phase}: {e}") from e
        seconds = time.time() - start
        self.state.record(phase, seconds, summary)
        clock.end(phase, seconds)
      if phase == until:
        break
    gin.clear_config()
    report = os.path.join(self.paths.report, "index.html")
    if os.path.isfile(report):
      print(f"quickstart: done; open {report}", flush=True)
    return self.state.state

  # Phases, in order.

  def _corpus_dir(self) -> str:
    from musiclm_jax.corpora import base  # pylint: disable=g-import-not-at-top
    from musiclm_jax.tasks import corpora  # pylint: disable=g-import-not-at-top
    return corpora.dataset_dir(self.paths.data, "gm_synth", self._spec(base))

  def _spec(self, base):
    return base.BuildSpec(num_examples=self.plan.num_clips, seconds=self.plan.clip_seconds,
                          seed=self.plan.seed)

  def corpus(self) -> dict[str, Any]:
    from musiclm_jax.corpora import base  # pylint: disable=g-import-not-at-top
    from musiclm_jax.corpora import registry  # pylint: disable=g-import-not-at-top
    from musiclm_jax.tasks import corpora  # pylint: disable=g-import-not-at-top
    gin.clear_config()
    corpus_dir = corpora.prepare(registry.SOURCES["gm_synth"](), self._spec(base),
                                 self.paths.data)
    return {"corpus_dir": corpus_dir, "clips": corpora.read_report(corpus_dir)["clips"]}

  def tokenizer(self, model: str) -> dict[str, Any]:
    from musiclm_jax.tokenizers import mulan_cli  # pylint: disable=g-import-not-at-top
    from musiclm_jax.tokenizers import semantic_cli  # pylint: disable=g-import-not-at-top
    run = self.paths.run(model)
    summary = _train(self.configs, model, {"MODEL_DIR": run, "CORPUS_DIR": self.corpus_dir})
    # The fits read their settings (clusters, codebook size) from the same gin file.
    if model == "w2v_bert":
      summary["kmeans"] = _fit_summary(semantic_cli.fit_kmeans(run, self.corpus_dir))
    elif model == "mulan":
      summary["rvq"] = _fit_summary(mulan_cli.fit_rvq(run, self.corpus_dir))
    return summary

  def tokenize(self) -> dict[str, Any]:
    from musiclm_jax.tasks import token_tasks  # pylint: disable=g-import-not-at-top
    _parse_phase_gin(self.configs, "tokenize", {
        "TOKENS_DIR": self.paths.tokens, "CORPUS_DIR": self.corpus_dir,
        "SOUNDSTREAM_DIR": self.paths.run("soundstream"),
        "SEMANTIC_DIR": self.paths.run("w2v_bert"), "MULAN_DIR": self.paths.run("mulan")})
    manifests = token_tasks.tokenize()  # pylint: disable=no-value-for-parameter
    return {"splits": manifests["gm_synth"]["splits"]}

  def stage(self, name: str) -> dict[str, Any]:
    return _train(self.configs, name, {"MODEL_DIR": self.paths.run(name),
                                    "TOKENS_DIR": self.paths.tokens})

  def export(self) -> dict[str, Any]:
    from musiclm_jax.sampling import bundle  # pylint: disable=g-import-not-at-top
    gin.clear_config()
    if os.path.isfile(os.path.join(self.paths.bundle, bundle.MANIFEST_FILE)):
      return {"bundle": self.paths.bundle}  # exported before the phase was recorded
    runs = bundle.BundleRuns(**{name: self.paths.run(name) for name in (
        "soundstream", "w2v_bert", "mulan", "semantic", "coarse", "fine")})
    bundle.export_bundle(runs, self.paths.bundle)
    return {"bundle": self.paths.bundle}

  def _prompts(self) -> list[dict[str, Any]]:
    from musiclm_jax.eval import generation  # pylint: disable=g-import-not-at-top
    return generation.read_prompts(self.corpus_dir, self.plan.num_prompts)

  def _generator(self):
    from musiclm_jax.sampling import bundle  # pylint: disable=g-import-not-at-top
    from musiclm_jax.sampling import hierarchy  # pylint: disable=g-import-not-at-top
    return hierarchy.Generator(bundle.Bundle.load(self.paths.bundle))

  def generate(self) -> dict[str, Any]:
    from musiclm_jax.sampling import infer  # pylint: disable=g-import-not-at-top
    gin.clear_config()
    with open(self.paths.prompts + ".tmp", "w", encoding="utf-8") as f:
      for i, p in enumerate(self._prompts()):
        f.write(json.dumps({"id": f"prompt_{i:02d}", "prompt": p["prompt"],
                            "seconds": self.plan.generate_seconds,
                            "seed": self.plan.seed + i}) + "\n")
    os.replace(self.paths.prompts + ".tmp", self.paths.prompts)
    return infer.infer(self._generator(), self.paths.prompts, self.paths.generated)

  def evaluate(self) -> dict[str, Any]:
    from musiclm_jax import audio  # pylint: disable=g-import-not-at-top
    from musiclm_jax.eval import codec as codec_eval  # pylint: disable=g-import-not-at-top
    from musiclm_jax.eval import generation  # pylint: disable=g-import-not-at-top
    gin.clear_config()
    generator = self._generator()
    prompts = self._prompts()
    # Read as written (`audio.load` would refuse an untrained model's clipped output).
    generated = np.stack([audio.read(os.path.join(self.paths.generated, f"prompt_{i:02d}.wav"))[0][0]
                          for i in range(len(prompts))])
    reference = generation.reference_clips(self.corpus_dir, prompts, generated.shape[1])
    report = generation.evaluate_clips(generated, reference, prompts,
                                       generator.bundle.tokenizers.mulan)
    report["prompts"] = prompts
    os.makedirs(os.path.join(self.paths.eval, "references"), exist_ok=True)
    for i, wav in enumerate(reference):
      audio.write_wav(os.path.join(self.paths.eval, "references", f"prompt_{i:02d}.wav"), wav)
    _write_json(os.path.join(self.paths.eval, "generation.json"), report)
    print(generation.format_report(report), flush=True)

    codec = generator.bundle.tokenizers.codec
    variables = generator.bundle.tokenizers.codec_variables
    clips = reference[:self.plan.num_reconstructions]
    codec_report = codec_eval.evaluate_codec(codec, variables, clips, with_opus=False)
    decoded = np.asarray(codec.decode(variables, codec.encode(variables, clips)))
    recon_dir = os.path.join(self.paths.eval, "reconstructions")
    os.makedirs(recon_dir, exist_ok=True)
    for i, (original, recon) in enumerate(zip(clips, decoded)):
      audio.write_wav(os.path.join(recon_dir, f"clip_{i}_original.wav"), original)
      audio.write_wav(os.path.join(recon_dir, f"clip_{i}_codec.wav"), recon[:len(original)])
    _write_json(os.path.join(self.paths.eval, "codec.json"), codec_report)
    print(codec_eval.format_report(codec_report), flush=True)
    return {"frechet_distance": round(report["frechet_distance"], 4),
            "cycle_consistency": round(report["generated"]["cycle_consistency"], 4),
            "semantic_within_clip_ami": self._evaluate_semantic_tokens(),
            "prefix_use": self._evaluate_stages()}

  def _evaluate_semantic_tokens(self) -> dict[str, list[float | None]]:
    """Whether the semantic tokens follow the notes (`eval/semantic.json`); returns
    the within-clip AMI of each label for the tokens and for log-mel k-means."""
    from musiclm_jax.eval import semantic as semantic_eval  # pylint: disable=g-import-not-at-top
    from musiclm_jax.tokenizers import semantic_cli  # pylint: disable=g-import-not-at-top
    report = semantic_cli.evaluate(self.paths.run("w2v_bert"), self.corpus_dir, "test",
                                   self.plan.semantic_eval_clips)
    print(semantic_eval.format_report(report), flush=True)
    _write_json(os.path.join(self.paths.eval, "semantic.json"), report)
    return {label: [None if report[m]["within_clip_ami"][label] is None
                    else round(report[m]["within_clip_ami"][label], 4)
                    for m in ("semantic", "log_mel_kmeans")]
            for label in report["label_classes"]}

  def _evaluate_stages(self) -> dict[str, list[float]]:
    """What each stage uses of its prefix on test windows (`eval/stages.json`);
    returns the loss increases of each `other_*` variant (whole window, first frame)."""
    from musiclm_jax.eval import stage as stage_eval  # pylint: disable=g-import-not-at-top
    reports = {}
    for name in stages.STAGE_NAMES:
      reports[name] = stage_eval.evaluate_run(self.paths.run(name), "test",
                                              self.plan.stage_eval_windows)
      print(stage_eval.format_report(reports[name]), flush=True)
    gin.clear_config()
    _write_json(os.path.join(self.paths.eval, "stages.json"), reports)
    return {f"{name}.{variant}": [round(row[k], 4) for k in ("increase", "first_frame_increase")]
            for name, report in reports.items() for variant, row in report["variants"].items()
            if variant.startswith("other_")}

  def report(self) -> dict[str, Any]:
    from musiclm_jax import report  # pylint: disable=g-import-not-at-top
    path = report.write_quickstart_report(self.paths, self.state.state)
    return {"report": path}


def _fit_summary(fit: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in fit.items() if isinstance(v, (int, float, str))}


def _write_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, default=float)
  os.replace(path + ".tmp", path)

