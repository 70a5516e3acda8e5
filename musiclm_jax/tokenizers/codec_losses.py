"""SoundStream's training losses and the codec's evaluation metrics (pure jnp).

Losses (scalars; `ref` is the real waveform, `est` the codec's output):
  * hinge adversarial losses over a list of sub-discriminator logits,
    each averaged over its positions, then over sub-discriminators;
  * feature matching: mean |real - fake| per feature map, averaged over
    all maps of all sub-discriminators;
  * multi-scale spectral reconstruction: for windows s = 2^6 .. 2^11 (hop
    s / 4, 64 mel bins), per frame the L1 norm of the mel-magnitude
    difference plus sqrt(s / 2) times the L2 norm of the log-mel
    difference, averaged over frames and batch and summed over scales.
Metrics (per example, `[batch]`): `mel_distance` (multi-resolution log-mel
L1, what the codec evaluation reports) and `si_snr` (dB).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.layers import spectral

RECONSTRUCTION_WINDOWS = tuple(2**i for i in range(6, 12))
MEL_DISTANCE_WINDOWS = (512, 1024, 2048)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CodecLossWeights:
  """Weights of the generator's loss terms (SoundStream: 1, 100, 1; commitment 1)."""
  adversarial: float = 1.0
  feature_matching: float = 100.0
  reconstruction: float = 1.0
  commitment: float = 1.0


def _check_pair(ref: jax.Array, est: jax.Array) -> None:
  if ref.shape != est.shape or ref.ndim != 2:
    raise ValueError(f"expected two waveforms of the same shape [batch, samples]; got "
                     f"{ref.shape} and {est.shape}")


def discriminator_hinge_loss(real_logits: Sequence[jax.Array],
                             fake_logits: Sequence[jax.Array]) -> jax.Array:
  """`mean(relu(1 - D(x))) + mean(relu(1 + D(G(x))))`, averaged over sub-discriminators.

  Args:
    real_logits: per sub-discriminator, logits on real audio `[batch, ...]`.
    fake_logits: the same on generated audio.
  Returns:
    scalar.
  """
  if len(real_logits) != len(fake_logits) or not real_logits:
    raise ValueError(f"{len(real_logits)} real and {len(fake_logits)} fake logits: "
                     "need one of each per sub-discriminator")
  losses = [jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
            for real, fake in zip(real_logits, fake_logits)]
  return sum(losses) / len(losses)


def generator_hinge_loss(fake_logits: Sequence[jax.Array]) -> jax.Array:
  """`mean(relu(1 - D(G(x))))`, averaged over sub-discriminators; scalar."""
  if not fake_logits:
    raise ValueError("no sub-discriminator logits")
  return sum(jnp.mean(jax.nn.relu(1.0 - fake)) for fake in fake_logits) / len(fake_logits)


def feature_matching_loss(real_features: Sequence[Sequence[jax.Array]],
                          fake_features: Sequence[Sequence[jax.Array]]) -> jax.Array:
  """Mean L1 distance of every feature map, averaged over all maps; scalar.

  Real features are targets (no gradient flows into them).

  Args:
    real_features: per sub-discriminator, its feature maps on real audio.
    fake_features: the same on generated audio.
  """
  distances = []
  for real_maps, fake_maps in zip(real_features, fake_features, strict=True):
    for real, fake in zip(real_maps, fake_maps, strict=True):
      distances.append(jnp.mean(jnp.abs(jax.lax.stop_gradient(real) - fake)))
  if not distances:
    raise ValueError("no feature maps to match")
  return sum(distances) / len(distances)


def _mel_magnitude(wav: jax.Array, sample_rate: int, window: int, n_mels: int) -> jax.Array:
  """`[batch, frames, n_mels]` mel filterbank applied to the STFT magnitude."""
  magnitude = jnp.abs(spectral.stft(wav, window, window // 4))
  return magnitude @ spectral.mel_filterbank(sample_rate, window, n_mels)


def _safe_norm(x: jax.Array) -> jax.Array:
  """L2 norm over the last axis whose gradient at 0 is 0 (not NaN)."""
  squared = jnp.sum(jnp.square(x), axis=-1)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def multi_scale_spectral_loss(ref: jax.Array, est: jax.Array, sample_rate: int = 24000,
                              windows: Sequence[int] = RECONSTRUCTION_WINDOWS,
                              n_mels: int = 64, eps: float = 1e-5) -> jax.Array:
  """SoundStream's reconstruction loss; 0 when `est == ref`.

  Args:
    ref, est: `[batch, samples]`, longer than half the largest window.
    windows: STFT sizes s (hop s / 4); the log term has weight sqrt(s / 2).
  Returns:
    scalar.
  """
  _check_pair(ref, est)
  total = 0.0
  for window in windows:
    mel_ref = _mel_magnitude(ref, sample_rate, window, n_mels)
    mel_est = _mel_magnitude(est, sample_rate, window, n_mels)
    l1 = jnp.sum(jnp.abs(mel_ref - mel_est), axis=-1)
    log_diff = jnp.log(jnp.maximum(mel_ref, eps)) - jnp.log(jnp.maximum(mel_est, eps))
    l2 = _safe_norm(log_diff)
    total += jnp.mean(l1 + np.sqrt(window / 2) * l2)
  return total


def mel_distance(ref: jax.Array, est: jax.Array, sample_rate: int = 24000,
                 windows: Sequence[int] = MEL_DISTANCE_WINDOWS, n_mels: int = 64
                 ) -> jax.Array:
  """Mean |log-mel(ref) - log-mel(est)|, averaged over windows (hop = window / 4).

  Log-mel is `spectral.log_mel_spectrogram` (natural log of mel power,
  floored at 1e-5).

  Args:
    ref, est: `[batch, samples]`.
  Returns:
    `[batch]`.
  """
  _check_pair(ref, est)
  distances = []
  for window in windows:
    log_mel_ref = spectral.log_mel_spectrogram(ref, sample_rate, window, window // 4, n_mels)
    log_mel_est = spectral.log_mel_spectrogram(est, sample_rate, window, window // 4, n_mels)
    distances.append(jnp.mean(jnp.abs(log_mel_ref - log_mel_est), axis=(1, 2)))
  return sum(distances) / len(distances)


def si_snr(ref: jax.Array, est: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Scale-invariant signal-to-noise ratio in dB (both signals made zero-mean).

  Args:
    ref, est: `[batch, samples]`.
  Returns:
    `[batch]`.
  """
  _check_pair(ref, est)
  ref = ref - jnp.mean(ref, axis=-1, keepdims=True)
  est = est - jnp.mean(est, axis=-1, keepdims=True)
  scale = jnp.sum(ref * est, axis=-1, keepdims=True) / (
      jnp.sum(ref * ref, axis=-1, keepdims=True) + eps)
  target = scale * ref
  noise = est - target
  ratio = (jnp.sum(target * target, axis=-1) + eps) / (jnp.sum(noise * noise, axis=-1) + eps)
  return 10.0 * jnp.log10(ratio)
