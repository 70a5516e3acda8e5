"""The three tokenizers and the melody encoder, barely trained, for pipeline tests;
built once per test run.

The tokenizers are the first four phases of the micro quickstart
(tests/quickstart_micro: its gm_synth corpus, then SoundStream, w2v-BERT with
its k-means and MuLan with its RVQ, two training steps each), which
tests/test_quickstart.py continues in a copy. The melody encoder is a `musiclm
train` run of its tiny gin file with `num_steps = 0` (the initialised model
saved as step 0) on a tiny sine-voice `melody_renditions` corpus, with its RVQ
fitted. Quality is beside the point: the files and their layouts are what the
token pipeline consumes. Training steps of each model are tested in its own file.
"""
from __future__ import annotations

import os
import subprocess
import sys

import gin

import once_per_run
import xla_env
from musiclm_jax import main as cli
from musiclm_jax import quickstart
from musiclm_jax import stages
from musiclm_jax.corpora import melody_pairs
from musiclm_jax.sampling import bundle
from musiclm_jax.tokenizers import frozen
from musiclm_jax.tokenizers import melody
from musiclm_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_MICRO = os.path.join(REPO, "tests", "quickstart_micro")
LAST_TOKENIZER_PHASE = "mulan"
# Where the shared build keeps the quickstart's output up to LAST_TOKENIZER_PHASE.
QUICKSTART_LOG = "quickstart.log"
# The token layout of those tokenizers (tests/quickstart_micro/{w2v_bert,mulan,soundstream}.gin).
SEMANTIC_CLUSTERS = 16
MULAN_CODEBOOK_SIZE = 4
COMMON = ["train.log_every_steps = 1", "train.eval_every_steps = 1000", "train.eval_batches = 1",
          "Checkpointer.save_every_steps = 1000"]
# Melody windows of 1 s every 0.5 s: a 4 s clip has 7, a 1 s semantic window takes 2.
MELODY_RUN = ("gin/tokenizers/melody_tiny.gin",
              ["WINDOW_SECONDS = 1.0", "MelodyConfig.hop_seconds = 0.5", "train.num_steps = 0",
               "train.batch_size = 6", "MelodyTask.melodies_per_batch = 3",
               "warmup_cosine.warmup_steps = 1"])
MELODY_LEVELS = 2
MELODY_CODEBOOK_SIZE = 4


def train_tiny_melody(root: str) -> str:
  """The melody encoder, untrained, with its RVQ fitted on a sine-voice corpus."""
  data_dir = os.path.join(root, "melody_corpus")
  model_dir = os.path.join(root, "melody")
  melody_pairs.build_melody_renditions(data_dir, num_melodies=6, renditions_per_melody=2,
                                       seconds=2.0, seed=0, soundfont=None)
  gin_file, bindings = MELODY_RUN
  cli.import_configurables("melody")
  gin.clear_config()
  cli.parse_gin([gin_file], [f"MODEL_DIR = '{model_dir}'", f"DATA_DIR = '{data_dir}'",
                             *COMMON, *bindings])
  trainer.train()  # pylint: disable=no-value-for-parameter
  gin.clear_config()
  gin.parse_config(f"fit_melody_rvq.num_levels = {MELODY_LEVELS}\n"
                   f"fit_melody_rvq.codebook_size = {MELODY_CODEBOOK_SIZE}\n"
                   "fit_melody_rvq.num_iters = 3")
  melody.fit_rvq(model_dir, data_dir)
  gin.clear_config()
  return model_dir


def _build(root: str) -> None:
  """In a subprocess of one device: the micro quickstart up to its last tokenizer
  (`musiclm quickstart --until=mulan`, its output kept in QUICKSTART_LOG), then
  the melody encoder."""
  env = xla_env.subprocess_env(1)
  result = subprocess.run(
      [sys.executable, "-m", "musiclm_jax.main", "quickstart",
       f"--workdir={os.path.join(root, 'quickstart')}", f"--size={QUICKSTART_MICRO}",
       f"--until={LAST_TOKENIZER_PHASE}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  with open(os.path.join(root, QUICKSTART_LOG), "w", encoding="utf-8") as f:
    f.write(result.stdout)
  result = subprocess.run([sys.executable, os.path.abspath(__file__), root], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def shared_quickstart() -> tuple[str, str]:
  """(workdir, its stdout) of the micro quickstart run up to LAST_TOKENIZER_PHASE,
  once per test run (`once_per_run`); copy the workdir before continuing it."""
  root = once_per_run.shared_directory("tiny_tokenizers", _build)
  with open(os.path.join(root, QUICKSTART_LOG), encoding="utf-8") as f:
    return os.path.join(root, "quickstart"), f.read()


def shared_tiny_tokenizers(with_melody: bool = False) -> frozen.TokenizerDirs:
  """The tokenizers (and the melody encoder) of the run's shared build."""
  workdir, _ = shared_quickstart()
  runs = quickstart.Paths(workdir)
  return frozen.TokenizerDirs(
      soundstream=runs.run("soundstream"), semantic=runs.run("w2v_bert"), mulan=runs.run("mulan"),
      melody=os.path.join(os.path.dirname(workdir), "melody") if with_melody else None)


def untrained_stage_bundle(cache_dir: str, dirs: frozen.TokenizerDirs, windows, root: str,
                           melody_conditioning: bool = False) -> tuple[str, dict[str, str]]:
  """The three stages untrained (`musiclm train` of gin/stages/tiny.gin with
  num_steps 0, float32) on the `gm` corpus of a token cache, exported with the
  tokenizers (and the melody encoder when melody-conditioned) as
  `root/bundle`. Returns the bundle and the stage runs."""
  for module in cli.GIN_MODULES["train"]:
    __import__(module)
  runs = {}
  for name in stages.STAGE_NAMES:
    gin.clear_config()
    runs[name] = os.path.join(root, name)
    cli.parse_gin(["gin/stages/tiny.gin", f"gin/stages/{name}.gin"],
                  [f"MODEL_DIR = '{runs[name]}'", f"TOKENS_DIR = '{cache_dir}'",
                   "CORPORA = {'gm': 1.0}", "NUM_STEPS = 0",
                   f"MELODY_CONDITIONING = {melody_conditioning}",
                   f"StageWindows.semantic_seconds = {windows.semantic_seconds}",
                   f"StageWindows.coarse_seconds = {windows.coarse_seconds}",
                   f"StageWindows.fine_seconds = {windows.fine_seconds}",
                   "DecoderConfig.dtype = 'float32'"])
    trainer.train()  # pylint: disable=no-value-for-parameter
  gin.clear_config()
  output = os.path.join(root, "bundle")
  bundle.export_bundle(bundle.BundleRuns(
      soundstream=dirs.soundstream, w2v_bert=dirs.semantic, mulan=dirs.mulan,
      melody=dirs.melody if melody_conditioning else None, **runs), output)
  return output, runs


if __name__ == "__main__":
  train_tiny_melody(sys.argv[1])
