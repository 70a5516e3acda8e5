"""Pre-tokenization cost: compute seconds per hour of audio of the Beam cache job.

Runs `musiclm tokenize`'s job (`token_tasks.run_cache_job`) on a built corpus
with three trained tokenizer runs, into a fresh cache directory, and prints
one JSON object:

  audio_hours                 real audio tokenized (skipped clips excluded)
  wall_s_per_audio_hour       job wall time / audio hours
  compute_s_per_audio_hour    CPU time (this process and the Beam workers,
                              user + system) / audio hours
  workers                     Beam DirectRunner worker processes

The job needs TensorFlow and Apache Beam (the `[data]` extra), so it runs
where those are installed; the tokenizers' own speeds on a GPU come from
codec_speed.py, semantic_speed.py and mulan_speed.py, which need neither.

  python3 benchmarks/tokenize_speed.py --corpus_dir data/gm_synth/n200_10s_seed0/1.0.0 \
      --soundstream runs/soundstream --semantic runs/w2v_bert --mulan runs/mulan --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from musiclm_jax.tasks import token_tasks  # pylint: disable=wrong-import-position
from musiclm_jax.tokenizers import frozen  # pylint: disable=wrong-import-position


def cpu_seconds() -> float:
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--corpus_dir", required=True)
  parser.add_argument("--soundstream", required=True)
  parser.add_argument("--semantic", required=True)
  parser.add_argument("--mulan", required=True)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=8)
  args = parser.parse_args()
  dirs = frozen.TokenizerDirs(args.soundstream, args.semantic, args.mulan)
  spec = token_tasks.TokenTaskSpec("bench", args.corpus_dir, dirs, batch_size=args.batch_size)
  options = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
             f"--direct_num_workers={args.workers}", "--default_sdk_harness_log_level=WARNING"]
  with tempfile.TemporaryDirectory() as cache_dir:
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    manifest = token_tasks.run_cache_job([spec], cache_dir, options)["bench"]
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
  hours = sum(s["audio_seconds"] for s in manifest["splits"].values()) / 3600
  print(json.dumps({
      "benchmark": "tokenize_speed", "corpus_dir": args.corpus_dir, "workers": args.workers,
      "cpu_count": os.cpu_count(), "clips": sum(s["clips"] for s in manifest["splits"].values()),
      "audio_hours": round(hours, 4), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
      "wall_s_per_audio_hour": round(wall / hours, 1),
      "compute_s_per_audio_hour": round(cpu / hours, 1),
      "soundstream_config": manifest["soundstream_config"],
      "semantic_mlm_layer": manifest["semantic_mlm_layer"]}), flush=True)


if __name__ == "__main__":
  main()
