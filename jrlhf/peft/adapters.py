"""Bottleneck adapters (Houlsby, Pfeiffer) and IA3, as kernel wrappers around a projection.

Each method replaces a `kernel` leaf of the param tree with a leaf type whose handler in
`layers.KERNEL_HANDLERS` computes the wrapped projection; the model code never changes.

  params = add_adapters(params, jax.random.key(0), "houlsby")  # after attn/o and mlp/down
  params = add_ia3(params)                                     # scales on k, v and down's input
  mask = trainable_mask(params)                                # True on adapter arrays only
  params_sh = shardings_like(params, plain_params_sh)          # adapters follow their kernel

Serial adapter on a projection y = x W (+ b):  y + s * (f((y + b) D + d) U + u),  with
D: (out, R), U: (R, out), R = out // reduction_factor, U and u zero so training starts at the
base model. `Dense` adds b after the handler, so the handler keeps a frozen copy of b
(`base_bias`) to feed the adapter the projection's full output, as Houlsby et al. do.

IA3 (Liu et al. 2022): a learned vector l (init 1) scales the projection's output (k, v:
`on="out"`, as peft scales the whole output, bias included) or its input (mlp/down: `on="in"`).
IA3 merges exactly into the kernel (`merge_ia3`); a bottleneck adapter is nonlinear and cannot.

Parallel adapter (He et al. 2022, "beside the MLP"): mlp_out(x) + s * (f(x D + d) U + u) with x
the MLP input, D: (hidden, R), R = hidden // reduction_factor. No kernel of the MLP both sees x
and writes the MLP output, so it is a D -> D "kernel" leaf of its own, `mlp/parallel`, that the
MLP adds when present (the hook in `jrlhf.models.transformer.MLP`).

Arrays of a leaf under `layers/` carry the leading layer axis, like the kernel they wrap (nn.scan
slices every leaf on axis 0). Trees are unboxed (`nn.unbox`) param trees.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jrlhf.models import layers
from jrlhf.peft import spec as spec_lib

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
}

# REFERENCE.md: Houlsby after attention and after the MLP (reduction 16, swish); Pfeiffer
# after the MLP only (reduction 16, relu). Patterns match '/'-joined param paths.
ADAPTER_PRESETS: dict[str, dict[str, Any]] = {
    "houlsby": dict(targets=(r"(^|/)attn/o/kernel$", r"(^|/)mlp/down/kernel$"),
                    reduction_factor=16, activation="swish", scale=1.0),
    "pfeiffer": dict(targets=(r"(^|/)mlp/down/kernel$",), reduction_factor=16,
                     activation="relu", scale=1.0),
    # He et al.: beside the MLP, scale 4 (REFERENCE.md); `targets` do not apply.
    "parallel": dict(targets=(), reduction_factor=2, activation="relu", scale=4.0),
}
# IA3 for decoders, as peft's defaults for Llama: k and v scaled on the output, the MLP
# down-projection on its input (the "feedforward" module).
IA3_TARGETS: dict[str, str] = {
    r"(^|/)attn/k/kernel$": "out",
    r"(^|/)attn/v/kernel$": "out",
    r"(^|/)mlp/down/kernel$": "in",
}

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterWeight:
  """Serial bottleneck adapter after the projection `base` (any kernel leaf type).

  `base` stays the first field: Flax's shape check on a stored `kernel` compares the first leaf.
  """

  base: Any  # (..., in, out)
  base_bias: Array  # (..., out) frozen copy of the projection's bias (zeros when it has none)
  down: Array  # (..., out, R)
  down_bias: Array  # (..., R)
  up: Array  # (..., R, out)
  up_bias: Array  # (..., out)
  scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  activation: str = dataclasses.field(default="relu", metadata=dict(static=True))
  # Read by `trainable_mask` and by lora.split_trainable: the base and its bias copy are frozen.
  trainable_fields = ("down", "down_bias", "up", "up_bias")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ia3Weight:
  """IA3: `base` with its input (`on="in"`) or output (`on="out"`) scaled by `scale_vector`."""

  base: Any  # (..., in, out)
  base_bias: Array  # (..., out) frozen copy of the projection's bias, used with on="out"
  scale_vector: Array  # (..., in) or (..., out)
  on: str = dataclasses.field(default="out", metadata=dict(static=True))
  trainable_fields = ("scale_vector",)


def adapter_matmul(x_BxLxI: Array, w: AdapterWeight, dtype) -> Array:
  y_BxLxO = layers.matmul(x_BxLxI, w.base, dtype)
  h_BxLxO = y_BxLxO + w.base_bias.astype(dtype)
  z_BxLxR = ACTIVATIONS[w.activation](
      layers.matmul(h_BxLxO, w.down, dtype) + w.down_bias.astype(dtype))
  return y_BxLxO + w.scale * (layers.matmul(z_BxLxR, w.up, dtype) + w.up_bias.astype(dtype))


def ia3_matmul(x_BxLxI: Array, w: Ia3Weight, dtype) -> Array:
  if w.on == "in":
    return layers.matmul(x_BxLxI.astype(dtype) * w.scale_vector.astype(dtype), w.base, dtype)
  # (x W + b) l - b: `Dense` adds b afterwards, so the bias is scaled too, as in peft.
  bias = w.base_bias.astype(dtype)
  vec = w.scale_vector.astype(dtype)
  return (layers.matmul(x_BxLxI, w.base, dtype) + bias) * vec - bias


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ParallelAdapterWeight:
  """Parallel adapter: x -> s * (f(x D + d) U + u), added to the MLP's output by the model."""

  down: Array  # (..., D, R)
  down_bias: Array  # (..., R)
  up: Array  # (..., R, D)
  up_bias: Array  # (..., D)
  scale: float = dataclasses.field(default=4.0, metadata=dict(static=True))
  activation: str = dataclasses.field(default="relu", metadata=dict(static=True))
  trainable_fields = ("down", "down_bias", "up", "up_bias")


def parallel_matmul(x_BxLxD: Array, w: ParallelAdapterWeight, dtype) -> Array:
  z_BxLxR = ACTIVATIONS[w.activation](
      layers.matmul(x_BxLxD, w.down, dtype) + w.down_bias.astype(dtype))
  return w.scale * (layers.matmul(z_BxLxR, w.up, dtype) + w.up_bias.astype(dtype))


layers.KERNEL_HANDLERS[AdapterWeight] = adapter_matmul
layers.KERNEL_HANDLERS[ParallelAdapterWeight] = parallel_matmul
layers.KERNEL_HANDLERS[Ia3Weight] = ia3_matmul



# ---------------------------------------------------------------------------------------------
# Tree transforms.


def _kernel_shape(kernel: Any) -> tuple[int, ...]:
  shape = getattr(kernel, "shape", None)
  if shape is None:  # a wrapper leaf: its base has the kernel's shape
    return _kernel_shape(kernel.base)
  return tuple(shape)


def _kernel_dtype(kernel: Any):
  return kernel.dtype if hasattr(kernel, "dtype") else _kernel_dtype(kernel.base)


def _check_patterns(params: dict, patterns) -> None:
  paths = spec_lib.kernel_paths(params)
  for pattern in patterns:
    if not any(re.search(pattern, p) for p in paths):
      raise ValueError(f"target {pattern!r} matches no kernel; kernels are: {', '.join(paths)}")


def _map_kernels(params: dict, fn: Callable[[str, Any, Any], Any], prefix: str = "") -> dict:
  """Rebuilds the tree with fn(path, kernel, bias or None) in place of every `kernel`."""
  out = {}
  for key, value in params.items():
    path = f"{prefix}{key}"
    if key == "kernel":
      out[key] = fn(path, value, params.get("bias"))
    elif isinstance(value, dict):
      out[key] = _map_kernels(value, fn, path + "/")
    else:
      out[key] = value
  return out


def _frozen_bias(kernel, bias, dtype) -> Array:
  shape = _kernel_shape(kernel)
  if bias is None:
    return jnp.zeros((*shape[:-2], shape[-1]), dtype)
  return jnp.asarray(bias)


def add_adapters(params: dict, rng: Array, method: str = "houlsby", *,
                 targets=None, reduction_factor: int | None = None,
                 activation: str | None = None, scale: float | None = None,
                 init_std: float = 1e-2) -> dict:
  """Wraps each targeted kernel in an `AdapterWeight`; preset defaults from `ADAPTER_PRESETS`.

  D ~ N(0, init_std) (Houlsby et al. use 1e-2), U and both biases zero: the start is the base.
  """
  if method not in ADAPTER_PRESETS:
    raise ValueError(f"adapter method {method!r} is not one of {sorted(ADAPTER_PRESETS)}")
  preset = ADAPTER_PRESETS[method]
  targets = tuple(preset["targets"] if targets is None else targets)
  reduction_factor = reduction_factor or preset["reduction_factor"]
  activation = activation or preset["activation"]
  scale = preset["scale"] if scale is None else scale
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
  if method == "parallel":
    return _add_parallel(params, rng, reduction_factor, activation, float(scale), init_std)
  _check_patterns(params, targets)
  counter = iter(range(1 << 30))

  def wrap(path, kernel, bias):
    if not any(re.search(p, path) for p in targets):
      return kernel
    shape = _kernel_shape(kernel)
    lead, out = shape[:-2], shape[-1]
    rank = max(1, out // reduction_factor)
    dtype = _kernel_dtype(kernel)
    key = jax.random.fold_in(rng, next(counter))
    return AdapterWeight(
        base=kernel, base_bias=_frozen_bias(kernel, bias, dtype),
        down=(init_std * jax.random.normal(key, (*lead, out, rank))).astype(dtype),
        down_bias=jnp.zeros((*lead, rank), dtype), up=jnp.zeros((*lead, rank, out), dtype),
        up_bias=jnp.zeros((*lead, out), dtype), scale=float(scale), activation=activation)

  return _map_kernels(params, wrap)


def _add_parallel(params: dict, rng: Array, reduction_factor: int, activation: str,
                  scale: float, init_std: float) -> dict:
  """`layers/mlp/parallel` beside the MLP of every layer (D ~ N(0, init_std), U = u = 0)."""
  mlp = params.get("layers", {}).get("mlp")
  if mlp is None or "down" not in mlp:
    raise ValueError("a parallel adapter needs the scanned `layers/mlp` of a Transformer tree")
  shape = _kernel_shape(mlp["down"]["kernel"])
  lead, hidden, dtype = shape[:-2], shape[-1], _kernel_dtype(mlp["down"]["kernel"])
  rank = max(1, hidden // reduction_factor)
  adapter = ParallelAdapterWeight(
      down=(init_std * jax.random.normal(rng, (*lead, hidden, rank))).astype(dtype),
      down_bias=jnp.zeros((*lead, rank), dtype), up=jnp.zeros((*lead, rank, hidden), dtype),
      up_bias=jnp.zeros((*lead, hidden), dtype), scale=scale, activation=activation)
  return {**params, "layers": {**params["layers"], "mlp": {**mlp, "parallel": adapter}}}


def add_ia3(params: dict, targets: dict[str, str] | None = None) -> dict:
  """Wraps each targeted kernel in an `Ia3Weight` with scales of 1 (the identity)."""
  targets = IA3_TARGETS if targets is None else targets
  for pattern, on in targets.items():
    if on not in ("in", "out"):
      raise ValueError(f"IA3 target {pattern!r}: on={on!r} is not 'in' or 'out'")
  _check_patterns(params, targets)

  def wrap(path, kernel, bias):
    ons = [on for pattern, on in targets.items() if re.search(pattern, path)]
    if not ons:
      return kernel
    shape = _kernel_shape(kernel)
    dim = shape[-2] if ons[0] == "in" else shape[-1]
    dtype = _kernel_dtype(kernel)
    return Ia3Weight(base=kernel, base_bias=_frozen_bias(kernel, bias, dtype),
                     scale_vector=jnp.ones((*shape[:-2], dim), dtype), on=ons[0])

  return _map_kernels(params, wrap)


def _is_wrapper(x) -> bool:
  return isinstance(x, (AdapterWeight, Ia3Weight, ParallelAdapterWeight))


def merge_ia3(params: dict) -> dict:
  """Plain kernels in place of `Ia3Weight`s (exact: a diagonal scale folds into W and b is
  unchanged for on="in"; for on="out" the bias is scaled too, so the bias leaf is rewritten)."""

  def merge_dict(tree: dict) -> dict:
    out = {}
    for key, value in tree.items():
      if isinstance(value, Ia3Weight):
        if not hasattr(value.base, "shape"):
          raise ValueError(f"cannot merge IA3 into a {type(value.base).__name__} kernel")
        vec = value.scale_vector
        if value.on == "in":
          out[key] = value.base * vec[..., :, None]
        else:
          out[key] = value.base * vec[..., None, :]
          if "bias" in tree:
            out["bias"] = tree["bias"] * vec
      elif isinstance(value, dict):
        out[key] = merge_dict(value)
      elif key not in out:
        out[key] = value
    return out

  return merge_dict(params)


def trainable_mask(params: dict) -> Any:
  """Same structure as `params` with True on adapter/IA3 arrays and False elsewhere (the base,
  its frozen bias copy, every other param), for `optax.masked`. A wrapper around a wrapper
  (IA3 over a Houlsby adapter) trains both."""

  def mask(leaf):
    if not _is_wrapper(leaf):
      return jax.tree.map(lambda _: False, leaf)
    flags = {}
    for f in dataclasses.fields(leaf):
      value = getattr(leaf, f.name)
      if f.metadata.get("static"):
        continue
      if _is_wrapper(value):
        flags[f.name] = mask(value)
      else:
        train = f.name in type(leaf).trainable_fields
        flags[f.name] = jax.tree.map(lambda _, t=train: t, value)
    return dataclasses.replace(leaf, **flags)

  return jax.tree.map(mask, params, is_leaf=_is_wrapper)


def shardings_like(params: dict, base_sh: Any) -> Any:
  """Shardings for a wrapped tree from those of the tree before wrapping (plain, or e.g. from
  quant.shardings_like): `base` keeps its own; the adapter arrays take the kernel's leading
  (layer) axes and its output axis (its input axis for IA3 "in"), the bottleneck R replicated.
  A dim the mesh axes do not divide is replicated instead."""

  def kernel_spec(sh) -> tuple:
    first = sh if isinstance(sh, NamedSharding) else jax.tree.leaves(sh)[0]
    return first.mesh, tuple(first.spec)

  def like(leaf, sh):
    if not _is_wrapper(leaf):
      return sh
    if isinstance(leaf, ParallelAdapterWeight):  # sh: mlp/down's, whose output is `hidden`
      mesh, spec = kernel_spec(sh)
      spec = spec + (None,) * (leaf.down.ndim - len(spec))
      lead, hid = spec[:-2], spec[-1]
      return dataclasses.replace(
          leaf, down=fit(mesh, leaf.down, (*lead, hid, None)),
          down_bias=fit(mesh, leaf.down_bias, (*lead, None)),
          up=fit(mesh, leaf.up, (*lead, None, hid)), up_bias=fit(mesh, leaf.up_bias, (*lead, hid)))
    base_tree = like(leaf.base, sh) if _is_wrapper(leaf.base) else sh
    mesh, spec = kernel_spec(sh)
    ndim = len(_kernel_shape(leaf.base))
    spec = spec + (None,) * (ndim - len(spec))
    lead, in_ax, out_ax = spec[:-2], spec[-2], spec[-1]

    if isinstance(leaf, Ia3Weight):
      vec_ax = in_ax if leaf.on == "in" else out_ax
      return dataclasses.replace(leaf, base=base_tree,
                                 base_bias=fit(mesh, leaf.base_bias, (*lead, out_ax)),
                                 scale_vector=fit(mesh, leaf.scale_vector, (*lead, vec_ax)))
    return dataclasses.replace(
        leaf, base=base_tree, base_bias=fit(mesh, leaf.base_bias, (*lead, out_ax)),
        down=fit(mesh, leaf.down, (*lead, out_ax, None)),
        down_bias=fit(mesh, leaf.down_bias, (*lead, None)),
        up=fit(mesh, leaf.up, (*lead, None, out_ax)),
        up_bias=fit(mesh, leaf.up_bias, (*lead, out_ax)))

  mlp = params.get("layers", {}).get("mlp", {})
  if "parallel" in mlp and "parallel" not in base_sh["layers"]["mlp"]:
    # The parallel adapter has no kernel of its own in the plain tree; it writes the MLP's
    # output, so it takes the down-projection's sharding as its template.
    sh_mlp = base_sh["layers"]["mlp"]
    down_sh = sh_mlp["down"]["kernel"]
    down_sh = down_sh if isinstance(down_sh, NamedSharding) else jax.tree.leaves(down_sh)[0]
    base_sh = {**base_sh, "layers": {**base_sh["layers"], "mlp": {**sh_mlp, "parallel": down_sh}}}
  return jax.tree.map(like, params, base_sh, is_leaf=_is_wrapper)


def fit(mesh, a, axes) -> NamedSharding:
  """NamedSharding of `a` over `axes`, replicating any dim the mesh axes do not divide."""
  size = lambda ax: 1 if ax is None else int(np.prod(  # noqa: E731
      [mesh.shape[n] for n in ((ax,) if isinstance(ax, str) else ax)]))
  return NamedSharding(mesh, PartitionSpec(
      *[ax if d % size(ax) == 0 else None for ax, d in zip(axes, a.shape)]))
