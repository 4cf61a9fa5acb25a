"""Model configuration: one typed config for every supported decoder family."""

from __future__ import annotations

import chz

# Families that share the Llama decoder (RMSNorm, RoPE, SwiGLU); they differ only in flags.
LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = LLAMA_FAMILIES + ("gpt2",)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@chz.chz
class RopeScaling:
  """RoPE frequency scaling. `kind`: none | linear | llama3 (Llama 3.1 long-context scaling)."""

  kind: str = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  @chz.validate
  def _check(self):
    if self.kind not in ("none", "linear", "llama3"):
      raise ValueError(f"rope scaling kind {self.kind!r} is not supported; use none, linear or llama3")


@chz.chz
class ModelConfig:
  """Shapes and numerics of a decoder LM. Defaults are a tiny Llama that runs anywhere.

  `param_dtype` is how weights are stored; `dtype` is what matmuls run in (softmax, norms and
  logits are always float32).
  """

  family: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 172
  max_position_embeddings: int = 2048
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = chz.field(default_factory=RopeScaling)
  sliding_window: int | None = None
  attention_bias: bool = False  # bias on q/k/v (Qwen2) ...
  attention_out_bias: bool = False  # ... and on the output projection (Llama `attention_bias`)
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  # Layers run under nn.scan so compile time stays flat in depth; `scan_unroll` layers per
  # scan iteration trade compile time for scheduling freedom (no gain measured on XLA:CPU).
  scan_unroll: int = 1
  # Queries attend in chunks of this many tokens, skipping fully masked key blocks (0 = off).
  attention_chunk: int = 128
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None

  @chz.validate
  def _check(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model family {self.family!r} is not supported; choose one of {FAMILIES}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r} is not one of {DTYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

  @property
  def is_gpt2(self) -> bool:
    return self.family == "gpt2"
