"""`musiclm` command line: subcommands configured by gin (T5X conventions).

    musiclm train --gin_file=gin/runs/synthetic_tiny.gin \
        --gin_bindings="MODEL_DIR='/tmp/run'"
    musiclm prepare gm_synth --data_dir=data --num_examples=200 --seconds=10
    musiclm codec roundtrip --checkpoint=MODEL_DIR in.wav out.wav
    musiclm mulan {fit_rvq|embed} --checkpoint=MODEL_DIR ...
    musiclm semantic {fit_kmeans|tokens} --checkpoint=MODEL_DIR ...
    musiclm eval {codec|mulan|semantic} --checkpoint=MODEL_DIR --corpus_dir=DIR
    musiclm eval generation --bundle=BUNDLE --corpus_dir=DIR
    musiclm eval stage --checkpoint=MODEL_DIR [--step=N]   (what a stage uses of its prefix)
    musiclm tokenize --gin_file=gin/tokenize/default.gin --gin_bindings="TOKENS_DIR='...'" ...
    musiclm export --output=BUNDLE --gin_bindings="BundleRuns.coarse='runs/coarse'" ...
    musiclm generate --bundle=BUNDLE --prompt="a calm piano waltz" --seconds=30 --output=a.wav
    musiclm generate --bundle=BUNDLE --prompt="a jazz trio" --melody=hum.wav --output=a.wav
    musiclm melody {prepare|fit_rvq} ...   (melody encoder: corpus, RVQ)
    musiclm eval melody --checkpoint=MELODY_DIR --data_dir=DIR | --bundle=BUNDLE --data_dir=DIR
    musiclm infer --bundle=BUNDLE --prompts=prompts.jsonl --output_dir=out
    musiclm quickstart --workdir=runs/quickstart [--size=tiny] [--until=PHASE]

A trained model is read from the MODEL_DIR its `musiclm train` run wrote
(`--checkpoint`). `--gin_file` and `--gin_bindings` repeat; `--gin_search_paths` adds
directories in which `--gin_file` and gin `include`s are looked up (this
repository's root and `gin/` are always searched last).
"""
from __future__ import annotations

import importlib
import json
import os
import sys

if __name__ == "__main__":  # `python -m musiclm_jax.main`: modules that import this one
  sys.modules.setdefault("musiclm_jax.main", sys.modules[__name__])  # get it, flags and all
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow's start-up logs
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import gin

flags.DEFINE_multi_string("gin_file", [], "gin config file(s), applied in order.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, e.g. \"MODEL_DIR='/tmp/x'\".")
flags.DEFINE_list("gin_search_paths", [], "extra directories to look up gin files in.")
# `musiclm prepare CORPUS`; everything else about a corpus is in gin.
flags.DEFINE_string("data_dir", "data", "prepare: TFDS data directory to build corpora in.")
flags.DEFINE_integer("num_examples", 0, "prepare: clips to build (0: all the source has).")
flags.DEFINE_float("seconds", 10.0, "prepare: clip length; generate: seconds of audio.")
flags.DEFINE_integer("seed", 0, "prepare: seed of composition, choices and splits; "
                     "generate: seed of the first prompt (the next ones count up).")
flags.DEFINE_string("source_dir", None, "prepare: the user's files (audio_folder, musiccaps).")
flags.DEFINE_integer("workers", 0, "prepare: worker processes (0: one per CPU core).")
# Trained models are read from the MODEL_DIR their training run wrote.
flags.DEFINE_string("checkpoint", None,
                    "codec, mulan, semantic, eval: MODEL_DIR of the trained model.")
flags.DEFINE_integer("num_levels", 0, "codec: RVQ levels to keep (0: all).")
flags.DEFINE_integer("step", None, "eval stage: the checkpoint step (default: the newest).")
flags.DEFINE_string("corpus_dir", None,
                    "eval, mulan fit_rvq, semantic fit_kmeans: a corpus built by prepare.")
flags.DEFINE_string("split", "test", "eval: corpus split.")
flags.DEFINE_integer("num_clips", 32, "eval: clips to evaluate on (eval stage: windows; "
                     "0: the whole split).")
flags.DEFINE_string("output", None, "eval: also write the report to this JSON file; "
                    "export: the bundle directory; generate: the wav file.")
flags.DEFINE_string("bundle", None,
                    "generate, infer, eval generation: a bundle written by `musiclm export`.")
flags.DEFINE_multi_string("prompt", [], "generate: a text prompt (repeatable: one clip each).")
flags.DEFINE_string("prompts", None, "infer: a JSONL file of prompts (see sampling/infer.py).")
flags.DEFINE_string("output_dir", None, "infer: where wavs, tokens and manifest.jsonl go.")
flags.DEFINE_string("workdir", None, "quickstart: where everything it makes goes.")
flags.DEFINE_string("size", "tiny", "quickstart: gin/quickstart/<size> (tiny: 2 CPU cores, "
                    "small: a GPU), or a directory of phase gin files.")
flags.DEFINE_string("until", None, "quickstart: stop after this phase (default: run all).")
flags.DEFINE_multi_string("text", [], "mulan embed: a text prompt (repeatable).")
flags.DEFINE_multi_string("audio", [], "mulan embed: an audio file (repeatable); "
                          "generate: audio to continue (one, or one per prompt).")
flags.DEFINE_string("melody", None, "generate: a recording of the melody to follow (any "
                    "format, rate and length of at least one melody window).")
flags.DEFINE_integer("num_melodies", 100, "melody prepare: melodies to compose; eval melody: "
                     "melodies to retrieve among (at most) or to generate from.")
flags.DEFINE_integer("renditions", 8, "melody prepare: renditions per melody.")
flags.DEFINE_string("soundfont", "fluidr3", "melody prepare: SoundFont of the General MIDI "
                    "voices ('' renders only the sine voice).")
FLAGS = flags.FLAGS

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Searched after --gin_search_paths, so that `gin/runs/x.gin` and includes
# such as `sizes/tiny.gin` resolve from any working directory.
DEFAULT_SEARCH_PATHS = (REPO_DIR, os.path.join(REPO_DIR, "gin"))


_SEARCH_PATHS_ADDED: set[str] = set()


class GinConfigError(ValueError):
  """A gin file or binding could not be parsed or refers to something unknown."""


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses files then bindings; errors name the file or binding at fault."""
  for path in [*search_paths, *DEFAULT_SEARCH_PATHS]:
    if os.path.isdir(path) and path not in _SEARCH_PATHS_ADDED:
      gin.add_config_file_search_path(path)
      _SEARCH_PATHS_ADDED.add(path)
  verbosity = logging.get_verbosity()
  # gin logs an error for every search path that misses, even when a later
  # one hits; a real failure is raised below with its own message.
  logging.set_verbosity(logging.FATAL)
  try:
    for path in gin_files:
      try:
        gin.parse_config_file(path)
      except Exception as e:  # gin raises IOError, ValueError, SyntaxError, ...
        raise GinConfigError(f"gin file {path!r}: {e}") from e
    for binding in gin_bindings:
      try:
        gin.parse_config(binding)
      except Exception as e:
        raise GinConfigError(f"gin binding {binding!r}: {e}") from e
  finally:
    logging.set_verbosity(verbosity)


def _require_macro(name: str, example: str) -> None:
  try:
    gin.query_parameter(f"%{name}")
  except ValueError:
    raise GinConfigError(f"the gin macro {name} is not set; add "
                         f"--gin_bindings=\"{name}={example}\"") from None


class UsageError(ValueError):
  """Wrong positional arguments or flags for a subcommand."""


class CommandError(RuntimeError):
  """A subcommand stopped on bad input or state, with a message for the user."""


def _train(args: Sequence[str]) -> None:
  from musiclm_jax.training import trainer  # pylint: disable=g-import-not-at-top
  if args:
    raise UsageError(f"train takes no positional arguments; got {' '.join(args)}")
  _require_macro("MODEL_DIR", "'/path/to/run'")
  try:
    trainer.train()  # pylint: disable=no-value-for-parameter
  except (trainer.NonFiniteLossError, trainer.IncompatibleCheckpointError) as e:
    raise CommandError(str(e)) from e


def _prepare(args: Sequence[str]) -> None:
  from musiclm_jax.corpora import base  # pylint: disable=g-import-not-at-top
  from musiclm_jax.corpora import registry  # pylint: disable=g-import-not-at-top
  from musiclm_jax.music import render  # pylint: disable=g-import-not-at-top
  if len(args) != 1 or args[0] not in registry.SOURCES:
    raise UsageError(f"usage: musiclm prepare {{{'|'.join(registry.SOURCES)}}} --data_dir=DIR "
                     f"--num_examples=N --seconds=S --seed=K [--source_dir=DIR]; "
                     f"got {' '.join(args) or 'no corpus'}")
  try:
    spec = base.BuildSpec(num_examples=FLAGS.num_examples, seconds=FLAGS.seconds,
                          seed=FLAGS.seed, source_dir=FLAGS.source_dir)
    source = registry.SOURCES[args[0]]()
    source.check(spec)  # a missing folder or SoundFont is named before TensorFlow loads (5 s)
    from musiclm_jax.tasks import corpora  # pylint: disable=g-import-not-at-top  # TensorFlow
    corpora.prepare(source, spec, FLAGS.data_dir, workers=FLAGS.workers)
  except (ValueError, render.RenderError) as e:
    raise CommandError(str(e)) from e


def _require_flag(name: str, usage: str) -> str:
  value = FLAGS[name].value
  if not value:
    raise UsageError(f"--{name} is required; usage: {usage}")
  return value


def _codec(args: Sequence[str]) -> None:
  from musiclm_jax.tokenizers import codec_files  # pylint: disable=g-import-not-at-top
  from musiclm_jax.tokenizers import soundstream  # pylint: disable=g-import-not-at-top
  usage = "musiclm codec {encode|decode|roundtrip} --checkpoint=MODEL_DIR IN OUT [--num_levels=Q]"
  actions = {"encode": codec_files.encode_file, "decode": codec_files.decode_file,
             "roundtrip": codec_files.roundtrip_file}
  if len(args) != 3 or args[0] not in actions:
    raise UsageError(f"usage: {usage}; got {' '.join(args) or 'nothing'}")
  codec, variables = _run(soundstream.load_codec, _require_flag("checkpoint", usage))
  extra = {"num_levels": FLAGS.num_levels or None} if args[0] != "decode" else {}
  print(json.dumps(_run(actions[args[0]], codec, variables, args[1], args[2], **extra)),
        flush=True)


def _eval_codec(args: Sequence[str]) -> None:
  from musiclm_jax.eval import codec as codec_eval  # pylint: disable=g-import-not-at-top
  from musiclm_jax.tasks import audio_clips  # pylint: disable=g-import-not-at-top
  from musiclm_jax.tokenizers import soundstream  # pylint: disable=g-import-not-at-top
  usage = ("musiclm eval codec --checkpoint=MODEL_DIR --corpus_dir=DIR [--split=test "
           "--num_clips=32 --seconds=10 --output=report.json]")
  if args:
    raise UsageError(f"usage: {usage}; got {' '.join(args)}")
  codec, variables = _run(soundstream.load_codec, _require_flag("checkpoint", usage))
  clips = _run(audio_clips.read_segments, _require_flag("corpus_dir", usage), FLAGS.split,
               FLAGS.num_clips, FLAGS.seconds)
  report = _run(codec_eval.evaluate_codec, codec, variables, clips)
  print(codec_eval.format_report(report), flush=True)
  _write_report(report)


def _run(command, *args, **kwargs):
  """`command(...)`; bad input or state (missing checkpoint, unreadable audio,
  a foreign codes file, a missing tool) becomes a `CommandError` with its message."""
  try:
    return command(*args, **kwargs)
  except (FileNotFoundError, ValueError) as e:
    raise CommandError(str(e)) from e


def _write_report(report) -> None:
  if FLAGS.output:
    tmp = f"{FLAGS.output}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, FLAGS.output)
    print(f"report written to {FLAGS.output}", flush=True)


def _eval_mulan(args: Sequence[str]) -> None:
  from musiclm_jax.tokenizers import mulan_cli  # pylint: disable=g-import-not-at-top
  usage = ("musiclm eval mulan --checkpoint=MODEL_DIR --corpus_dir=DIR [--split=test "
           "--num_clips=1000 --output=report.json]")
  if args:
    raise UsageError(f"usage: {usage}; got {' '.join(args)}")
  report = _run(mulan_cli.evaluate, _require_flag("checkpoint", usage),
                _require_flag("corpus_dir", usage), FLAGS.split, FLAGS.num_clips)
  print(json.dumps(report, indent=1), flush=True)
  _write_report(report)


def _mulan(args: Sequence[str]) -> None:
  from musiclm_jax.tokenizers import mulan_cli  # pylint: disable=g-import-not-at-top
  usage = ("musiclm mulan fit_rvq --checkpoint=MODEL_DIR --corpus_dir=DIR [--num_clips=N] | "
           "musiclm mulan embed --checkpoint=MODEL_DIR [--text=PROMPT ...] [--audio=FILE ...]")
  if args == ["fit_rvq"]:
    num_clips = FLAGS.num_clips if FLAGS["num_clips"].present else None
    _run(mulan_cli.fit_rvq, _require_flag("checkpoint", usage),
         _require_flag("corpus_dir", usage), num_clips)
  elif args == ["embed"]:
    for row in _run(mulan_cli.embed, _require_flag("checkpoint", usage), FLAGS.text,
                    FLAGS.audio):
      print(json.dumps(row), flush=True)
  else:
    raise UsageError(f"usage: {usage}; got {' '.join(args) or 'nothing'}")


def _semantic(args: Sequence[str]) -> None:
  from musiclm_jax.tokenizers import semantic_cli  # pylint: disable=g-import-not-at-top
  usage = ("musiclm semantic fit_kmeans --checkpoint=MODEL_DIR --corpus_dir=DIR | "
           "musiclm semantic tokens --checkpoint=MODEL_DIR IN_AUDIO [OUT.npy]")
  if args == ["fit_kmeans"]:
    _run(semantic_cli.fit_kmeans, _require_flag("checkpoint", usage),
         _require_flag("corpus_dir", usage))
  elif len(args) in (2, 3) and args[0] == "tokens":
    row = _run(semantic_cli.tokens, _require_flag("checkpoint", usage), *args[1:])
    print(json.dumps(row), flush=True)
  else:
    raise UsageError(f"usage: {usage}; got {' '.join(args) or 'nothing'}")


def _eval_semantic(args: Sequence[str]) -> None:
  from musiclm_jax.eval import semantic as semantic_eval  # pylint: disable=g-import-not-at-top
  from musiclm_jax.tokenizers import semantic_cli  # pylint: disable=g-import-not-at-top
  usage = ("musiclm eval semantic --checkpoint=MODEL_DIR --corpus_dir=DIR [--split=test "
           "--num_clips=32 --output=report.json]")
  if args:
    raise UsageError(f"usage: {usage}; got {' '.join(args)}")
  report = _run(semantic_cli.evaluate, _require_flag("checkpoint", usage),
                _require_flag("corpus_dir", usage), FLAGS.split, FLAGS.num_clips)
  print(semantic_eval.format_report(report), flush=True)
  _write_report(report)


def _tokenize(args: Sequence[str]) -> None:
  from musiclm_jax.tasks import token_tasks  # pylint: disable=g-import-not-at-top
  if args:
    raise UsageError(f"tokenize takes no positional arguments; got {' '.join(args)}")
  manifests = _run(token_tasks.tokenize)  # pylint: disable=no-value-for-parameter
  for corpus, manifest in manifests.items():
    print(f"tokenize {corpus}: {json.dumps(manifest['splits'])}", flush=True)
    if "job_seconds" in manifest:
      hours = sum(s["audio_seconds"] for s in manifest["splits"].values()) / 3600
      print(f"tokenize {corpus}: {manifest['job_seconds']:.0f} s for {hours * 60:.1f} minutes of "
            f"audio ({manifest['job_seconds'] / max(hours, 1e-9):.0f} s per audio hour)",
            flush=True)


def _generator(usage: str):
  """The bundle's hierarchy, data-parallel over this process' devices when it has several."""
  import jax  # pylint: disable=g-import-not-at-top
  from musiclm_jax.partitioning import Partitioner  # pylint: disable=g-import-not-at-top
  from musiclm_jax.sampling import bundle  # pylint: disable=g-import-not-at-top
  from musiclm_jax.sampling import hierarchy  # pylint: disable=g-import-not-at-top
  loaded = _run(bundle.Bundle.load, _require_flag("bundle", usage))
  devices = jax.local_devices()
  partitioner = Partitioner((len(devices), 1, 1), devices=devices) if len(devices) > 1 else None
  return hierarchy.Generator(loaded, partitioner=partitioner)


def _export(args: Sequence[str]) -> None:
  from musiclm_jax.sampling import bundle  # pylint: disable=g-import-not-at-top
  usage = ("musiclm export --output=BUNDLE_DIR --gin_bindings=\"BundleRuns.soundstream='...'\" "
           "... (soundstream, w2v_bert, mulan, semantic, coarse, fine)")
  if args:
    raise UsageError(f"usage: {usage}; got {' '.join(args)}")
  output = _require_flag("output", usage)
  try:
    runs = bundle.BundleRuns()  # pylint: disable=no-value-for-parameter
  except TypeError as e:
    raise UsageError(f"{e}; usage: {usage}") from e
  _run(bundle.export_bundle, runs, output)


def _generate(args: Sequence[str]) -> None:
  from musiclm_jax import audio  # pylint: disable=g-import-not-at-top
  usage = ("musiclm generate --bundle=DIR --prompt=\"...\" [--prompt=...] --seconds=30 "
           "--output=out.wav [--seed=0] [--audio=continue_me.wav] [--melody=hum.wav]")
  if args or not FLAGS.prompt:
    raise UsageError(f"usage: {usage}; got {' '.join(args) or 'no --prompt'}")
  output = _require_flag("output", usage)
  generator = _generator(usage)
  prompt_audio = None
  if FLAGS.audio:
    if len(FLAGS.audio) not in (1, len(FLAGS.prompt)):
      raise UsageError(f"give one --audio, or one per --prompt; got {len(FLAGS.audio)}")
    loaded = [_run(audio.load, path)[0] for path in FLAGS.audio]
    length = min(len(w) for w in loaded)
    prompt_audio = [w[:length] for w in loaded] * (len(FLAGS.prompt) // len(loaded))
  melody_audio, melody_rate = None, 16000
  if FLAGS.melody:
    melody_audio, melody_rate = _run(generator.load_melody, FLAGS.melody)
  seeds = [FLAGS.seed + i for i in range(len(FLAGS.prompt))]
  result = _run(generator.generate, [[(p, FLAGS.seconds)] for p in FLAGS.prompt], seeds,
                prompt_audio, melody_audio, melody_rate)
  stem, ext = os.path.splitext(output)
  for i, (prompt, seed) in enumerate(zip(FLAGS.prompt, seeds)):
    path = output if len(FLAGS.prompt) == 1 else f"{stem}_{i}{ext or '.wav'}"
    audio.write_wav(path, result.audio[i])
    print(json.dumps({"prompt": prompt, "seed": seed, "wav": path,
                      "seconds": result.audio.shape[1] / audio.SAMPLE_RATE,
                      "timings_s": {k: round(v, 3) for k, v in result.seconds.items()}}),
          flush=True)


def _infer(args: Sequence[str]) -> None:
  from musiclm_jax.sampling import infer  # pylint: disable=g-import-not-at-top
  usage = "musiclm infer --bundle=DIR --prompts=prompts.jsonl --output_dir=DIR"
  if args:
    raise UsageError(f"usage: {usage}; got {' '.join(args)}")
  prompts = _require_flag("prompts", usage)
  output_dir = _require_flag("output_dir", usage)
  print(json.dumps(_run(infer.infer, _generator(usage), prompts, output_dir)), flush=True)


def _eval_generation(args: Sequence[str]) -> None:
  from musiclm_jax.eval import generation  # pylint: disable=g-import-not-at-top
  usage = ("musiclm eval generation --bundle=DIR --corpus_dir=DIR [--num_clips=32 "
           "--seconds=10 --seed=0 --output=report.json]")
  if args:
    raise UsageError(f"usage: {usage}; got {' '.join(args)}")
  report = _run(generation.evaluate_generation, _generator(usage), _require_flag("corpus_dir", usage),
                FLAGS.num_clips, FLAGS.seconds, FLAGS.seed)
  print(generation.format_report(report), flush=True)
  _write_report(report)


def _eval_stage(args: Sequence[str]) -> None:
  from musiclm_jax.eval import stage as stage_eval  # pylint: disable=g-import-not-at-top
  usage = ("musiclm eval stage --checkpoint=MODEL_DIR [--step=N --split=test "
           "--num_clips=32 (0: all) --output=report.json] "
           "[--gin_bindings=\"TOKENS_DIR='...'\"]")
  if args:
    raise UsageError(f"usage: {usage}; got {' '.join(args)}")
  report = _run(stage_eval.evaluate_run, _require_flag("checkpoint", usage), FLAGS.split,
                FLAGS.num_clips, FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.step)
  print(stage_eval.format_report(report), flush=True)
  _write_report(report)


def _melody(args: Sequence[str]) -> None:
  from musiclm_jax.tokenizers import melody_cli  # pylint: disable=g-import-not-at-top
  usage = ("musiclm melody prepare --data_dir=OUT --num_melodies=N --renditions=R --seconds=S "
           "[--seed=0 --soundfont=fluidr3 --workers=W] | "
           "musiclm melody fit_rvq --checkpoint=MODEL_DIR --data_dir=DIR [--num_clips=N]")
  if args == ["prepare"]:
    if not FLAGS["data_dir"].present:
      raise UsageError(f"--data_dir is required; usage: {usage}")
    report = _run(melody_cli.prepare, FLAGS.data_dir, FLAGS.num_melodies, FLAGS.renditions,
                  FLAGS.seconds, FLAGS.seed, FLAGS.soundfont, FLAGS.workers)
  elif args == ["fit_rvq"]:
    if not FLAGS["data_dir"].present:
      raise UsageError(f"--data_dir is required; usage: {usage}")
    num_clips = FLAGS.num_clips if FLAGS["num_clips"].present else None
    report = _run(melody_cli.fit_rvq, _require_flag("checkpoint", usage), FLAGS.data_dir,
                  num_clips)
  else:
    raise UsageError(f"usage: {usage}; got {' '.join(args) or 'nothing'}")
  print(json.dumps(report), flush=True)


def _eval_melody(args: Sequence[str]) -> None:
  from musiclm_jax.tokenizers import melody_cli  # pylint: disable=g-import-not-at-top
  usage = ("musiclm eval melody --checkpoint=MELODY_DIR --data_dir=DIR [--split=test "
           "--num_melodies=100] | musiclm eval melody --bundle=BUNDLE --data_dir=DIR "
           "--prompt=\"...\" [--seconds=10 --num_melodies=8 --seed=0] [--output=report.json]")
  if args or not FLAGS["data_dir"].present or not (FLAGS.checkpoint or FLAGS.bundle):
    got = " ".join(args) or "no --data_dir, or neither --checkpoint nor --bundle"
    raise UsageError(f"usage: {usage}; got {got}")
  report = {}
  if FLAGS.checkpoint:
    report["retrieval"] = _run(melody_cli.evaluate_retrieval, FLAGS.checkpoint, FLAGS.data_dir,
                               FLAGS.split, FLAGS.num_melodies)
  if FLAGS.bundle:
    if len(FLAGS.prompt) != 1:
      raise UsageError(f"give one --prompt; usage: {usage}")
    report["generation"] = _run(melody_cli.evaluate_generation, _generator(usage),
                                FLAGS.data_dir, FLAGS.prompt[0], FLAGS.seconds, FLAGS.split,
                                FLAGS.num_melodies, FLAGS.seed)
  print(json.dumps(report, indent=1), flush=True)
  _write_report(report)


def _quickstart(args: Sequence[str]) -> None:
  from musiclm_jax import quickstart  # pylint: disable=g-import-not-at-top
  usage = "musiclm quickstart --workdir=DIR [--size=tiny|small] [--until=PHASE]"
  if args or FLAGS.gin_file:
    raise UsageError(f"usage: {usage} (the experiment is gin/quickstart/<size>/; "
                     f"--gin_bindings set QuickstartPlan); got {' '.join(args or FLAGS.gin_file)}")
  workdir = _require_flag("workdir", usage)
  try:
    configs = quickstart.config_dir(FLAGS.size)
    gin.clear_config()
    parse_gin([os.path.join(configs, "quickstart.gin")], FLAGS.gin_bindings)
    plan = quickstart.QuickstartPlan()  # pylint: disable=no-value-for-parameter
    quickstart.Quickstart(workdir, FLAGS.size, plan).run(FLAGS.until)
  except (quickstart.QuickstartError, quickstart.QuickstartStopped) as e:
    raise CommandError(str(e)) from e


EVALUATIONS: dict[str, Callable[[Sequence[str]], None]] = {
    "codec": _eval_codec, "mulan": _eval_mulan, "semantic": _eval_semantic,
    "generation": _eval_generation, "melody": _eval_melody, "stage": _eval_stage}


def _eval(args: Sequence[str]) -> None:
  if not args or args[0] not in EVALUATIONS:
    raise UsageError(f"usage: musiclm eval {{{'|'.join(EVALUATIONS)}}} ...; got "
                     f"{' '.join(args) or 'nothing'}")
  EVALUATIONS[args[0]](args[1:])


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "train": _train, "prepare": _prepare, "codec": _codec, "eval": _eval, "mulan": _mulan,
    "semantic": _semantic, "tokenize": _tokenize, "export": _export, "generate": _generate,
    "infer": _infer, "quickstart": _quickstart, "melody": _melody}
# Modules whose gin configurables a subcommand needs, imported before gin is
# parsed. Kept per subcommand, so that each imports only its own stack:
# `train` runs on GPU images without TensorFlow or the audio libraries, and
# `prepare`'s worker processes, which re-import this module, start quickly.
_TRAIN_MODULES = ("musiclm_jax.models", "musiclm_jax.partitioning",
                  "musiclm_jax.layers.transformer", "musiclm_jax.training.checkpoints",
                  "musiclm_jax.training.optimizers", "musiclm_jax.training.synthetic_task",
                  "musiclm_jax.training.trainer")
GIN_MODULES = {
    "train": _TRAIN_MODULES,
    "prepare": ("musiclm_jax.corpora.registry",),
    "codec": (),
    # eval stage re-parses a stage run's own gin config (its task and model)
    "eval": ("musiclm_jax.sampling.hierarchy", "musiclm_jax.stage_task") + _TRAIN_MODULES,
    "mulan": ("musiclm_jax.tokenizers.mulan_tokens",),
    "semantic": ("musiclm_jax.tokenizers.semantic_cli",),
    "tokenize": ("musiclm_jax.tasks.token_tasks",),
    "export": ("musiclm_jax.sampling.bundle",),
    "generate": ("musiclm_jax.sampling.hierarchy",),
    "infer": ("musiclm_jax.sampling.infer",),
    "quickstart": ("musiclm_jax.quickstart",),
    # with train's, so that `fit_rvq --gin_file=gin/tokenizers/melody_tiny.gin` parses
    "melody": ("musiclm_jax.tokenizers.melody",) + _TRAIN_MODULES,
}


def import_configurables(subcommand: str) -> None:
  """Registers the gin configurables of `subcommand` (before parsing gin)."""
  for module in GIN_MODULES[subcommand]:
    importlib.import_module(module)


def main(argv: Sequence[str]) -> int:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # progress lines go to stdout
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: musiclm {{{'|'.join(SUBCOMMANDS)}}} [--gin_file=...] "
                         f"[--gin_bindings=...]; got {' '.join(argv[1:]) or 'nothing'}")
  import_configurables(argv[1])
  try:
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    SUBCOMMANDS[argv[1]](argv[2:])
  except (GinConfigError, UsageError, CommandError) as e:
    print(f"musiclm {argv[1]}: error: {e}", file=sys.stderr, flush=True)
    return 2 if isinstance(e, (GinConfigError, UsageError)) else 1
  return 0


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
