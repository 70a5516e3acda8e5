"""KV-cached sampling of a stage decoder, the whole loop in one jitted function.

A stage's sequence is `[0 (BOS), prefix (P ids), targets (T ids)]`. The
sampler prefills BOS + prefix as the bidirectional block in one `decode`
call, then runs T single-token steps in `jax.lax.fori_loop`: each step picks
target t from the logits of the previous position and appends it to the KV
cache (`1 + P + T` positions). Per step the logits are

  1. guided, `uncond + scale * (cond - uncond)`, when classifier-free
     guidance is on (conditional and unconditional prefixes run as one
     doubled batch `[2B, ...]`),
  2. masked to `-inf` outside the position's legal id range `[lo, hi)`,
  3. divided by the temperature, cut to the top k and to the top-p nucleus,

and a row's token is drawn with its own key
`fold_in(fold_in(key(0), seed), t)`, so that a row's output depends only on
its prefix and seed. Temperature 0 is greedy decoding.

Sharded parameters (`partitioning.Partitioner`): call `sample` under
`partitioner.activate()`; the cache then follows its logical axes
(`cache_batch` split like the batch) and the loop has no host callbacks.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.layers.transformer import DecoderConfig
from musiclm_jax.models import DecoderOnlyModel


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen from a stage's logits.

  Attributes:
    temperature: softmax temperature; 0 picks the most likely legal id.
    top_k: keep only the k most likely ids (0: off).
    top_p: keep the smallest set of most likely ids whose probability
      reaches p (nucleus sampling; 1: off).
    guidance_scale: classifier-free guidance on the MuLan conditioning,
      `uncond + scale * (cond - uncond)` logits (1: off).
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  guidance_scale: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature {self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k {self.top_k} must be >= 0 (0 turns it off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p {self.top_p} must be in (0, 1]")

  @property
  def guided(self) -> bool:
    return self.guidance_scale != 1.0


def sample(model: DecoderOnlyModel, params: Any, prefix: jax.Array,
           target_lo: jax.Array, target_hi: jax.Array, seeds: jax.Array,
           config: SamplingConfig = SamplingConfig(),
           unconditional_prefix: jax.Array | None = None,
           target_prompt: jax.Array | None = None) -> jax.Array:
  """Samples every row's targets after its prefix, KV-cached.

  Args:
    model: the stage decoder.
    params: its parameters (boxed or not; sharded or not).
    prefix: int32 `[batch, P]` context ids.
    target_lo, target_hi: int32 `[T]`, legal ids `[lo, hi)` per target position
      (`stages.Stage.target_ranges(T)`).
    seeds: int `[batch]`, one per row.
    config: temperature, top-k, top-p and guidance.
    unconditional_prefix: int32 `[batch, P]`, `prefix` with its MuLan tokens
      replaced by pad (`stages.Stage.unconditional`); needed when
      `config.guidance_scale != 1`, ignored otherwise.
    target_prompt: int32 `[batch, K]`, K < T: the first K targets are given,
      not sampled (continuing a window whose start is known, as long-form
      generation and audio continuation do); they are fed causally, as in
      training, and returned unchanged.
  Returns:
    int32 `[batch, T]` target ids (the prompt, then the sampled ones).
  """
  *args, target_prompt = _checked_inputs(model.config, prefix, target_lo, target_hi, seeds,
                                         config, unconditional_prefix, target_prompt)
  # The prompt travels padded to T with its length as a value, so that windows
  # with prompts of any length share one compiled loop.
  given = target_prompt.shape[1]
  padded = jnp.pad(target_prompt, ((0, 0), (0, len(target_lo) - given)))
  return _jitted_sampler(model.config, config)(nn.unbox(params), *args, padded,
                                               jnp.int32(given))


def sample_full_forward(model: DecoderOnlyModel, params: Any, prefix: jax.Array,
                        target_lo: jax.Array, target_hi: jax.Array, seeds: jax.Array,
                        config: SamplingConfig = SamplingConfig(),
                        unconditional_prefix: jax.Array | None = None,
                        target_prompt: jax.Array | None = None) -> jax.Array:
  """`sample` without a cache: the reference the tests compare it with.

  At step t it recomputes `model.logits` on the whole padded sequence
  `[BOS, prefix, targets so far, 0...]` (length P + T) and reads position
  P + t; token choice and keys are `sample`'s. A Python loop: tiny sizes only.
  Same arguments and result as `sample`.
  """
  prefix, target_lo, target_hi, seeds, unconditional_prefix, target_prompt = _checked_inputs(
      model.config, prefix, target_lo, target_hi, seeds, config, unconditional_prefix,
      target_prompt)
  params = nn.unbox(params)
  batch, prefix_len = prefix.shape
  num_targets = target_lo.shape[0]
  context = _context(prefix, unconditional_prefix)
  row_keys = _row_keys(seeds)
  length = prefix_len + num_targets
  in_prefix = jnp.broadcast_to(jnp.arange(length) <= prefix_len, (context.shape[0], length))
  logits_fn = jax.jit(model.logits)
  given = target_prompt.shape[1]
  targets = jnp.zeros((batch, num_targets), jnp.int32).at[:, :given].set(target_prompt)
  for t in range(given, num_targets):
    fed = jnp.concatenate([targets] * (context.shape[0] // batch), axis=0)
    tokens = jnp.concatenate([jnp.zeros((context.shape[0], 1), jnp.int32), context,
                              fed[:, :num_targets - 1]], axis=1)
    logits = logits_fn(params, {"decoder_input_tokens": tokens,
                                "decoder_causal_attention": in_prefix})
    token = choose_tokens(logits[:, prefix_len + t], target_lo[t], target_hi[t],
                          _position_keys(row_keys, t), config)
    targets = targets.at[:, t].set(token)
  return targets


def choose_tokens(logits: jax.Array, lo: jax.Array, hi: jax.Array, keys: jax.Array,
                  config: SamplingConfig) -> jax.Array:
  """One token per row from next-token logits.

  Args:
    logits: float32 `[rows, vocab]`; `rows = 2 * batch` when guided
      (conditional rows first, then unconditional).
    lo, hi: int scalars, the legal id range `[lo, hi)`.
    keys: `[batch]` PRNG keys.
    config: how to choose.
  Returns:
    int32 `[batch]` ids, all in `[lo, hi)`.
  """
  if config.guided:
    cond, uncond = jnp.split(logits, 2, axis=0)
    logits = uncond + config.guidance_scale * (cond - uncond)
  ids = jnp.arange(logits.shape[-1])
  logits = jnp.where((ids >= lo) & (ids < hi), logits, -jnp.inf)
  if config.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / config.temperature
  if config.top_k:
    kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.top_p < 1:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    smallest_kept = jnp.min(jnp.where(mass_before < config.top_p, descending, jnp.inf),
                            axis=-1, keepdims=True)
    logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def _jitted_sampler(model_config: DecoderConfig, config: SamplingConfig):
  """One jitted generation per (model config, sampling config); jit caches shapes.

  Keyed on the config, not the model object, so that a fresh
  `DecoderOnlyModel` of the same config reuses the compiled loop.
  """
  return jax.jit(functools.partial(_generate, DecoderOnlyModel(model_config), config))


def _generate(model: DecoderOnlyModel, config: SamplingConfig, params: Any,
              prefix: jax.Array, target_lo: jax.Array, target_hi: jax.Array,
              seeds: jax.Array, unconditional_prefix: jax.Array | None,
              target_prompt: jax.Array, given: jax.Array) -> jax.Array:
  """Prefill + loop over the targets after the prompt; shapes as in `sample`, but
  `target_prompt` padded to `[batch, T]` and its length `given` a traced scalar.

  The prefill feeds the whole padded prompt (positions past `given` hold
  padding), reads the logits after the last given token and rewinds the
  cache's write index to just after it: the causal mask hides the padding's
  keys from every later query, and each decode step overwrites one of them.
  """
  batch, prefix_len = prefix.shape
  num_targets = target_lo.shape[0]
  context = _context(prefix, unconditional_prefix)  # [rows, P]
  rows = context.shape[0]
  cache = _zero_cache(model, rows, 1 + prefix_len + num_targets)
  bos = jnp.zeros((rows, 1), jnp.int32)
  prompt = jnp.tile(target_prompt[:, :num_targets - 1], (rows // batch, 1))
  fed = prefix_len + num_targets  # bos, context, prompt: all positions but the last
  in_prefix = jnp.arange(fed) < 1 + prefix_len
  logits, cache = model.decode(params, cache, jnp.concatenate([bos, context, prompt], axis=1),
                               jnp.broadcast_to(in_prefix, (rows, fed)))
  cache["index"] = jnp.asarray(1 + prefix_len + given, cache["index"].dtype)
  first_logits = jax.lax.dynamic_index_in_dim(logits, prefix_len + given, axis=1,
                                              keepdims=False)
  row_keys = _row_keys(seeds)

  def step(t, carry):
    cache, next_logits, targets = carry  # next_logits: [rows, vocab], predicts target t
    token = choose_tokens(next_logits, target_lo[t], target_hi[t],
                          _position_keys(row_keys, t), config)
    targets = jax.lax.dynamic_update_slice(targets, token[:, None], (0, t))
    fed = jnp.tile(token, rows // batch)[:, None]
    logits, cache = model.decode(params, cache, fed, jnp.zeros((rows, 1), bool))
    return cache, logits[:, 0], targets

  # The last step also appends target T-1 (its logits are unused): one
  # uniform step body, and the cache holds exactly 1 + P + T positions.
  targets = jnp.where(jnp.arange(num_targets) < given, target_prompt, 0)
  carry = (cache, first_logits, targets)
  return jax.lax.fori_loop(given, num_targets, step, carry)[2]


def _zero_cache(model: DecoderOnlyModel, rows: int, length: int) -> Any:
  """Unboxed zero KV cache, constrained to its logical axes (active under a mesh)."""
  def constrained(leaf):
    if isinstance(leaf, nn.Partitioned):
      return nn.with_logical_constraint(leaf.value, leaf.names)
    return leaf  # the write index

  return jax.tree.map(constrained, model.init_cache(rows, length),
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _context(prefix: jax.Array, unconditional_prefix: jax.Array | None) -> jax.Array:
  """`[B, P]`, or `[2B, P]` (conditional rows, then unconditional) when guided."""
  if unconditional_prefix is None:
    return prefix
  return jnp.concatenate([prefix, unconditional_prefix], axis=0)


def _row_keys(seeds: jax.Array) -> jax.Array:
  """`[batch]` keys, `fold_in(key(0), seed)`."""
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), seeds)


def _position_keys(row_keys: jax.Array, position: jax.Array) -> jax.Array:
  """`[batch]` keys of one target position."""
  return jax.vmap(jax.random.fold_in, (0, None))(row_keys, position)


def _checked_inputs(model_config: DecoderConfig, prefix, target_lo, target_hi, seeds,
                    config: SamplingConfig, unconditional_prefix, target_prompt):
  """Validates shapes and ranges; returns jnp arrays (uncond: None unless guided;
  the prompt `[batch, 0]` when there is none)."""
  prefix = jnp.asarray(prefix, jnp.int32)
  target_lo, target_hi = jnp.asarray(target_lo, jnp.int32), jnp.asarray(target_hi, jnp.int32)
  seeds = jnp.asarray(seeds).astype(jnp.uint32)
  if prefix.ndim != 2:
    raise ValueError(f"prefix must be [batch, prefix_length]; got shape {prefix.shape}")
  if target_lo.ndim != 1 or target_lo.shape != target_hi.shape or target_lo.shape[0] < 1:
    raise ValueError(f"target_lo {target_lo.shape} and target_hi {target_hi.shape} must "
                     "both be [num_targets] with num_targets >= 1")
  lo, hi = np.asarray(target_lo), np.asarray(target_hi)
  if np.any(lo < 0) or np.any(hi <= lo) or np.any(hi > model_config.vocab_size):
    raise ValueError(f"target ranges must satisfy 0 <= lo < hi <= vocab size "
                     f"{model_config.vocab_size}")
  if seeds.shape != prefix.shape[:1]:
    raise ValueError(f"seeds {seeds.shape} must be [batch] = {prefix.shape[:1]}")
  if target_prompt is None:
    target_prompt = jnp.zeros((prefix.shape[0], 0), jnp.int32)
  target_prompt = jnp.asarray(target_prompt, jnp.int32)
  given = target_prompt.shape[1] if target_prompt.ndim == 2 else -1
  if target_prompt.shape[:1] != prefix.shape[:1] or not 0 <= given < len(lo):
    raise ValueError(f"target_prompt {target_prompt.shape} must be [batch, K] with "
                     f"batch {prefix.shape[0]} and K < {len(lo)} targets")
  prompt = np.asarray(target_prompt)
  if np.any(prompt < lo[:given]) or np.any(prompt >= hi[:given]):
    raise ValueError("target_prompt has ids outside their positions' legal ranges")
  if not config.guided:
    return prefix, target_lo, target_hi, seeds, None, target_prompt
  if unconditional_prefix is None:
    raise ValueError(f"guidance_scale {config.guidance_scale} needs an "
                     "unconditional_prefix (stages.Stage.unconditional(prefix))")
  unconditional_prefix = jnp.asarray(unconditional_prefix, jnp.int32)
  if unconditional_prefix.shape != prefix.shape:
    raise ValueError(f"unconditional_prefix {unconditional_prefix.shape} must have the "
                     f"prefix's shape {prefix.shape}")
  return prefix, target_lo, target_hi, seeds, unconditional_prefix, target_prompt
