"""The token cache of `musiclm tokenize`, read without TensorFlow.

The cache job (`tasks/token_tasks.py`) writes SeqIO's cache layout, one
directory per corpus:

    <cache_dir>/<corpus>_tokens/
        COMPLETED                              the job finished this corpus
        tokens_manifest.json                   tokenizers, token layout, clips per split
        info.<split>.json                      SeqIO's info, with `num_shards`
        <split>.tfrecord-NNNNN-of-MMMMM        one serialized tf.train.Example per clip

This module reads that layout with the standard library, google_crc32c,
protobuf and numpy: the TFRecord framing (each record's length and data
checked against their CRC-32C) and the Example message (parsed by protobuf
from a descriptor built here, in a pool of its own, so that it never clashes
with TensorFlow's `tensorflow.Example` in a process that imports both; the
packed int64 lists decoded by numpy). It serves the stage reader of hosts without TensorFlow
(`stage_task.StageTask`, `reader='numpy'`) and anything else that only needs
the paths, the manifest or the records.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import struct
import weakref
from typing import Any, Iterator, Optional, Sequence

import google_crc32c
import numpy as np
from etils import epath
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory

MANIFEST_FILE = "tokens_manifest.json"
MANIFEST_FORMAT = "musiclm_jax.tokens/1"
COMPLETED_FILE = "COMPLETED"
CODE_FEATURES = ("semantic", "acoustic", "mulan", "melody")
TEXT_FEATURES = ("caption", "clip_id", "source_id", "split", "skip_reason")


class CorruptCacheError(ValueError):
  """A cache file is truncated or does not match its checksums."""


def token_task_name(corpus: str) -> str:
  return f"{corpus}_tokens"


def task_cache_dir(cache_dir: str, corpus: str) -> str:
  """The corpus' cache directory (SeqIO's `get_task_dir_from_name`: `:` nests)."""
  return os.path.join(cache_dir, *token_task_name(corpus).split(":"))


def is_complete(task_dir: str) -> bool:
  return epath.Path(task_dir, COMPLETED_FILE).exists()


def read_manifest(task_dir: str) -> dict[str, Any]:
  path = epath.Path(task_dir, MANIFEST_FILE)
  if not path.exists():
    raise FileNotFoundError(f"no token cache at {task_dir} ({MANIFEST_FILE} missing); "
                            "run `musiclm tokenize` first")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != MANIFEST_FORMAT:
    raise ValueError(f"{path} has format {manifest.get('format')!r}, not {MANIFEST_FORMAT}")
  return manifest


def cached_splits(task_dir: str) -> list[str]:
  """Splits with an info file (`info.<split>.json`, SeqIO's naming)."""
  return sorted(p.name[len("info."):-len(".json")]
                for p in epath.Path(task_dir).glob("info.*.json"))


def shard_paths(task_dir: str, split: str) -> list[str]:
  """The split's TFRecord shards in order; raises FileNotFoundError if one is missing."""
  info = epath.Path(task_dir, f"info.{split}.json")
  if not info.exists():
    raise FileNotFoundError(f"the token cache {task_dir} has no split {split!r} (no {info.name})")
  num_shards = json.loads(info.read_text())["num_shards"]
  paths = [os.path.join(task_dir, f"{split}.tfrecord-{i:05d}-of-{num_shards:05d}")
           for i in range(num_shards)]
  missing = [p for p in paths if not epath.Path(p).exists()]
  if missing:
    raise FileNotFoundError(f"the token cache {task_dir} lacks {len(missing)} of the "
                            f"{num_shards} shards of {split!r}, e.g. {missing[0]}")
  return paths


# -- TFRecord framing ----------------------------------------------------------

def masked_crc32c(chunks: Sequence[bytes]) -> np.ndarray:
  """TFRecord's checksum of each chunk: CRC-32C (Castagnoli, google_crc32c's C
  code), rotated and offset; uint32 `[chunks]`."""
  crc = np.array([google_crc32c.value(chunk) for chunk in chunks], np.uint32)
  return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)


def record_spans(path: str, data: Optional[bytes] = None) -> list[tuple[int, int]]:
  """(offset, length) of the data of every record in a TFRecord file (its bytes
  `data`, read when not given), each record's length and data checked
  against their CRC-32C.

  Raises:
    CorruptCacheError: a truncated record or a checksum mismatch, naming the
      offset of the first bad record.
  """
  if data is None:
    data = epath.Path(path).read_bytes()
  offsets, spans, offset = [], [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header) if len(header) == 8 else (len(data),)
    if offset + 12 + length + 4 > len(data):  # truncated, or a corrupt length
      _check_crcs(path, data, offsets + [offset], spans, headers_only=True)
      raise CorruptCacheError(f"{path} is truncated in the record at byte {offset}")
    offsets.append(offset)
    spans.append((offset + 12, length))
    offset += 12 + length + 4
  _check_crcs(path, data, offsets, spans)
  return spans


def _check_crcs(path: str, data: bytes, offsets: list[int], spans: list[tuple[int, int]],
                headers_only: bool = False) -> None:
  """Raises CorruptCacheError for the first record whose length (at `offsets`)
  or data (at `spans`) fails its checksum; a header cut short is not checked."""
  whole = [o for o in offsets if o + 12 <= len(data)]
  bad = np.flatnonzero(masked_crc32c([data[o:o + 8] for o in whole]) != np.array(
      [struct.unpack("<I", data[o + 8:o + 12])[0] for o in whole], np.uint32))
  if len(bad):
    raise CorruptCacheError(f"{path}: the length of the record at byte {whole[bad[0]]} fails "
                            "its checksum (corrupt file)")
  if headers_only:
    return
  bad = np.flatnonzero(masked_crc32c([data[s:s + n] for s, n in spans]) != np.array(
      [struct.unpack("<I", data[s + n:s + n + 4])[0] for s, n in spans], np.uint32))
  if len(bad):
    raise CorruptCacheError(f"{path}: the record at byte {offsets[bad[0]]} fails its checksum "
                            "(corrupt file)")


# -- tf.train.Example ----------------------------------------------------------

@functools.cache
def _example_class():
  """A message class wire-compatible with tf.train.Example (example.proto and
  feature.proto: the same field numbers and wire types), in a private pool.

  One difference: `Int64List.value` is declared `repeated bytes`, which reads
  the packed encoding that TensorFlow writes (proto3 packs repeated ints) as
  its raw varint bytes; `decode_varints` turns those into an array at numpy
  speed, where protobuf's repeated int64 field costs a Python object per value.
  """
  file = descriptor_pb2.FileDescriptorProto(name="musiclm_jax/example.proto",
                                            package="musiclm_jax.example", syntax="proto3")
  Field = descriptor_pb2.FieldDescriptorProto  # pylint: disable=invalid-name

  def add_message(container, name, *fields, oneof=None):
    message = container.add(name=name)
    if oneof:
      message.oneof_decl.add(name=oneof)
    for number, (field_name, kind, type_name) in enumerate(fields, start=1):
      repeated = field_name in ("value", "feature")
      field = message.field.add(
          name=field_name, number=number, type=kind,
          label=Field.LABEL_REPEATED if repeated else Field.LABEL_OPTIONAL)
      if type_name:
        field.type_name = f".musiclm_jax.example.{type_name}"
      if kind == Field.TYPE_FLOAT:
        field.options.packed = True
      if oneof:
        field.oneof_index = 0
    return message

  add_message(file.message_type, "BytesList", ("value", Field.TYPE_BYTES, None))
  add_message(file.message_type, "FloatList", ("value", Field.TYPE_FLOAT, None))
  add_message(file.message_type, "Int64List", ("value", Field.TYPE_BYTES, None))
  add_message(file.message_type, "Feature", ("bytes_list", Field.TYPE_MESSAGE, "BytesList"),
              ("float_list", Field.TYPE_MESSAGE, "FloatList"),
              ("int64_list", Field.TYPE_MESSAGE, "Int64List"), oneof="kind")
  features = add_message(file.message_type, "Features",
                         ("feature", Field.TYPE_MESSAGE, "Features.FeatureEntry"))
  entry = add_message(features.nested_type, "FeatureEntry", ("key", Field.TYPE_STRING, None),
                      ("value", Field.TYPE_MESSAGE, "Feature"))
  entry.field[1].label = Field.LABEL_OPTIONAL
  entry.options.map_entry = True
  add_message(file.message_type, "Example", ("features", Field.TYPE_MESSAGE, "Features"))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("musiclm_jax.example.Example"))


def decode_varints(data: bytes) -> np.ndarray:
  """The int64 values of concatenated base-128 varints (protobuf's packed
  encoding; negatives as 10-byte two's complement), int64 `[values]`."""
  raw = np.frombuffer(data, np.uint8)
  if not len(raw):
    return np.zeros(0, np.int64)
  last = raw < 0x80  # the final byte of each value
  if not last[-1]:
    raise CorruptCacheError("a packed int64 list ends inside a value")
  starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
  value_of_byte = np.cumsum(last) - last
  shift = 7 * (np.arange(len(raw)) - starts[value_of_byte])
  parts = (raw & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
  return np.add.reduceat(parts, starts).view(np.int64)


def parse_clip(serialized: bytes, acoustic_levels: int, melody_levels: int = 0
               ) -> dict[str, Any]:
  """One cached record as `tasks.token_tasks.read_cached` gives it.

  Returns:
    `semantic` int32 `[frames_s]`, `acoustic` int32 `[frames_a, acoustic_levels]`,
    `mulan` int32 `[mulan_levels]`, `melody` int32 `[windows, melody_levels]`
    (when `melody_levels` > 0), the text features as bytes and `duration_s`.
    A skipped clip has empty codes.
  Raises:
    CorruptCacheError: the record is not such an Example.
  """
  example = _example_class()()
  try:
    example.ParseFromString(serialized)
  except Exception as e:  # protobuf's DecodeError
    raise CorruptCacheError(f"a cached record is not a tf.train.Example: {e}") from e
  features = example.features.feature
  widths = {"semantic": 0, "acoustic": acoustic_levels, "mulan": 0, "melody": melody_levels}
  clip: dict[str, Any] = {}
  try:
    for name in CODE_FEATURES[:3 + bool(melody_levels)]:
      packed = b"".join(features[name].int64_list.value) if name in features else b""
      clip[name] = decode_varints(packed).astype(np.int32)
      if widths[name]:
        clip[name] = clip[name].reshape(-1, widths[name])
    for name in TEXT_FEATURES:
      (clip[name],) = features[name].bytes_list.value
    (duration,) = features["duration_s"].float_list.value
    clip["duration_s"] = np.float32(duration)
  except ValueError as e:  # a missing or ill-shaped feature
    raise CorruptCacheError(f"a cached record does not hold the token task's features: "
                            f"{e}") from e
  return clip


@dataclasses.dataclass(frozen=True)
class RecordRef:
  """Where one cached clip lies (its shard, byte offset and length), its number
  of semantic frames (which fixes its evaluation windows), and whether the
  cache job skipped it."""

  path: str
  offset: int
  length: int
  semantic_frames: int
  skipped: bool


class CachedSplit:
  """The tokenized clips of one split of one corpus' cache that one process reads.

  Opening it reads this process' shards once: it checks each record's
  checksums and keeps a `RecordRef` per record, so a clip is read again by
  seeking to it. Memory grows with the number of clips, not their tokens.
  `read` keeps the shards it read last open (at most `max_open_files`; the
  least recently read one is closed first), so that training's shuffled order
  does not open a file per clip, which on a remote filesystem costs a round
  trip each time; they close when the split is garbage-collected.

  `records` are this process' tokenized clips in the order SeqIO reads the
  split unshuffled: its files through tf.data's interleave (`interleave`),
  with SeqIO's host sharding: every `num_shards`-th file from `shard_index`
  on when there are at least `num_shards` files, else every `num_shards`-th
  record (skipped clips counted) of all files.

  Args:
    task_dir: the corpus' cache directory (`task_cache_dir`).
    split: e.g. "train".
    acoustic_levels, melody_levels: the cache's layout (`melody_levels` 0:
      the melody codes are not read).
    shard_index, num_shards: this process and the number of processes.
    max_open_files: how many shards `read` keeps open.
  """

  def __init__(self, task_dir: str, split: str, acoustic_levels: int,
               melody_levels: int = 0, shard_index: int = 0, num_shards: int = 1,
               max_open_files: int = 16):
    if max_open_files < 1:
      raise ValueError(f"max_open_files must be at least 1; got {max_open_files}")
    paths = shard_paths(task_dir, split)
    by_file = len(paths) >= num_shards
    self.acoustic_levels = acoustic_levels
    self.melody_levels = melody_levels
    self.files = paths[shard_index::num_shards] if by_file else paths
    order = interleave([self._index(path) for path in self.files])
    if not by_file:
      order = order[shard_index::num_shards]
    self.records = [ref for ref in order if not ref.skipped]
    self._max_open_files = max_open_files
    self._open_files: collections.OrderedDict[str, Any] = collections.OrderedDict()
    weakref.finalize(self, _close_files, self._open_files)

  def _index(self, path: str) -> list[RecordRef]:
    data = epath.Path(path).read_bytes()
    refs = []
    for offset, length in record_spans(path, data):
      clip = self._parse(data[offset:offset + length])
      refs.append(RecordRef(path, offset, length, len(clip["semantic"]),
                            skipped=bool(clip["skip_reason"])))
    return refs

  def _parse(self, serialized: bytes) -> dict[str, Any]:
    return parse_clip(serialized, self.acoustic_levels, self.melody_levels)

  def read(self, ref: RecordRef) -> dict[str, Any]:
    f = self._open_files.pop(ref.path, None)
    if f is None:
      if len(self._open_files) >= self._max_open_files:
        self._open_files.popitem(last=False)[1].close()
      f = epath.Path(ref.path).open("rb")
    self._open_files[ref.path] = f  # the most recently read shard last
    f.seek(ref.offset)
    return self._parse(f.read(ref.length))


def _close_files(files: dict[str, Any]) -> None:
  for f in files.values():
    f.close()
  files.clear()


def interleave(sources: list[list[Any]], cycle_length: int = 16, block_length: int = 16
               ) -> list[Any]:
  """The order of tf.data's deterministic `interleave` over `sources` (SeqIO's
  `FileDataSource` defaults): `cycle_length` slots take `block_length` items in
  turn; a slot whose source ends moves on, and takes the next source when the
  cycle comes back to it."""
  pending = iter(sources)
  slots: list[Optional[Iterator[Any]]] = [None] * cycle_length
  end_of_input, num_open, slot, taken = False, 0, 0, 0
  order = []

  def advance():
    nonlocal slot, taken
    slot, taken = (slot + 1) % cycle_length, 0

  while not end_of_input or num_open:
    if slots[slot] is not None:
      item = next(slots[slot], _END)
      if item is not _END:
        order.append(item)
        taken += 1
        if taken == block_length:
          advance()
        continue
      slots[slot] = None
      num_open -= 1
      advance()
    elif not end_of_input:
      source = next(pending, None)
      if source is None:
        end_of_input = True
      else:
        slots[slot] = iter(source)
        num_open += 1
    else:
      advance()
  return order


_END = object()
