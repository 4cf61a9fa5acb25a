"""Logical axis names -> mesh axes, and params created directly in their sharded layout.

Model code names every param dimension (`nn.with_logical_partitioning`) and a few activations
(`nn.with_logical_constraint`); `DEFAULT_RULES` is the one table that maps those names onto the
mesh. Typical use:

  mesh = make_mesh(MeshConfig(data=2))
  params, params_sh = init_sharded(model, jax.random.key(0), tokens_BxL, mesh=mesh)
  with sharding_context(mesh):
    logits_BxLxV = jax.jit(model.apply)({"params": params}, tokens_BxL)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jrlhf.sharding.mesh import BATCH_AXES

# Flax's format: (logical name, mesh axes) pairs, first match wins. Every logical name the model
# uses must appear here (None = replicated) so that a typo is an error, not silent replication.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    # The residual stream stays whole on each device: splitting it over `tensor` would need an
    # all-gather before every projection, which costs more than it saves at these sizes.
    ("embed_act", None),
    ("length", None),
    ("norm", None),
    ("head_dim", None),
    ("layers", None),
    ("rank", None),
)

Rules = tuple[tuple[str, Any], ...]


def _is_spec(x) -> bool:
  return x is None or isinstance(x, PartitionSpec)


def _axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[name] for name in names)


def _check_known(path, logical: PartitionSpec, rules: Rules) -> None:
  known = {name for name, _ in rules}
  unknown = [name for name in logical if isinstance(name, str) and name not in known]
  if unknown:
    raise ValueError(
        f"param {jax.tree_util.keystr(path)} has logical axis names {unknown} that the sharding "
        f"rules do not mention (known: {sorted(known)}); add them to the rules table, mapped to "
        f"a mesh axis or to None for replicated")


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                        shapes: Any = None) -> Any:
  """Pytree of logical PartitionSpecs (from `nn.get_partition_spec`) -> pytree of NamedSharding.

  With `shapes` (a matching pytree of ShapeDtypeStruct), a dimension whose size is not a multiple
  of its mesh axes' size is replicated instead. Tiny test models and some real ones (odd MLP
  widths, vocabularies like 50257) have such dims, and jit rejects an uneven out_sharding; the
  cost is memory on that one param, not a failed run.
  """
  def one(path, logical, shape=None):
    if logical is None:
      return NamedSharding(mesh, PartitionSpec())
    _check_known(path, logical, rules)
    axes = list(nn.logical_to_mesh_axes(logical, rules))
    if shape is not None:
      axes = [a if dim % _axes_size(mesh, a) == 0 else None for a, dim in zip(axes, shape.shape)]
    return NamedSharding(mesh, PartitionSpec(*axes))

  if shapes is None:
    return jax.tree_util.tree_map_with_path(one, logical_tree, is_leaf=_is_spec)
  return jax.tree_util.tree_map_with_path(one, logical_tree, shapes, is_leaf=_is_spec)


def unbox(tree: Any) -> Any:
  """Strips Flax partitioning boxes without the sharding constraint `nn.unbox` adds under a
  mesh: out_shardings already pin the layout (with the divisibility fallback the box knows
  nothing of), and that constraint fails when init runs inside `sharding_context`."""
  def strip(x):
    return x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x.unbox()
  return meta.map_axis_meta(lambda x: unbox(strip(x)), tree)


def _abstract_shardings(abstract_vars: Any, mesh: Mesh, rules: Rules) -> Any:
  boxed = abstract_vars["params"]
  return logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules, shapes=unbox(boxed))


def param_shardings(model: nn.Module, *init_args, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedSharding for every leaf of `model.init(...)["params"]`, computed from shapes only.

  For loaders that place existing (e.g. HF) weights straight onto the mesh.
  """
  abstract = jax.eval_shape(model.init, jax.random.key(0), *init_args)
  return _abstract_shardings(abstract, mesh, rules)


def init_sharded(model: nn.Module, rng, *init_args, mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> tuple[Any, Any]:
  """(params, shardings): plain param dicts created on the mesh, never whole on one device."""
  abstract = jax.eval_shape(model.init, rng, *init_args)
  shardings = _abstract_shardings(abstract, mesh, rules)
  init = jax.jit(lambda rng: unbox(model.init(rng, *init_args)["params"]),
                 out_shardings=shardings)
  return init(rng), shardings


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Makes `mesh` and `rules` visible to `nn.with_logical_constraint` inside traced code.

  Flax reads the mesh from `jax.sharding.get_abstract_mesh()`, which `jax.set_mesh` sets and
  the legacy `with mesh:` no longer does; without it the activation constraints are no-ops.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
