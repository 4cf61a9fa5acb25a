"""New tokens/s of jrlhf's jitted sampler vs HF `generate`, same random Llama weights, greedy.

  .venv/bin/python benchmarks/generate.py                    # hidden 512, 8 layers, B8 64+128
  .venv/bin/python benchmarks/generate.py --tiny             # seconds-long smoke run
  .venv/bin/python benchmarks/generate.py --out gen.json --scan-unroll 8

Both sides generate exactly --new-tokens tokens per row (no stop tokens for ours,
min_new_tokens for HF) from the same left-padded prompts, in float32. Each side is warmed up
(compiled) first; then the timed runs alternate between the two sides, so a noisy neighbour on a
shared machine slows both alike, and the median of --repeats runs is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import workload  # benchmarks/workload.py: the shared model shape
from jrlhf.models import Transformer
from jrlhf.models.generate import Sampler, SamplingConfig
from jrlhf.models.hf import params_from_state_dict


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  workload.add_model_args(ap)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  workload.apply_tiny(args)
  if args.tiny:
    args.batch, args.prompt_len, args.new_tokens = 2, 8, 8
  return args


def prompts(args):
  """Left-padded prompts with lengths between half and all of --prompt-len."""
  rng = np.random.default_rng(0)
  tokens_BxP = rng.integers(1, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
  lengths_B = rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, args.batch)
  mask_BxP = np.arange(args.prompt_len)[None] >= (args.prompt_len - lengths_B)[:, None]
  return np.where(mask_BxP, tokens_BxP, 0), mask_BxP


def seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  args = parse_args()
  cfg = workload.model_config(args)
  model = Transformer(cfg)
  prompt_BxP, mask_BxP = prompts(args)
  new_tokens = args.batch * args.new_tokens
  results = {"config": vars(args), "devices": str(jax.devices())}

  hf_model = None
  try:
    import torch
    torch.set_num_threads(args.torch_threads)
    hf_model = workload.hf_llama(cfg, pad_token_id=0).eval()
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = jax.tree.map(jnp.asarray, params_from_state_dict(tensors, model))
  except ImportError:
    params = nn.unbox(model.init(jax.random.key(0), jnp.asarray(prompt_BxP)))["params"]

  sampler = Sampler(model, SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens))
  prompt_dev, mask_dev = jnp.asarray(prompt_BxP), jnp.asarray(mask_BxP)
  rng = jax.random.key(0)
  sides = {"jrlhf": lambda: jax.block_until_ready(sampler(params, prompt_dev, mask_dev, rng))}

  if hf_model is not None and not args.no_hf:
    ids, attn = torch.from_numpy(prompt_BxP).long(), torch.from_numpy(mask_BxP).long()

    def hf_generate():
      with torch.inference_mode():
        out = hf_model.generate(
            input_ids=ids, attention_mask=attn, do_sample=False, use_cache=True,
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
      assert out.shape[1] == args.prompt_len + args.new_tokens, out.shape

    sides["hf"] = hf_generate

  for name, fn in sides.items():
    results[name] = {"warmup_s": seconds(fn), "times_s": []}
  for _ in range(args.repeats):
    for name, fn in sides.items():
      results[name]["times_s"].append(seconds(fn))
  for name in sides:
    results[name]["tokens_per_s"] = new_tokens / statistics.median(results[name]["times_s"])
  if "hf" in results:
    results["ratio_ours_over_hf"] = results["jrlhf"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
  # A busy machine (load above its core count) slows both sides; say so next to the numbers.
  results["load_average_1m"] = os.getloadavg()[0]

  print(f"B{args.batch} prompt {args.prompt_len} + {args.new_tokens} new, hidden {args.hidden}, "
        f"{args.layers} layers, vocab {args.vocab}, f32, scan_unroll {args.scan_unroll}")
  print(f"{'':8} {'tok/s':>9} {'median s':>9} {'warmup s':>9}")
  for name in ("jrlhf", "hf"):
    if name in results:
      r = results[name]
      print(f"{name:8} {r['tokens_per_s']:9.1f} {statistics.median(r['times_s']):9.3f} "
            f"{r['warmup_s']:9.2f}")
  if "ratio_ours_over_hf" in results:
    print(f"ratio jrlhf / hf: {results['ratio_ours_over_hf']:.2f}x")
  print(f"load average (1 min) at the end: {results['load_average_1m']:.1f} "
        f"on {os.cpu_count()} cores")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
