"""One decoder for Llama 2/3, Mistral, Qwen2/2.5, Qwen3 and GPT-2, with layers under `nn.scan`.

Family differences are flags on `ModelConfig` (biases, q/k norm, tied embeddings) plus the GPT-2
switch (LayerNorm, learned positions, GELU MLP). Attention runs over two key sets: an optional
KV cache (earlier tokens) and the new tokens of this call, so one code path serves training,
prefill and decode without ever copying the cache.

Prompt tuning and prefix tuning (jrlhf.peft.prompt) reach the model through one hook: a
top-level `prompt` or `prefix` sub-tree in the params becomes per-layer prefix keys/values
(`Transformer.prefix_kv`) that every real token attends to, and real positions start at T, the
number of virtual tokens, as in PEFT. See `Prefix` for the layouts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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

  k_LxBxKxSxDh: Any  # one (L, B, K, S, Dh) array, or a tuple of L (B, K, S, Dh) arrays
  v_LxBxKxSxDh: Any
  valid_BxS: Array
  index: Array

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, slots: int, per_layer: bool = False,
            prefix: Prefix | None = None) -> "KVCache":
    """A cache of `slots` slots; with a (layer-stacked) `prefix` of T entries from
    `Transformer.prefix_kv`, slots 0..T-1 hold it, valid, and writing starts at slot T."""
    shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    k = v = jnp.zeros((cfg.num_layers, *shape), dtype)
    valid_BxS, index = jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32)
    if prefix is not None:
      t = prefix.k_KxTxDh.shape[-2]
      put = lambda full, p_LxKxTxDh: full.at[:, :, :, :t].set(  # noqa: E731
          p_LxKxTxDh[:, None].astype(dtype))  # broadcast over the batch
      k, v = put(k, prefix.k_KxTxDh), put(v, prefix.v_KxTxDh)
      valid_BxS, index = valid_BxS.at[:, :t].set(True), jnp.asarray(t, jnp.int32)
    if per_layer:
      k, v = tuple(k), tuple(v)
    return cls(k, v, valid_BxS, index)


class Prefix(NamedTuple):
  """Per-layer keys/values that every real token attends to (no batch dim: all rows share them).

  Scanned, each field carries a leading layer axis. k/v are (K, T, Dh), used as they are (no
  RoPE: HF past_key_values semantics). In a call with a cache they are None: the prefix already
  sits in cache slots 0..T-1 (`KVCache.empty(..., prefix=...)`). `gate_KxGxT` is set for a
  gated prefix (`prefix/gate` in the params): the prefix gets its own softmax, weighted per
  query head by the gate (broadcast over T so its shape says which keys it gates).
  """

  k_KxTxDh: Array | None
  v_KxTxDh: Array | None
  gate_KxGxT: Array | None = None


class Side(NamedTuple):
  """Per-call inputs every layer sees (broadcast over the layer scan)."""

  positions_BxL: Array
  self_mask_BxLxL: Array
  cache_mask_BxLxS: Array | None
  # Set when each layer writes its new keys into its own cache before attending (unstacked).
  cache_index: Array | None = None


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, side: Side, cache_kv, prefix: Prefix | None):
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
    # Keys/values are (B, K, S, Dh) everywhere: batch dims lead, so the score and value matmuls
    # read the cache as it is stored (a (B, S, K, Dh) cache was transposed every decode step).
    k_BxKxLxDh, v_BxKxLxDh = k_BxLxKxDh.transpose(0, 2, 1, 3), v_BxLxKxDh.transpose(0, 2, 1, 3)
    gate = None if prefix is None else prefix.gate_KxGxT
    if side.cache_index is not None:
      # Write first, then attend over the whole cache: the reads depend on the write, so XLA
      # updates this layer's cache in place instead of copying it.
      start = (0, 0, side.cache_index, 0)
      cache_k = jax.lax.dynamic_update_slice(
          cache_kv[0], k_BxKxLxDh.astype(cache_kv[0].dtype), start)
      cache_v = jax.lax.dynamic_update_slice(
          cache_kv[1], v_BxKxLxDh.astype(cache_kv[1].dtype), start)
      out_BxLxKxGxDh = layers.attend(q_BxLxKxGxDh, [cache_k], [cache_v], [side.cache_mask_BxLxS],
                                     gate)
      new_kv = (cache_k, cache_v)
    else:
      cache = None if cache_kv is None else (*cache_kv, side.cache_mask_BxLxS)
      prefix_kv = None if prefix is None or prefix.k_KxTxDh is None else (
          prefix.k_KxTxDh.astype(k_BxKxLxDh.dtype), prefix.v_KxTxDh.astype(v_BxKxLxDh.dtype))
      out_BxLxKxGxDh = layers.chunked_causal_attend(
          q_BxLxKxGxDh, k_BxKxLxDh, v_BxKxLxDh, side.self_mask_BxLxL, cfg.attention_chunk,
          cfg.sliding_window, cache, prefix_kv, gate)
      new_kv = (k_BxKxLxDh, v_BxKxLxDh)
    out_BxLxD = layers.Dense(cfg.hidden_size, ("heads", "embed"), cfg.attention_out_bias, cfg,
                             name="o")(out_BxLxKxGxDh.reshape(b, length, h * dh))
    return out_BxLxD, new_kv


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
    out_BxLxD = dense(cfg.hidden_size, ("mlp", "embed"), "down")(h_BxLxF)
    if self.has_variable("params", "parallel"):
      # A parallel adapter (jrlhf.peft.adapters) beside the MLP: a D -> D "kernel" leaf whose
      # handler computes s * f(x W_down) W_up from the MLP's input; absent in a plain tree.
      out_BxLxD += layers.matmul(x_BxLxD, self.get_variable("params", "parallel"),
                                 jnp.dtype(cfg.dtype))
    return out_BxLxD


class Block(nn.Module):
  """Pre-norm residual block; `(carry, scanned) -> (carry, scanned_out)` for `nn.scan`."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, side: Side, cache_kv, prefix: Prefix | None):
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed_act"))
    attn_BxLxD, new_kv = Attention(self.cfg, name="attn")(
        layers.make_norm(self.cfg, "attn_norm")(x_BxLxD), side, cache_kv, prefix)
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
  `return_hidden=True` (no cache) returns `(output, final-normed hidden states (B, L, D))`, for a
  head kept outside the model (PPO's value head on the policy's trunk).
  """

  cfg: ModelConfig
  head: str = "lm"
  # One module per layer (params under layers_0..layers_{n-1}, see `unstack_layers`) instead
  # of a scan over stacked weights: for decoding, where a scan copies every layer's weights
  # and cache slice on every step (XLA:CPU cannot feed a matmul from a slice in place).
  unstacked: bool = False

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
    if self.unstacked:
      self.blocks = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    else:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, 0, 0), length=cfg.num_layers, unroll=cfg.scan_unroll,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    self.final_norm = layers.make_norm(cfg, "final_norm")
    if self.head == "scalar":
      self.score = layers.Dense(1, ("embed", None), False, cfg, name="score")
    elif self.head != "lm":
      raise ValueError(f"head {self.head!r} is not one of 'lm', 'scalar'")
    elif not cfg.tie_embeddings:
      self.lm_head = layers.Dense(cfg.vocab_size, ("embed", "vocab"), False, cfg, name="lm_head")

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None,
               attention_mask_BxL=None, cache: KVCache | None = None, return_hidden: bool = False):
    cfg = self.cfg
    if return_hidden and cache is not None:
      raise ValueError("return_hidden=True is for a full forward pass; decoding with a cache "
                       "returns only the last position's output")
    b, length = tokens_BxL.shape
    t = self.num_virtual_tokens()
    if positions_BxL is None:
      positions_BxL = default_positions(tokens_BxL, attention_mask_BxL)
      if cfg.is_gpt2 and t + length > cfg.max_position_embeddings:
        raise ValueError(
            f"{t} virtual + {length} real tokens exceed max_position_embeddings="
            f"{cfg.max_position_embeddings} of this GPT-2 model; use fewer tokens")
    # Real tokens follow the T virtual ones: PEFT's positions count the prompt or prefix.
    positions_BxL = positions_BxL + t
    valid_BxL = (jnp.ones((b, length), bool) if attention_mask_BxL is None
                 else attention_mask_BxL.astype(bool))
    x_BxLxD = self._embed(tokens_BxL, positions_BxL)
    self_mask_BxLxL = layers.self_mask(valid_BxL, segment_ids_BxL, cfg.sliding_window)
    # Without a cache the prefix is computed here; a cache already holds it in slots 0..T-1,
    # and only a gate (if any) is still needed to weight those slots.
    prefix = self.prefix_kv() if cache is None else self._gate_only()
    if cache is not None:
      new_valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, valid_BxL, (0, cache.index))
    if self.unstacked:
      side = Side(positions_BxL, self_mask_BxLxL, None if cache is None else layers.cache_mask(
          new_valid_BxS, cache.index, length, cfg.sliding_window, include_new=True,
          prefix_slots=t), None if cache is None else cache.index)
      x_BxLxD, (ks, vs) = self._unstacked_layers(x_BxLxD, side, cache, prefix)
      x_BxLxD = self.final_norm(x_BxLxD)
      if cache is None:
        return (self._head(x_BxLxD), x_BxLxD) if return_hidden else self._head(x_BxLxD)
      new_cache = KVCache(tuple(ks), tuple(vs), new_valid_BxS, cache.index + length)
      return self._head(x_BxLxD[:, -1:])[:, 0], new_cache
    side = Side(positions_BxL, self_mask_BxLxL, None if cache is None else layers.cache_mask(
        cache.valid_BxS, cache.index, length, cfg.sliding_window, prefix_slots=t))
    cache_kv = None if cache is None else (cache.k_LxBxKxSxDh, cache.v_LxBxKxSxDh)
    x_BxLxD, (k_LxBxKxLxDh, v_LxBxKxLxDh) = self.layers(x_BxLxD, side, cache_kv, prefix)
    x_BxLxD = self.final_norm(x_BxLxD)
    if cache is None:
      return (self._head(x_BxLxD), x_BxLxD) if return_hidden else self._head(x_BxLxD)
    write = lambda full, new: jax.lax.dynamic_update_slice(  # noqa: E731
        full, new.astype(full.dtype), (0, 0, 0, cache.index, 0))
    new_cache = KVCache(write(cache.k_LxBxKxSxDh, k_LxBxKxLxDh),
                        write(cache.v_LxBxKxSxDh, v_LxBxKxLxDh), new_valid_BxS,
                        cache.index + length)
    return self._head(x_BxLxD[:, -1:])[:, 0], new_cache

  def _embed(self, tokens_BxL, positions_BxL):
    x_BxLxD = self.embed.astype(self.cfg.dtype)[tokens_BxL]
    if self.cfg.is_gpt2:
      x_BxLxD = x_BxLxD + self.pos_embed.astype(self.cfg.dtype)[positions_BxL]
    return x_BxLxD

  def _unstacked_layers(self, x_BxLxD, side: Side, cache: KVCache | None, prefix: Prefix | None):
    ks, vs = [], []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else (cache.k_LxBxKxSxDh[i], cache.v_LxBxKxSxDh[i])
      x_BxLxD, (k, v) = block(x_BxLxD, side, layer_cache, jax.tree.map(lambda a: a[i], prefix))
      ks.append(k)
      vs.append(v)
    return x_BxLxD, (ks, vs)

  # -------------------------------------------------------------------------------------------
  # Prompt / prefix tuning: trainable `prompt` or `prefix` sub-trees (jrlhf.peft.prompt) that
  # a plain tree does not have.

  def num_virtual_tokens(self) -> int:
    """T: the prompt's or prefix's length (static, from the param shapes); 0 for a plain tree."""
    prompt, prefix = self._tuned_params()
    if prompt is not None:
      return prompt["embeddings"].shape[0]
    if prefix is not None:
      return (prefix["k"] if "k" in prefix else prefix["embedding"]).shape[-2]
    return 0

  def _tuned_params(self):
    def get(name):
      tree = self.get_variable("params", name) if self.has_variable("params", name) else None
      # The frozen half of a split tree keeps the sub-tree with None leaves: that is the base
      # model (the DPO/PPO reference), so it counts as absent.
      return tree if jax.tree.leaves(tree) else None

    prompt, prefix = get("prompt"), get("prefix")
    if prompt is not None and prefix is not None:
      raise ValueError("params hold both a `prompt` and a `prefix` sub-tree; use one of prompt "
                       "tuning or prefix tuning")
    return prompt, prefix

  def prefix_kv(self) -> Prefix | None:
    """The layer-stacked prefix keys/values (layers, K, T, Dh) of a prompt- or prefix-tuned
    tree, None for a plain one. `model.apply({"params": p}, method=Transformer.prefix_kv)`.

    Prompt tuning: the virtual tokens attend only to each other, so their keys/values do not
    depend on the input; they come from one pass of the layers over the (1, T, D) virtual
    embeddings at positions 0..T-1, exactly what PEFT's concatenation computes for them.
    """
    cfg = self.cfg
    prompt, prefix = self._tuned_params()
    if prompt is not None:
      t = prompt["embeddings"].shape[0]
      positions_1xT = jnp.arange(t)[None]
      x_1xTxD = prompt["embeddings"].astype(cfg.dtype)[None]
      if cfg.is_gpt2:
        x_1xTxD = x_1xTxD + self.pos_embed.astype(cfg.dtype)[positions_1xT]
      side = Side(positions_1xT, layers.self_mask(jnp.ones((1, t), bool), None,
                                                  cfg.sliding_window), None)
      if self.unstacked:
        _, (ks, vs) = self._unstacked_layers(x_1xTxD, side, None, None)
        return Prefix(jnp.stack(ks)[:, 0], jnp.stack(vs)[:, 0])
      _, (k_Lx1xKxTxDh, v_Lx1xKxTxDh) = self.layers(x_1xTxD, side, None, None)
      return Prefix(k_Lx1xKxTxDh[:, 0], v_Lx1xKxTxDh[:, 0])
    if prefix is None:
      return None
    k_LxKxTxDh, v_LxKxTxDh = prefix_from_params(prefix, cfg)
    gate = self._gate_only()
    return Prefix(k_LxKxTxDh, v_LxKxTxDh, None if gate is None else gate.gate_KxGxT)

  def _gate_only(self) -> Prefix | None:
    _, prefix = self._tuned_params()
    if prefix is None or "gate" not in prefix:
      return None
    cfg, t = self.cfg, self.num_virtual_tokens()
    k = cfg.num_kv_heads
    gate_LxKxGx1 = prefix["gate"].reshape(cfg.num_layers, k, cfg.num_heads // k, 1)
    return Prefix(None, None, jnp.broadcast_to(gate_LxKxGx1, (*gate_LxKxGx1.shape[:3], t)))
  def _head(self, x_BxLxD):
    if self.head == "scalar":
      return self.score(x_BxLxD)[..., 0].astype(jnp.float32)
    if self.cfg.tie_embeddings:
      logits_BxLxV = layers.matmul(x_BxLxD, self.embed.T, jnp.dtype(self.cfg.dtype))
    else:
      logits_BxLxV = self.lm_head(x_BxLxD)
    return logits_BxLxV.astype(jnp.float32)


def prefix_from_params(prefix: dict, cfg: ModelConfig) -> tuple[Array, Array]:
  """(k, v), each (layers, K, T, Dh), from a `prefix` sub-tree: stored as is (`k`, `v`), or
  PEFT's reparameterisation tanh(E w1 + b1) w2 + b2 with PEFT's layout of the output row
  (layers, k|v, K, Dh), so PEFT's prefix encoder weights load unchanged."""
  if "k" in prefix:
    return prefix["k"], prefix["v"]
  f32 = lambda name: prefix[name].astype(jnp.float32)  # noqa: E731 - tiny; keep it exact
  h_TxH = jnp.tanh(f32("embedding") @ f32("w1") + f32("b1"))
  kv_TxW = h_TxH @ f32("w2") + f32("b2")
  t = kv_TxW.shape[0]
  kv_2xLxKxTxDh = kv_TxW.reshape(t, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim).transpose(
      2, 1, 3, 0, 4)
  return kv_2xLxKxTxDh[0], kv_2xLxKxTxDh[1]


def unstack_layers(params: dict, num_layers: int) -> dict:
  """Params of `Transformer(unstacked=True)`: the stacked `layers` tree split per layer (a copy)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  return out
