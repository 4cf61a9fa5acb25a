"""Trainable / frozen halves of a PEFT tree (DESIGN decision 3), and per-step dropout keys.

    trainable, frozen = split_trainable(params, train_regex=r"^prompt/")
    params = combine(trainable, frozen)                  # exact inverse
    frozen = with_dropout_keys(frozen, rng)              # inside a train step only

Both halves keep the full tree structure with None where the other half holds the value, so
`combine` is exact and optax sees only the trainable arrays (None is an empty pytree). Inside a
PEFT leaf (a dataclass registered in `layers.KERNEL_HANDLERS`) the fields named by the class's
`trainable_fields` are trainable; without that attribute, every data field except `base` and
`base_*` (frozen copies, e.g. of a bias) is, and a leaf without `base` (a 4-bit weight) is
frozen whole. Plain arrays are frozen unless their path matches `train_regex`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax

from jrlhf.models import layers
from jrlhf.peft import spec as spec_lib

Array = jax.Array
# Top-level sub-trees the model reads as virtual tokens (prompt tuning) or per-layer KV prefixes.
VIRTUAL_TOKEN_SUBTREES = ("prompt", "prefix")


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
  """(trainable, frozen): PEFT leaves' own weights (LoRA a/b, adapters) and the plain leaves
  whose path matches `train_regex` (prompt embeddings, prefixes) vs everything else."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_peft)
  pairs = [_split_leaf(spec_lib.path_str(kp), leaf, train_regex) for kp, leaf in flat]
  trainable = jax.tree_util.tree_unflatten(treedef, [t for t, _ in pairs])
  frozen = jax.tree_util.tree_unflatten(treedef, [f for _, f in pairs])
  return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
  """The inverse of `split_trainable`; also merges disjoint dicts ({} frozen = full fine-tuning)."""
  if trainable is None or (isinstance(trainable, dict) and not trainable):
    return frozen
  if frozen is None or (isinstance(frozen, dict) and not frozen):
    return trainable
  if isinstance(trainable, dict) and isinstance(frozen, dict):
    return {k: combine(trainable.get(k), frozen.get(k)) for k in {**frozen, **trainable}}
  if _is_peft(trainable) and type(trainable) is type(frozen):
    return dataclasses.replace(trainable, **{
        n: combine(getattr(trainable, n), getattr(frozen, n)) for n in _data_fields(trainable)})
  raise ValueError(
      f"trainable and frozen params overlap on a leaf ({type(trainable).__name__} vs "
      f"{type(frozen).__name__}); each param must live in exactly one of the two trees")


def count(tree: Any) -> int:
  """Number of scalars in a (half) tree; None halves count nothing."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def with_dropout_keys(tree: Any, rng: Array) -> Any:
  """Every PEFT leaf with `dropout > 0` and a `dropout_key` field gets a fresh key per step
  (one per stacked layer, so each layer of a scanned stack draws its own mask; one per path, so
  q and v do too). Leaves without dropout are returned as they are: a run without dropout
  compiles the same program as before."""

  def one(key_path, leaf):
    if not (_is_peft(leaf) and getattr(leaf, "dropout", 0.0) > 0
            and hasattr(leaf, "dropout_key")):
      return leaf
    key = jax.random.fold_in(rng, spec_lib.stable_hash(spec_lib.path_str(key_path)))
    lead = tuple(leaf.base.shape[:-2])
    keys = jax.random.split(key, math.prod(lead)).reshape(*lead, -1) if lead else key
    return dataclasses.replace(leaf, dropout_key=keys)

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_peft)


def base_params(params: Any) -> Any:
  """The base model inside a PEFT tree, sharing its arrays (no copy): every wrapper leaf becomes
  its `base` (a 4-bit base stays 4-bit), added leaves (a parallel adapter) and sub-trees (prompt,
  prefix) are dropped. With PEFT this is the reference model for DPO / PPO KL (DESIGN 3)."""
  def strip(x):
    while _is_peft(x) and "base" in _data_fields(x):
      x = x.base
    return x

  def walk(tree: dict) -> dict:
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = walk(value)
      elif _is_peft(value) and "base" not in _data_fields(value) and (
          set(_trainable_fields(value)) == set(_data_fields(value))):
        continue  # a leaf that only adds (parallel adapter): the base has nothing there
      else:
        out[key] = strip(value)
    return out

  return {k: v for k, v in walk(params).items() if k not in VIRTUAL_TOKEN_SUBTREES}
