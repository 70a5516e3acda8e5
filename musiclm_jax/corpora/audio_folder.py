"""`audio_folder`: the user's own audio files with captions.

SOURCE_DIR holds audio files (wav, flac, ogg, opus, mp3, aiff; any rate or
channel count; sub-directories allowed) and one captions file,
`captions.jsonl` or `captions.csv` (or `metadata.jsonl` / `metadata.csv`).
Each row names a file relative to SOURCE_DIR and its caption:

    {"file": "jazz/take1.flac", "caption": "A mellow jazz trio ...",
     "aspect_list": ["jazz", "piano trio"], "genre": "jazz", "tempo_bpm": 92}

Columns: `file` (or `file_name`, `path`), `caption` (or `text`); optional
`aspect_list` (a list, or a comma-separated string), `source_id` (files of one
recording or album: kept in one split; default the file), and metadata
`tempo_bpm`, `key`, `mode`, `time_signature`, `instruments`, `genre`, `mood`.
Long files are cut into consecutive clips; unusable files are skipped and
counted with the reason.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
from typing import Any, Optional

import gin
import numpy as np

from musiclm_jax import audio
from musiclm_jax.corpora import base

CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")
FILE_COLUMNS = ("file", "file_name", "path")
CAPTION_COLUMNS = ("caption", "text")


def read_table(path: str) -> list[dict[str, Any]]:
  """Rows of a JSONL or CSV file; errors name the file and line."""
  rows = []
  with open(path, newline="", encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON object: {e}") from e
    else:
      rows = list(csv.DictReader(f))
  return rows


def parse_list(value: Any) -> list[str]:
  """A list from a list, a Python-literal list string or 'a, b, c'."""
  if value is None or value == "":
    return []
  if isinstance(value, (list, tuple)):
    return [str(v).strip() for v in value if str(v).strip()]
  text = str(value).strip()
  if text.startswith("["):
    try:
      return [str(v).strip() for v in ast.literal_eval(text)]
    except (ValueError, SyntaxError):
      text = text.strip("[]")
  return [v.strip().strip("'\"") for v in text.split(",") if v.strip()]


def row_metadata(row: dict[str, Any], source_id: str) -> base.Metadata:
  """Metadata from the optional columns of a captions row."""
  try:
    tempo = float(row.get("tempo_bpm") or 0.0)
  except ValueError:
    tempo = 0.0
  return base.Metadata(
      tempo_bpm=tempo, key=str(row.get("key") or ""), mode=str(row.get("mode") or ""),
      time_signature=str(row.get("time_signature") or ""),
      instruments=tuple(parse_list(row.get("instruments"))),
      genre=str(row.get("genre") or ""), mood=str(row.get("mood") or ""), source_id=source_id)


def first_present(row: dict[str, Any], names: tuple[str, ...]) -> Optional[str]:
  for name in names:
    if row.get(name) not in (None, ""):
      return str(row[name])
  return None


def clips_from_file(path: str, key_prefix: str, spec: base.BuildSpec, caption: str,
                    aspects: list[str], metadata: base.Metadata,
                    max_clips: Optional[int]) -> list[base.Clip]:
  """Loads, repairs and cuts one audio file into clips."""
  wav, repairs = audio.load(path)
  cut = base.cut_clips(wav, spec, repairs, max_clips=max_clips, name=path)
  return [base.Clip(key=f"{key_prefix}@{start:g}", audio=clip, caption=caption,
                    aspect_list=aspects, metadata=metadata, duration_s=content,
                    repairs=list(repairs.done))
          for clip, start, content in cut]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AudioFolderSource(base.Source):
  """captions_file: path of the captions table (default: the first of
  CAPTION_FILES found in SOURCE_DIR). max_clips_per_file: cap on clips cut
  from one long file (None: all)."""
  captions_file: Optional[str] = None
  max_clips_per_file: Optional[int] = None
  name = "audio_folder"

  def _captions_path(self, spec: base.BuildSpec) -> str:
    if self.captions_file:
      return self.captions_file
    for name in CAPTION_FILES:
      path = os.path.join(spec.source_dir, name)
      if os.path.isfile(path):
        return path
    raise ValueError(f"no captions file in {spec.source_dir}: expected one of "
                     f"{', '.join(CAPTION_FILES)} (see `musiclm_jax/corpora/audio_folder.py`)")

  def check(self, spec: base.BuildSpec) -> None:
    if not spec.source_dir or not os.path.isdir(spec.source_dir):
      raise ValueError(f"audio_folder needs --source_dir, a directory of audio files; "
                       f"got {spec.source_dir!r}")
    self._captions_path(spec)

  def items(self, spec: base.BuildSpec) -> list[base.Item]:
    path = self._captions_path(spec)
    items, seen = [], set()
    for number, row in enumerate(read_table(path), 1):
      file_name = first_present(row, FILE_COLUMNS)
      caption = first_present(row, CAPTION_COLUMNS)
      if file_name is None or caption is None:
        raise ValueError(f"{path}: row {number} lacks a file ({'/'.join(FILE_COLUMNS)}) or a "
                         f"caption ({'/'.join(CAPTION_COLUMNS)}) column: {row}")
      if file_name in seen:
        continue
      seen.add(file_name)
      source_id = str(row.get("source_id") or file_name)
      items.append(base.Item(key=f"audio_folder:{file_name}", source_id=source_id,
                             payload=(file_name, caption.strip(),
                                      tuple(parse_list(row.get("aspect_list"))),
                                      row_metadata(row, source_id))))
    order = np.random.default_rng([spec.seed, 4]).permutation(len(items))
    return [items[i] for i in order]

  def clips(self, item: base.Item, spec: base.BuildSpec) -> list[base.Clip]:
    file_name, caption, aspects, metadata = item.payload
    return clips_from_file(os.path.join(spec.source_dir, file_name), item.key, spec, caption,
                           list(aspects), metadata, self.max_clips_per_file)
