"""MuLan end to end on a tiny rendered corpus: `mulan_tiny.gin` training through
the generic trainer (tokenizer trained on first use), the RVQ fit, M_A / M_T
tokens from the saved run, retrieval evaluation and `musiclm mulan` errors."""
import os

import gin
import jax
import numpy as np
import pytest

from musiclm_jax import main as cli
from musiclm_jax.partitioning import Partitioner
from musiclm_jax.tasks import corpora
from musiclm_jax.tasks import mulan_task
from musiclm_jax.tokenizers import mulan_cli
from musiclm_jax.tokenizers import mulan_tokens
from musiclm_jax.training import metrics as metrics_lib
from musiclm_jax.training import trainer

# gin/tokenizers/mulan_tiny.gin, shrunk so that the test compiles quickly.
SMALLER = ["WINDOW_SECONDS = 1.0", "MAX_TEXT_LENGTH = 48", "MulanConfig.cnn_channels = (8, 16)",
           "MulanConfig.n_mels = 16", "MulanConfig.text_layers = 1", "MulanConfig.embed_dim = 32",
           "train.batch_size = 8", "train.num_steps = 16", "train.log_every_steps = 2",
           "train.eval_every_steps = 16", "train.eval_batches = 1",
           "warmup_cosine.warmup_steps = 2", "warmup_cosine.peak_value = 3e-3"]


def test_train_fit_rvq_tokens_and_evaluate(tiny_gm_corpus, tmp_path, capsys):
  model_dir = str(tmp_path / "mulan")
  for module in cli.GIN_MODULES["train"] + ("musiclm_jax.tokenizers.mulan",
                                            "musiclm_jax.tasks.mulan_task"):
    __import__(module)
  cli.parse_gin(["gin/tokenizers/mulan_tiny.gin"],
                [f"MODEL_DIR = '{model_dir}'", f"CORPUS_DIR = '{tiny_gm_corpus}'", *SMALLER])
  # On one device: 8 virtual devices on 2 cores make each step several times slower
  # (test_mulan.py checks the data-parallel step against the single-device one).
  result = trainer.train(  # pylint: disable=no-value-for-parameter
      partitioner=Partitioner((1, 1, 1), devices=jax.devices()[:1]))
  out = capsys.readouterr().out
  assert "Training the text tokenizer on" in out
  assert os.path.isfile(os.path.join(model_dir, "text_tokenizer.model"))
  assert result.step == 16 and np.isfinite(result.metrics["loss"])
  assert 0 < result.metrics["temperature"] < 1 and "eval_accuracy" in result.metrics
  rows = metrics_lib.read_jsonl_metrics(model_dir)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:2])

  gin.clear_config()
  gin.parse_config("fit_mulan_rvq.codebook_size = 4\nfit_mulan_rvq.num_iters = 5")
  report = mulan_cli.fit_rvq(model_dir, tiny_gm_corpus)
  num_train = corpora.read_report(tiny_gm_corpus)["clips"]["train"]
  assert report["num_levels"] == 12 and report["num_embeddings"] == num_train
  assert report["checkpoint_step"] == 16  # the step MulanTokenizer.load then reads
  errors = report["relative_error"]
  assert errors[-1] < errors[0] and all(b <= a + 1e-6 for a, b in zip(errors, errors[1:]))

  tokenizer = mulan_tokens.MulanTokenizer.load(model_dir)
  batch = next(mulan_task.labelled_clip_batches(tiny_gm_corpus, "train", 3))
  m_a = tokenizer.audio_tokens(batch["audio"], 16000, batch["lengths"])
  m_t = tokenizer.text_tokens(batch["caption"])
  assert m_a.shape == m_t.shape == (3, 12) and m_a.dtype == np.int32
  assert np.all((m_a >= 0) & (m_a < 4)) and np.all((m_t >= 0) & (m_t < 4))
  with pytest.raises(ValueError, match="empty"):
    tokenizer.text_tokens([""])

  metrics = mulan_cli.evaluate(model_dir, tiny_gm_corpus, "test")
  num_test = corpora.read_report(tiny_gm_corpus)["clips"]["test"]
  assert metrics["num_candidates"] == num_test
  for key in ("text_to_audio_recall@1", "audio_to_text_recall@10", "genre_accuracy",
              "tempo_accuracy", "lead_instrument_accuracy"):
    assert 0.0 <= metrics[key] <= 1.0, key
  assert metrics["text_to_audio_recall@10"] == 1.0  # fewer than 10 candidates
  assert 1 <= metrics["text_to_audio_median_rank"] <= num_test

  rows = mulan_cli.embed(model_dir, ["a calm waltz"], [])
  assert len(rows[0]["embedding"]) == 32 and len(rows[0]["mulan_tokens"]) == 12


def test_missing_run_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    mulan_tokens.MulanTokenizer.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="fit_rvq"):
    mulan_tokens.load_rvq(str(tmp_path))
