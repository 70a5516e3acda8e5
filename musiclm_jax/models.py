"""Decoder-only prefix LM: loss, metrics and KV-cached decoding of a `Decoder`.

Every stage trains on batches of four `[batch, length]` features:

  decoder_input_tokens      int32, the targets shifted right (0 first)
  decoder_target_tokens     int32, ids to predict (0 = padding)
  decoder_loss_weights      float32, 1 where a target counts in the loss
  decoder_causal_attention  bool, True on the bidirectional prefix block

`prefix_lm_example` builds them from a prefix and its targets.
"""
from __future__ import annotations

from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from musiclm_jax.layers.transformer import Decoder, DecoderConfig
from musiclm_jax.training import steps
from musiclm_jax.training.metrics import TrainCost
from musiclm_jax.training.optimizers import Optimizer

Batch = Mapping[str, Any]


def prefix_lm_example(prefix: np.ndarray, targets: np.ndarray,
                      length: int) -> dict[str, np.ndarray]:
  """One padded training example: `prefix` is context, `targets` are predicted.

  The bidirectional block covers the input positions that hold the prefix
  (the begin-of-sequence 0 and the prefix tokens), so position
  `len(prefix)` sees the whole prefix when it predicts the first target.

  Args:
    prefix: int `[prefix_len]` token ids.
    targets: int `[target_len]` token ids.
    length: padded length, at least `prefix_len + target_len`.
  Returns:
    the four features, each `[length]`.
  """
  sequence = np.concatenate([prefix, targets]).astype(np.int32)
  if len(sequence) > length:
    raise ValueError(f"prefix ({len(prefix)}) + targets ({len(targets)}) exceed the "
                     f"example length {length}")
  pad = length - len(sequence)
  target_tokens = np.pad(sequence, (0, pad))
  input_tokens = np.concatenate([[0], target_tokens[:-1]]).astype(np.int32)
  loss_weights = np.zeros(length, np.float32)
  loss_weights[len(prefix):len(sequence)] = 1.0
  causal_attention = np.zeros(length, bool)
  causal_attention[:len(prefix) + 1] = True
  return {"decoder_input_tokens": input_tokens, "decoder_target_tokens": target_tokens,
          "decoder_loss_weights": loss_weights, "decoder_causal_attention": causal_attention}


@gin.configurable
class DecoderOnlyModel:
  """A `Decoder` with its training loss, eval metrics and decoding entry points.

  Args:
    config: the decoder's size and numerics.
    z_loss: weight of `logsumexp(logits)^2`, which keeps logits from drifting
      (T5X's auxiliary loss).
  """

  def __init__(self, config: DecoderConfig = gin.REQUIRED, z_loss: float = 1e-4):
    self.config = config
    self.z_loss = z_loss
    self.module = Decoder(config)

  def init_params(self, rng: jax.Array, length: int) -> Any:
    """Parameters boxed with their logical axes (`nn.Partitioned`)."""
    tokens = jnp.zeros((1, length), jnp.int32)
    return self.module.init({"params": rng}, tokens, tokens > 0)["params"]

  # -- the trainer's model interface (see `training/trainer.py`) ---------------
  def init_variables(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
    """`{"params": ...}` for examples as long as `batch`'s `[batch, length]`."""
    return {"params": self.init_params(rng, batch["decoder_input_tokens"].shape[1])}

  def make_train_step(self, optimizer: Optimizer, num_microbatches: int = 1):
    return steps.make_train_step(self, optimizer, num_microbatches)

  def make_eval_step(self):
    return steps.make_eval_step(self)

  def eval_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
    weight = max(sums["weight"], 1.0)
    return {"loss": sums["loss"] / weight, "accuracy": sums["correct"] / weight}

  def train_cost(self, batch_size: int, batch: Batch) -> TrainCost:
    length = batch["decoder_input_tokens"].shape[1]
    return TrainCost("tokens", batch_size * length, self.train_flops(batch_size, length))

  def logits(self, params: Any, batch: Batch, dropout_rng: jax.Array | None = None
             ) -> jax.Array:
    """float32 `[batch, length, vocab]`; dropout on when `dropout_rng` is given."""
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return self.module.apply({"params": params}, batch["decoder_input_tokens"],
                             batch["decoder_causal_attention"],
                             deterministic=dropout_rng is None, rngs=rngs)

  def loss_sums(self, params: Any, batch: Batch, dropout_rng: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed (not averaged) weighted loss and metric sums over a batch.

    Summing lets micro-batches and data shards add up exactly; the caller
    divides by the total weight.

    Returns:
      loss_sum: scalar, sum of weights * (cross-entropy + z-loss).
      sums: `loss` (cross-entropy sum), `z_loss`, `correct`, `weight`.
    """
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    terms = self.token_losses(params, batch, dropout_rng)
    sums = {"loss": jnp.sum(terms["cross_entropy"] * weights),
            "z_loss": jnp.sum(terms["z_loss"] * weights),
            "correct": jnp.sum(terms["correct"] * weights),
            "weight": jnp.sum(weights)}
    return sums["loss"] + sums["z_loss"], sums

  def token_losses(self, params: Any, batch: Batch, dropout_rng: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
    """Per position, unweighted: `cross_entropy`, `z_loss` and `correct` (1.0 where
    the argmax is the target), float32 `[batch, length]` each."""
    logits = self.logits(params, batch, dropout_rng)
    targets = batch["decoder_target_tokens"]
    return {"cross_entropy": optax.softmax_cross_entropy_with_integer_labels(logits, targets),
            "z_loss": self.z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1)),
            "correct": (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)}

  # -- decoding ----------------------------------------------------------------
  def init_cache(self, batch_size: int, cache_length: int) -> Any:
    """Zeroed KV cache, boxed with logical axes, for `cache_length` positions."""
    tokens = jnp.zeros((batch_size, cache_length), jnp.int32)
    abstract = jax.eval_shape(
        lambda: self.module.init({"params": jax.random.key(0)}, tokens, tokens > 0,
                                 decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)

  def decode(self, params: Any, cache: Any, tokens: jax.Array, in_prefix: jax.Array
             ) -> tuple[jax.Array, Any]:
    """Appends `tokens [batch, n]` to the cache; returns their logits and the cache."""
    logits, variables = self.module.apply(
        {"params": params, "cache": cache}, tokens, in_prefix, decode=True,
        mutable=["cache"])
    return logits, variables["cache"]

  def train_flops(self, batch_size: int, length: int) -> float:
    return self.config.train_flops(batch_size, length)
