"""Building blocks of the decoder. `matmul` is the one place that knows what a weight leaf is.

PEFT methods replace kernel leaves with their own leaf types (LoRA, 4-bit, adapters); every
projection in the model goes through `matmul`, so supporting a new leaf type is a change here
and nowhere else.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jrlhf.models.config import ModelConfig

Array = jax.Array
# Extended by jrlhf.peft: leaf type -> fn(x, kernel, dtype) -> y.
KERNEL_HANDLERS: dict[type, Callable[[Array, Any, Any], Array]] = {}


def matmul(x_BxLxI: Array, kernel: Any, dtype) -> Array:
  """x @ kernel for a 2-D kernel (in, out), in `dtype`, whatever leaf type the kernel is."""
  handler = KERNEL_HANDLERS.get(type(kernel))
  if handler is not None:
    return handler(x_BxLxI, kernel, dtype)
  return jnp.einsum("...i,io->...o", x_BxLxI.astype(dtype), kernel.astype(dtype))


def dtype_of(name: str):
  return jnp.dtype(name)


class Dense(nn.Module):
  """A projection with a 2-D kernel (in, out) named by logical axes, optional bias."""

  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  cfg: ModelConfig | None = None
  kernel_init: Callable = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype, param_dtype = dtype_of(self.cfg.dtype), dtype_of(self.cfg.param_dtype)
    # A PEFT leaf (LoRA, 4-bit, ...) is a pytree whose first leaf need not have the kernel's
    # shape, which `self.param` would reject; read it as stored and let `matmul` dispatch on it.
    kernel = (self.get_variable("params", "kernel")
              if self.has_variable("params", "kernel") else None)
    if type(kernel) not in KERNEL_HANDLERS:
      kernel = self.param(
          "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
          (x.shape[-1], self.features), param_dtype)
    y = matmul(x, kernel, dtype)
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
          (self.features,), param_dtype)
      y = y + bias.astype(dtype)
    return y


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32 (bf16 variance is too coarse), as HF Llama does."""

  eps: float
  cfg: ModelConfig
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
        (x.shape[-1],), dtype_of(self.cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nn.Module):
  """GPT-2's LayerNorm with scale and bias, statistics in float32."""

  eps: float
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    param_dtype = dtype_of(self.cfg.param_dtype)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (x.shape[-1],), param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  if cfg.is_gpt2:
    return LayerNorm(cfg.norm_eps, cfg, name=name)
  return RMSNorm(cfg.norm_eps, cfg, name=name)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (HF "rotate_half" layout: the two halves of head_dim pair up).


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse frequencies (Dh/2,), with Llama-3 or linear scaling applied."""
  dh = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  sc = cfg.rope_scaling
  if sc.kind == "linear":
    return inv_freq / sc.factor
  if sc.kind == "llama3":
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x_BxLxHxDh: Array, positions_BxL: Array, inv_freq: Array) -> Array:
  angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BxLxF)[:, :, None, :]
  sin = jnp.sin(angles_BxLxF)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxDh.dtype)


# ---------------------------------------------------------------------------------------------
# Attention masks. A key is visible to a query when it is real, not in the query's future, in
# the same packed document, and (sliding window) close enough.


def self_mask(valid_BxL: Array, segment_ids_BxL: Array | None, window: int | None) -> Array:
  """Mask (B, L, L) of the new tokens attending to each other."""
  length = valid_BxL.shape[1]
  q_idx = jnp.arange(length)[:, None]
  k_idx = jnp.arange(length)[None, :]
  visible_LxL = k_idx <= q_idx
  if window is not None:
    visible_LxL &= q_idx - k_idx < window
  mask_BxLxL = visible_LxL[None] & valid_BxL[:, None, :]
  if segment_ids_BxL is not None:
    mask_BxLxL &= segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return mask_BxLxL


def cache_mask(cache_valid_BxS: Array, index: Array, length: int, window: int | None,
               include_new: bool = False, prefix_slots: int = 0) -> Array:
  """Mask (B, L, S) of new tokens (which will sit at slots index..index+L-1) over cache slots;
  with `include_new`, the new tokens are already in the cache and see themselves causally.
  Slots 0..prefix_slots-1 hold a prompt/prefix-tuning prefix, which the window never hides."""
  slots = cache_valid_BxS.shape[1]
  q_idx = index + jnp.arange(length)[:, None]
  k_idx = jnp.arange(slots)[None, :]
  visible_LxS = jnp.broadcast_to((k_idx <= q_idx) if include_new else (k_idx < index),
                                 (length, slots))
  if window is not None:
    visible_LxS &= (q_idx - k_idx < window) | (k_idx < prefix_slots)
  return visible_LxS[None] & cache_valid_BxS[:, None, :]


# ---------------------------------------------------------------------------------------------
# Attention over one or more key sets (prefix, cache slots, new tokens) without concatenating
# keys.


def _scores(q_BxLxKxGxDh: Array, k: Array) -> Array:
  # A prompt/prefix-tuning prefix is shared by every row: (K, T, Dh), no batch dimension.
  spec = "BLKGd,BKSd->BKGLS" if k.ndim == 4 else "BLKGd,KSd->BKGLS"
  return jnp.einsum(spec, q_BxLxKxGxDh, k, preferred_element_type=jnp.float32)


def attend(q_BxLxKxGxDh: Array, keys: list[Array], values: list[Array], masks: list[Array],
           gate_KxGxT: Array | None = None) -> Array:
  """softmax(q k^T) v over the union of key sets; each k/v is (B, K, S_i, Dh) or, shared by all
  rows, (K, S_i, Dh); each mask is (B, L, S_i).

  Scores and softmax are float32 whatever the compute dtype: bf16 scores lose the small
  differences that softmax amplifies. Keys are never concatenated (that would copy a KV cache on
  every decode step); only the small score tensors are.

  With `gate_KxGxT`, the first T keys (a gated prefix) get a softmax of their own, weighted by
  the gate, as in LLaMA-Adapter: a zero gate removes them exactly, which a zero key or value in
  the joint softmax would not (it still takes probability mass from the real keys).
  """
  scores = [_scores(q_BxLxKxGxDh, k) for k in keys]
  scores_BxKxGxLxS = jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0]
  mask_BxLxS = jnp.concatenate(masks, axis=-1) if len(masks) > 1 else masks[0]
  scores_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], scores_BxKxGxLxS,
                               jnp.finfo(jnp.float32).min)
  if gate_KxGxT is None:
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1)
  else:
    t = gate_KxGxT.shape[-1]
    prefix_BxKxGxLxT = jax.nn.softmax(scores_BxKxGxLxS[..., :t], axis=-1)
    prefix_BxKxGxLxT *= gate_KxGxT[:, :, None, :].astype(jnp.float32)
    probs_BxKxGxLxS = jnp.concatenate(
        [prefix_BxKxGxLxT, jax.nn.softmax(scores_BxKxGxLxS[..., t:], axis=-1)], axis=-1)
  probs_BxKxGxLxS = probs_BxKxGxLxS.astype(q_BxLxKxGxDh.dtype)
  out_BxLxKxGxDh, start = 0, 0
  for v in values:
    size = v.shape[-2]
    spec = "BKGLS,BKSd->BLKGd" if v.ndim == 4 else "BKGLS,KSd->BLKGd"
    out_BxLxKxGxDh += jnp.einsum(spec, probs_BxKxGxLxS[..., start:start + size], v)
    start += size
  return out_BxLxKxGxDh


def chunked_causal_attend(q_BxLxKxGxDh: Array, k_BxKxLxDh: Array, v_BxKxLxDh: Array,
                          mask_BxLxL: Array, chunk: int, window: int | None,
                          cache: tuple[Array, Array, Array] | None = None,
                          prefix: tuple[Array, Array] | None = None,
                          gate_KxGxT: Array | None = None) -> Array:
  """`attend` over the new tokens (plus an optional cache), one query chunk at a time.

  A chunk of queries only looks at keys up to its own end (later keys are masked by causality,
  and before `window` by the sliding window), so about half of the score matrix is never
  computed: on CPU this is ~1.5x faster than the full masked product, fwd+bwd.

  `prefix` (k, v), each (K, T, Dh), is seen by every query: no causality, no window, no segment.
  `gate_KxGxT` gates the first T keys: the prefix, or (without `prefix`) the cache's first slots.
  """
  length = q_BxLxKxGxDh.shape[1]
  chunk = chunk if 0 < chunk < length else length
  outs = []
  for start in range(0, length, chunk):
    end = min(start + chunk, length)
    lo = 0 if window is None else max(0, start - window + 1)
    keys, values, masks = [k_BxKxLxDh[:, :, lo:end]], [v_BxKxLxDh[:, :, lo:end]], [
        mask_BxLxL[:, start:end, lo:end]]
    if cache is not None:
      cache_k, cache_v, cache_mask_BxLxS = cache
      keys.insert(0, cache_k)
      values.insert(0, cache_v)
      masks.insert(0, cache_mask_BxLxS[:, start:end])
    if prefix is not None:
      keys.insert(0, prefix[0])
      values.insert(0, prefix[1])
      masks.insert(0, jnp.ones((q_BxLxKxGxDh.shape[0], end - start, prefix[0].shape[-2]), bool))
    outs.append(attend(q_BxLxKxGxDh[:, start:end], keys, values, masks, gate_KxGxT))
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
