"""One decoder for Llama 2/3, Mistral, Qwen2/2.5, Qwen3 and GPT-2, with layers under `nn.scan`.

Family differences are flags on `ModelConfig` (biases, q/k norm, tied embeddings) plus the GPT-2
switch (LayerNorm, learned positions, GELU MLP). Attention runs over two key sets: an optional
KV cache (earlier tokens) and the new tokens of this call, so one code path serves training,
prefill and decode without ever copying the cache.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jrlhf.models import layers
from jrlhf.models.config import ModelConfig

Array = jax.Array

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class KVCache(NamedTuple):
  """Keys/values of every layer at slots 0..S-1; `valid_BxS` marks real tokens already written;
  `index` is the next slot to write (shared by all rows: prompts are left-padded)."""

  k_LxBxSxKxDh: Array
  v_LxBxSxKxDh: Array
  valid_BxS: Array
  index: Array

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))


class Side(NamedTuple):
  """Per-call inputs every layer sees (broadcast over the layer scan)."""

  positions_BxL: Array
  self_mask_BxLxL: Array
  cache_mask_BxLxS: Array | None


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, side: Side, cache_kv):
    cfg = self.cfg
    b, length, _ = x_BxLxD.shape
    h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = lambda n, axis, name: layers.Dense(  # noqa: E731
        n, ("embed", axis), cfg.attention_bias, cfg, name=name)
    q_BxLxHxDh = proj(h * dh, "heads", "q")(x_BxLxD).reshape(b, length, h, dh)
    k_BxLxKxDh = proj(k * dh, "kv_heads", "k")(x_BxLxD).reshape(b, length, k, dh)
    v_BxLxKxDh = proj(k * dh, "kv_heads", "v")(x_BxLxD).reshape(b, length, k, dh)
    if cfg.qk_norm:
      q_BxLxHxDh = layers.RMSNorm(cfg.norm_eps, cfg, "head_dim", name="q_norm")(q_BxLxHxDh)
      k_BxLxKxDh = layers.RMSNorm(cfg.norm_eps, cfg, "head_dim", name="k_norm")(k_BxLxKxDh)
    if not cfg.is_gpt2:
      inv_freq = layers.rope_inv_freq(cfg)
      q_BxLxHxDh = layers.apply_rope(q_BxLxHxDh, side.positions_BxL, inv_freq)
      k_BxLxKxDh = layers.apply_rope(k_BxLxKxDh, side.positions_BxL, inv_freq)

    q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, length, k, h // k, dh) * (dh ** -0.5)
    cache = None if cache_kv is None else (*cache_kv, side.cache_mask_BxLxS)
    out_BxLxKxGxDh = layers.chunked_causal_attend(
        q_BxLxKxGxDh, k_BxLxKxDh, v_BxLxKxDh, side.self_mask_BxLxL, cfg.attention_chunk,
        cfg.sliding_window, cache)
    out_BxLxD = layers.Dense(cfg.hidden_size, ("heads", "embed"), cfg.attention_out_bias, cfg,
                             name="o")(out_BxLxKxGxDh.reshape(b, length, h * dh))
    return out_BxLxD, (k_BxLxKxDh, v_BxLxKxDh)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dense = lambda n, axes, name: layers.Dense(n, axes, cfg.mlp_bias, cfg, name=name)  # noqa: E731
    if cfg.is_gpt2:
      h_BxLxF = jax.nn.gelu(dense(cfg.mlp_dim, ("embed", "mlp"), "up")(x_BxLxD), approximate=True)
    else:
      gate_BxLxF = dense(cfg.mlp_dim, ("embed", "mlp"), "gate")(x_BxLxD)
      h_BxLxF = jax.nn.silu(gate_BxLxF) * dense(cfg.mlp_dim, ("embed", "mlp"), "up")(x_BxLxD)
    return dense(cfg.hidden_size, ("mlp", "embed"), "down")(h_BxLxF)


class Block(nn.Module):
  """Pre-norm residual block; `(carry, scanned) -> (carry, scanned_out)` for `nn.scan`."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, side: Side, cache_kv):
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed_act"))
    attn_BxLxD, new_kv = Attention(self.cfg, name="attn")(
        layers.make_norm(self.cfg, "attn_norm")(x_BxLxD), side, cache_kv)
    x_BxLxD = x_BxLxD + attn_BxLxD
    x_BxLxD = x_BxLxD + MLP(self.cfg, name="mlp")(layers.make_norm(self.cfg, "mlp_norm")(x_BxLxD))
    return x_BxLxD, new_kv


def default_positions(tokens_BxL: Array, attention_mask_BxL: Array | None) -> Array:
  """0..L-1, or with a mask, the count of real tokens before each one (left padding)."""
  if attention_mask_BxL is None:
    return jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
  return jnp.maximum(jnp.cumsum(attention_mask_BxL.astype(jnp.int32), axis=1) - 1, 0)


class Transformer(nn.Module):
  """Decoder LM. `head="lm"` returns float32 logits (B, L, V); `head="scalar"` returns one value
  per position (B, L) for reward and value models.

  Call: `model.apply({"params": p}, tokens_BxL, positions_BxL=None, segment_ids_BxL=None,
  attention_mask_BxL=None)`. With `cache=KVCache`, returns `(last-position output, new cache)`.
  """

  cfg: ModelConfig
  head: str = "lm"

  def setup(self):
    cfg = self.cfg
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.embed = self.param(
        "embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), param_dtype)
    if cfg.is_gpt2:
      self.pos_embed = self.param(
          "pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
          (cfg.max_position_embeddings, cfg.hidden_size), param_dtype)
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    self.layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, 0), length=cfg.num_layers, unroll=cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    self.final_norm = layers.make_norm(cfg, "final_norm")
    if self.head == "scalar":
      self.score = layers.Dense(1, ("embed", None), False, cfg, name="score")
    elif self.head != "lm":
      raise ValueError(f"head {self.head!r} is not one of 'lm', 'scalar'")
    elif not cfg.tie_embeddings:
      self.lm_head = layers.Dense(cfg.vocab_size, ("embed", "vocab"), False, cfg, name="lm_head")

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None,
               attention_mask_BxL=None, cache: KVCache | None = None):
    cfg = self.cfg
    b, length = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = default_positions(tokens_BxL, attention_mask_BxL)
    valid_BxL = (jnp.ones((b, length), bool) if attention_mask_BxL is None
                 else attention_mask_BxL.astype(bool))
    side = Side(
        positions_BxL,
        layers.self_mask(valid_BxL, segment_ids_BxL, cfg.sliding_window),
        None if cache is None else layers.cache_mask(cache.valid_BxS, cache.index, length,
                                                      cfg.sliding_window))
    x_BxLxD = self.embed.astype(cfg.dtype)[tokens_BxL]
    if cfg.is_gpt2:
      x_BxLxD = x_BxLxD + self.pos_embed.astype(cfg.dtype)[positions_BxL]
    cache_kv = None if cache is None else (cache.k_LxBxSxKxDh, cache.v_LxBxSxKxDh)
    x_BxLxD, (k_LxBxLxKxDh, v_LxBxLxKxDh) = self.layers(x_BxLxD, side, cache_kv)
    x_BxLxD = self.final_norm(x_BxLxD)
    if cache is None:
      return self._head(x_BxLxD)
    start = (0, 0, cache.index, 0, 0)
    new_cache = KVCache(
        jax.lax.dynamic_update_slice(cache.k_LxBxSxKxDh, k_LxBxLxKxDh.astype(cache.k_LxBxSxKxDh.dtype), start),
        jax.lax.dynamic_update_slice(cache.v_LxBxSxKxDh, v_LxBxLxKxDh.astype(cache.v_LxBxSxKxDh.dtype), start),
        jax.lax.dynamic_update_slice(cache.valid_BxS, valid_BxL, (0, cache.index)),
        cache.index + length)
    return self._head(x_BxLxD[:, -1:])[:, 0], new_cache

  def _head(self, x_BxLxD):
    if self.head == "scalar":
      return self.score(x_BxLxD)[..., 0].astype(jnp.float32)
    if self.cfg.tie_embeddings:
      logits_BxLxV = layers.matmul(x_BxLxD, self.embed.T, jnp.dtype(self.cfg.dtype))
    else:
      logits_BxLxV = self.lm_head(x_BxLxD)
    return logits_BxLxV.astype(jnp.float32)
