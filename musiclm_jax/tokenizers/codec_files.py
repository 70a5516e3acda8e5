"""Audio files <-> SoundStream code files: `musiclm codec encode | decode | roundtrip`.

A code file is an `.npz` holding `codes` (int16 `[frames, levels]`), the
number of audio samples it stands for, and the configuration of the codec
that wrote it, so that decoding with another codec is refused instead of
producing noise. Audio of any common format, rate and channel count is
read (`audio.load`: downmix, resample to 24 kHz); long files go through the
streaming encoder and decoder in chunks, so memory stays bounded.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from musiclm_jax import audio
from musiclm_jax.tokenizers.soundstream import HOP_LENGTH, SAMPLE_RATE, SoundStreamCodec

CODES_FORMAT = "musiclm_jax.soundstream_codes/1"
CHUNK_FRAMES = 500  # 10 s per streaming call


class CodesFileError(ValueError):
  """A code file that is not one, or was written by another codec."""


def _config_json(codec: SoundStreamCodec) -> str:
  return json.dumps(dataclasses.asdict(codec.config), sort_keys=True)


def encode_waveform(codec: SoundStreamCodec, variables: Any, wav: np.ndarray,
                    num_levels: int | None = None) -> np.ndarray:
  """int32 codes `[ceil(samples / 480), levels]` of a mono 24 kHz `wav [samples]`,
  encoded in streaming chunks of `CHUNK_FRAMES` frames."""
  num_frames = codec.num_frames(len(wav))
  wav = np.pad(wav, (0, num_frames * HOP_LENGTH - len(wav)))[None]
  chunks, state = [], None
  for start in range(0, num_frames, CHUNK_FRAMES):
    chunk = wav[:, start * HOP_LENGTH:(start + CHUNK_FRAMES) * HOP_LENGTH]
    codes, state = codec.encode_stream(variables, chunk, state)
    chunks.append(np.asarray(codes[0]))
  codes = np.concatenate(chunks)
  return codes[:, :num_levels] if num_levels else codes


def decode_codes(codec: SoundStreamCodec, variables: Any, codes: np.ndarray) -> np.ndarray:
  """Mono 24 kHz waveform `[frames * 480]` of codes `[frames, q]`, in streaming chunks."""
  pieces, state = [], None
  for start in range(0, len(codes), CHUNK_FRAMES):
    wav, state = codec.decode_stream(variables, codes[None, start:start + CHUNK_FRAMES], state)
    pieces.append(np.asarray(wav[0]))
  return np.concatenate(pieces)


def encode_file(codec: SoundStreamCodec, variables: Any, audio_path: str, codes_path: str,
                num_levels: int | None = None) -> dict[str, Any]:
  """Writes the codes of an audio file; returns a summary (frames, levels, bitrate)."""
  wav, repairs = audio.load(audio_path, SAMPLE_RATE)
  codes = encode_waveform(codec, variables, wav, num_levels)
  tmp = f"{codes_path}.tmp.npz"
  np.savez(tmp, codes=codes.astype(np.int16), num_samples=np.int64(len(wav)),
           format=CODES_FORMAT, codec_config=_config_json(codec))
  os.replace(tmp, codes_path)
  return {"input": audio_path, "output": codes_path, "seconds": len(wav) / SAMPLE_RATE,
          "frames": codes.shape[0], "levels": codes.shape[1],
          "bitrate": codec.bitrate(codes.shape[1]), "repairs": list(repairs.done)}


def read_codes(codec: SoundStreamCodec, codes_path: str) -> tuple[np.ndarray, int]:
  """`(codes [frames, levels], num_samples)` of a code file written by this codec."""
  try:
    with np.load(codes_path, allow_pickle=False) as data:
      fields = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise CodesFileError(f"{codes_path}: not a code file ({e})") from e
  if str(fields.get("format")) != CODES_FORMAT:
    raise CodesFileError(f"{codes_path}: not a {CODES_FORMAT} file "
                         f"(format {fields.get('format')!r})")
  if str(fields["codec_config"]) != _config_json(codec):
    raise CodesFileError(
        f"{codes_path} was written by a codec with config {fields['codec_config']}, "
        f"not this checkpoint's {_config_json(codec)}; decode it with the codec that "
        "encoded it")
  return fields["codes"].astype(np.int32), int(fields["num_samples"])


def decode_file(codec: SoundStreamCodec, variables: Any, codes_path: str,
                audio_path: str) -> dict[str, Any]:
  """Writes the 24 kHz wav of a code file; returns a summary."""
  codes, num_samples = read_codes(codec, codes_path)
  wav = decode_codes(codec, variables, codes)[:num_samples]
  audio.write_wav(audio_path, wav, SAMPLE_RATE)
  return {"input": codes_path, "output": audio_path, "seconds": num_samples / SAMPLE_RATE,
          "levels": codes.shape[1], "bitrate": codec.bitrate(codes.shape[1])}


def roundtrip_file(codec: SoundStreamCodec, variables: Any, audio_path: str,
                   output_path: str, num_levels: int | None = None) -> dict[str, Any]:
  """Encodes and decodes an audio file; writes the 24 kHz reconstruction."""
  wav, repairs = audio.load(audio_path, SAMPLE_RATE)
  codes = encode_waveform(codec, variables, wav, num_levels)
  audio.write_wav(output_path, decode_codes(codec, variables, codes)[:len(wav)], SAMPLE_RATE)
  return {"input": audio_path, "output": output_path, "seconds": len(wav) / SAMPLE_RATE,
          "levels": codes.shape[1], "bitrate": codec.bitrate(codes.shape[1]),
          "repairs": list(repairs.done)}
