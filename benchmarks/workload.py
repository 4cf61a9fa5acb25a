"""The benchmark workload shared by every script: one Llama shape, ours and HF's.

Defaults are the workload of ../shared/PERF_NOTES.md: hidden 512, 8 layers, 8 heads, MLP 1376,
vocab 8192, float32. `--tiny` shrinks it to a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import os

# PyTorch's OpenMP workers spin between parallel regions by default. On a shared 2-core machine,
# beside XLA's threads in the same process, a spinning worker holds a core someone needs and a
# descheduled one stalls every barrier: at load average 5-9 that made PyTorch's SFT step 2x
# slower (9.1 s vs 4.4 s), which would flatter jrlhf. Waiting passively is the fair setting
# here; set OMP_WAIT_POLICY yourself to override. Read once, when torch starts its threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from jrlhf.models import ModelConfig
from jrlhf.models.hf_config import config_to_hf

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=4, mlp=128, vocab=256)


def add_model_args(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--mlp", type=int, default=1376)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--scan-unroll", type=int, default=1, help="ModelConfig.scan_unroll")
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--no-hf", action="store_true", help="time only jrlhf")
  ap.add_argument("--tiny", action="store_true", help="tiny sizes for a smoke run")
  ap.add_argument("--out", help="write results as JSON here")


def apply_tiny(args) -> None:
  if args.tiny:
    for name, value in TINY.items():
      setattr(args, name, value)


def model_config(args, **overrides) -> ModelConfig:
  return ModelConfig(**{
      "vocab_size": args.vocab, "hidden_size": args.hidden, "num_layers": args.layers,
      "num_heads": args.heads, "num_kv_heads": args.kv_heads,
      "head_dim": args.hidden // args.heads, "mlp_dim": args.mlp,
      "scan_unroll": args.scan_unroll, **overrides})


def hf_llama(cfg: ModelConfig, **hf_overrides):
  """The same Llama in transformers (random init, seed 0, float32)."""
  import torch  # noqa: PLC0415 - optional
  import transformers  # noqa: PLC0415

  hf_cfg = transformers.LlamaConfig(**{**config_to_hf(cfg), **hf_overrides})
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(hf_cfg).to(torch.float32)
