"""Read and write Hugging Face checkpoints (config.json + safetensors) for supported families.

Only safetensors are read: pickled `.bin` checkpoints can run arbitrary code on load.

    model, params = from_pretrained("meta-llama/Llama-3.2-1B", dtype="bfloat16")
    save_pretrained("out/", model, params)   # loads with AutoModelForCausalLM.from_pretrained
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jrlhf.models.config import ModelConfig
from jrlhf.models.hf_config import config_from_hf, config_to_hf
from jrlhf.models.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One param leaf <- one HF tensor (per layer when `hf` contains `{i}`).

  `transpose`: HF nn.Linear stores (out, in), our kernels are (in, out). `part`: GPT-2 fuses
  q, k, v into one Conv1D; this leaf is chunk `part` of 3 along the output axis.
  """

  path: tuple[str, ...]
  hf: str
  transpose: bool = False
  part: int | None = None


def weight_map(cfg: ModelConfig, head: str = "lm", prefix: str | None = None) -> list[Tensor]:
  if cfg.is_gpt2:
    p = "transformer." if prefix is None else prefix
    layer = p + "h.{i}."
    out = [Tensor(("embed",), p + "wte.weight"), Tensor(("pos_embed",), p + "wpe.weight")]
    for name, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      out += [Tensor(("layers", name, "scale"), layer + hf + ".weight"),
              Tensor(("layers", name, "bias"), layer + hf + ".bias")]
    for part, name in enumerate("qkv"):
      out += [Tensor(("layers", "attn", name, "kernel"), layer + "attn.c_attn.weight", part=part),
              Tensor(("layers", "attn", name, "bias"), layer + "attn.c_attn.bias", part=part)]
    for path, hf in ((("attn", "o"), "attn.c_proj"), (("mlp", "up"), "mlp.c_fc"),
                     (("mlp", "down"), "mlp.c_proj")):
      out += [Tensor(("layers", *path, "kernel"), layer + hf + ".weight"),
              Tensor(("layers", *path, "bias"), layer + hf + ".bias")]
    out += [Tensor(("final_norm", "scale"), p + "ln_f.weight"),
            Tensor(("final_norm", "bias"), p + "ln_f.bias")]
  else:
    p = "model." if prefix is None else prefix
    layer = p + "layers.{i}."
    out = [Tensor(("embed",), p + "embed_tokens.weight"),
           Tensor(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight"),
           Tensor(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight"),
           Tensor(("final_norm", "scale"), p + "norm.weight")]
    projections = [("attn", n, f"self_attn.{n}_proj", cfg.attention_bias) for n in "qkv"]
    projections += [("attn", "o", "self_attn.o_proj", cfg.attention_out_bias)]
    projections += [("mlp", n, f"mlp.{n}_proj", cfg.mlp_bias) for n in ("gate", "up", "down")]
    for block, name, hf, bias in projections:
      out.append(Tensor(("layers", block, name, "kernel"), layer + hf + ".weight", transpose=True))
      if bias:
        out.append(Tensor(("layers", block, name, "bias"), layer + hf + ".bias"))
    if cfg.qk_norm:
      out += [Tensor(("layers", "attn", "q_norm", "scale"), layer + "self_attn.q_norm.weight"),
              Tensor(("layers", "attn", "k_norm", "scale"), layer + "self_attn.k_norm.weight")]
  if head == "scalar":
    out.append(Tensor(("score", "kernel"), "score.weight", transpose=True))
  elif not cfg.tie_embeddings:
    out.append(Tensor(("lm_head", "kernel"), "lm_head.weight", transpose=True))
  return out


def abstract_params(model: Transformer) -> dict[str, Any]:
  """Param shapes and dtypes, computed without allocating anything."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  return nn.unbox(boxed)


# ---------------------------------------------------------------------------------------------
# Reading.


def read_hf_config(path_or_hub_id: str | os.PathLike) -> dict[str, Any]:
  """A checkpoint's parsed config.json (from the hub: that file alone, no weights)."""
  return json.loads((_resolve(path_or_hub_id, weights=False) / "config.json").read_text())


def _resolve(path_or_hub_id: str | os.PathLike, weights: bool = True) -> Path:
  path = Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.exists() or str(path_or_hub_id).startswith((".", "/", "~")):
    raise FileNotFoundError(f"{path} is not a checkpoint directory (expected config.json and "
                            "*.safetensors inside)")
  import huggingface_hub  # noqa: PLC0415

  try:
    return Path(huggingface_hub.snapshot_download(
        str(path_or_hub_id),
        allow_patterns=["config.json", *(("*.safetensors", INDEX_FILE) if weights else ())]))
  except Exception as e:  # offline, unknown repo, gated model, network: one actionable message
    raise FileNotFoundError(
        f"{path_or_hub_id!r} is not a local directory and could not be fetched from the hub "
        f"({type(e).__name__}: {str(e).splitlines()[0]}). Pass a checkpoint directory, or check "
        "the hub id, your network and HF_TOKEN for gated models.") from e


class _Checkpoint:
  """Lazy access to every tensor of a single-file or sharded safetensors checkpoint."""

  def __init__(self, directory: Path):
    index = directory / INDEX_FILE
    if index.exists():
      weight_map_ = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map_.values()))
    elif (directory / SINGLE_FILE).exists():
      files = [SINGLE_FILE]
    else:
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(
          f"{directory} has no {SINGLE_FILE} or {INDEX_FILE} (found: {found}). jrlhf reads only "
          "safetensors; convert a .bin checkpoint with transformers' save_pretrained("
          "safe_serialization=True) first.")
    self._handles = {f: safetensors.safe_open(directory / f, framework="np") for f in files}
    self.file_of = {name: f for f, h in self._handles.items() for name in h.keys()}

  def get(self, name: str) -> np.ndarray:
    return self._handles[self.file_of[name]].get_tensor(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())


def _hf_shape(t: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that yields a leaf of `shape` (per layer)."""
  if t.part is not None:
    shape = shape[:-1] + (shape[-1] * 3,)
  return shape[::-1] if t.transpose else shape


def _to_leaf(t: Tensor, array: np.ndarray) -> np.ndarray:
  if t.part is not None:
    array = np.split(array, 3, axis=-1)[t.part]
  return array.T if t.transpose else array


def _get_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set_path(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


class _StateDict:
  """A name -> numpy array dict (e.g. a torch state_dict converted) as a checkpoint."""

  def __init__(self, tensors: dict[str, np.ndarray]):
    self.tensors, self.file_of = tensors, dict.fromkeys(tensors, "state_dict")

  def get(self, name: str) -> np.ndarray:
    return np.asarray(self.tensors[name])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.tensors[name].shape)


def params_from_state_dict(tensors: dict[str, np.ndarray], model: Transformer) -> dict[str, Any]:
  """Host param tree from HF tensor names -> arrays; the inverse of `hf_state_dict`."""
  return load_params(_StateDict(tensors), model, "state_dict")


def load_params(directory: Path | _StateDict, model: Transformer,
                where: str | None = None) -> dict[str, Any]:
  """Host (numpy) param tree from a checkpoint, checked tensor by tensor against the model."""
  cfg = model.cfg
  ckpt = directory if isinstance(directory, _StateDict) else _Checkpoint(directory)
  directory = where or directory
  prefix = None
  if cfg.is_gpt2 and "wte.weight" in ckpt.file_of:
    prefix = ""  # the original openai-community checkpoints have no "transformer." prefix
  expected = abstract_params(model)
  dtype = jnp.dtype(cfg.param_dtype)
  params: dict[str, Any] = {}
  used = set()
  for t in weight_map(cfg, model.head, prefix):
    leaf = _get_path(expected, t.path)
    stacked = "{i}" in t.hf
    names = [t.hf.format(i=i) for i in range(cfg.num_layers)] if stacked else [t.hf]
    want = _hf_shape(t, leaf.shape[1:] if stacked else leaf.shape)
    arrays = []
    for name in names:
      if name not in ckpt.file_of:
        raise ValueError(f"{directory}: tensor {name} is missing (expected shape {want}); is this "
                         f"a {cfg.family} checkpoint with {model.head!r} head?")
      found = ckpt.shape(name)
      if found != want:
        raise ValueError(f"{directory}: tensor {name} has shape {found}, expected {want} from "
                         "config.json; the config and weights disagree")
      arrays.append(_to_leaf(t, ckpt.get(name)).astype(dtype))
      used.add(name)
    _set_path(params, t.path, np.stack(arrays) if stacked else arrays[0])
  unexpected = sorted(n for n in ckpt.file_of if n not in used and not n.endswith(
      _IGNORED_SUFFIXES) and not (n == "lm_head.weight" and cfg.tie_embeddings))
  if unexpected:
    raise ValueError(f"{directory}: {len(unexpected)} tensors that a {cfg.family} model with "
                     f"{model.head!r} head does not have, e.g. {unexpected[:5]}")
  return params


def from_pretrained(path_or_hub_id: str | os.PathLike, dtype: Any = "float32", *,
                    compute_dtype: Any = None, head: str = "lm", mesh=None, rules=None,
                    **overrides) -> tuple[Transformer, dict[str, Any]]:
  """(model, params) from a local HF checkpoint directory or a hub id.

  `dtype` is the parameter dtype, `compute_dtype` the matmul dtype (default: `dtype`).
  With `mesh`, each leaf is placed sharded by the logical-axis rules (each host reads only the
  slices it owns); `overrides` set other ModelConfig fields (`remat="full"`, ...).
  """
  directory = _resolve(path_or_hub_id)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{directory} has no config.json")
  param_dtype = jnp.dtype(dtype).name
  cfg = config_from_hf(json.loads(config_path.read_text()), param_dtype=param_dtype,
                       dtype=jnp.dtype(compute_dtype or dtype).name, **overrides)
  model = Transformer(cfg, head=head)
  host = load_params(directory, model)
  if mesh is None:
    return model, jax.tree.map(jnp.asarray, host)
  from jrlhf.sharding import param_shardings  # noqa: PLC0415 - sharding sits above models

  rules_kw = {} if rules is None else {"rules": rules}
  shardings = param_shardings(model, jnp.zeros((1, 1), jnp.int32), mesh=mesh, **rules_kw)
  params = jax.tree.map(
      lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]), host, shardings)
  return model, params


# ---------------------------------------------------------------------------------------------
# Writing.


def _host(leaf) -> np.ndarray:
  if not isinstance(leaf, (jax.Array, np.ndarray)):
    raise TypeError(f"cannot export a {type(leaf).__name__} leaf; merge PEFT weights into plain "
                    "arrays first")
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(leaf)


def hf_state_dict(model: Transformer, params: dict[str, Any]) -> dict[str, np.ndarray]:
  """HF tensor name -> numpy array, the inverse of `load_params`."""
  cfg = model.cfg
  fused: dict[str, list] = {}
  out: dict[str, np.ndarray] = {}
  for t in weight_map(cfg, model.head):
    leaf = _host(_get_path(params, t.path))
    stacked = "{i}" in t.hf
    for i in range(cfg.num_layers if stacked else 1):
      array = leaf[i] if stacked else leaf
      array = array.T if t.transpose else array
      name = t.hf.format(i=i)
      if t.part is None:
        out[name] = np.ascontiguousarray(array)
      else:
        fused.setdefault(name, [None] * 3)[t.part] = array
  for name, parts in fused.items():
    out[name] = np.ascontiguousarray(np.concatenate(parts, axis=-1))
  return out


def save_pretrained(path: str | os.PathLike, model: Transformer, params: dict[str, Any], *,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
  """Write config.json + safetensors (sharded with an index past `max_shard_bytes`)."""
  directory = Path(path)
  tensors = hf_state_dict(model, params)
  config = config_to_hf(model.cfg, model.head)
  if jax.process_index() != 0:
    return directory
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if size and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  metadata = {"format": "pt"}  # transformers refuses safetensors without this tag
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], directory / SINGLE_FILE, metadata=metadata)
    return directory
  weight_map_ = {}
  for k, shard in enumerate(shards):
    name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, directory / name, metadata=metadata)
    weight_map_.update(dict.fromkeys(shard, name))
  index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
           "weight_map": weight_map_}
  (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return directory
