"""Hugging Face `config.json` <-> `ModelConfig`, for the families jrlhf implements."""

from __future__ import annotations

from typing import Any

import chz

from jrlhf.models.config import LLAMA_FAMILIES, ModelConfig, RopeScaling

SUPPORTED = ", ".join(LLAMA_FAMILIES + ("gpt2",))
_ARCH_SUFFIX = {"lm": "ForCausalLM", "scalar": "ForSequenceClassification"}
_ARCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                "gpt2": "GPT2"}


def _family(hf: dict[str, Any]) -> str:
  family = hf.get("model_type")
  if family not in _ARCH_PREFIX:
    arch = (hf.get("architectures") or ["?"])[0]
    raise ValueError(
        f"model_type {family!r} (architecture {arch}) is not supported; jrlhf loads {SUPPORTED}")
  return family


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
  # transformers >= 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
  params = dict(hf.get("rope_parameters") or {})
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling = dict(hf.get("rope_scaling") or params)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return theta, RopeScaling()
  if kind == "linear":
    return theta, RopeScaling(kind="linear", factor=float(scaling["factor"]))
  if kind == "llama3":
    return theta, RopeScaling(
        kind="llama3", factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
  raise ValueError(f"rope scaling {kind!r} is not supported; jrlhf implements default, linear, "
                   "llama3")


def _token_id(value):
  return value[0] if isinstance(value, list) else value


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from a parsed HF `config.json`; `overrides` set jrlhf-only fields (dtype, ...)."""
  family = _family(hf)
  common = dict(bos_token_id=_token_id(hf.get("bos_token_id")),
                eos_token_id=_token_id(hf.get("eos_token_id")),
                pad_token_id=_token_id(hf.get("pad_token_id")))
  if family == "gpt2":
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ValueError(f"GPT-2 activation {hf['activation_function']!r} is not supported; "
                       "jrlhf implements gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx"):
      raise ValueError("GPT-2 scale_attn_by_inverse_layer_idx=True is not supported")
    d, h = hf["n_embd"], hf["n_head"]
    kw = dict(family=family, vocab_size=hf["vocab_size"], hidden_size=d,
              num_layers=hf["n_layer"], num_heads=h, num_kv_heads=h, head_dim=d // h,
              mlp_dim=hf.get("n_inner") or 4 * d, max_position_embeddings=hf["n_positions"],
              norm_eps=hf.get("layer_norm_epsilon", 1e-5), attention_bias=True,
              attention_out_bias=True, mlp_bias=True,
              tie_embeddings=hf.get("tie_word_embeddings", True), **common)
  else:
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; jrlhf implements silu")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
      raise ValueError(f"{family} with use_sliding_window=True is not supported")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    kw = dict(family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
              num_layers=hf["num_hidden_layers"], num_heads=heads,
              num_kv_heads=hf.get("num_key_value_heads") or heads,
              head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
              mlp_dim=hf["intermediate_size"],
              max_position_embeddings=hf.get("max_position_embeddings", 2048),
              norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
              sliding_window=hf.get("sliding_window") if family == "mistral" else None,
              # Qwen2 always has q/k/v bias and never an output bias; Llama/Qwen3 tie both.
              attention_bias=True if family == "qwen2" else bias,
              attention_out_bias=False if family == "qwen2" else bias,
              mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=family == "qwen3",
              tie_embeddings=hf.get("tie_word_embeddings", False), **common)
  kw.update(overrides)
  return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig, head: str = "lm") -> dict[str, Any]:
  """The `config.json` dict that transformers needs to rebuild this model."""
  import transformers  # noqa: PLC0415 - heavy import, only needed when writing

  if cfg.family == "gpt2":
    kw = dict(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
              n_head=cfg.num_heads, n_inner=cfg.mlp_dim, n_positions=cfg.max_position_embeddings,
              layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new")
  else:
    expected_out_bias = False if cfg.family == "qwen2" else cfg.attention_bias
    if cfg.attention_out_bias != expected_out_bias or (
        cfg.family == "qwen2" and not cfg.attention_bias):
      raise ValueError(f"attention_bias={cfg.attention_bias}, attention_out_bias="
                       f"{cfg.attention_out_bias} has no {cfg.family} config.json equivalent")
    if cfg.qk_norm != (cfg.family == "qwen3"):
      raise ValueError(f"qk_norm={cfg.qk_norm} has no {cfg.family} config.json equivalent")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    sc = cfg.rope_scaling
    if sc.kind == "linear":
      rope.update(rope_type="linear", factor=sc.factor)
    elif sc.kind == "llama3":
      rope.update(rope_type="llama3", factor=sc.factor, low_freq_factor=sc.low_freq_factor,
                  high_freq_factor=sc.high_freq_factor,
                  original_max_position_embeddings=sc.original_max_position_embeddings)
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
              rms_norm_eps=cfg.norm_eps, hidden_act="silu", rope_parameters=rope)
    if cfg.family in ("llama", "qwen3"):
      kw["attention_bias"] = cfg.attention_bias
    if cfg.family == "llama":
      kw["mlp_bias"] = cfg.mlp_bias
    elif cfg.mlp_bias:
      raise ValueError(f"mlp_bias=True has no {cfg.family} config.json equivalent")
    if cfg.family == "mistral":
      kw["sliding_window"] = cfg.sliding_window
    elif cfg.sliding_window is not None:
      raise ValueError(f"sliding_window has no {cfg.family} config.json equivalent")
  kw.update(tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
            architectures=[_ARCH_PREFIX[cfg.family] + _ARCH_SUFFIX[head]])
  if head == "scalar":
    kw["num_labels"] = 1
  hf_cfg = transformers.CONFIG_MAPPING[cfg.family](**kw)
  hf_cfg.dtype = cfg.param_dtype
  return hf_cfg.to_dict()


def with_overrides(cfg: ModelConfig, **overrides) -> ModelConfig:
  return chz.replace(cfg, **overrides) if overrides else cfg
