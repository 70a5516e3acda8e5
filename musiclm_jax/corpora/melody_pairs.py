"""`melody_renditions`: the same melodies in many renditions, for the melody encoder.

    build_melody_renditions(out_dir, num_melodies=1000, renditions_per_melody=8,
                            seconds=10.0, seed=0, soundfont="fluidr3")
    musiclm melody prepare --data_dir=OUT_DIR --num_melodies=1000 --renditions=8 \
        --seconds=10 --soundfont=fluidr3 --workers=8       # the same, from the CLI

Each melody is the lead line of a composed gm_synth piece
(`music/melody_renditions.py`); each rendition plays it with another voice,
key, register, tempo and accompaniment, or hums it with the numpy sine voice.
Clips are 24 kHz float32 mono of exactly `seconds`, at a common loudness.

The output is TensorFlow-free: `.npz` shards per split plus `manifest.json`
(written last, so a directory with a manifest is complete):

    OUT_DIR/manifest.json
    OUT_DIR/{train,validation,test}-00000.npz   audio float32 [clips, samples],
        melody_id int32 [clips], rendition int32 [clips], tempo_factor float32 [clips]

Splits are disjoint in melodies (`base.assign_splits` over melody ids).
`load_split` reads a split back.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import time
from typing import Any, Optional

import numpy as np

from musiclm_jax import audio
from musiclm_jax.corpora import base
from musiclm_jax.corpora import rendered
from musiclm_jax.music import melody_renditions as mr
from musiclm_jax.music import render

MANIFEST_FILE = "manifest.json"
FORMAT = "musiclm_jax.melody_renditions/1"
MIN_NOTES = 4  # a melody needs this many notes within the clip
MAX_ATTEMPTS = 20  # composed pieces per melody, or draws per rendition, until one is usable
# Pieces are composed this much longer than the clip, so that renditions
# played 10% faster still fill it.
PIECE_MARGIN = 1.15


def _melody_piece(seed: int, index: int, seconds: float):
  """The first composed piece of melody `index` with MIN_NOTES notes in `seconds`."""
  for attempt in range(MAX_ATTEMPTS):
    piece = mr.compose_melody_piece(int(np.random.SeedSequence([seed, index, attempt])
                                        .generate_state(1)[0]), PIECE_MARGIN * seconds)
    line = mr.melody_line(piece)
    if np.sum(line.starts < seconds / 1.1) >= MIN_NOTES:
      return piece
  raise RuntimeError(f"melody {index}: no piece with {MIN_NOTES} notes in {seconds} s after "
                     f"{MAX_ATTEMPTS} attempts")


def rendition_audio(rendition: mr.Rendition, seconds: float, soundfont: Optional[str],
                    sample_rate: int = audio.SAMPLE_RATE) -> np.ndarray:
  """float32 `[seconds * sample_rate]` of a rendition at the corpora's common loudness.

  The sine voice is synthesised in numpy; other voices are rendered with
  FluidSynth and `soundfont` (a path or 'fluidr3' / 'timgm6mb').
  Raises:
    audio.AudioError: the rendition rendered silent (or heavily clipped).
  """
  num_samples = int(round(seconds * sample_rate))
  if rendition.spec.is_sine_voice:
    wav = mr.sine_voice(rendition.line, sample_rate, seconds, rendition.spec.seed)
  else:
    if soundfont is None:
      raise ValueError(f"rendition voice {rendition.spec.voice!r} needs a SoundFont")
    wav = render.render_midi(rendition.midi, render.find_soundfont(soundfont), sample_rate)
  wav = np.pad(wav, (0, max(num_samples - len(wav), 0)))[:num_samples]
  # A voice the SoundFont has no sample for at these pitches renders silence
  # (TimGM6mb's Whistle around A6), which normalisation would raise to a DC offset.
  wav = audio.check_and_repair(wav, audio.Repairs(), name=f"{rendition.spec.voice} rendition")
  return rendered.normalize_loudness(wav)


def melody_clips(seed: int, index: int, renditions_per_melody: int, seconds: float,
                 soundfont: Optional[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Audio `[renditions, samples]` and one record per rendition of melody `index`.

  Without a SoundFont every rendition is the sine voice. A rendition that renders
  unusable audio (`rendition_audio` raises) is drawn again with another seed.
  """
  piece = _melody_piece(seed, index, seconds)
  voices = tuple(mr.VOICE_RANGES) if soundfont else (mr.SINE_VOICE,)
  items = mr.renditions(piece, renditions_per_melody, seed=int(np.random.SeedSequence(
      [seed, index, 99]).generate_state(1)[0]), voices=voices)
  clips = []
  for k in range(len(items)):
    for attempt in range(MAX_ATTEMPTS):
      try:
        clips.append(rendition_audio(items[k], seconds, soundfont))
        break
      except audio.AudioError:  # rendered silent: draw this rendition again
        items[k] = mr.renditions(piece, 1, seed=int(np.random.SeedSequence(
            [seed, index, 99, k, attempt]).generate_state(1)[0]), voices=voices)[0]
    else:
      raise RuntimeError(f"melody {index}, rendition {k}: every one of {MAX_ATTEMPTS} draws "
                         f"rendered unusable audio with SoundFont {soundfont!r}")
  clips = np.stack(clips)
  records = [dict(melody_id=index, rendition=k, genre=piece.genre, source_key=piece.key,
                  source_mode=piece.mode, num_notes=len(r.line),
                  spec=dataclasses.asdict(r.spec)) for k, r in enumerate(items)]
  return clips, records


class _ShardWriter:
  """Collects a split's clips and writes them `clips_per_shard` at a time."""

  def __init__(self, out_dir: str, split: str, clips_per_shard: int):
    self.out_dir, self.split, self.clips_per_shard = out_dir, split, clips_per_shard
    self.files: list[str] = []
    self.count = 0
    self._audio: list[np.ndarray] = []
    self._records: list[dict[str, Any]] = []

  def add(self, clips: np.ndarray, records: list[dict[str, Any]]) -> None:
    self._audio.extend(clips)
    self._records.extend(records)
    self.count += len(records)
    while len(self._records) >= self.clips_per_shard:
      self._write(self.clips_per_shard)

  def flush(self) -> None:
    if self._records:
      self._write(len(self._records))

  def _write(self, n: int) -> None:
    records, self._records = self._records[:n], self._records[n:]
    clips, self._audio = self._audio[:n], self._audio[n:]
    name = f"{self.split}-{len(self.files):05d}.npz"
    path = os.path.join(self.out_dir, name)
    with open(path + ".tmp", "wb") as f:
      np.savez(f, audio=np.stack(clips).astype(np.float32),
               melody_id=np.array([r["melody_id"] for r in records], np.int32),
               rendition=np.array([r["rendition"] for r in records], np.int32),
               tempo_factor=np.array([r["spec"]["tempo_factor"] for r in records], np.float32))
    os.replace(path + ".tmp", path)
    self.files.append(name)


def build_melody_renditions(out_dir: str, num_melodies: int, renditions_per_melody: int,
                            seconds: float, seed: int = 0, soundfont: Optional[str] = "fluidr3",
                            workers: int = 1, clips_per_shard: int = 512) -> dict[str, Any]:
  """Builds the corpus into `out_dir` (see the module doc); returns the manifest.

  Args:
    num_melodies: distinct melodies (each in exactly one split).
    renditions_per_melody: clips per melody (>= 2: the triplet loss needs pairs).
    seconds: clip length.
    seed: fixes melodies, renditions and splits.
    soundfont: for the General MIDI voices; None renders only the sine voice
      (no FluidSynth needed).
    workers: processes rendering melodies in parallel.
    clips_per_shard: clips per `.npz` file.
  """
  if num_melodies < 3:
    raise ValueError(f"num_melodies must be >= 3 (one per split), got {num_melodies}")
  if renditions_per_melody < 2:
    raise ValueError(f"renditions_per_melody must be >= 2, got {renditions_per_melody}")
  if not seconds > 0:
    raise ValueError(f"seconds must be > 0, got {seconds}")
  if soundfont is not None:
    render.fluidsynth_binary()
    render.find_soundfont(soundfont)
  started = time.time()
  os.makedirs(out_dir, exist_ok=True)
  splits = base.assign_splits([str(i) for i in range(num_melodies)], seed)
  manifest: dict[str, Any] = {
      "format": FORMAT, "sample_rate": audio.SAMPLE_RATE, "seconds": seconds,
      "num_samples": int(round(seconds * audio.SAMPLE_RATE)), "seed": seed,
      "soundfont": soundfont, "num_melodies": num_melodies,
      "renditions_per_melody": renditions_per_melody, "splits": {}, "clips": []}
  with contextlib.ExitStack() as stack:
    run = map
    if workers > 1:
      pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn")))
      run = pool.map
    for split in base.SPLITS:
      ids = [i for i in range(num_melodies) if splits[str(i)] == split]
      writer = _ShardWriter(out_dir, split, clips_per_shard)
      n = len(ids)
      for clips, records in run(melody_clips, [seed] * n, ids, [renditions_per_melody] * n,
                                [seconds] * n, [soundfont] * n):
        writer.add(clips, records)
        manifest["clips"] += [dict(r, split=split) for r in records]
      writer.flush()
      manifest["splits"][split] = {"files": writer.files, "melody_ids": ids,
                                   "clips": writer.count}
  manifest["seconds_elapsed"] = round(time.time() - started, 2)
  path = os.path.join(out_dir, MANIFEST_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(path + ".tmp", path)
  return manifest


def read_manifest(data_dir: str) -> dict[str, Any]:
  path = os.path.join(data_dir, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {MANIFEST_FILE} in {data_dir}: build the corpus with "
                            "build_melody_renditions first (an unfinished build has none)")
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def load_split(data_dir: str, split: str) -> dict[str, np.ndarray]:
  """A split's clips in storage order: `audio` float32 `[clips, samples]` (24 kHz),
  `melody_id`, `rendition` int32 `[clips]`, `tempo_factor` float32 `[clips]`."""
  manifest = read_manifest(data_dir)
  if split not in manifest["splits"]:
    raise ValueError(f"unknown split {split!r}; {data_dir} has {sorted(manifest['splits'])}")
  parts = []
  for name in manifest["splits"][split]["files"]:
    with np.load(os.path.join(data_dir, name)) as data:
      parts.append({k: data[k] for k in ("audio", "melody_id", "rendition", "tempo_factor")})
  if not parts:
    raise ValueError(f"split {split!r} of {data_dir} has no clips")
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
