"""What every corpus is made of, and the resumable parallel build that makes it.

A corpus `Source` lists `Item`s (units of work: a piece to compose, a work to
arrange, a file to read) and turns one item into `Clip`s (24 kHz mono audio,
caption, aspects, metadata). `build_clips` runs that over a process pool and
keeps each item's result in a cache directory, written atomically, so an
interrupted build resumes where it stopped and never duplicates a clip. Items
that cannot be used are recorded with a reason and counted, never fatal.

No TensorFlow here: workers are spawned processes that import only this
package's audio and music code. `musiclm_jax/tasks/corpora.py` writes the
cached clips as a TFDS dataset.
"""
from __future__ import annotations

import abc
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from typing import Iterator, Optional, Sequence

import numpy as np

from musiclm_jax import audio

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class BuildSpec:
  """What `musiclm prepare CORPUS` was asked for.

  num_examples: most clips to build (0: everything the source has).
  seconds: clip length; shorter audio is padded, longer is cut into clips.
  seed: makes the corpus (composition, choices, splits) reproducible.
  source_dir: the user's files (audio_folder, musiccaps); None for built-ins.
  """
  num_examples: int
  seconds: float
  seed: int = 0
  source_dir: Optional[str] = None

  def __post_init__(self):
    if self.num_examples < 0:
      raise ValueError(f"num_examples must be >= 0 (0 = all), got {self.num_examples}")
    if not self.seconds > 0:
      raise ValueError(f"seconds must be > 0, got {self.seconds}")

  @property
  def config_name(self) -> str:
    """TFDS config name, e.g. 'n200_10s_seed0' or 'all_10s_seed0'."""
    count = f"n{self.num_examples}" if self.num_examples else "all"
    return f"{count}_{self.seconds:g}s_seed{self.seed}".replace(".", "p")

  @property
  def num_samples(self) -> int:
    return int(round(self.seconds * audio.SAMPLE_RATE))


@dataclasses.dataclass(frozen=True)
class Metadata:
  """Labels of a clip. Unknown values are 0.0 / '' / ()."""
  tempo_bpm: float = 0.0
  key: str = ""
  mode: str = ""
  time_signature: str = ""
  instruments: tuple[str, ...] = ()
  genre: str = ""
  mood: str = ""
  source_id: str = ""


@dataclasses.dataclass
class Clip:
  """One example. audio: float32 [spec.num_samples] at 24 kHz;
  duration_s: seconds of real content before any padding;
  midi: the score as a standard MIDI file (b'' when there is none)."""
  key: str
  audio: np.ndarray
  caption: str
  aspect_list: list[str]
  metadata: Metadata
  duration_s: float
  midi: bytes = b""
  repairs: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Item:
  """A unit of work. key: unique and stable across runs; source_id: the
  piece or recording it comes from (splits never share one)."""
  key: str
  source_id: str
  payload: tuple = ()


class SkipItem(Exception):
  """An item that yields no clip; `reason` is a short code for the report."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class Source(abc.ABC):
  """A corpus: its items, and how one item becomes clips (in a worker)."""
  name: str = ""

  def check(self, spec: BuildSpec) -> None:
    """Raises ValueError naming what is missing before any work starts."""

  @abc.abstractmethod
  def items(self, spec: BuildSpec) -> list[Item]:
    """All items, in the deterministic order of the build."""

  @abc.abstractmethod
  def clips(self, item: Item, spec: BuildSpec) -> list[Clip]:
    """Clips of one item; raises SkipItem or audio.AudioError to skip it."""

  def max_clips(self, spec: BuildSpec) -> int:
    """Clips to keep at most: spec.num_examples, 0 meaning all."""
    return spec.num_examples


def assign_splits(source_ids: Sequence[str], seed: int,
                  fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, str]:
  """Deterministic split of source ids into SPLITS by `fractions`.

  Ids are ordered by a seeded hash and cut by the fractions, so every split
  gets its share (at least one id each when there are three or more) and no
  source id is in two splits.
  """
  if len(fractions) != len(SPLITS) or abs(sum(fractions) - 1.0) > 1e-6:
    raise ValueError(f"split fractions {tuple(fractions)} must be 3 numbers summing to 1")
  unique = sorted(set(source_ids), key=lambda s: stable_hash(f"{seed}:{s}"))
  n = len(unique)
  n_test = int(round(fractions[2] * n))
  n_val = int(round(fractions[1] * n))
  if n >= 3:
    n_test, n_val = max(n_test, 1), max(n_val, 1)
  n_train = n - n_val - n_test
  names = ["train"] * n_train + ["validation"] * n_val + ["test"] * n_test
  return dict(zip(unique, names))


def stable_hash(text: str) -> str:
  """Hex SHA-1 of `text`: a hash that is the same in every process and run."""
  return hashlib.sha1(text.encode()).hexdigest()


@dataclasses.dataclass
class BuildReport:
  """Counts for `build_report.json`: what was built, repaired and skipped."""
  corpus: str
  spec: dict
  items: int = 0
  clips: dict = dataclasses.field(default_factory=dict)        # split -> count
  skipped: dict = dataclasses.field(default_factory=dict)      # reason -> count
  skipped_examples: dict = dataclasses.field(default_factory=dict)  # reason -> [messages]
  repairs: dict = dataclasses.field(default_factory=dict)      # repair -> count
  resumed_items: int = 0
  seconds_elapsed: float = 0.0

  def skip(self, reason: str, message: str, keep: int = 20) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    examples = self.skipped_examples.setdefault(reason, [])
    if len(examples) < keep:
      examples.append(message)

  def summary(self) -> str:
    clips = ", ".join(f"{k} {v}" for k, v in self.clips.items())
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
    repairs = ", ".join(f"{k} {v}" for k, v in sorted(self.repairs.items())) or "none"
    return (f"{self.corpus}: {sum(self.clips.values())} clips ({clips}) from "
            f"{self.items} items; skipped: {skipped}; repaired: {repairs}")


class ClipCache:
  """One file per finished item under `directory`: `<hash>.npz` with its
  clips, or `<hash>.skip.json` with the reason it yields none. Writes are
  atomic (temporary file + rename), so a killed build leaves only whole
  results."""

  def __init__(self, directory: str):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)

  def _path(self, item: Item, suffix: str) -> str:
    return os.path.join(self.directory, stable_hash(item.key)[:20] + suffix)

  def done(self, item: Item) -> bool:
    return any(os.path.exists(self._path(item, s)) for s in (".npz", ".skip.json"))

  def put_clips(self, item: Item, clips: list[Clip]) -> None:
    arrays = {f"audio_{i}": c.audio.astype(np.float32) for i, c in enumerate(clips)}
    arrays.update({f"midi_{i}": np.frombuffer(c.midi, np.uint8) for i, c in enumerate(clips)})
    records = [dict(key=c.key, caption=c.caption, aspect_list=list(c.aspect_list),
                    metadata=dataclasses.asdict(c.metadata), duration_s=c.duration_s,
                    repairs=list(c.repairs)) for c in clips]
    arrays["records"] = np.frombuffer(json.dumps(records).encode(), np.uint8)
    path = self._path(item, ".npz")
    with open(path + ".tmp", "wb") as f:
      np.savez(f, **arrays)
    os.replace(path + ".tmp", path)

  def put_skip(self, item: Item, reason: str, message: str) -> None:
    path = self._path(item, ".skip.json")
    with open(path + ".tmp", "w") as f:
      json.dump({"key": item.key, "reason": reason, "message": message}, f)
    os.replace(path + ".tmp", path)

  def _skip_record(self, item: Item) -> Optional[dict]:
    skip_path = self._path(item, ".skip.json")
    if not os.path.exists(skip_path):
      return None
    with open(skip_path) as f:
      return json.load(f)

  def records(self, item: Item) -> tuple[list[dict], Optional[dict]]:
    """Like `get` without reading audio: (clip records, None) or ([], skip record)."""
    skip = self._skip_record(item)
    if skip is not None:
      return [], skip
    with np.load(self._path(item, ".npz")) as data:  # npz members load lazily
      return json.loads(data["records"].tobytes()), None

  def get(self, item: Item) -> tuple[list[Clip], Optional[dict]]:
    """(clips, None) for a finished item, ([], skip record) for a skipped one."""
    skip = self._skip_record(item)
    if skip is not None:
      return [], skip
    with np.load(self._path(item, ".npz")) as data:
      records = json.loads(data["records"].tobytes())
      clips = []
      for i, r in enumerate(records):
        meta = dict(r["metadata"], instruments=tuple(r["metadata"]["instruments"]))
        clips.append(Clip(key=r["key"], audio=data[f"audio_{i}"], caption=r["caption"],
                          aspect_list=r["aspect_list"], metadata=Metadata(**meta),
                          duration_s=r["duration_s"], midi=data[f"midi_{i}"].tobytes(),
                          repairs=r["repairs"]))
    return clips, None


def _build_item(source: Source, item: Item, spec: BuildSpec, cache_dir: str) -> tuple[str, int]:
  """Worker: makes one item's clips into the cache. Returns (status, clips)."""
  cache = ClipCache(cache_dir)
  try:
    clips = source.clips(item, spec)
  except (SkipItem, audio.AudioError) as e:
    cache.put_skip(item, e.reason, str(e))
    return e.reason, 0
  except Exception as e:  # pylint: disable=broad-except
    # A bug or an unforeseen input in one item must not stop the corpus; the
    # traceback goes into the report.
    message = f"{item.key}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    cache.put_skip(item, "error", message)
    return "error", 0
  if not clips:
    cache.put_skip(item, "no_clips", f"{item.key}: produced no clips")
    return "no_clips", 0
  cache.put_clips(item, clips)
  return "ok", len(clips)


class Progress:
  """`prepare gm_synth: 120/1000 items (12%) | 8.1 items/s | skipped 2 | ETA 1m48s`."""

  def __init__(self, label: str, total: int, every_seconds: float = 10.0, stream=None):
    self.label, self.total, self.every = label, total, every_seconds
    self.stream = stream or sys.stdout
    self.start = self.last = time.time()

  def update(self, done: int, fresh: int, skipped: int, force: bool = False) -> None:
    now = time.time()
    if not force and now - self.last < self.every:
      return
    self.last = now
    rate = fresh / max(now - self.start, 1e-9)
    remaining = (self.total - done) / rate if rate > 0 else float("nan")
    eta = f"{remaining:.0f}s" if np.isfinite(remaining) else "?"
    print(f"{self.label}: {done}/{self.total} items ({100 * done // max(self.total, 1)}%) | "
          f"{rate:.2f} items/s | skipped {skipped} | ETA {eta}", file=self.stream, flush=True)


def build_clips(source: Source, spec: BuildSpec, items: Sequence[Item], cache_dir: str,
                workers: int = 0) -> int:
  """Makes every item not yet in the cache, `workers` processes at a time
  (0: one per CPU core; 1: in this process). Returns how many items were
  already cached (a resumed build)."""
  cache = ClipCache(cache_dir)
  todo = [item for item in items if not cache.done(item)]
  resumed = len(items) - len(todo)
  if resumed:
    print(f"prepare {source.name}: resuming; {resumed}/{len(items)} items already built",
          flush=True)
  progress = Progress(f"prepare {source.name}", len(items))
  workers = workers or os.cpu_count() or 1
  done, skipped = resumed, 0
  if workers == 1 or len(todo) <= 1:
    results: Iterator = (_build_item(source, item, spec, cache_dir) for item in todo)
    for status, _ in results:
      done += 1
      skipped += status != "ok"
      progress.update(done, done - resumed, skipped)
  else:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      futures = [pool.submit(_build_item, source, item, spec, cache_dir) for item in todo]
      for future in concurrent.futures.as_completed(futures):
        status, _ = future.result()
        done += 1
        skipped += status != "ok"
        progress.update(done, done - resumed, skipped)
  progress.update(done, done - resumed, skipped, force=True)
  return resumed


def collect(source: Source, spec: BuildSpec, items: Sequence[Item], cache_dir: str,
            splits: dict[str, str], report: BuildReport) -> dict[str, list[tuple[Item, int]]]:
  """Reads the finished cache once: fills `report` and returns, per split,
  the (item, clip index) pairs to write, capped at `source.max_clips(spec)`."""
  cache = ClipCache(cache_dir)
  chosen: dict[str, list[tuple[Item, int]]] = collections.defaultdict(list)
  limit = source.max_clips(spec) or float("inf")
  kept = 0
  for item in items:
    records, skip = cache.records(item)
    if skip is not None:
      report.skip(skip["reason"], skip["message"])
      continue
    for index, record in enumerate(records):
      if kept >= limit:
        report.skip("over_num_examples", f"{record['key']}: beyond --num_examples")
        continue
      kept += 1
      for repair in record["repairs"]:
        report.repairs[repair] = report.repairs.get(repair, 0) + 1
      chosen[splits[item.source_id]].append((item, index))
  report.items = len(items)
  report.clips = {split: len(chosen.get(split, [])) for split in SPLITS}
  return chosen


def cut_clips(wav: np.ndarray, spec: BuildSpec, repairs: audio.Repairs,
              max_clips: Optional[int] = None, min_fraction: float = 0.5,
              name: str = "audio") -> list[tuple[np.ndarray, float, float]]:
  """Cuts mono [samples] into consecutive clips of spec.seconds.

  A tail shorter than `min_fraction` of a clip is dropped (unless it is the
  only audio there is, then it is refused as too short); a longer tail is
  zero-padded. Silent stretches of a longer file are left out. Returns
  [(clip [num_samples], start_s, content_s)].
  """
  n = spec.num_samples
  if len(wav) < min_fraction * n:
    raise audio.AudioError("too_short", f"{name}: {len(wav) / audio.SAMPLE_RATE:.2f}s is "
                           f"shorter than {min_fraction:.0%} of a {spec.seconds:g}s clip")
  clips = []
  for start in range(0, len(wav), n):
    piece = wav[start:start + n]
    if len(piece) < min_fraction * n and clips:
      if len(piece):
        repairs.add("cropped")
      break
    if audio.rms_dbfs(piece) < audio.QualityLimits().silence_dbfs:
      repairs.add("dropped_silent_part")
      continue
    content = len(piece) / audio.SAMPLE_RATE
    clips.append((audio.fit_length(piece, n, repairs), start / audio.SAMPLE_RATE, content))
    if max_clips is not None and len(clips) >= max_clips:
      if start + n < len(wav):
        repairs.add("cropped")
      break
  return clips
