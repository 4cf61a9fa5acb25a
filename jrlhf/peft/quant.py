"""4-bit weights: int4 and NF4 codes packed two per byte, block-wise absmax scales, optionally
double-quantized; dequantized inside the matmul (`layers.KERNEL_HANDLERS`).

  qparams = quantize(params, r"layers/.*/kernel", kind="nf4", double_quant=True)
  logits = model.apply({"params": qparams}, tokens_BxL)   # every targeted x @ W reads 4 bits
  params = dequantize(qparams)                            # plain arrays again (rounded)

Layout of a kernel (..., I, O) (leading dims = the scanned `layers` axis, if any):
- Blocks of 64 run along I, the input axis (zero-padded to a multiple of 64). HF stores the
  same weight as (O, I) and bitsandbytes blocks its row-major flattening, so these are
  bitsandbytes' blocks and its codes; and no block straddles a shard of the output axis.
- `codes` uint8 (..., I/2, O): rows 2k and 2k+1 share a byte, row 2k in the high nibble (as
  bitsandbytes packs consecutive elements).
- `absmax` float32 (..., I/64, O) or, double-quantized, a `DoubleQuant`: `absmax - mean` in
  8 bits with bitsandbytes' dynamic map, one float32 scale per 256 along O (along O, not the
  flattened order, so the scales shard like the weight), the mean one float32 per layer.
Every array keeps the kernel's rank-2 tail (or its leading dims), so nn.scan slices all of them
on the layer axis and `shardings_like` gives each the weight's own PartitionSpec.

Error bounds, per weight w in a block with absmax a (tests/peft/test_quant.py checks them):
  nf4:  |w - w_hat| <= a * 0.152 (half the widest NF4 gap, 1 - 0.696)
  int4: |w - w_hat| <= a / 14    (half of one step a/7)
  double quant adds at most |c| * |a - a_hat| <= (8/7) * 0.00704 * (the 256-block's absmax of
  a - mean): the dynamic map's widest half gap near 1.
Storage: 0.5 + 4/64 = 0.5625 bytes per weight (4.5 bits); double-quantized
0.5 + 1/64 + 4/(64*256) = 0.5159 bytes (4.127 bits).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jrlhf.models import layers
from jrlhf.peft import spec as spec_lib
from jrlhf.peft.spec import ALL_LINEAR

Array = jax.Array
BLOCK = 64
DQ_BLOCK = 256

# bitsandbytes' NF4 code values, order 0..15 (quantiles of N(0, 1) normalised to [-1, 1]).
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# Symmetric int4: q = round(w / s) in [-8, 7] with s = absmax / 7, stored as q + 8.
INT4 = ((np.arange(16) - 8) / 7).astype(np.float32)
CODEBOOKS = {"nf4": NF4, "int4": INT4}


def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, 7 exponent bits)):
  for exponent i = 0..6, 2^i fraction values (midpoints of linspace(0.1, 1, 2^i + 1)) times
  10^(i-6), both signs; plus 0 and 1. 256 values, sorted."""
  data = []
  for i in range(7):
    bounds = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    data += list(np.float32(10.0 ** (i - 6)) * means) + list(-np.float32(10.0 ** (i - 6)) * means)
  data += [0.0, 1.0]
  return np.sort(np.array(data, np.float32))


DYNAMIC = dynamic_map()


def _nearest(x: Array, code: np.ndarray) -> Array:
  """Index of the code value nearest to x; a tie goes to the lower value, as bitsandbytes'
  `x > midpoint` tests do. `code` must be sorted."""
  midpoints = jnp.asarray((code[:-1] + code[1:]) / 2)
  return jnp.searchsorted(midpoints, x, side="left").astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class DoubleQuant:
  """Block absmax (..., I/64, O) stored as `codes` (uint8, dynamic map) * `scale` + `offset`."""

  codes: Array
  scale: Array
  offset: Array

  def decode(self) -> Array:
    o = self.codes.shape[-1]
    scale = jnp.repeat(self.scale, DQ_BLOCK, axis=-1)[..., :o]
    return jnp.asarray(DYNAMIC)[self.codes] * scale + self.offset[..., None, None]


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """A kernel (..., I, O) as 4-bit codes and per-64 absmax scales; see the module docstring."""

  codes: Array
  absmax: Array | DoubleQuant
  kind: str = dataclasses.field(default="nf4", metadata=dict(static=True))
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))
  # The kernel's input dim I; codes cover it zero-padded to a multiple of 64.
  rows: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.codes.shape[:-2], self.rows, self.codes.shape[-1])

  def dequantize(self, dtype=None) -> Array:
    hi, lo = self.codes >> 4, self.codes & 15
    *lead, half, o = self.codes.shape
    idx = jnp.stack([hi, lo], axis=-2).reshape(*lead, half * 2, o)
    absmax = self.absmax.decode() if isinstance(self.absmax, DoubleQuant) else self.absmax
    values = jnp.asarray(CODEBOOKS[self.kind])[idx].reshape(*lead, -1, BLOCK, o)
    w = (values * absmax[..., :, None, :]).reshape(*lead, half * 2, o)[..., :self.rows, :]
    return w.astype(self.dtype if dtype is None else dtype)


jax.tree_util.register_dataclass(DoubleQuant)
jax.tree_util.register_dataclass(QuantizedWeight)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _matmul(x_BxLxI: Array, kernel: QuantizedWeight, dtype) -> Array:
  # Rematerialised: without it autodiff keeps each layer's dequantized weight as a residual for
  # the input gradient (a full 16-bit copy of the model by the end of the forward pass); with it
  # the backward pass dequantizes again from the 4-bit codes.
  return jnp.einsum("...i,io->...o", x_BxLxI.astype(dtype), kernel.dequantize(dtype))


layers.KERNEL_HANDLERS[QuantizedWeight] = _matmul


def _double_quantize(absmax: Array) -> DoubleQuant:
  offset = absmax.mean(axis=(-2, -1))
  centred = absmax - offset[..., None, None]
  o = centred.shape[-1]
  pad = -o % DQ_BLOCK
  padded = jnp.pad(centred, [(0, 0)] * (centred.ndim - 1) + [(0, pad)])
  blocks = padded.reshape(*padded.shape[:-1], -1, DQ_BLOCK)
  scale = jnp.abs(blocks).max(axis=-1)
  normed = centred / jnp.repeat(jnp.where(scale == 0, 1, scale), DQ_BLOCK, axis=-1)[..., :o]
  return DoubleQuant(_nearest(normed, DYNAMIC), scale, offset)


@functools.partial(jax.jit, static_argnames=("kind", "double_quant"))
def quantize_array(w: Array, kind: str = "nf4", double_quant: bool = True) -> QuantizedWeight:
  """One kernel (..., I, O) -> QuantizedWeight (I zero-padded to a multiple of 64, e.g. an MLP
  width of 172: zero is a code value of both codebooks, so the padding dequantizes exactly)."""
  if kind not in CODEBOOKS:
    raise ValueError(f"kind {kind!r} is not one of {sorted(CODEBOOKS)}")
  *lead, i, o = w.shape
  padded = jnp.pad(w.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, -i % BLOCK), (0, 0)])
  w32_blocks = padded.reshape(*lead, -1, BLOCK, o)
  absmax = jnp.abs(w32_blocks).max(axis=-2)
  normed = w32_blocks / jnp.where(absmax == 0, 1, absmax)[..., :, None, :]
  idx = _nearest(normed, CODEBOOKS[kind]).reshape(*lead, -1, 2, o)
  codes = (idx[..., 0, :] << 4) | idx[..., 1, :]
  scales = _double_quantize(absmax) if double_quant else absmax
  return QuantizedWeight(codes, scales, kind, jnp.dtype(w.dtype).name, i)


def quantize(params: Any, targets: str | tuple[str, ...] | Callable[[str], bool] = ALL_LINEAR,
             kind: str = "nf4", double_quant: bool = True) -> Any:
  """Replaces every targeted projection kernel with a QuantizedWeight.

  `targets` as in `LoraSpec.targets`: "all-linear" (every projection but the lm_head/score head,
  which QLoRA keeps in 16 bits), regex(es) searched in '/'-joined param paths (one that matches
  nothing is an error listing the paths), or a predicate on the path. Quantize before wrapping
  in LoRA: QLoRA is `lora.wrap(quantize(params), ...)`.
  """
  if callable(targets):
    chosen = {p for p in spec_lib.kernel_paths(params) if targets(p)}
  else:
    chosen = set(spec_lib.select(params, targets))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_handled)
  paths = [spec_lib.path_str(key_path) for key_path, _ in flat]
  leaves = [leaf for _, leaf in flat]
  for path, leaf in zip(paths, leaves):
    if path in chosen and not isinstance(leaf, (jax.Array, np.ndarray)):
      raise ValueError(f"{path} is already a {type(leaf).__name__}, not a plain kernel; "
                       f"quantize the plain params first, then wrap them (QLoRA = LoRA on the "
                       f"quantized base)")
  # One kernel at a time: a model has a handful of kernel shapes, so this compiles a few small
  # programs (cached across calls) and holds one kernel's float32 temporaries at a time.
  leaves = [quantize_array(leaf, kind, double_quant) if path in chosen else leaf
            for path, leaf in zip(paths, leaves)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _is_handled(x) -> bool:
  return type(x) in layers.KERNEL_HANDLERS


def dequantize(params: Any, dtype=None) -> Any:
  """Every QuantizedWeight back to a plain array (its original dtype unless `dtype`)."""
  return jax.tree.map(lambda x: _dequantize(x, dtype) if isinstance(x, QuantizedWeight) else x,
                      params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


_dequantize = jax.jit(QuantizedWeight.dequantize, static_argnums=1)


def shardings_like(qparams: Any, params_sh: Any) -> Any:
  """Shardings for a quantized tree from the plain tree's: codes and scales take the spec of the
  kernel they replace (their last two dims are I- and O-like), the per-layer mean its leading
  axes; a dim whose size the mesh axes do not divide is replicated instead."""
  def like(q, sh):
    if not isinstance(q, QuantizedWeight):
      return sh
    spec = tuple(sh.spec) + (None,) * (len(q.shape) - len(sh.spec))

    def fit(a):
      axes = spec[:a.ndim] if a.ndim < len(spec) else spec
      size = lambda ax: 1 if ax is None else int(np.prod(  # noqa: E731
          [sh.mesh.shape[n] for n in ((ax,) if isinstance(ax, str) else ax)]))
      return NamedSharding(sh.mesh, PartitionSpec(
          *[ax if d % size(ax) == 0 else None for ax, d in zip(axes, a.shape)]))

    return jax.tree.map(fit, q)

  # Other kernel leaves (LoRA, adapters) keep the kernel's sharding for their own
  # `shardings_like`; a QLoRA tree is `lora.shardings_like(t, quant.shardings_like(t, sh))`.
  return jax.tree.map(like, qparams, params_sh, is_leaf=_is_handled)


def bytes_per_weight(q: QuantizedWeight) -> float:
  """Stored bytes (codes and every scale array) per weight of the kernel it replaces."""
  stored = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(q))
  return stored / int(np.prod(q.shape))
