"""The three tokenizers, untrained, on a tiny corpus, for pipeline tests.

Each is a `musiclm train` run of its tiny gin file with `num_steps = 0` (the
initialised model saved as step 0, no train step compiled; the MuLan run
still trains its text tokenizer) followed by its real fit (k-means, RVQ).
Quality is beside the point: the files and their layouts are what the token
pipeline consumes. Training steps of each model are tested in its own file.
"""
from __future__ import annotations

import os
import subprocess
import sys

import gin

from musiclm_jax import main as cli
from musiclm_jax.tokenizers import frozen
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


def train_tiny_tokenizers(corpus_dir: str, root: str) -> frozen.TokenizerDirs:
  """Trains and fits the three tokenizers under `root`; returns their directories."""
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
  return frozen.TokenizerDirs(**dirs)


def train_in_subprocess(corpus_dir: str, root: str) -> frozen.TokenizerDirs:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, os.path.abspath(__file__), corpus_dir, root],
                          env=env, capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return frozen.TokenizerDirs(**{name: os.path.join(root, name) for name in RUNS})


if __name__ == "__main__":
  train_tiny_tokenizers(sys.argv[1], sys.argv[2])
