"""Tokens/s and MFU of one full fine-tuning SFT step: jrlhf's jitted step vs HF + PyTorch.

  .venv/bin/python benchmarks/sft_throughput.py            # Llama hidden 512, 8 layers, B8 x 256
  .venv/bin/python benchmarks/sft_throughput.py --tiny     # seconds-long smoke run
  .venv/bin/python benchmarks/sft_throughput.py --out sft.json --no-hf

MFU = model FLOPs per step / step time / this machine's measured matmul peak (a 2048^3 f32
matmul timed in the same run, so both sides are judged against the same number). Model FLOPs:
3 x forward (forward + backward), forward = 2 x (matmul params) per token + attention
4 x L x S x H x Dh per sequence per layer, counted for the full L x S score matrix as written
(no causal halving). The embedding lookup is not a matmul and is not counted; the LM head is.

The jrlhf side is the real training path: `create_state` + the loop's `jit_train_step` (AdamW,
clipping, loss, metrics, the state donated) on a one-device mesh. The PyTorch side is
`LlamaForCausalLM` (sdpa attention) + `torch.optim.AdamW` + clipping, with --torch-threads.
Every timed function is warmed up first, then they run interleaved, one call each per round,
so a burst of load from other processes hits both sides alike; the median (and the best) of
--repeats rounds is reported. On a shared machine the best step is the steadier estimate of
what the step costs. benchmarks/peft_throughput.py reuses these pieces for LoRA and QLoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import workload  # benchmarks/workload.py: the shared model shape
from jrlhf.algorithms import sft
from jrlhf.algorithms.step import combine_params
from jrlhf.sharding import MeshConfig, make_mesh, put_batch, sharding_context
from jrlhf.train import loop
from jrlhf.train.config import OptimConfig
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.state import create_state

Timed = dict[str, Callable[[], None]]  # name -> one blocking call (a step, or a part of one)


def parser(description: str) -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=description)
  workload.add_model_args(ap)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--remat", default="none", help="ModelConfig.remat")
  ap.add_argument("--breakdown", action="store_true",
                  help="also time the forward and forward+backward alone, on both sides")
  return ap


def finish_args(args):
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


def time_interleaved(fns: Timed, repeats: int) -> dict[str, dict[str, float]]:
  """{name: {"s": median, "best_s": min}} over `repeats` rounds of one call of each fn."""
  for fn in fns.values():
    fn()  # warm-up: compile / allocate
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: {"s": statistics.median(t), "best_s": min(t)} for name, t in times.items()}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n^3 float32 matmul through XLA on this machine."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  return 2 * n**3 / median_seconds(lambda: mm(a, b).block_until_ready(), repeats)


def model_flops(args) -> float:
  """Training FLOPs of one full fine-tuning step (see the module docstring)."""
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


def machine() -> str:
  """Cores and load: on a shared machine other processes' load is part of every number."""
  return (f"{os.cpu_count()} CPU cores, 1-min load average "
          f"{os.getloadavg()[0]:.1f}, jax {jax.__version__} ({jax.default_backend()})")


def one_device_mesh():
  return make_mesh(MeshConfig(), devices=jax.devices()[:1])


def jrlhf_fns(args, mesh, peft=None) -> Timed:
  """The step a run compiles, for `peft` (a jrlhf.peft.config method; None = full). Call it
  inside `sharding_context(mesh)`: the model's activation constraints read the mesh there."""
  cfg = workload.model_config(args, max_position_embeddings=max(args.seq, 128),
                              remat=args.remat)
  opt = make_optimizer(OptimConfig(lr=1e-5, weight_decay=0.01), total_steps=1000)
  model, state, state_sh = create_state(cfg, opt, mesh, seed=0, peft=peft)
  sft_cfg = sft.SFTConfig()
  step = loop.jit_train_step(loop.algorithm_for(sft_cfg), model, sft_cfg, opt, state_sh, mesh)
  device_batch = put_batch(batch(args), mesh)
  holder = [state]

  def run_step():
    holder[0], metrics = step(holder[0], device_batch)
    jax.block_until_ready(metrics["loss"])

  fns = {"step": run_step}
  if args.breakdown:
    # Gradients of the trainable half only, over the frozen one: what the step differentiates.
    def loss(trainable, frozen, b):
      return sft.loss_fn(combine_params(trainable, frozen), b, model, sft_cfg)[0]

    fwd = jax.jit(loss)
    grad = jax.jit(jax.grad(loss))
    fns["forward"] = lambda: jax.block_until_ready(
        fwd(holder[0].trainable, holder[0].frozen, device_batch))
    fns["forward_backward"] = lambda: jax.block_until_ready(
        grad(holder[0].trainable, holder[0].frozen, device_batch))
  return fns


def hf_fns(args, lora: dict | None = None) -> Timed | None:
  """HF Llama + AdamW over its trainable params; `lora` = peft.LoraConfig kwargs, or None for
  full fine-tuning. None when torch / transformers (/ peft) are not installed."""
  try:
    import torch  # noqa: PLC0415 - optional
    import transformers  # noqa: F401, PLC0415
    if lora is not None:
      import peft  # noqa: PLC0415
  except ImportError:
    return None
  torch.set_num_threads(args.torch_threads)
  model = workload.hf_llama(
      workload.model_config(args, max_position_embeddings=max(args.seq, 128)),
      attn_implementation="sdpa")
  if lora is not None:
    model = peft.get_peft_model(model, peft.LoraConfig(**lora))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
  host = batch(args)
  tokens = torch.from_numpy(host["tokens"]).long()
  labels = tokens.clone()
  labels[~torch.from_numpy(host["loss_mask"])] = -100

  def run_step():
    loss = model(input_ids=tokens, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()

  fns = {"step": run_step}
  if args.breakdown:
    def forward():
      with torch.no_grad():
        model(input_ids=tokens, labels=labels).loss.item()

    def forward_backward():
      model(input_ids=tokens, labels=labels).loss.backward()
      optimizer.zero_grad(set_to_none=True)

    fns.update(forward=forward, forward_backward=forward_backward)
  return fns


def prefixed(side: str, fns: Timed) -> Timed:
  return {f"{side}/{part}": fn for part, fn in fns.items()}


def by_side(timings: dict[str, dict[str, float]], tokens: int) -> dict[str, dict[str, float]]:
  """{"side/part": {s, best_s}} -> {side: {step_s, best_step_s, part_s, ..., tokens_per_s}}."""
  sides = {}
  for name, t in timings.items():
    side, part = name.split("/")
    sides.setdefault(side, {}).update({f"{part}_s": t["s"], f"best_{part}_s": t["best_s"]})
  for timing in sides.values():
    timing["tokens_per_s"] = tokens / timing["step_s"]
    timing["best_tokens_per_s"] = tokens / timing["best_step_s"]
  return sides


def parts_text(timing: dict[str, float]) -> str:
  """The --breakdown parts, medians then best."""
  return "".join(f", {part} {timing[f'{part}_s']:.3f} s (best {timing[f'best_{part}_s']:.3f})"
                 for part in ("forward", "forward_backward") if f"{part}_s" in timing)


def main():
  args = finish_args(parser(__doc__.splitlines()[0]).parse_args())
  tokens = args.batch * args.seq
  flops = model_flops(args)
  peak = matmul_peak()
  print(f"machine: {machine()}", flush=True)
  print(f"matmul peak (2048^3 f32, XLA): {peak / 1e9:.0f} GFLOP/s; model: {flops / 1e9:.1f} "
        f"GFLOP per step, {tokens} tokens per step", flush=True)
  results = {"args": vars(args), "peak_flops": peak, "model_flops_per_step": flops}
  mesh = one_device_mesh()
  with sharding_context(mesh):
    fns = prefixed("jrlhf", jrlhf_fns(args, mesh))
    hf = None if args.no_hf else hf_fns(args)
    if hf is None and not args.no_hf:
      print("torch / transformers not installed: PyTorch side skipped")
    fns.update(prefixed("hf_pytorch", hf or {}))
    sides = by_side(time_interleaved(fns, args.repeats), tokens)
  print(f"machine after: {machine()}")
  for name, timing in sides.items():
    timing["mfu"] = flops / timing["step_s"] / peak
    print(f"{name:>11}: step {timing['step_s']:.3f} s, {timing['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {timing['mfu']:.1%}{parts_text(timing)}", flush=True)
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
