"""Decoder-only Transformer (T5.1.1 style) with logical axis names.

Pre-norm (RMSNorm) blocks of relative-bias self-attention and a gated-GELU
MLP; layers are stacked with `nn.scan` (one compiled layer, parameters with
a leading `layers` axis) under a gin-selectable remat policy. Parameters are
float32, compute runs in `config.dtype` (bfloat16 by default), logits are
returned in float32.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from musiclm_jax import vocab
from musiclm_jax.layers.attention import SelfAttention, prefix_lm_mask
from musiclm_jax.layers.projection import Projection
from musiclm_jax.layers.relative_position import RelativePositionBias

HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")

# gin names of remat policies; see `jax.checkpoint_policies`.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(name: str) -> None:
  """Raises ValueError unless `name` is one of `REMAT_POLICIES`."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy {name!r} is not one of {sorted(REMAT_POLICIES)}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Size and numerics of a decoder; `gin/sizes/*.gin` bind these."""
  num_layers: int = 2
  num_heads: int = 4
  head_dim: int = 16
  d_model: int = 64
  d_ff: int = 128
  vocab_size: int = vocab.LAYOUT.vocab_size
  dropout_rate: float = 0.0
  dtype: str = "bfloat16"
  remat_policy: str = "none"
  relpos_num_buckets: int = 32
  relpos_max_distance: int = 128
  attention_implementation: str | None = None

  def __post_init__(self):
    check_remat_policy(self.remat_policy)
    if self.attention_implementation not in (None, "xla", "cudnn"):
      raise ValueError(f"attention_implementation {self.attention_implementation!r} "
                       "must be None, 'xla' or 'cudnn'")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def matmul_params(self) -> int:
    """Parameters that take part in matmuls (layers + unembedding)."""
    per_layer = (self.d_model * 4 * self.num_heads * self.head_dim
                 + 3 * self.d_model * self.d_ff)
    return self.num_layers * per_layer + self.d_model * self.vocab_size

  def train_flops(self, batch_size: int, length: int) -> float:
    """Model FLOPs of one training step (forward + backward), MaxText's convention.

    6 * matmul params * tokens, plus causal attention
    4 * B * S^2 * H * D * 3 / 2 per layer (QK^T and AV, x3 for fwd+bwd,
    halved for the causal triangle). Remat recomputation is not counted.
    """
    tokens = batch_size * length
    attention = (4 * batch_size * length**2 * self.num_heads * self.head_dim * 3 / 2
                 * self.num_layers)
    return 6 * self.matmul_params() * tokens + attention


def rms_norm(dtype: jnp.dtype, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones,
                                                            ("embed",)),
                    name=name)


class GatedGeluMlp(nn.Module):
  """`wo(gelu(wi_0 x) * wi_1 x)` with dropout on the hidden units."""
  d_ff: int
  dropout_rate: float
  dtype: jnp.dtype
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def dense(features, axes, name):
      return Projection((features,), axes, dtype=self.dtype, name=name)

    gate = dense(self.d_ff, ("embed", "mlp"), "wi_0")(x)
    up = dense(self.d_ff, ("embed", "mlp"), "wi_1")(x)
    h = nn.gelu(gate, approximate=True) * up
    h = nn.with_logical_constraint(
        h, ("activation_batch", "activation_length", "activation_mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
    return dense(x.shape[-1], ("mlp", "embed"), "wo")(h)


class DecoderLayer(nn.Module):
  """One pre-norm block; `(x, None)` in and out so that `nn.scan` can stack it."""
  config: DecoderConfig
  deterministic: bool
  decode: bool

  @nn.compact
  def __call__(self, x, bias, mask, start):
    """x: `[batch, length, embed]`; bias, mask, start: see `SelfAttention`."""
    cfg = self.config
    dtype = cfg.compute_dtype
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    x = nn.with_logical_constraint(x, HIDDEN_AXES)
    h = rms_norm(dtype, "pre_attention_norm")(x)
    h = SelfAttention(cfg.num_heads, cfg.head_dim, dtype, cfg.attention_implementation,
                      self.decode, name="attention")(h, bias, mask, start)
    x = x + dropout(h, deterministic=self.deterministic)
    h = rms_norm(dtype, "pre_mlp_norm")(x)
    h = GatedGeluMlp(cfg.d_ff, cfg.dropout_rate, dtype, self.deterministic, name="mlp")(h)
    x = x + dropout(h, deterministic=self.deterministic)
    return nn.with_logical_constraint(x, HIDDEN_AXES), None


class Decoder(nn.Module):
  """Token ids -> next-token logits, prefix-LM masked, optionally KV-cached."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, in_prefix: jax.Array, *,
               deterministic: bool = True, decode: bool = False) -> jax.Array:
    """Logits for every position.

    Args:
      tokens: int `[batch, length]` input ids (targets shifted right).
      in_prefix: bool `[batch, length]`, True on the bidirectional prefix.
      deterministic: disables dropout.
      decode: use and extend the KV cache (`cache` collection, mutable).
        `init` with `decode=True` creates a cache as long as `tokens`; later
        calls append `length` tokens at the cache's write index. Prefill the
        whole prefix in one call: later calls are causal only.
    Returns:
      float32 `[batch, length, vocab]`.
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    batch, length = tokens.shape
    if decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      start = index.value
      num_keys = length
      if not self.is_initializing():
        num_keys = self._cache_length()
        index.value = start + length
      key_in_prefix = jax.lax.dynamic_update_slice(
          jnp.zeros((batch, num_keys), bool), in_prefix, (0, start))
    else:
      start = jnp.zeros((), jnp.int32)
      num_keys = length
      key_in_prefix = in_prefix
    query_positions = start + jnp.arange(length)
    key_positions = jnp.arange(num_keys)
    bias = RelativePositionBias(cfg.num_heads, cfg.relpos_num_buckets,
                                cfg.relpos_max_distance, dtype,
                                name="relpos_bias")(query_positions, key_positions)
    mask = prefix_lm_mask(query_positions, key_positions, in_prefix, key_in_prefix)

    x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                 embedding_init=nn.with_logical_partitioning(
                     nn.initializers.normal(1.0), ("vocab", "embed")),
                 name="token_embed")(tokens)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)

    layer = DecoderLayer
    if cfg.remat_policy != "none":
      layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    stack = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                    length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(cfg, deterministic, decode, name="layers")(x, bias, mask, start)

    x = rms_norm(dtype, "final_norm")(x)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    logits = Projection((cfg.vocab_size,), ("embed", "vocab"), dtype=dtype,
                        name="logits")(x)
    logits = nn.with_logical_constraint(
        logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits.astype(jnp.float32)

  def _cache_length(self) -> int:
    key = self.get_variable("cache", "layers")["attention"]["key"]
    return jax.tree.leaves(key)[0].shape[2]  # [layers, batch, cache_length, heads, kv]
