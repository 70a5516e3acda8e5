"""SoundStream codec: shapes, bitrate, RVQ prefixes, streaming, causality,
discriminators, losses, and a tiny codec that learns to reconstruct a chord."""
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from audio_fixtures import tone
from musiclm_jax.layers.conv import CausalConv1d, CausalConvTranspose1d
from musiclm_jax.tokenizers import codec_losses
from musiclm_jax.tokenizers.discriminators import CodecDiscriminator
from musiclm_jax.tokenizers.soundstream import SoundStreamCodec, SoundStreamConfig
from musiclm_jax.training.codec import CodecModel
from musiclm_jax.training.optimizers import Optimizer, gan_optimizer
from musiclm_jax.training.train_state import TrainState

RATE = 24000
HOP = 480
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides) -> SoundStreamConfig:
  """The `tiny` size of gin/sizes/soundstream_tiny.gin."""
  gin.parse_config_file(os.path.join(REPO, "gin/sizes/soundstream_tiny.gin"))
  config = SoundStreamConfig(**overrides)
  gin.clear_config()
  return config


def chord(seconds: float = 1.0, batch: int = 1) -> np.ndarray:
  wav = tone(seconds, RATE)[:, 0]
  return np.stack([wav * (1.0 - 0.2 * i) for i in range(batch)])


@pytest.fixture(scope="module")
def codec():
  return SoundStreamCodec(tiny_config())


def initialise(init_fn, *args):
  """`init_fn(*args)` under the non-partitionable threefry PRNG, whose many small
  random kernels XLA:CPU compiles ~3x faster (the values differ, not their law)."""
  with jax.threefry_partitionable(False):
    return init_fn(*args)


@pytest.fixture(scope="module")
def variables(codec):
  return initialise(codec.init, jax.random.key(0), RATE)


def test_config_sizes_and_validation():
  config = tiny_config()
  assert (config.channels, config.embedding_dim, config.num_levels,
          config.codebook_size) == (8, 64, 12, 1024)
  assert np.prod(config.strides) == HOP
  with pytest.raises(ValueError, match="480"):
    SoundStreamConfig(strides=(2, 4, 5, 8))
  for size, embedding_dim in (("small", 128), ("base", 512)):
    gin.parse_config_file(os.path.join(REPO, f"gin/sizes/soundstream_{size}.gin"))
    config = SoundStreamConfig()
    assert (config.channels, config.embedding_dim) == (32, embedding_dim)
    assert config.bitrate() == 6000
    gin.clear_config()


def test_one_second_gives_50_frames_of_12_codes_at_6_kbps(codec, variables):
  wav = chord(1.0, batch=2) + 0.01 * np.random.default_rng(0).normal(size=(2, RATE))
  codes = np.asarray(codec.encode(variables, wav))
  assert codes.shape == (2, 50, 12) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < 1024
  assert len(np.unique(codes[:, :, 0])) > 1
  assert codec.bitrate(12) == 6000 and codec.bitrate(4) == 2000
  decoded = np.asarray(codec.decode(variables, codes))
  assert decoded.shape == (2, RATE) and decoded.dtype == np.float32
  assert np.all(np.isfinite(decoded))
  # A length that is not a whole number of frames is padded up: ceil(T / 480).
  assert codec.encode(variables, wav[:, :RATE - 100]).shape == (2, 50, 12)
  with pytest.raises(ValueError, match="levels"):
    codec.decode(variables, np.zeros((2, 50, 13), np.int32))


def test_every_prefix_of_levels_decodes_and_error_falls_with_levels(codec, variables):
  codes = codec.encode(variables, chord(1.0, batch=2))
  for q in range(1, 13):
    decoded = codec.decode(variables, codes[:1, :7, :q])
    assert decoded.shape == (1, 7 * HOP) and np.all(np.isfinite(decoded))

  # The same network with 16 codes per level, so that the batch's 1200
  # frames are many more than the codes: k-means cannot memorise them.
  small = SoundStreamCodec(tiny_config(codebook_size=16))
  rng = np.random.default_rng(1)
  wav = (chord(6.0, batch=4) + 0.1 * rng.normal(size=(4, 6 * RATE))).astype(np.float32)

  @jax.jit
  def fit_quantizer(params):
    def embed_fit_and_encode(module, wav):
      embeddings = module.embed(wav)
      module.quantizer(embeddings, train=True)  # k-means init, then an EMA step
      return embeddings, module.quantizer.encode(embeddings)

    return small.module.apply({"params": params}, wav, method=embed_fit_and_encode,
                              rngs={"params": jax.random.key(1),
                                    "quantizer": jax.random.key(2)},
                              mutable=["quantizer"])

  (embeddings, codes), fitted = fit_quantizer(variables["params"])
  assert bool(fitted["quantizer"]["quantizer"]["initialized"])
  assert codes.shape == (4, 300, 12) and int(codes.max()) < 16
  codebooks = np.asarray(fitted["quantizer"]["quantizer"]["codebook"])  # [12, 16, D]
  level_vectors = codebooks[np.arange(12), np.asarray(codes)]  # [4, 300, 12, D]
  quantized = np.cumsum(level_vectors, axis=2)  # prefix q = index + 1
  errors = np.mean(np.square(quantized - np.asarray(embeddings)[:, :, None]), axis=(0, 1, 3))
  print("quantization error by levels:", np.round(errors, 5))
  assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
  assert errors[-1] < 0.5 * errors[0]


@pytest.mark.parametrize("layer, first_affected", [
    (CausalConv1d(5, 7, dilation=3), 12),
    (CausalConv1d(5, 8, stride=4), 3),  # output n sees inputs up to 4n + 3
    (CausalConvTranspose1d(5, 8, stride=4), 48),  # sample t sees frames up to t // 4
    (CausalConvTranspose1d(5, 6, stride=4), 48),
])
def test_conv_layers_stream_like_offline_and_are_causal(layer, first_affected):
  x = np.random.default_rng(0).normal(size=(2, 24, 3)).astype(np.float32)
  variables = layer.init(jax.random.key(0), x)
  offline = np.asarray(layer.apply(variables, x))
  state, chunks = {}, []
  for start, stop in [(0, 4), (4, 8), (8, 20), (20, 24)]:
    y, state = layer.apply({**variables, **state}, x[:, start:stop], streaming=True,
                           mutable=["stream"])
    chunks.append(y)
  np.testing.assert_allclose(np.concatenate(chunks, axis=1), offline, atol=1e-6)
  changed = x.copy()
  changed[:, 12:] += 1.0  # change input frames 12 and later
  out = np.asarray(layer.apply(variables, changed))
  np.testing.assert_array_equal(out[:, :first_affected], offline[:, :first_affected])
  assert np.all(np.abs(out[:, first_affected] - offline[:, first_affected]) > 0)


def test_transposed_conv_is_a_trimmed_transposed_convolution():
  layer = CausalConvTranspose1d(4, 6, stride=4)
  x = np.random.default_rng(1).normal(size=(1, 5, 3)).astype(np.float32)
  variables = layer.init(jax.random.key(1), x)
  kernel = np.asarray(variables["params"]["kernel"])  # [6, 3, 4]
  expected = np.zeros((1, 5 * 4 + 2, 4))
  for m in range(5):
    for j in range(6):
      expected[:, m * 4 + j] += x[:, m] @ kernel[j]
  np.testing.assert_allclose(layer.apply(variables, x), expected[:, :20], atol=1e-5)


def test_streaming_encode_and_decode_equal_whole_signal(codec, variables):
  frames = 21
  wav = chord(frames * HOP / RATE, batch=2)
  wav[1] += 0.05 * np.random.default_rng(3).normal(size=frames * HOP)
  codes = np.asarray(codec.encode(variables, wav))
  decoded = np.asarray(codec.decode(variables, codes))
  for chunk in (1, 3, 7):
    state, streamed_codes = None, []
    for start in range(0, frames, chunk):
      c, state = codec.encode_stream(variables, wav[:, start * HOP:(start + chunk) * HOP],
                                     state)
      streamed_codes.append(np.asarray(c))
    np.testing.assert_array_equal(np.concatenate(streamed_codes, axis=1), codes)
    state, streamed_wav = None, []
    for start in range(0, frames, chunk):
      w, state = codec.decode_stream(variables, codes[:, start:start + chunk], state)
      streamed_wav.append(np.asarray(w))
    # Equal up to float32 rounding: chunks sum the convolutions in another order
    # (decoded samples reach |3|; one in 20160 differed by 1.04e-5 at 0.117).
    np.testing.assert_allclose(np.concatenate(streamed_wav, axis=1), decoded, rtol=1e-4,
                               atol=1e-5)


def test_changing_the_future_does_not_change_the_past(codec, variables):
  frames, cut = 21, 10
  wav = chord(frames * HOP / RATE, batch=2)
  changed = wav.copy()
  changed[:, cut * HOP:] = np.random.default_rng(4).normal(size=(2, (frames - cut) * HOP))
  codes, codes_changed = (np.asarray(codec.encode(variables, w)) for w in (wav, changed))
  np.testing.assert_array_equal(codes_changed[:, :cut], codes[:, :cut])
  assert not np.array_equal(codes_changed[:, cut:], codes[:, cut:])
  decoded = np.asarray(codec.decode(variables, codes))
  decoded_changed = np.asarray(codec.decode(variables, codes_changed))
  np.testing.assert_array_equal(decoded_changed[:, :cut * HOP], decoded[:, :cut * HOP])
  assert not np.allclose(decoded_changed[:, cut * HOP:], decoded[:, cut * HOP:])


def test_deterministic_from_the_seed(codec, variables):
  again = initialise(codec.init, jax.random.key(0), RATE)
  other = initialise(codec.init, jax.random.key(1), RATE)
  same = jax.tree.map(np.array_equal, variables, again)
  assert all(jax.tree.leaves(same))
  assert not np.array_equal(variables["params"]["encoder"]["conv_in"]["kernel"],
                            other["params"]["encoder"]["conv_in"]["kernel"])
  wav = chord(1.0, batch=2)
  np.testing.assert_array_equal(codec.encode(variables, wav), codec.encode(again, wav))


def test_discriminator_outputs_and_gin_configuration():
  gin.parse_config("""
      CodecDiscriminator.stft_channels = 4
      CodecDiscriminator.wave_channels = 4
      CodecDiscriminator.wave_max_channels = 32
  """)
  discriminator = CodecDiscriminator()
  wav = jnp.asarray(chord(0.2, batch=2))  # 4800 samples
  # Shapes only: tracing without compiling keeps the test fast.
  params = jax.eval_shape(discriminator.init, jax.random.key(0), wav)
  outputs = jax.eval_shape(discriminator.apply, params, wav)
  assert len(outputs) == 4  # STFT + 3 waveform scales
  stft = outputs[0]
  # 4800 // 256 + 1 = 19 STFT frames, time strides 1, 2, 1, 2, 1, 2 -> 3.
  assert stft.logits.shape == (2, 3) and len(stft.features) == 7
  assert stft.features[-1].shape[-1] == 4 * 8
  # Scales: 4800, 2400 and 1200 samples, downsampled by 4^4 = 256.
  for output, positions in zip(outputs[1:], (19, 10, 5)):
    assert output.logits.shape == (2, positions) and len(output.features) == 6
    assert output.features[1].shape[-1] == 16 and output.features[2].shape[-1] == 32
  gin.parse_config("CodecDiscriminator.wave_num_scales = 2")
  two_scales = jax.eval_shape(CodecDiscriminator().apply, params, wav)
  assert len(two_scales) == 3

  # Numbers: random parameters drawn on the host (no PRNG to compile); the
  # generator's adversarial + feature-matching loss has a finite, non-zero
  # gradient with respect to the generated waveform.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.3 * rng.normal(size=s.shape).astype(np.float32),
                        params)
  fake = wav + 0.1 * rng.normal(size=wav.shape).astype(np.float32)

  @jax.jit
  def generator_loss_and_grad(fake):
    real_outputs = discriminator.apply(params, wav)

    def loss(fake):
      fake_outputs = discriminator.apply(params, fake)
      return (codec_losses.generator_hinge_loss([o.logits for o in fake_outputs])
              + codec_losses.feature_matching_loss([o.features for o in real_outputs],
                                                   [o.features for o in fake_outputs]))

    return jax.value_and_grad(loss)(fake)

  loss, grad = generator_loss_and_grad(fake)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_hinge_and_feature_matching_losses_on_hand_made_values():
  real = [jnp.array([[2.0, 0.5]]), jnp.array([[0.0, 1.0]])]
  fake = [jnp.array([[-2.0, 0.5]]), jnp.array([[-1.0, 3.0]])]
  # D0: mean(0, 0.5) + mean(0, 1.5) = 1.0; D1: mean(1, 0) + mean(0, 4) = 2.5.
  assert float(codec_losses.discriminator_hinge_loss(real, fake)) == pytest.approx(1.75)
  # G: D0 mean(3, 0.5) = 1.75; D1 mean(2, 0) = 1.0.
  assert float(codec_losses.generator_hinge_loss(fake)) == pytest.approx(1.375)
  real_features = [[jnp.ones((1, 4)), jnp.zeros((1, 2, 2))], [jnp.full((1, 3), 2.0)]]
  fake_features = [[jnp.zeros((1, 4)), jnp.full((1, 2, 2), 0.5)], [jnp.full((1, 3), 2.0)]]
  # Per map: 1, 0.5, 0; averaged over the 3 maps.
  assert float(codec_losses.feature_matching_loss(real_features, fake_features)) == (
      pytest.approx(0.5))
  with pytest.raises(ValueError):
    codec_losses.discriminator_hinge_loss(real, fake[:1])


def test_spectral_loss_and_metrics():
  ref = jnp.asarray(chord(0.25, batch=2))
  noise = jnp.asarray(np.random.default_rng(5).normal(size=ref.shape).astype(np.float32))
  spectral_loss = jax.jit(codec_losses.multi_scale_spectral_loss)
  mel_distance = jax.jit(codec_losses.mel_distance)
  si_snr = jax.jit(codec_losses.si_snr)
  assert float(spectral_loss(ref, ref)) == 0.0
  losses = [float(spectral_loss(ref, ref + level * noise)) for level in (0.001, 0.01, 0.1)]
  assert 0 < losses[0] < losses[1] < losses[2]
  distances = [np.asarray(mel_distance(ref, ref + level * noise))
               for level in (0.0, 0.01, 0.1)]
  assert distances[0].shape == (2,) and np.all(distances[0] == 0)
  assert np.all(distances[1] > 0) and np.all(distances[2] > distances[1])
  # SI-SNR ignores scale; white noise at 1/10 of the signal's RMS gives 20 dB.
  assert np.all(np.asarray(si_snr(ref, 3.0 * ref)) > 60)
  rms = jnp.sqrt(jnp.mean(jnp.square(ref - ref.mean(-1, keepdims=True)), -1, keepdims=True))
  noisy = ref + 0.1 * rms * noise / jnp.std(noise, -1, keepdims=True)
  np.testing.assert_allclose(si_snr(ref, noisy), 20.0, atol=0.3)
  grads = jax.jit(jax.grad(lambda est: codec_losses.multi_scale_spectral_loss(ref, est)))(ref)
  assert np.all(np.isfinite(grads))


def test_tiny_codec_overfits_a_chord(codec, variables):
  """The trainer's codec step on reconstruction alone (`adversarial_warmup_steps=None`):
  the mel distance halves in 40 steps and the discriminator is never run or moved."""
  weights = codec_losses.CodecLossWeights()
  assert (weights.adversarial, weights.feature_matching, weights.reconstruction,
          weights.commitment) == (1.0, 100.0, 1.0, 1.0)
  wav = jnp.asarray(chord(0.5))
  # The discriminator of gin/tokenizers/soundstream_tiny.gin: only its parameters
  # take part (kept as they are); initialising the default one took 7.6 s.
  model = CodecModel(codec.config, adversarial_warmup_steps=None,
                     discriminator=CodecDiscriminator(stft_channels=8, wave_channels=4,
                                                      wave_max_channels=64))
  discriminator = initialise(model.discriminator.init, jax.random.key(1), wav)["params"]
  params = {"generator": variables["params"], "discriminator": discriminator}
  adam = Optimizer(optax.adam(3e-3), optax.constant_schedule(3e-3))
  optimizer = gan_optimizer(adam, adam)
  state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.tx.init(params),
                     rng=jax.random.PRNGKey(7), model_state={"quantizer": variables["quantizer"]})
  train_step = jax.jit(model.make_train_step(optimizer))

  @jax.jit
  def distance(params, quantizer):
    wav_hat, _ = codec.module.apply({"params": params, "quantizer": quantizer}, wav,
                                    train=False)
    return codec_losses.mel_distance(wav, wav_hat)[0]

  initial = float(distance(variables["params"], variables["quantizer"]))
  start = time.time()
  losses = []
  for _ in range(40):
    state, metrics = train_step(state, {"audio": wav})
    losses.append(float(metrics["loss"]))
  assert float(metrics["adversarial_on"]) == 0.0
  assert not {"discriminator_loss", "adversarial_loss", "feature_matching_loss"} & set(metrics)
  for before, after in zip(jax.tree.leaves(discriminator),
                           jax.tree.leaves(state.params["discriminator"])):
    np.testing.assert_array_equal(before, after)
  final = float(distance(state.params["generator"], state.model_state["quantizer"]))
  print(f"overfit: loss {losses[0]:.1f} -> {losses[-1]:.1f}, mel distance "
        f"{initial:.3f} -> {final:.3f} in {time.time() - start:.1f}s")
  assert final < 0.5 * initial
