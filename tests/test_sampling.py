"""The KV-cached sampler: legal ids, seeds, cache == full forward, top-k/p, guidance."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from musiclm_jax import stages
from musiclm_jax.models import DecoderOnlyModel
from musiclm_jax.sampling import decoding
from musiclm_jax.sampling.decoding import SamplingConfig

# A coarse window of 3 semantic frames: prefix 12 MuLan + 3 semantic ids,
# targets 6 acoustic frames x 4 levels, the level cycling 0, 1, 2, 3.
STAGE = stages.Stage("coarse", window_seconds=0.12)
PREFIX_LEN, NUM_TARGETS = STAGE.lengths()
LO, HI = STAGE.target_ranges(NUM_TARGETS)


@pytest.fixture(scope="module")
def model_and_params():
  model = DecoderOnlyModel(tiny_config())
  return model, nn.unbox(jax.jit(lambda rng: model.init_params(rng, 8))(jax.random.key(1)))


def prefixes(seed: int, batch: int) -> np.ndarray:
  """int32 `[batch, PREFIX_LEN]` coarse prefixes of random codes."""
  rng = np.random.default_rng(seed)
  layout = STAGE.layout
  clips = [stages.ClipTokens(
      mulan=rng.integers(0, layout.mulan_codebook_size, layout.mulan_levels),
      semantic=rng.integers(0, layout.semantic_codebook_size, 3),
      acoustic=rng.integers(0, layout.acoustic_codebook_size, (6, layout.acoustic_levels)))
           for _ in range(batch)]
  return np.stack([STAGE.sequences(clip)[0] for clip in clips])


def run(model_and_params, prefix, seeds, config=SamplingConfig(), lo=LO, hi=HI, **kwargs):
  model, params = model_and_params
  return np.asarray(decoding.sample(model, params, prefix, lo, hi, np.asarray(seeds),
                                    config, **kwargs))


def test_sampled_ids_are_in_their_positions_range(model_and_params):
  assert len(set(LO[:4])) == 4 and np.array_equal(LO[:4], LO[4:8])  # levels cycle
  out = run(model_and_params, prefixes(0, 3), [0, 1, 2])
  assert out.shape == (3, NUM_TARGETS) and out.dtype == np.int32
  assert np.all(out >= LO) and np.all(out < HI)
  # Random weights spread samples over the range, not only its first ids.
  assert len(np.unique(out)) > NUM_TARGETS


def test_seeds_decide_the_output(model_and_params):
  prefix = prefixes(0, 3)
  first = run(model_and_params, prefix, [0, 1, 2])
  np.testing.assert_array_equal(run(model_and_params, prefix, [0, 1, 2]), first)
  other = run(model_and_params, prefix, [5, 6, 7])
  assert np.mean(other != first) > 0.5


def test_a_row_does_not_depend_on_the_other_rows(model_and_params):
  prefix = prefixes(0, 3)
  first = run(model_and_params, prefix, [0, 1, 2])
  changed = prefix.copy()
  changed[[0, 2]] = prefixes(1, 2)
  second = run(model_and_params, changed, [0, 1, 2])
  np.testing.assert_array_equal(second[1], first[1])
  # The changed rows (same seeds, other prefixes) do change: the prefix is read.
  assert np.mean(second[[0, 2]] != first[[0, 2]]) > 0.5


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_cached_sampling_equals_full_forward_sampling(model_and_params, temperature):
  model, params = model_and_params
  config = SamplingConfig(temperature=temperature)
  prefix, seeds = prefixes(2, 2), np.array([3, 4])
  cached = run(model_and_params, prefix, seeds, config)
  full = np.asarray(decoding.sample_full_forward(model, params, prefix, LO, HI, seeds, config))
  np.testing.assert_array_equal(cached, full)


def test_a_target_prompt_is_kept_and_continued_like_the_full_forward(model_and_params):
  model, params = model_and_params
  prefix, seeds = prefixes(5, 2), np.array([1, 2])
  free = run(model_and_params, prefix, seeds)
  prompt = free[:, :10]
  continued = run(model_and_params, prefix, seeds, target_prompt=prompt)
  np.testing.assert_array_equal(continued[:, :10], prompt)
  # The same keys per position: continuing a row's own start reproduces it.
  np.testing.assert_array_equal(continued, free)
  other = (prompt - LO[:10] + 1) % (HI[:10] - LO[:10]) + LO[:10]
  steered = run(model_and_params, prefix, seeds, target_prompt=other)
  np.testing.assert_array_equal(steered[:, :10], other)
  assert np.all((steered >= LO) & (steered < HI))
  full = np.asarray(decoding.sample_full_forward(model, params, prefix, LO, HI, seeds,
                                                 target_prompt=other))
  np.testing.assert_array_equal(steered, full)
  with pytest.raises(ValueError, match="legal ranges"):
    run(model_and_params, prefix, seeds, target_prompt=np.zeros((2, 3), np.int32))


def test_top_k_1_and_a_tiny_top_p_are_greedy(model_and_params):
  prefix, seeds = prefixes(3, 2), [0, 1]
  greedy = run(model_and_params, prefix, seeds, SamplingConfig(temperature=0.0))
  sampled = run(model_and_params, prefix, seeds)
  assert np.mean(sampled != greedy) > 0.5  # so that the checks below could fail
  np.testing.assert_array_equal(run(model_and_params, prefix, seeds, SamplingConfig(top_k=1)),
                                greedy)
  np.testing.assert_array_equal(
      run(model_and_params, prefix, seeds, SamplingConfig(top_p=1e-6)), greedy)


def test_guidance_scale_1_equals_no_guidance(model_and_params):
  prefix, seeds = prefixes(4, 2), [0, 1]
  unguided = run(model_and_params, prefix, seeds)
  unconditional = STAGE.unconditional(prefix)
  np.testing.assert_array_equal(
      run(model_and_params, prefix, seeds, unconditional_prefix=unconditional), unguided)
  # Just above 1 the doubled (conditional + unconditional) batch runs.
  barely = SamplingConfig(guidance_scale=1.0 + 1e-6)
  np.testing.assert_array_equal(
      run(model_and_params, prefix, seeds, barely, unconditional_prefix=unconditional),
      unguided)


def test_guided_cached_sampling_equals_full_forward(model_and_params):
  model, params = model_and_params
  config = SamplingConfig(guidance_scale=5.0)
  prefix, seeds = prefixes(5, 2), np.array([1, 2])
  unconditional = STAGE.unconditional(prefix)
  cached = run(model_and_params, prefix, seeds, config, unconditional_prefix=unconditional)
  full = np.asarray(decoding.sample_full_forward(model, params, prefix, LO, HI, seeds, config,
                                                 unconditional))
  np.testing.assert_array_equal(cached, full)
  assert np.all(cached >= LO) and np.all(cached < HI)
  assert np.mean(cached != run(model_and_params, prefix, seeds)) > 0.5


def test_guidance_samples_the_guided_distribution(model_and_params):
  """First target of 256 seeds: the guided mode's frequency matches its probability."""
  model, params = model_and_params
  scale, num = 5.0, 256
  prefix = np.repeat(prefixes(0, 1), num, axis=0)
  unconditional = STAGE.unconditional(prefix)
  lo, hi = LO[:1], HI[:1]
  tokens = jnp.concatenate([jnp.zeros((2, 1), jnp.int32),
                            jnp.asarray(np.concatenate([prefix[:1], unconditional[:1]]))], 1)
  logits = jax.jit(model.logits)(params, {"decoder_input_tokens": tokens,
                                 "decoder_causal_attention": jnp.ones(tokens.shape, bool)})
  cond, uncond = np.asarray(logits[:, -1, lo[0]:hi[0]], np.float64)
  guided_probs = np.exp(uncond + scale * (cond - uncond))
  guided_probs /= guided_probs.sum()
  cond_probs = np.exp(cond - cond.max()) / np.exp(cond - cond.max()).sum()
  mode = lo[0] + np.argmax(guided_probs)
  p_guided, p_cond = guided_probs.max(), cond_probs[mode - lo[0]]
  assert p_guided > 0.3 and p_cond < 0.05  # the statistic separates the two

  seeds = np.arange(num)
  guided = run(model_and_params, prefix, seeds, SamplingConfig(guidance_scale=scale), lo, hi,
               unconditional_prefix=unconditional)[:, 0]
  plain = run(model_and_params, prefix, seeds, lo=lo, hi=hi)[:, 0]
  sigma = np.sqrt(p_guided * (1 - p_guided) / num)
  assert abs(np.mean(guided == mode) - p_guided) < 4 * sigma
  assert np.mean(plain == mode) < p_cond + 4 * np.sqrt(p_cond * (1 - p_cond) / num) + 0.01


def test_the_loop_compiles_once(model_and_params):
  config = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9)  # used by no other test
  compiles = []

  def listener(name, _duration, **_):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    first = run(model_and_params, prefixes(6, 2), [0, 1], config)
    assert compiles  # the listener sees the first call's compilation
    compiles.clear()
    second = run(model_and_params, prefixes(7, 2), [2, 3], config)
    assert not compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert np.all(second >= LO) and np.all(second < HI) and np.any(second != first)


def test_bad_inputs_are_rejected(model_and_params):
  prefix = prefixes(0, 2)
  with pytest.raises(ValueError, match="unconditional_prefix"):
    run(model_and_params, prefix, [0, 1], SamplingConfig(guidance_scale=3.0))
  with pytest.raises(ValueError, match="seeds"):
    run(model_and_params, prefix, [0, 1, 2])
  with pytest.raises(ValueError, match="lo < hi"):
    run(model_and_params, prefix, [0, 1], lo=HI, hi=LO)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)
