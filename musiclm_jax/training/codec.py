"""Adversarial training of the SoundStream codec (the trainer's GAN model).

    train.model = @CodecModel()
    train.optimizer = @gan_optimizer()
    gan_optimizer.generator = @generator/make_optimizer()
    gan_optimizer.discriminator = @discriminator/make_optimizer()

One step updates both players from the same batch: the generator (encoder,
RVQ, decoder) on `reconstruction * multi-scale spectral + commitment *
RVQ commitment + adversarial * hinge + feature_matching * L1 features`,
the discriminator (STFT + multi-scale waveform) on the hinge loss against
the generator's current output. For the first `adversarial_warmup_steps`
the adversarial and feature-matching terms are off and the discriminator
is frozen (its optimizer state too, so its learning-rate schedule starts
with the adversarial phase), so the codec first learns to reconstruct.
`adversarial_warmup_steps=None` trains on reconstruction and commitment
only: the step never runs the discriminator (which stays as initialised),
so it is cheaper than a warm-up that lasts the whole run. The RVQ's EMA
codebooks are the state's `model_state["quantizer"]`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from musiclm_jax.layers import spectral
from musiclm_jax.tokenizers import codec_losses
from musiclm_jax.tokenizers.discriminators import CodecDiscriminator
from musiclm_jax.tokenizers.soundstream import HOP_LENGTH, SAMPLE_RATE, SoundStream, SoundStreamConfig
from musiclm_jax.training.metrics import TrainCost
from musiclm_jax.training.optimizers import Optimizer
from musiclm_jax.training.train_state import TrainState

Batch = Mapping[str, Any]
SUMMARY_CLIPS = 2


@gin.configurable
class CodecModel:
  """SoundStream generator + discriminators under the trainer's model interface.

  Batches are `{"audio": float32 [batch, samples]}` at 24 kHz, `samples` a
  multiple of 480 (`AudioClipTask`).

  Args:
    config: the generator (stored in checkpoint manifests; `musiclm codec`
      rebuilds the codec from it).
    discriminator: the discriminators (default: `CodecDiscriminator()` as
      bound in gin).
    loss_weights: weights of the generator's loss terms.
    adversarial_warmup_steps: steps with reconstruction and commitment only;
      None: all of them, without running the discriminator.
  """

  def __init__(self, config: SoundStreamConfig = gin.REQUIRED,
               discriminator: CodecDiscriminator | None = None,
               loss_weights: codec_losses.CodecLossWeights | None = None,
               adversarial_warmup_steps: Optional[int] = 1000):
    self.config = config
    self.generator = SoundStream(config)
    self.discriminator = discriminator or CodecDiscriminator()
    self.loss_weights = loss_weights or codec_losses.CodecLossWeights()
    self.adversarial_warmup_steps = adversarial_warmup_steps
    self._reconstruct_for_summaries = jax.jit(
        lambda params, model_state, wav: self.reconstruct(params, model_state, wav,
                                                          train=False)[0])

  def _check_batch(self, batch: Batch) -> jax.Array:
    wav = batch["audio"]
    if wav.ndim != 2 or wav.shape[1] % HOP_LENGTH:
      raise ValueError(f"codec batches are audio [batch, samples] with samples a multiple "
                       f"of {HOP_LENGTH}; got {wav.shape} (set AudioClipTask.segment_seconds "
                       "to a multiple of 0.02)")
    return wav

  def init_variables(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
    wav = jnp.asarray(self._check_batch(batch), jnp.float32)
    generator_rng, discriminator_rng = jax.random.split(rng)
    generator = self.generator.init({"params": generator_rng}, wav, train=False)
    discriminator = self.discriminator.init({"params": discriminator_rng}, wav)
    return {"params": {"generator": generator["params"],
                       "discriminator": discriminator["params"]},
            "quantizer": generator["quantizer"]}

  def reconstruct(self, params: Any, model_state: Any, wav: jax.Array, train: bool,
                  rng: jax.Array | None = None):
    """`(wav_hat [batch, samples], QuantizerOutput, new quantizer state)`."""
    variables = {"params": params["generator"], **model_state}
    if not train:
      wav_hat, quantized = self.generator.apply(variables, wav, train=False)
      return wav_hat, quantized, model_state
    (wav_hat, quantized), updated = self.generator.apply(
        variables, wav, train=True, rngs={"quantizer": rng}, mutable=["quantizer"])
    return wav_hat, quantized, {**model_state, **updated}

  def make_train_step(self, optimizer: Optimizer, num_microbatches: int = 1):
    if num_microbatches != 1:
      raise ValueError("CodecModel does not accumulate gradients over microbatches "
                       f"(num_microbatches={num_microbatches}); lower train.batch_size")
    weights = self.loss_weights
    adversarial = self.adversarial_warmup_steps is not None

    def train_step(state: TrainState, batch: Batch):
      wav = batch["audio"]
      rng = jax.random.fold_in(state.rng, state.step)
      adversarial_on = ((state.step >= self.adversarial_warmup_steps).astype(jnp.float32)
                        if adversarial else jnp.float32(0.0))
      disc_params = state.params["discriminator"]
      # Feature-matching targets: no gradient reaches the generator through them.
      real = self.discriminator.apply({"params": disc_params}, wav) if adversarial else None

      def generator_loss(gen_params):
        params = {"generator": gen_params, "discriminator": disc_params}
        wav_hat, quantized, model_state = self.reconstruct(
            params, state.model_state, wav, train=True, rng=rng)
        terms = {"reconstruction": codec_losses.multi_scale_spectral_loss(wav, wav_hat),
                 "commitment": quantized.commitment_loss}
        loss = (weights.reconstruction * terms["reconstruction"]
                + weights.commitment * terms["commitment"])
        if adversarial:
          fake = self.discriminator.apply({"params": disc_params}, wav_hat)
          terms["adversarial"] = codec_losses.generator_hinge_loss([o.logits for o in fake])
          terms["feature_matching"] = codec_losses.feature_matching_loss(
              [o.features for o in real], [o.features for o in fake])
          loss += adversarial_on * (weights.adversarial * terms["adversarial"]
                                    + weights.feature_matching * terms["feature_matching"])
        return loss, (wav_hat, quantized, model_state, terms)

      (gen_loss, (wav_hat, quantized, model_state, terms)), gen_grads = jax.value_and_grad(
          generator_loss, has_aux=True)(state.params["generator"])

      def discriminator_loss(params):
        real = self.discriminator.apply({"params": params}, wav)
        fake = self.discriminator.apply({"params": params}, jax.lax.stop_gradient(wav_hat))
        return codec_losses.discriminator_hinge_loss([o.logits for o in real],
                                                     [o.logits for o in fake])

      if adversarial:
        disc_loss, disc_grads = jax.value_and_grad(discriminator_loss)(disc_params)
        disc_metrics = {"discriminator_loss": disc_loss,
                        "discriminator_grad_norm": optax.tree.norm(disc_grads)}
      else:
        disc_grads, disc_metrics = jax.tree.map(jnp.zeros_like, disc_params), {}
      grads = {"generator": gen_grads, "discriminator": disc_grads}
      updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      # The discriminator (and its optimizer statistics) stay put during warm-up.
      frozen = adversarial_on < 1.0
      keep_discriminator = lambda new, old: jax.tree.map(
          lambda n, o: jnp.where(frozen, o, n), new, old)
      params = {"generator": params["generator"],
                "discriminator": keep_discriminator(params["discriminator"], disc_params)}
      opt_state = _merge_discriminator_state(opt_state, state.opt_state, keep_discriminator)
      metrics = {"loss": gen_loss, **disc_metrics,
                 "adversarial_on": adversarial_on,
                 "mel_distance": jnp.mean(codec_losses.mel_distance(wav, wav_hat)),
                 "generator_grad_norm": optax.tree.norm(gen_grads),
                 "learning_rate": optimizer.schedule(state.step),
                 **{f"{k}_loss": v for k, v in terms.items()},
                 **{f"quantizer/{k}": v for k, v in quantized.metrics.items()}}
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                           model_state=model_state), metrics

    return train_step

  def make_eval_step(self):
    def eval_step(state: TrainState, batch: Batch):
      wav = batch["audio"]
      wav_hat, _, _ = self.reconstruct(state.params, state.model_state, wav, train=False)
      return {"mel_distance": jnp.sum(codec_losses.mel_distance(wav, wav_hat)),
              "si_snr": jnp.sum(codec_losses.si_snr(wav, wav_hat)),
              "clips": jnp.asarray(wav.shape[0], jnp.float32)}
    return eval_step

  def eval_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
    clips = max(sums["clips"], 1.0)
    return {"mel_distance": sums["mel_distance"] / clips, "si_snr": sums["si_snr"] / clips}

  def train_cost(self, batch_size: int, batch: Batch) -> TrainCost:
    return TrainCost("audio_seconds", batch_size * batch["audio"].shape[1] / SAMPLE_RATE, 0.0)

  def write_summaries(self, writer, step: int, state: TrainState, batch: Batch) -> None:
    """Originals, reconstructions and their log-mel spectrograms (TensorBoard)."""
    wav = batch["audio"][:SUMMARY_CLIPS]
    wav_hat = self._reconstruct_for_summaries(state.params, state.model_state, wav)
    pair = {"original": np.asarray(wav), "reconstruction": np.asarray(wav_hat)}
    writer.write_audios(step, {f"codec/{k}": np.clip(v, -1, 1)[..., None]
                               for k, v in pair.items()}, sample_rate=SAMPLE_RATE)
    writer.write_images(step, {f"codec/{k}_log_mel": spectrogram_image(v)
                               for k, v in pair.items()})


def spectrogram_image(wav: np.ndarray) -> np.ndarray:
  """Log-mel spectrograms `[batch, mels, frames, 1]` scaled to [0, 1], low bins at the bottom."""
  log_mel = np.asarray(spectral.log_mel_spectrogram(jnp.asarray(wav), SAMPLE_RATE, 1024,
                                                    256, 80))
  image = np.flip(np.swapaxes(log_mel, 1, 2), axis=1)
  low, high = image.min(), image.max()
  return ((image - low) / max(high - low, 1e-6))[..., None]


def _merge_discriminator_state(new: Any, old: Any, merge) -> Any:
  """`new` optimizer state with its discriminator part merged with `old`'s.

  `optax.multi_transform` keeps one inner state per label; the
  discriminator's is `inner_states["discriminator"]`.
  """
  inner = dict(new.inner_states)
  inner["discriminator"] = merge(new.inner_states["discriminator"],
                                 old.inner_states["discriminator"])
  return new._replace(inner_states=inner)
