"""`musiclm infer`: a resumable batch job from a prompt file to wavs and a manifest.

    musiclm infer --bundle=bundles/tiny --prompts=prompts.jsonl --output_dir=out

Each line of the prompt file is one item:

    {"id": "waltz-1", "prompt": "a calm piano waltz", "seconds": 30, "seed": 0}
    {"id": "story", "segments": [["calm piano", 10], ["drums join", 10]], "seed": 3}
    {"id": "trio", "prompt": "a jazz trio", "melody": "hums/tune.wav", "seconds": 20}

(`id` defaults to the line number, `seconds` to `infer.seconds`, `seed` to the
line number; `melody`, a recording to follow with a melody bundle, is a path
relative to the prompt file). Items of equal length, segment count and
melody-or-not are generated together in batches of `batch_size`; when such a
group fills more than one batch, its last batch is filled up with copies of a
row (dropped afterwards), so that every batch of the group runs the programs
its first batch compiled. Every process of a multi-host job takes the items
whose index modulo the process count is its own.

For each finished item the job writes `<id>.wav` and `<id>.npz` (its
semantic, acoustic and MuLan codes, and melody codes) atomically, then
appends one line to `manifest.jsonl` (prompt, seed, melody, files, seconds,
timings). A re-run skips the items already in the manifest, so an
interrupted job resumes where it stopped and nothing written is lost.
Unusable items (empty prompt, bad length, duplicate id, a missing, silent,
too short or unpitched melody) are skipped, counted and listed in
`skipped.jsonl` (`skipped.<process>-of-<count>.jsonl` in a multi-host job)
instead of stopping the job.
"""
from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Optional

import gin
import jax
import numpy as np

from musiclm_jax import audio
from musiclm_jax.sampling.hierarchy import Generator

MANIFEST_FILE = "manifest.jsonl"
SKIPPED_FILE = "skipped.jsonl"


def read_prompts(path: str, default_seconds: float) -> tuple[list[dict[str, Any]],
                                                                 list[dict[str, Any]]]:
  """Items `{id, segments, seed, melody}` of a prompt file, and the lines skipped
  with why. `melody` is the recording's path (resolved) or None."""
  items, skipped, seen = [], [], set()
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        item_id = str(row.get("id", number))
        if item_id in seen:
          raise ValueError(f"id {item_id!r} repeats")
        if "segments" in row:
          segments = [(str(p), float(s)) for p, s in row["segments"]]
        else:
          segments = [(str(row["prompt"]), float(row.get("seconds", default_seconds)))]
        if not segments or any(not p.strip() for p, _ in segments):
          raise ValueError("empty prompt")
        if any(s <= 0 for _, s in segments):
          raise ValueError("seconds must be positive")
        if any(c in item_id for c in "/\\") or item_id.startswith("."):
          raise ValueError(f"id {item_id!r} cannot be a file name")
        melody = row.get("melody")
        if melody is not None:
          if not isinstance(melody, str) or not melody.strip():
            raise ValueError("melody must be the path of a recording")
          melody = os.path.join(os.path.dirname(os.path.abspath(path)), melody)
          if not os.path.isfile(melody):
            raise ValueError("melody file not found")
      except (ValueError, KeyError, TypeError) as e:
        reason = f"missing {e}" if isinstance(e, KeyError) else str(e)
        skipped.append({"line": number + 1, "reason": reason})
        continue
      seen.add(item_id)
      items.append({"id": item_id, "segments": segments, "seed": int(row.get("seed", number)),
                    "melody": melody})
  return items, skipped


def skipped_file(process_index: int, process_count: int) -> str:
  """This process' list of skipped lines and items (one writer per file)."""
  if process_count == 1:
    return SKIPPED_FILE
  return f"skipped.{process_index}-of-{process_count}.jsonl"


def finished_ids(output_dir: str) -> set[str]:
  path = os.path.join(output_dir, MANIFEST_FILE)
  if not os.path.isfile(path):
    return set()
  with open(path, encoding="utf-8") as f:
    return {json.loads(line)["id"] for line in f if line.strip()}


def _write_item(output_dir: str, item: dict[str, Any], wav: np.ndarray,
                tokens: dict[str, np.ndarray], timings: dict[str, float]) -> dict[str, Any]:
  wav_path = os.path.join(output_dir, f"{item['id']}.wav")
  audio.write_wav(wav_path, wav)
  tokens_path = os.path.join(output_dir, f"{item['id']}.npz")
  with open(tokens_path + ".tmp", "wb") as f:
    np.savez(f, **tokens)
  os.replace(tokens_path + ".tmp", tokens_path)
  row = {"id": item["id"], "segments": item["segments"], "seed": item["seed"],
         "melody": item["melody"],
         "seconds": len(wav) / audio.SAMPLE_RATE, "wav": os.path.basename(wav_path),
         "tokens": os.path.basename(tokens_path),
         "timings_s": {k: round(v, 3) for k, v in timings.items()}}
  with open(os.path.join(output_dir, MANIFEST_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())
  return row


def _load_melodies(generator: Generator, batch: list[dict[str, Any]]
                   ) -> tuple[list[dict[str, Any]], list[np.ndarray], int, list[dict[str, Any]]]:
  """The items of a batch whose melody recording is usable (all of a batch
  without melodies), their recordings and its rate, and the others as skip
  records."""
  kept, recordings, rate, skipped = [], [], 0, []
  for item in batch:
    if item["melody"] is None:
      kept.append(item)
      continue
    try:
      wav, rate = generator.load_melody(item["melody"])
      recordings.append(wav)
      kept.append(item)
    except ValueError as e:
      reason = f"melody {e.reason}" if isinstance(e, audio.AudioError) else "melody refused"
      skipped.append({"id": item["id"], "reason": reason, "message": str(e)})
  return kept, recordings, rate, skipped


@gin.configurable
def infer(generator: Generator, prompts_path: str, output_dir: str, batch_size: int = 8,
          seconds: float = 10.0, process_index: Optional[int] = None,
          process_count: Optional[int] = None) -> dict[str, Any]:
  """Generates every unfinished item of `prompts_path` this process owns.

  Returns counts: `generated`, `already_done`, `skipped` (by reason: the
  prompt file's bad lines, and this process' items with an unusable melody),
  and the audio seconds generated per wall second.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  os.makedirs(output_dir, exist_ok=True)
  items, skipped = read_prompts(prompts_path, seconds)
  mine = [item for i, item in enumerate(items) if i % process_count == process_index]
  done = finished_ids(output_dir)
  todo = [item for item in mine if item["id"] not in done]
  skipped_path = os.path.join(output_dir, skipped_file(process_index, process_count))
  bad_lines = len(skipped)
  if process_index != 0:
    skipped = []  # the prompt file's bad lines are process 0's to list
  with open(skipped_path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(s) + "\n" for s in skipped)
  groups = collections.defaultdict(list)
  for item in todo:
    key = (len(item["segments"]), round(sum(s for _, s in item["segments"]), 6),
           item["melody"] is not None)
    groups[key].append(item)
  print(f"infer: {len(items)} items ({bad_lines} skipped lines); this process owns "
        f"{len(mine)}, {len(mine) - len(todo)} already done, {len(todo)} to generate",
        flush=True)
  started, generated, refused_items, audio_seconds = time.time(), 0, 0, 0.0
  for group in groups.values():
    for i in range(0, len(group), batch_size):
      batch, melodies, rate, refused = _load_melodies(generator, group[i:i + batch_size])
      if refused:
        skipped += refused
        refused_items += len(refused)
        with open(skipped_path, "a", encoding="utf-8") as f:
          f.writelines(json.dumps(s) + "\n" for s in refused)
      if batch:
        # A group's last batch (or one thinned by refused melodies) is filled up
        # with copies of its last row, so that it reuses the programs the group's
        # first batch compiled; rows are independent, and the copies are dropped.
        pad = batch_size - len(batch) if len(group) > batch_size else 0
        filled = batch + batch[-1:] * pad
        melody = ({"melody_audio": melodies + melodies[-1:] * pad, "melody_sample_rate": rate}
                  if melodies else {})
        result = generator.generate([item["segments"] for item in filled],
                                    [item["seed"] for item in filled], **melody)
        for row, item in enumerate(batch):
          tokens = {"semantic": result.semantic[row], "acoustic": result.acoustic[row],
                    "mulan": result.mulan[row]}
          if result.melody is not None:
            tokens["melody"] = result.melody[row]
          _write_item(output_dir, item, result.audio[row], tokens, result.seconds)
          audio_seconds += result.audio.shape[1] / audio.SAMPLE_RATE
      generated += len(batch)
      handled = generated + refused_items
      elapsed = time.time() - started
      print(f"infer: {generated}/{len(todo)} items | {audio_seconds / elapsed:.2f} audio s per "
            f"s | ETA {elapsed / max(handled, 1) * (len(todo) - handled):.0f}s", flush=True)
  reasons = collections.Counter(s["reason"] for s in skipped)
  return {"generated": generated, "already_done": len(mine) - len(todo),
          "skipped": dict(reasons),
          "audio_s_per_s": audio_seconds / max(time.time() - started, 1e-9)}
