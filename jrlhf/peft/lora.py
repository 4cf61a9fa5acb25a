"""LoRA as a kernel leaf: y = x @ base + scale * (x @ a) @ b.

    params = lora.wrap(params, LoraSpec(targets="all-linear", rank=8, alpha=16), rng)
    trainable, frozen = peft.split_trainable(params)     # optimizer state over `trainable`
    logits = model.apply({"params": peft.combine(trainable, frozen)}, tokens_BxL)
    plain = lora.merge(params)                           # base + scale * a @ b, for export

A `LoraWeight` sits where a `kernel` array was. Under `layers/` every array carries the leading
layer axis (nn.scan slices each leaf), so `a` is (layers, in, R) and `b` (layers, R, out). The
handler never forms base + a @ b in a step: that would be a full (in, out) matrix per projection
per step, and its gradient a full-size matmul; (x @ a) @ b costs O(R) instead. `base` may be any
leaf `layers.matmul` understands (a 4-bit `QuantizedWeight` makes this QLoRA).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jrlhf.models import layers
from jrlhf.peft import spec as spec_lib

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
  base: Any
  a: Array
  b: Array
  scale: float = dataclasses.field(metadata=dict(static=True))
  # Dropout on the LoRA branch's input (PEFT's lora_dropout). It is active only while
  # `dropout_key` holds keys, which the train step sets each step (trainable.with_dropout_keys);
  # eval, sampling and export see None and run without it.
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  dropout_key: Array | None = None
  trainable_fields = ("a", "b")


def _lora_matmul(x_BxLxI: Array, w: LoraWeight, dtype) -> Array:
  y_BxLxO = layers.matmul(x_BxLxI, w.base, dtype)
  x_BxLxI = x_BxLxI.astype(dtype)
  if w.dropout > 0 and w.dropout_key is not None:
    keep = 1.0 - w.dropout
    mask_BxLxI = jax.random.bernoulli(w.dropout_key, keep, x_BxLxI.shape)
    x_BxLxI = jnp.where(mask_BxLxI, x_BxLxI / keep, 0).astype(dtype)
  x_BxLxR = jnp.einsum("...i,ir->...r", x_BxLxI, w.a.astype(dtype))
  delta_BxLxO = jnp.einsum("...r,ro->...o", x_BxLxR, w.b.astype(dtype))
  return y_BxLxO + (w.scale * delta_BxLxO).astype(y_BxLxO.dtype)


layers.KERNEL_HANDLERS[LoraWeight] = _lora_matmul


def _float_dtype(leaf) -> Any:
  dtype = getattr(leaf, "dtype", None)
  return dtype if dtype is not None and jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _init_a(key, shape, init: str, rank: int, fan_in: int, dtype) -> Array:
  if init == "kaiming":
    # torch's kaiming_uniform_(a=sqrt(5)) on lora_A (R, in), as PEFT: bound 1/sqrt(in).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return (jax.random.normal(key, shape, jnp.float32) / rank).astype(dtype)


def wrap(params: Any, spec: spec_lib.LoraSpec, rng: Array) -> Any:
  """A copy of `params` with each targeted kernel replaced by a LoraWeight (B = 0: identity)."""
  targets = spec_lib.resolve(params, spec)

  def one(key_path, leaf):
    path = spec_lib.path_str(key_path)
    if path not in targets:
      return leaf
    rank, alpha = targets[path]
    *lead, fan_in, fan_out = leaf.shape
    dtype = _float_dtype(leaf)
    key = jax.random.fold_in(rng, spec_lib.stable_hash(path))
    a = _init_a(key, (*lead, fan_in, rank), spec.init, rank, fan_in, dtype)
    b = jnp.zeros((*lead, rank, fan_out), dtype)
    return LoraWeight(leaf, a, b, spec.scale(rank, alpha), spec.dropout)

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=spec_lib.is_kernel_leaf)


def _dense(base: Any) -> Array:
  """A kernel leaf as a plain array: the leaf applied to the identity (any leaf type)."""
  if isinstance(base, jax.Array) or hasattr(base, "__array__"):
    return jnp.asarray(base)
  if hasattr(base, "dequantize"):  # a 4-bit QuantizedWeight knows its own inverse
    return base.dequantize()
  first = jax.tree.leaves(base)[0]
  fan_in = base.shape[-2] if hasattr(base, "shape") else None
  if fan_in is None:
    raise TypeError(f"cannot merge a {type(base).__name__} base without a .shape")
  eye = jnp.eye(fan_in, dtype=jnp.float32)
  dense = lambda leaf: layers.matmul(eye, leaf, jnp.float32)  # noqa: E731
  for _ in range(len(base.shape) - 2):  # stacked layers: one identity product per layer
    dense = jax.vmap(dense)
  return dense(base).astype(_float_dtype(first))


def merge(params: Any) -> Any:
  """A plain param tree: every LoraWeight becomes base + scale * a @ b, in the base's dtype."""

  def one(leaf):
    if not isinstance(leaf, LoraWeight):
      return leaf
    base = _dense(leaf.base)
    delta = jnp.einsum("...ir,...ro->...io", leaf.a.astype(jnp.float32),
                       leaf.b.astype(jnp.float32))
    return (base.astype(jnp.float32) + leaf.scale * delta).astype(base.dtype)

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, LoraWeight))


def shardings_like(lparams: Any, params_sh: Any) -> Any:
  """Shardings for a LoRA tree from the plain tree's: `a` splits its input dim like the kernel
  does and `b` its output dim; the rank dim is small and stays replicated. A 4-bit base takes
  `quant.shardings_like`'s."""
  from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

  from jrlhf.peft import quant  # noqa: PLC0415 - only trees with a 4-bit base need it

  def like(w, sh):
    if not isinstance(w, LoraWeight):
      return sh
    *lead, in_axis, out_axis = tuple(sh.spec) + (None,) * (w.a.ndim - len(sh.spec))
    spec = lambda *axes: NamedSharding(sh.mesh, PartitionSpec(*lead, *axes))  # noqa: E731
    base = sh if isinstance(w.base, jax.Array) or hasattr(w.base, "__array__") else (
        quant.shardings_like(w.base, sh))
    return dataclasses.replace(w, base=base, a=spec(in_axis, None), b=spec(None, out_axis))

  return jax.tree.map(like, lparams, params_sh, is_leaf=lambda x: isinstance(x, LoraWeight))
