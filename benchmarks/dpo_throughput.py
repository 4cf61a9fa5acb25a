"""Tokens/s of one DPO step (policy + reference forward, policy backward): jrlhf vs PyTorch.

  .venv/bin/python benchmarks/dpo_throughput.py            # workload.py's shape, 8 rows x 256
  .venv/bin/python benchmarks/dpo_throughput.py --tiny     # seconds-long smoke run

The shape is the SFT benchmark's (benchmarks/workload.py): `--batch` rows of `--seq` tokens,
here `--batch / 2` pairs laid out [chosen; rejected], the response (the loss mask) being the
last three quarters of each row. Tokens/s counts each row's tokens once, although the reference
reads them too; MFU counts 4 forwards' FLOPs (policy forward + backward = 3, reference = 1).
- jrlhf: `create_state(..., reference=True)` (full fine-tuning with a frozen copy, as the loop
  builds DPO) and the loop's `jit_train_step` for `DPOConfig()` (sigmoid loss, beta 0.1; the
  step also computes TRL's metrics), AdamW + clipping, the state donated.
- PyTorch: HF `LlamaForCausalLM` policy (sdpa attention) and a frozen deep copy as the
  reference under `torch.no_grad()`, summed response log-probs, the sigmoid DPO loss by hand,
  clipping at 1.0 and `torch.optim.AdamW`.
Timing is benchmarks/sft_throughput.py's: warm-up, then interleaved rounds, median and best.
"""

from __future__ import annotations

import copy
import json

import numpy as np

import sft_throughput as bench  # benchmarks/sft_throughput.py: builders and timing
import workload  # benchmarks/workload.py: the shared model shape
from jrlhf.algorithms import dpo
from jrlhf.sharding import put_batch, sharding_context
from jrlhf.train import loop
from jrlhf.train.config import OptimConfig
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.state import create_state

BETA = 0.1


def pair_batch(args) -> dict[str, np.ndarray]:
  """The SFT benchmark's random batch as pairs: distinct chosen and rejected rows sharing each
  pair's prompt, loss on the response tokens."""
  if args.batch % 2:
    raise SystemExit(f"--batch {args.batch} must be even: rows are [chosen; rejected] pairs")
  b = bench.batch(args)
  pairs, prompt = args.batch // 2, args.seq // 4
  b["tokens"][pairs:, :prompt] = b["tokens"][:pairs, :prompt]
  b["loss_mask"][:, :prompt] = False
  return b


def jrlhf_fns(args, mesh) -> bench.Timed:
  cfg = workload.model_config(args, max_position_embeddings=max(args.seq, 128),
                                    remat=args.remat)
  opt = make_optimizer(OptimConfig(lr=1e-6, weight_decay=0.01), total_steps=1000)
  dpo_cfg = dpo.DPOConfig(beta=BETA)
  algorithm = loop.algorithm_for(dpo_cfg)
  model, state, state_sh = create_state(cfg, opt, mesh, seed=0,
                                        reference=algorithm.needs_reference(dpo_cfg))
  step = loop.jit_train_step(algorithm, model, dpo_cfg, opt, state_sh, mesh)
  device_batch = put_batch(pair_batch(args), mesh)
  holder = [state]

  def run_step():
    holder[0], metrics = step(holder[0], device_batch)
    metrics["loss"].block_until_ready()

  return {"step": run_step}


def hf_fns(args) -> bench.Timed | None:
  try:
    import torch  # noqa: PLC0415 - optional
    import torch.nn.functional as F  # noqa: N812, PLC0415
  except ImportError:
    return None
  torch.set_num_threads(args.torch_threads)
  policy = workload.hf_llama(
      workload.model_config(args, max_position_embeddings=max(args.seq, 128)),
      attn_implementation="sdpa")
  reference = copy.deepcopy(policy).eval().requires_grad_(False)
  policy.train()
  params = [p for p in policy.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01)
  host = pair_batch(args)
  tokens = torch.from_numpy(host["tokens"]).long()
  targets, mask = tokens[:, 1:], torch.from_numpy(host["loss_mask"][:, 1:]).float()
  pairs = args.batch // 2

  def sequence_logps(model):
    logits = model(input_ids=tokens).logits[:, :-1].float()
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, targets[..., None])[..., 0]
    return (logp * mask).sum(-1)

  def run_step():
    with torch.no_grad():
      ref = sequence_logps(reference)
    logp = sequence_logps(policy)
    margin = (logp[:pairs] - ref[:pairs]) - (logp[pairs:] - ref[pairs:])
    loss = -F.logsigmoid(BETA * margin).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()

  return {"step": run_step}


def main():
  args = bench.finish_args(bench.parser(__doc__.splitlines()[0]).parse_args())
  tokens = args.batch * args.seq
  flops = bench.model_flops(args) * 4 / 3  # + the reference forward
  peak = bench.matmul_peak()
  print(f"machine: {bench.machine()}", flush=True)
  print(f"matmul peak (2048^3 f32, XLA): {peak / 1e9:.0f} GFLOP/s; DPO step: {flops / 1e9:.1f} "
        f"GFLOP, {args.batch // 2} pairs, {tokens} tokens", flush=True)
  results = {"args": vars(args), "peak_flops": peak, "model_flops_per_step": flops}
  mesh = bench.one_device_mesh()
  with sharding_context(mesh):
    fns = bench.prefixed("jrlhf", jrlhf_fns(args, mesh))
    hf = None if args.no_hf else hf_fns(args)
    if hf is None and not args.no_hf:
      print("torch / transformers not installed: PyTorch side skipped")
    fns.update(bench.prefixed("hf_pytorch", hf or {}))
    sides = bench.by_side(bench.time_interleaved(fns, args.repeats), tokens)
  print(f"machine after: {bench.machine()}")
  for name, timing in sides.items():
    timing["mfu"] = flops / timing["step_s"] / peak
    print(f"{name:>11}: DPO step {timing['step_s']:.3f} s (best {timing['best_step_s']:.3f}), "
          f"{timing['tokens_per_s']:,.0f} tokens/s, MFU {timing['mfu']:.1%}", flush=True)
  results.update(sides)
  if "hf_pytorch" in sides:
    ratio = sides["jrlhf"]["tokens_per_s"] / sides["hf_pytorch"]["tokens_per_s"]
    best = sides["hf_pytorch"]["best_step_s"] / sides["jrlhf"]["best_step_s"]
    results["ratio_jrlhf_over_hf"], results["ratio_best_steps"] = ratio, best
    print(f"jrlhf / HF PyTorch DPO tokens/s: {ratio:.2f}x (median steps), {best:.2f}x (best "
          f"steps)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
