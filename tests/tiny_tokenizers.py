"""The three tokenizers (and the melody encoder), untrained, on a tiny corpus, for
pipeline tests.

Each is a `musiclm train` run of its tiny gin file with `num_steps = 0` (the
initialised model saved as step 0, no train step compiled; the MuLan run
still trains its text tokenizer) followed by its real fit (k-means, RVQ).
The melody encoder (optional) is trained the same way on a tiny sine-voice
`melody_renditions` corpus and gets its RVQ. Quality is beside the point: the
files and their layouts are what the token pipeline consumes. Training steps of each model are tested in its own file.
"""
from __future__ import annotations

import os
import subprocess
import sys

import gin

import once_per_run
import xla_env
from musiclm_jax import main as cli
from musiclm_jax import stages
from musiclm_jax.corpora import melody_pairs
from musiclm_jax.sampling import bundle
from musiclm_jax.tokenizers import frozen
from musiclm_jax.tokenizers import melody
from musiclm_jax.tokenizers import mulan_cli
from musiclm_jax.tokenizers import semantic_cli
from musiclm_jax.training import trainer

COMMON = ["train.log_every_steps = 1", "train.eval_every_steps = 1000", "train.eval_batches = 1",
          "Checkpointer.save_every_steps = 1000"]
RUNS = {
    "soundstream": ("gin/tokenizers/soundstream_tiny.gin",
                    ["NUM_STEPS = 0", "train.batch_size = 8", "AudioClipTask.segment_seconds = 0.16",
                     "SoundStreamConfig.codebook_size = 64", "CodecModel.adversarial_warmup_steps = 1",
                     "generator/warmup_cosine.warmup_steps = 1",
                     "discriminator/warmup_cosine.warmup_steps = 1"]),
    "semantic": ("gin/tokenizers/w2v_bert_tiny.gin",
                 ["train.num_steps = 0", "train.batch_size = 8",
                  "AudioClipTask.segment_seconds = 1.0", "warmup_cosine.warmup_steps = 1"]),
    "mulan": ("gin/tokenizers/mulan_tiny.gin",
              ["WINDOW_SECONDS = 1.0", "MAX_TEXT_LENGTH = 48", "MulanConfig.cnn_channels = (8, 16)",
               "MulanConfig.n_mels = 16", "MulanConfig.text_layers = 1",
               "MulanConfig.embed_dim = 32", "train.batch_size = 8", "train.num_steps = 0",
               "warmup_cosine.warmup_steps = 1"]),
}
SEMANTIC_CLUSTERS = 16
MULAN_CODEBOOK_SIZE = 4
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


def train_tiny_tokenizers(corpus_dir: str, root: str, with_melody: bool = False
                          ) -> frozen.TokenizerDirs:
  """Trains and fits the three tokenizers (and the melody encoder) under `root`;
  returns their directories."""
  dirs = {name: os.path.join(root, name) for name in RUNS}
  for module in cli.GIN_MODULES["train"] + ("musiclm_jax.tokenizers.mulan",
                                            "musiclm_jax.tasks.mulan_task",
                                            "musiclm_jax.tokenizers.semantic_cli"):
    __import__(module)
  for name, (gin_file, bindings) in RUNS.items():
    gin.clear_config()
    cli.parse_gin([gin_file], [f"MODEL_DIR = '{dirs[name]}'", f"CORPUS_DIR = '{corpus_dir}'",
                               *COMMON, *bindings])
    trainer.train()  # pylint: disable=no-value-for-parameter
  gin.clear_config()
  gin.parse_config(f"fit_semantic_kmeans.num_clusters = {SEMANTIC_CLUSTERS}\n"
                   "fit_semantic_kmeans.num_frames = 400\n"
                   "corpus_batches.segment_seconds = 2.0")
  semantic_cli.fit_kmeans(dirs["semantic"], corpus_dir)
  gin.clear_config()
  gin.parse_config(f"fit_mulan_rvq.codebook_size = {MULAN_CODEBOOK_SIZE}\n"
                   "fit_mulan_rvq.num_iters = 3")
  mulan_cli.fit_rvq(dirs["mulan"], corpus_dir)
  gin.clear_config()
  if with_melody:
    dirs["melody"] = train_tiny_melody(root)
  return frozen.TokenizerDirs(**dirs)


def train_in_subprocess(corpus_dir: str, root: str, with_melody: bool = False
                        ) -> frozen.TokenizerDirs:
  env = xla_env.subprocess_env(1)
  result = subprocess.run([sys.executable, os.path.abspath(__file__), corpus_dir, root,
                           *(["melody"] if with_melody else [])],
                          env=env, capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  dirs = {name: os.path.join(root, name) for name in RUNS}
  if with_melody:
    dirs["melody"] = os.path.join(root, "melody")
  return frozen.TokenizerDirs(**dirs)


def shared_tiny_tokenizers(corpus_dir: str, with_melody: bool = False) -> frozen.TokenizerDirs:
  """The tiny tokenizers and melody encoder, trained once per test run (in a
  subprocess) in the run's shared directory (`once_per_run`), whichever test
  file in whichever xdist worker asks first. `corpus_dir` is a tiny gm_synth
  corpus (the same in every worker).
  """
  root = once_per_run.shared_directory(
      "tiny_tokenizers", lambda root: train_in_subprocess(corpus_dir, root, with_melody=True))
  dirs = {name: os.path.join(root, name) for name in RUNS}
  if with_melody:
    dirs["melody"] = os.path.join(root, "melody")
  return frozen.TokenizerDirs(**dirs)


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
  train_tiny_tokenizers(sys.argv[1], sys.argv[2], with_melody=sys.argv[3:] == ["melody"])
