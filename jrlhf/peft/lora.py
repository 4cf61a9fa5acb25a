"""LoRA as a kernel leaf: y = x @ base + scale * (x @ a) @ b.

    params = lora.wrap(params, LoraSpec(targets="all-linear", rank=8, alpha=16), rng)
    trainable, frozen = lora.split_trainable(params)     # optimizer state over `trainable`
    logits = model.apply({"params": lora.combine(trainable, frozen)}, tokens_BxL)
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
import zlib
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


def _lora_matmul(x_BxLxI: Array, w: LoraWeight, dtype) -> Array:
  y_BxLxO = layers.matmul(x_BxLxI, w.base, dtype)
  x_BxLxR = jnp.einsum("...i,ir->...r", x_BxLxI.astype(dtype), w.a.astype(dtype))
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
    key = jax.random.fold_in(rng, zlib_crc(path))
    a = _init_a(key, (*lead, fan_in, rank), spec.init, rank, fan_in, dtype)
    b = jnp.zeros((*lead, rank, fan_out), dtype)
    return LoraWeight(leaf, a, b, spec.scale(rank, alpha))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=spec_lib._is_kernel_leaf)


def zlib_crc(text: str) -> int:
  """A stable per-path seed (Python's hash() changes between processes)."""
  return zlib.crc32(text.encode()) & 0x7FFFFFFF


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
    return LoraWeight(base, spec(in_axis, None), spec(None, out_axis), w.scale)

  return jax.tree.map(like, lparams, params_sh, is_leaf=lambda x: isinstance(x, LoraWeight))


# ---------------------------------------------------------------------------------------------
# Trainable / frozen split (DESIGN decision 3). Both halves keep the full tree structure with
# None where the other half holds the value, so `combine` is exact and optax sees only the
# trainable arrays (None is an empty pytree). Inside a PEFT leaf (any dataclass registered in
# KERNEL_HANDLERS), `base` and `base_*` fields are frozen, every other data field trainable, unless
# the class names its own `trainable_fields`; a leaf without `base` (e.g. a 4-bit weight) is
# frozen whole. Plain arrays are frozen unless their path matches `train_regex`.


def _is_peft(x) -> bool:
  return dataclasses.is_dataclass(x) and type(x) in layers.KERNEL_HANDLERS


def _data_fields(leaf) -> list[str]:
  return [f.name for f in dataclasses.fields(leaf) if not f.metadata.get("static", False)]


def _trainable_fields(leaf) -> tuple[str, ...]:
  names = getattr(type(leaf), "trainable_fields", None)
  if names is not None:
    return tuple(names)
  fields = _data_fields(leaf)
  frozen = lambda n: n == "base" or n.startswith("base_")  # noqa: E731 - e.g. a bias copy
  return tuple(n for n in fields if not frozen(n)) if "base" in fields else ()


def _split_leaf(path: str, leaf, train_regex):
  if _is_peft(leaf):
    train = _trainable_fields(leaf)
    if not train:
      return None, leaf
    fields = _data_fields(leaf)
    t = dataclasses.replace(leaf, **{n: None for n in fields if n not in train})
    f = dataclasses.replace(leaf, **{n: None for n in fields if n in train})
    return t, f
  if train_regex is not None and re.search(train_regex, path):
    return leaf, None
  return None, leaf


def split_trainable(params: Any, train_regex: str | None = None) -> tuple[Any, Any]:
  """(trainable, frozen): LoRA a/b (and other PEFT leaves' own weights) vs everything else."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_peft)
  pairs = [_split_leaf(spec_lib.path_str(kp), leaf, train_regex) for kp, leaf in flat]
  trainable = jax.tree_util.tree_unflatten(treedef, [t for t, _ in pairs])
  frozen = jax.tree_util.tree_unflatten(treedef, [f for _, f in pairs])
  return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
  """The inverse of `split_trainable`."""
  if trainable is None:
    return frozen
  if frozen is None:
    return trainable
  if isinstance(trainable, dict):
    return {k: combine(trainable.get(k), frozen.get(k)) for k in {**frozen, **trainable}}
  if _is_peft(trainable):
    return dataclasses.replace(trainable, **{
        n: combine(getattr(trainable, n), getattr(frozen, n)) for n in _data_fields(trainable)})
  raise ValueError(f"both halves hold a {type(trainable).__name__} at the same place")
