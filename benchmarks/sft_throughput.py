"""Tokens/s and MFU of one full fine-tuning SFT step: jrlhf's jitted step vs HF + PyTorch.

  .venv/bin/python benchmarks/sft_throughput.py            # Llama hidden 512, 8 layers, B8 x 256
  .venv/bin/python benchmarks/sft_throughput.py --tiny     # seconds-long smoke run
  .venv/bin/python benchmarks/sft_throughput.py --out sft.json --no-hf

MFU = model FLOPs per step / step time / this machine's measured matmul peak (a 2048^3 f32
matmul timed in the same run, so both sides are judged against the same number). Model FLOPs:
3 x forward (forward + backward), forward = 2 x (matmul params) per token + attention
4 x L x S x H x Dh per sequence per layer, counted for the full L x S score matrix as written
(no causal halving). The embedding lookup is not a matmul and is not counted; the LM head is.

The jrlhf side is the real training path: `create_state` + `sft.train_step` (AdamW, clipping,
loss, metrics) jitted with donation, on a one-device mesh. The PyTorch side is
`LlamaForCausalLM` (sdpa attention) + `torch.optim.AdamW` + clipping, with --torch-threads.
Each side is warmed up first; the median (and the best) of --repeats timed steps is reported.
On a shared machine the best step is the steadier estimate of what the step costs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import workload  # benchmarks/workload.py: the shared model shape
from jrlhf.algorithms import sft
from jrlhf.sharding import MeshConfig, make_mesh, put_batch, sharding_context
from jrlhf.train.config import OptimConfig
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.state import create_state


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  workload.add_model_args(ap)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--remat", default="none", help="ModelConfig.remat")
  ap.add_argument("--breakdown", action="store_true",
                  help="also time jrlhf forward and forward+backward alone")
  args = ap.parse_args()
  workload.apply_tiny(args)
  if args.tiny:
    args.batch, args.seq, args.repeats = 2, 32, 2
  return args


def timed(fn, repeats: int) -> list[float]:
  fn()  # warm-up: compile / allocate
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def median_seconds(fn, repeats: int) -> float:
  return statistics.median(timed(fn, repeats))


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n^3 float32 matmul through XLA on this machine."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  return 2 * n**3 / median_seconds(lambda: mm(a, b).block_until_ready(), repeats)


def model_flops(args) -> float:
  """Training FLOPs of one step (see the module docstring)."""
  d, f, v, lyr = args.hidden, args.mlp, args.vocab, args.layers
  dh = d // args.heads
  attn_params = d * args.heads * dh * 2 + d * args.kv_heads * dh * 2  # q, o, k, v
  matmul_params = lyr * (attn_params + 3 * d * f) + d * v  # + LM head
  tokens = args.batch * args.seq
  forward = 2 * matmul_params * tokens + lyr * 4 * args.batch * args.seq**2 * args.heads * dh
  return 3 * forward


def batch(args) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq)
  loss_mask = np.ones(shape, bool)
  loss_mask[:, 0] = False  # the first token is never a target
  return {"tokens": rng.integers(0, args.vocab, shape).astype(np.int32),
          "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape).copy(),
          "segment_ids": np.ones(shape, np.int32), "loss_mask": loss_mask}


def jrlhf_step(args) -> dict[str, float]:
  cfg = workload.model_config(args, max_position_embeddings=max(args.seq, 128),
                              remat=args.remat)
  mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
  opt = make_optimizer(OptimConfig(lr=1e-5, weight_decay=0.01), total_steps=1000)
  model, state, state_sh = create_state(cfg, opt, mesh, seed=0)
  step = jax.jit(functools.partial(sft.train_step, model=model, cfg=sft.SFTConfig(), opt=opt),
                 in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=0)
  host = batch(args)
  out = {}
  with sharding_context(mesh):
    device_batch = put_batch(host, mesh)
    holder = [state]

    def run_step():
      holder[0], metrics = step(holder[0], device_batch)
      jax.block_until_ready(metrics["loss"])

    times = timed(run_step, args.repeats)
    out["step_s"], out["best_step_s"] = statistics.median(times), min(times)
    if args.breakdown:
      params = holder[0].trainable
      fwd = jax.jit(lambda p, b: model.apply({"params": p}, b["tokens"],
                                             positions_BxL=b["positions"],
                                             segment_ids_BxL=b["segment_ids"]))
      grad = jax.jit(jax.grad(lambda p, b: sft.loss_fn(p, b, model, sft.SFTConfig())[0]))
      out["forward_s"] = median_seconds(
          lambda: fwd(params, device_batch).block_until_ready(), args.repeats)
      out["forward_backward_s"] = median_seconds(
          lambda: jax.block_until_ready(grad(params, device_batch)), args.repeats)
  return out


def hf_step(args) -> dict[str, float] | None:
  try:
    import torch  # noqa: PLC0415 - optional
    import transformers  # noqa: F401, PLC0415
  except ImportError:
    return None
  torch.set_num_threads(args.torch_threads)
  model = workload.hf_llama(
      workload.model_config(args, max_position_embeddings=max(args.seq, 128)),
      attn_implementation="sdpa").train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
  host = batch(args)
  tokens = torch.from_numpy(host["tokens"]).long()
  labels = tokens.clone()
  labels[~torch.from_numpy(host["loss_mask"])] = -100

  def run_step():
    loss = model(input_ids=tokens, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()

  times = timed(run_step, args.repeats)
  return {"step_s": statistics.median(times), "best_step_s": min(times)}


def main():
  args = parse_args()
  tokens = args.batch * args.seq
  flops = model_flops(args)
  peak = matmul_peak()
  print(f"matmul peak (2048^3 f32, XLA): {peak / 1e9:.0f} GFLOP/s; model: {flops / 1e9:.1f} "
        f"GFLOP per step, {tokens} tokens per step", flush=True)
  results = {"args": vars(args), "peak_flops": peak, "model_flops_per_step": flops}
  sides = {"jrlhf": jrlhf_step(args)}
  if not args.no_hf:
    hf = hf_step(args)
    if hf is None:
      print("torch / transformers not installed: PyTorch side skipped")
    else:
      sides["hf_pytorch"] = hf
  for name, timing in sides.items():
    extra = "".join(f", {k.removesuffix('_s')} {v:.3f} s" for k, v in timing.items()
                    if k != "step_s")
    timing["tokens_per_s"] = tokens / timing["step_s"]
    timing["mfu"] = flops / timing["step_s"] / peak
    print(f"{name:>11}: step {timing['step_s']:.3f} s, {timing['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {timing['mfu']:.1%}{extra}", flush=True)
  results.update(sides)
  if "hf_pytorch" in sides:
    ratio = sides["jrlhf"]["tokens_per_s"] / sides["hf_pytorch"]["tokens_per_s"]
    best = sides["hf_pytorch"]["best_step_s"] / sides["jrlhf"]["best_step_s"]
    results["ratio_jrlhf_over_hf"], results["ratio_best_steps"] = ratio, best
    print(f"jrlhf / HF PyTorch tokens/s: {ratio:.2f}x (median steps), {best:.2f}x (best steps)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
