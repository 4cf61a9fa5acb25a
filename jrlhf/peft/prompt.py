"""Prompt tuning and prefix tuning / P-tuning v2: trainable sub-trees the model consumes.

    params = prompt.add_prompt(params, rng, model.cfg, 20, init="vocab")    # params["prompt"]
    params = prompt.add_prefix(params, rng, model.cfg, 20, projection=True) # params["prefix"]
    trainable, frozen = peft.split_trainable(params, train_regex=prompt.TRAIN_REGEX)
    params_sh = prompt.shardings_like(params, plain_params_sh, mesh)

Layouts (T virtual tokens; the model reads them in `jrlhf.models.transformer`):
  prompt tuning   {"prompt": {"embeddings": (T, D)}}: virtual token embeddings before the input.
  prefix tuning   {"prefix": {"k": (layers, K, T, Dh), "v": same}}: past keys/values per layer,
                  sized for grouped-query attention (K kv heads), no RoPE applied to them.
  reparameterised {"prefix": {"embedding": (T, E), "w1": (E, H), "b1": (H,),
                  "w2": (H, layers * 2 * K * Dh), "b2": (layers * 2 * K * Dh,)}}: PEFT's
                  `prefix_projection`, tanh(E w1 + b1) w2 + b2; E = K * Dh is PEFT's token_dim.
  zero-init       adds "gate": (layers, H) zeros to either prefix form (see `add_prefix`).

Real tokens sit at positions T.. (PEFT counts the virtual tokens), and logits stay (B, L, V) over
the real tokens only, so label masks and algorithms do not change.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jrlhf.models.config import ModelConfig
from jrlhf.models.transformer import prefix_from_params

Array = jax.Array

# For `split_trainable(params, train_regex=TRAIN_REGEX)`: only these sub-trees train.
TRAIN_REGEX = r"^(prompt|prefix)/"
PROMPT_INITS = ("random", "vocab", "text")


def _check_tokens(num_virtual_tokens: int):
  if num_virtual_tokens < 1:
    raise ValueError(f"num_virtual_tokens={num_virtual_tokens} must be >= 1")


def add_prompt(params: dict, rng: Array, model_cfg: ModelConfig, num_virtual_tokens: int,
               init: str = "random", init_token_ids: Sequence[int] | None = None) -> dict:
  """A copy of `params` with `prompt/embeddings` (T, D), float32 (small, and trained).

  init: "random" N(0, 0.02^2) like the model's embedding init; "vocab" rows of `embed` at
  random token ids; "text" the embeddings of `init_token_ids`, repeated and truncated to T
  (PEFT's TEXT init, given token ids instead of a tokenizer).
  """
  _check_tokens(num_virtual_tokens)
  if "prompt" in params or "prefix" in params:
    raise ValueError("params already hold a `prompt` or `prefix` sub-tree")
  t, embed = num_virtual_tokens, params["embed"]
  if init == "random":
    emb_TxD = 0.02 * jax.random.normal(rng, (t, model_cfg.hidden_size), jnp.float32)
  elif init == "vocab":
    emb_TxD = jnp.asarray(embed)[jax.random.randint(rng, (t,), 0, embed.shape[0])]
  elif init == "text":
    if not init_token_ids:
      raise ValueError('init="text" needs init_token_ids (the token ids of the init text)')
    ids = list(init_token_ids) * math.ceil(t / len(init_token_ids))
    emb_TxD = jnp.asarray(embed)[jnp.asarray(ids[:t])]
  else:
    raise ValueError(f"init {init!r} is not one of {PROMPT_INITS}")
  return {**params, "prompt": {"embeddings": emb_TxD.astype(jnp.float32)}}


def _linear_init(key, fan_in: int, shape) -> Array:
  # torch.nn.Linear's default, as PEFT's prefix encoder has: U(+-1/sqrt(fan_in)).
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def add_prefix(params: dict, rng: Array, model_cfg: ModelConfig, num_virtual_tokens: int,
               projection: bool = False, encoder_hidden_size: int | None = None,
               zero_init: bool = False) -> dict:
  """A copy of `params` with a `prefix` sub-tree, float32, initialised as PEFT does.

  projection=False: k and v ~ N(0, 1) (PEFT's nn.Embedding). projection=True: embedding
  N(0, 1), w1/b1/w2/b2 like torch.nn.Linear; `encoder_hidden_size` defaults to K * Dh.

  zero_init=True adds a per-layer, per-query-head `gate` of zeros, and the model then gives the
  prefix a softmax of its own weighted by the gate (LLaMA-Adapter's zero-init attention), so
  training starts exactly at the base model. PEFT's init_weights="zero" (zero keys/values) does
  not: a zero key still takes exp(0) of the softmax mass and its zero value dilutes the output.
  The prefix itself keeps its random init: a zero gate and a zero prefix would have zero
  gradients for both.
  """
  _check_tokens(num_virtual_tokens)
  if "prompt" in params or "prefix" in params:
    raise ValueError("params already hold a `prompt` or `prefix` sub-tree")
  c = model_cfg
  t, kv = num_virtual_tokens, c.num_kv_heads * c.head_dim
  keys = jax.random.split(rng, 5)
  if projection:
    hidden = encoder_hidden_size or kv
    out = c.num_layers * 2 * kv
    prefix = {"embedding": jax.random.normal(keys[0], (t, kv), jnp.float32),
              "w1": _linear_init(keys[1], kv, (kv, hidden)),
              "b1": _linear_init(keys[2], kv, (hidden,)),
              "w2": _linear_init(keys[3], hidden, (hidden, out)),
              "b2": _linear_init(keys[4], hidden, (out,))}
  else:
    shape = (c.num_layers, c.num_kv_heads, t, c.head_dim)
    prefix = {"k": jax.random.normal(keys[0], shape, jnp.float32),
              "v": jax.random.normal(keys[1], shape, jnp.float32)}
  if zero_init:
    prefix["gate"] = jnp.zeros((c.num_layers, c.num_heads), jnp.float32)
  return {**params, "prefix": prefix}


def shardings_like(params: dict, params_sh: dict, mesh: Mesh) -> dict:
  """Shardings for a prompt/prefix-tuned tree from the plain tree's: the new sub-trees are
  small and replicated; everything else keeps its sharding."""
  replicated = NamedSharding(mesh, PartitionSpec())
  out = dict(params_sh)
  for name in ("prompt", "prefix"):
    if name in params:
      out[name] = jax.tree.map(lambda _: replicated, params[name])
  return out


def peft_prefix_rows(params: dict, model_cfg: ModelConfig) -> Array:
  """The prefix as PEFT's flat (T, layers * 2 * K * Dh) `prompt_embeddings` rows (what PEFT
  saves for PREFIX_TUNING), from either prefix form."""
  k_LxKxTxDh, v_LxKxTxDh = prefix_from_params(params["prefix"], model_cfg)
  kv_TxLx2xKxDh = jnp.stack([k_LxKxTxDh, v_LxKxTxDh], axis=1).transpose(3, 0, 1, 2, 4)
  return kv_TxLx2xKxDh.reshape(kv_TxLx2xKxDh.shape[0], -1)


def prefix_from_peft_rows(rows_TxW: Array, model_cfg: ModelConfig) -> dict:
  """The inverse of `peft_prefix_rows`: a {"k", "v"} prefix from PEFT's flat rows."""
  c = model_cfg
  t = rows_TxW.shape[0]
  kv_2xLxKxTxDh = jnp.asarray(rows_TxW, jnp.float32).reshape(
      t, c.num_layers, 2, c.num_kv_heads, c.head_dim).transpose(2, 1, 3, 0, 4)
  return {"k": kv_2xLxKxTxDh[0], "v": kv_2xLxKxTxDh[1]}


# ---------------------------------------------------------------------------------------------
# PEFT's on-disk format: adapter_config.json + adapter_model.safetensors holding one
# `prompt_embeddings` tensor, (T, D) for PROMPT_TUNING, (T, layers * 2 * K * Dh) for
# PREFIX_TUNING (PEFT saves the projected prefix too, so a reparameterised one saves flat).

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def save_peft_prompt(directory, params: dict, model_cfg: ModelConfig,
                     base_model_name_or_path: str | None = None) -> None:
  """Writes the `prompt` or `prefix` sub-tree where `peft.PeftModel.from_pretrained` reads it."""
  c = model_cfg
  common = dict(base_model_name_or_path=base_model_name_or_path, inference_mode=True,
                num_layers=c.num_layers, num_transformer_submodules=1, task_type="CAUSAL_LM",
                revision=None, modules_to_save=None, auto_mapping=None)
  if "prompt" in params:
    rows_TxW = params["prompt"]["embeddings"]
    config = dict(common, peft_type="PROMPT_TUNING", token_dim=c.hidden_size,
                  num_attention_heads=c.num_heads, prompt_tuning_init="RANDOM",
                  prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                  tokenizer_kwargs=None)
  elif "prefix" in params:
    if "gate" in params["prefix"]:
      raise ValueError("a gated (zero_init) prefix has no PEFT equivalent: PEFT attends to the "
                       "prefix in one joint softmax, without a gate")
    rows_TxW = peft_prefix_rows(params, c)
    kv = c.num_kv_heads * c.head_dim
    config = dict(common, peft_type="PREFIX_TUNING", token_dim=kv,
                  num_attention_heads=c.num_kv_heads, encoder_hidden_size=kv,
                  prefix_projection=False, init_weights=None)
  else:
    raise ValueError("params hold neither a `prompt` nor a `prefix` sub-tree")
  config["num_virtual_tokens"] = int(rows_TxW.shape[0])
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  safetensors.numpy.save_file(
      {"prompt_embeddings": np.asarray(rows_TxW, np.float32)},
      os.path.join(directory, WEIGHTS_FILE))


def load_peft_prompt(directory, params: dict, model_cfg: ModelConfig) -> dict:
  """A copy of `params` with the `prompt` or `prefix` of a PEFT PROMPT_TUNING / PREFIX_TUNING
  adapter directory (one trained with peft, or written by `save_peft_prompt`)."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    config = json.load(f)
  weights = safetensors.numpy.load_file(os.path.join(directory, WEIGHTS_FILE))
  rows_TxW = weights["prompt_embeddings"]
  c, kind = model_cfg, config.get("peft_type")
  widths = {"PROMPT_TUNING": c.hidden_size,
            "PREFIX_TUNING": c.num_layers * 2 * c.num_kv_heads * c.head_dim}
  if kind not in widths:
    raise ValueError(f"{directory}: peft_type {kind!r} is not PROMPT_TUNING or PREFIX_TUNING")
  if rows_TxW.ndim != 2 or rows_TxW.shape[1] != widths[kind]:
    raise ValueError(
        f"{directory}: prompt_embeddings has shape {rows_TxW.shape}, but a {kind} adapter for "
        f"this model ({c.num_layers} layers, hidden {c.hidden_size}, {c.num_kv_heads} kv heads "
        f"x {c.head_dim}) needs (num_virtual_tokens, {widths[kind]}); was it trained for "
        f"another base model?")
  out = {k: v for k, v in params.items() if k not in ("prompt", "prefix")}
  if kind == "PROMPT_TUNING":
    out["prompt"] = {"embeddings": jnp.asarray(rows_TxW, jnp.float32)}
  else:
    out["prefix"] = prefix_from_peft_rows(rows_TxW, c)
  return out
