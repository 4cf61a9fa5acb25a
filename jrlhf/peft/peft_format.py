"""LoRA adapters in the `peft` library's on-disk format (adapter_config.json +
adapter_model.safetensors), so adapters move both ways between jrlhf and PEFT.

    params = load_peft_adapter("some/adapter", params)          # PEFT-trained -> LoraWeight leaves
    save_peft_adapter("out/adapter", params, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    # PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(...), "out/adapter")

Keys are `base_model.model.<HF module>.lora_A.weight` (R, in) and `...lora_B.weight` (out, R);
HF module names come from `jrlhf.models.hf.weight_map`, the same table the checkpoint loader
uses. Our scale is one float per leaf, written as lora_alpha = scale * R (use_rslora false), which
PEFT turns back into the same scale; per-module ranks/alphas go in rank_pattern/alpha_pattern.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jrlhf.models.config import ModelConfig
from jrlhf.models.hf import Tensor, _get_path, _host, weight_map
from jrlhf.peft import spec as spec_lib
from jrlhf.peft.lora import LoraWeight

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_BASE_SUFFIX = ".base_layer.weight"
_KEY = re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")  # optional adapter name


def _projections(params: Any, model=None) -> dict[str, Tensor]:
  """Our kernel path -> its HF tensor. Without `model`, the family is read off the tree (only
  the kernel names matter here, and those depend on the family alone)."""
  if model is not None:
    cfg, head = model.cfg, model.head
  else:
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    cfg = ModelConfig(family="gpt2" if "pos_embed" in params else "llama", num_layers=num_layers,
                      tie_embeddings="lm_head" not in params)
    head = "scalar" if "score" in params else "lm"
  return {"/".join(t.path): t for t in weight_map(cfg, head)
          if t.path[-1] == "kernel" and t.hf.endswith(".weight")}


def _module(t: Tensor) -> str:
  return t.hf[:-len(".weight")]


def _pattern_key(t: Tensor) -> str:
  """The module name without its layer prefix ("self_attn.q_proj"): one key for all layers."""
  return _module(t).split("{i}.", 1)[-1]


def _peft_pattern(patterns: dict[str, Any], module: str, default):
  """PEFT's get_pattern_key: a key matches a module name that ends with it at a '.' boundary."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def save_peft_adapter(directory: str | Path, params: Any, base_model_name_or_path: str = "", *,
                      model=None) -> Path:
  """Write every LoraWeight of `params` as a PEFT LoRA adapter for `base_model_name_or_path`
  (recorded in adapter_config.json, as PEFT does). The family and head are read off the tree
  unless `model` is given."""
  directory = Path(directory)
  projections = _projections(params, model)
  flat = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, LoraWeight))[0]
  loras = {spec_lib.path_str(kp): w for kp, w in flat if isinstance(w, LoraWeight)}
  if not loras:
    raise ValueError("params hold no LoraWeight leaves; wrap them with jrlhf.peft.lora.wrap")
  tensors: dict[str, np.ndarray] = {}
  modules: dict[str, tuple[int, float]] = {}
  for path, w in loras.items():
    t = projections.get(path)
    if t is None or t.part is not None:
      raise ValueError(f"{path}: no single HF module to attach a PEFT LoRA to (GPT-2 fuses "
                       "q, k and v into c_attn; target all three through merge instead)")
    a, b = _host(w.a), _host(w.b)
    stacked = "{i}" in t.hf
    for i in range(a.shape[0] if stacked else 1):
      name = PREFIX + _module(t).format(i=i)
      tensors[name + ".lora_A.weight"] = np.ascontiguousarray((a[i] if stacked else a).T)
      tensors[name + ".lora_B.weight"] = np.ascontiguousarray((b[i] if stacked else b).T)
    rank = a.shape[-1]
    modules[_pattern_key(t)] = (rank, float(w.scale * rank))
  rank, alpha = collections.Counter(modules.values()).most_common(1)[0][0]
  is_lm = model.head == "lm" if model is not None else "score" not in params
  is_gpt2 = model.cfg.is_gpt2 if model is not None else "pos_embed" in params
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM" if is_lm else "SEQ_CLS",
      "base_model_name_or_path": base_model_name_or_path, "r": rank, "lora_alpha": alpha,
      "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
      "use_rslora": False, "use_dora": False, "fan_in_fan_out": is_gpt2,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "rank_pattern": {k: r for k, (r, _) in modules.items() if r != rank},
      "alpha_pattern": {k: al for k, (_, al) in modules.items() if al != alpha},
  }
  if jax.process_index() != 0:
    return directory
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  safetensors.numpy.save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
  return directory


def _read(directory: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
  config = json.loads((directory / CONFIG_FILE).read_text())
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{directory}: peft_type {config.get('peft_type')!r}, only LORA is read")
  unsupported = {k: config.get(k) for k in ("use_dora", "modules_to_save", "bias")
                 if config.get(k) not in (None, False, "none")}
  if unsupported:
    raise ValueError(f"{directory}: adapter options jrlhf cannot represent: {unsupported}")
  by_module: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  for key, array in safetensors.numpy.load_file(directory / WEIGHTS_FILE).items():
    if key.startswith(PREFIX) and key.endswith(_BASE_SUFFIX):
      # PEFT copies a targeted lm_head/embedding whole ("save_embedding_layers"), in case the
      # vocabulary was resized; it must equal our base, which `_check_base` verifies.
      by_module[key[len(PREFIX):-len(_BASE_SUFFIX)]]["base"] = array
      continue
    match = _KEY.match(key)
    if match is None or not key.startswith(PREFIX):
      raise ValueError(f"{directory}: tensor {key} is not a LoRA A/B weight")
    by_module[match.group(1)[len(PREFIX):]][match.group(2)] = array
  return config, by_module


def _check_base(directory, name, saved: np.ndarray, base, stacked: bool, i: int, t: Tensor):
  ours = np.asarray(base[i] if stacked else base, np.float32)
  ours = ours.T if t.transpose else ours
  if saved.shape != ours.shape or not np.allclose(saved.astype(np.float32), ours, atol=1e-3):
    raise ValueError(f"{directory}: the adapter carries its own {name} weight (shape "
                     f"{saved.shape}) that differs from the base model's {ours.shape}; a resized "
                     "vocabulary or a different base model is not supported")


def load_peft_adapter(adapter_dir: str | Path, params: Any, model=None) -> Any:
  """A copy of `params` whose adapted kernels are LoraWeight leaves read from a PEFT adapter.

  Layers an adapter skips (PEFT's layers_to_transform) get A = B = 0, an exact no-op, since
  stacked layers share one leaf. Every tensor must land somewhere: leftovers are an error.
  """
  directory = Path(adapter_dir)
  config, by_module = _read(directory)
  use_rslora = bool(config.get("use_rslora", False))
  rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
  used: set[str] = set()
  replaced: dict[str, LoraWeight] = {}
  for path, t in _projections(params, model).items():
    stacked = "{i}" in t.hf
    base = _get_path(params, t.path)
    count = base.shape[0] if stacked else 1
    names = [_module(t).format(i=i) for i in range(count)]
    found = [n for n in names if n in by_module]
    if not found:
      continue
    if t.part is not None:
      raise ValueError(f"{directory}: LoRA on fused {names[0]} cannot be split into q, k, v")
    used.update(found)
    scales = set()
    for name in found:
      pair = by_module[name]
      if "base" in pair:
        _check_base(directory, name, pair.pop("base"), base, stacked, names.index(name), t)
      if set(pair) != {"A", "B"}:
        raise ValueError(f"{directory}: {name} has lora_{list(pair)} but not both A and B")
      rank = pair["A"].shape[0]
      if _peft_pattern(rank_pattern, name, config["r"]) != rank:
        raise ValueError(f"{directory}: {name} has rank {rank}, the config says otherwise")
      alpha = _peft_pattern(alpha_pattern, name, config["lora_alpha"])
      scales.add((rank, alpha / rank ** 0.5 if use_rslora else alpha / rank))
    if len(scales) != 1:
      raise ValueError(f"{directory}: layers of {path} differ in rank or scale {scales}; "
                       "stacked layers share one")
    (rank, scale), = scales
    dtype = base.dtype if jnp.issubdtype(base.dtype, jnp.floating) else jnp.float32
    fan_in, fan_out = base.shape[-2:]
    a = [by_module[n]["A"].T if n in by_module else np.zeros((fan_in, rank)) for n in names]
    b = [by_module[n]["B"].T if n in by_module else np.zeros((rank, fan_out)) for n in names]
    if a[0].shape != (fan_in, rank) or b[0].shape != (rank, fan_out):
      raise ValueError(f"{directory}: {found[0]} LoRA shapes {by_module[found[0]]['A'].shape}, "
                       f"{by_module[found[0]]['B'].shape} do not fit the base {base.shape}")
    stack = (lambda xs: np.stack(xs)) if stacked else (lambda xs: xs[0])  # noqa: E731
    replaced[path] = LoraWeight(base, jnp.asarray(stack(a), dtype), jnp.asarray(stack(b), dtype),
                                float(scale))
  leftover = sorted(set(by_module) - used)
  if leftover:
    raise ValueError(f"{directory}: LoRA weights for modules this model does not have or "
                     f"jrlhf cannot adapt, e.g. {leftover[:5]}")
  if not replaced:
    raise ValueError(f"{directory}: the adapter holds no LoRA weights")
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: replaced.get(spec_lib.path_str(kp), x), params,
      is_leaf=spec_lib.is_kernel_leaf)
