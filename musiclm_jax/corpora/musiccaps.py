"""`musiccaps`: the public MusicCaps captions with clips the user downloaded.

SOURCE_DIR holds `musiccaps-public.csv` (columns ytid, start_s, end_s,
aspect_list, caption, ...) and the audio, named by YouTube id: `<ytid>.<ext>`
or `<ytid>_<anything>.<ext>`, in SOURCE_DIR or SOURCE_DIR/audio. A file of
about end_s - start_s seconds is taken as the clip itself; a longer one as
the whole video, from which [start_s, end_s) is cut. Clips that are not
there are counted as `missing_clip` in the build report, not fatal.
"""
from __future__ import annotations

import dataclasses
import os

import gin
import numpy as np

from musiclm_jax import audio
from musiclm_jax.corpora import audio_folder
from musiclm_jax.corpora import base

CSV_NAME = "musiccaps-public.csv"
AUDIO_SUBDIRS = ("", "audio")


def index_audio(source_dir: str) -> dict[str, str]:
  """YouTube id -> audio path, for files named `<ytid>.<ext>` or `<ytid>_*.<ext>`.

  YouTube ids are 11 characters and may themselves contain '_', so the id is
  the first 11 characters of the file name.
  """
  found = {}
  for sub in AUDIO_SUBDIRS:
    directory = os.path.join(source_dir, sub)
    if not os.path.isdir(directory):
      continue
    for name in sorted(os.listdir(directory)):
      stem, ext = os.path.splitext(name)
      if ext.lower() in audio.AUDIO_EXTENSIONS and len(stem) >= 11:
        found.setdefault(stem[:11], os.path.join(directory, name))
  return found


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MusicCapsSource(base.Source):
  """One clip per CSV row (MusicCaps clips are 10 s)."""
  name = "musiccaps"

  def check(self, spec: base.BuildSpec) -> None:
    path = os.path.join(spec.source_dir or "", CSV_NAME)
    if not os.path.isfile(path):
      raise ValueError(f"musiccaps needs --source_dir with {CSV_NAME} (from the MusicCaps "
                       f"release) and the clips you downloaded; {path} does not exist")

  def items(self, spec: base.BuildSpec) -> list[base.Item]:
    rows = audio_folder.read_table(os.path.join(spec.source_dir, CSV_NAME))
    found = index_audio(spec.source_dir)
    items = []
    for row in rows:
      ytid = row["ytid"]
      metadata = base.Metadata(source_id=f"youtube:{ytid}")
      items.append(base.Item(
          key=f"musiccaps:{ytid}", source_id=metadata.source_id,
          payload=(found.get(ytid), float(row["start_s"]), float(row["end_s"]),
                   row["caption"].strip(), tuple(audio_folder.parse_list(row["aspect_list"])),
                   metadata)))
    order = np.random.default_rng([spec.seed, 5]).permutation(len(items))
    return [items[i] for i in order]

  def clips(self, item: base.Item, spec: base.BuildSpec) -> list[base.Clip]:
    path, start_s, end_s, caption, aspects, metadata = item.payload
    if path is None:
      raise base.SkipItem("missing_clip", f"{item.key}: no audio file for this YouTube id")
    wav, repairs = audio.load(path)
    if len(wav) > (end_s - start_s + 1.0) * audio.SAMPLE_RATE:  # the whole video
      wav = wav[int(start_s * audio.SAMPLE_RATE):int(end_s * audio.SAMPLE_RATE)]
      repairs.add("cut_from_video")
      wav = audio.check_and_repair(wav, repairs, name=f"{path} [{start_s:g}s, {end_s:g}s)")
    clip, _, content = base.cut_clips(wav, spec, repairs, max_clips=1, name=path)[0]
    return [base.Clip(key=item.key, audio=clip, caption=caption, aspect_list=list(aspects),
                      metadata=metadata, duration_s=content, repairs=list(repairs.done))]
