"""Tokens/s of one LoRA / QLoRA SFT step: jrlhf vs PEFT + PyTorch, full fine-tuning alongside.

  .venv/bin/python benchmarks/peft_throughput.py                # workload.py's shape, B8 x 256
  .venv/bin/python benchmarks/peft_throughput.py --breakdown    # + forward, forward+backward
  .venv/bin/python benchmarks/peft_throughput.py --tiny         # seconds-long smoke run

Every row trains the same model on the same batch with the same optimizer (AdamW over the
trainable params, clipping at 1.0), built the way benchmarks/sft_throughput.py builds it and
timed by the same interleaved rounds, all in one process:
- jrlhf: `create_state(..., peft=LoraConfig(rank, alpha, all-linear))` (trainable = LoRA
  factors, frozen = the base) and the loop's `jit_train_step`; QLoRA is the same with the
  targeted base kernels in NF4 with double quantization (`QLoraConfig`).
- PyTorch: `peft.get_peft_model(LlamaForCausalLM, LoraConfig(r, lora_alpha,
  target_modules="all-linear", lora_dropout=0))`. Its QLoRA needs bitsandbytes' 4-bit kernels,
  which run on CUDA: on a CPU-only machine that row says so instead of timing something else.
"""

from __future__ import annotations

import json

import sft_throughput as bench  # benchmarks/sft_throughput.py: builders and timing
from jrlhf.peft.config import LoraConfig, QLoraConfig
from jrlhf.sharding import sharding_context

METHODS = ("full", "lora", "qlora")


def parse_args():
  ap = bench.parser(__doc__.splitlines()[0])
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--alpha", type=float, default=32.0)
  ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
  args = bench.finish_args(ap.parse_args())
  args.methods = tuple(args.methods.split(","))
  unknown = set(args.methods) - set(METHODS)
  if unknown:
    ap.error(f"--methods {sorted(unknown)} not among {', '.join(METHODS)}")
  return args


def jrlhf_peft(method: str, args):
  lora = dict(rank=args.rank, alpha=args.alpha, targets=("all-linear",))
  return {"full": None, "lora": LoraConfig(**lora), "qlora": QLoraConfig(**lora)}[method]


def torch_qlora_missing() -> str:
  """Why PyTorch QLoRA is not timed here."""
  import importlib.util  # noqa: PLC0415
  import torch  # noqa: PLC0415
  found = [] if importlib.util.find_spec("bitsandbytes") else ["bitsandbytes is not installed"]
  found += [] if torch.cuda.is_available() else ["no CUDA device"]
  return ("needs bitsandbytes 4-bit kernels on CUDA (" + ", ".join(found or ["both present, "
          "but this script times CPU only"]) + ")")


def build(args, mesh) -> tuple[bench.Timed, dict[str, str]]:
  """(every side's timed functions, {side: why it was not run})."""
  fns, skipped = {}, {}
  hf_lora = dict(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear",
                 lora_dropout=0.0)
  for method in args.methods:
    fns.update(bench.prefixed(f"jrlhf {method}", bench.jrlhf_fns(args, mesh,
                                                                jrlhf_peft(method, args))))
    side = f"pytorch {method}"
    if args.no_hf:
      continue
    if method == "qlora":
      skipped[side] = torch_qlora_missing()
      continue
    hf = bench.hf_fns(args, lora=hf_lora if method == "lora" else None)
    if hf is None:
      skipped[side] = "torch / transformers / peft not installed"
    else:
      fns.update(bench.prefixed(side, hf))
  return fns, skipped


def table(sides: dict, skipped: dict[str, str], methods) -> list[str]:
  """One markdown row per method: tokens/s (median, best) each side, the ratio, vs full."""
  def cell(name):
    t = sides.get(name)
    return skipped.get(name, "-") if t is None else (
        f"{t['tokens_per_s']:,.0f} ({t['best_tokens_per_s']:,.0f})")

  def ratio(a, b, key):
    return f"{sides[a][key] / sides[b][key]:.2f}x" if a in sides and b in sides else "-"

  rows = ["| method | jrlhf tok/s, median (best) | PyTorch tok/s, median (best) | "
          "jrlhf / PyTorch, median (best) | vs full: jrlhf, PyTorch |", "|---|---|---|---|---|"]
  for m in methods:
    j, p = f"jrlhf {m}", f"pytorch {m}"
    vs_full = (f"{ratio(j, 'jrlhf full', 'tokens_per_s')}, "
               f"{ratio(p, 'pytorch full', 'tokens_per_s')}")
    rows.append(f"| {m} | {cell(j)} | {cell(p)} | {ratio(j, p, 'tokens_per_s')} "
                f"({ratio(j, p, 'best_tokens_per_s')}) | {vs_full} |")
  return rows


def main():
  args = parse_args()
  tokens = args.batch * args.seq
  print(f"{tokens} tokens per step; LoRA rank {args.rank}, alpha {args.alpha:g}, all-linear; "
        f"{args.repeats} interleaved rounds", flush=True)
  load = {"before": bench.machine()}
  print(f"machine: {load['before']}", flush=True)
  mesh = bench.one_device_mesh()
  with sharding_context(mesh):
    fns, skipped = build(args, mesh)
    sides = bench.by_side(bench.time_interleaved(fns, args.repeats), tokens)
  load["after"] = bench.machine()
  print(f"machine after: {load['after']}")
  for name, timing in sides.items():
    print(f"{name:>13}: step {timing['step_s']:.3f} s (best {timing['best_step_s']:.3f}), "
          f"{timing['tokens_per_s']:,.0f} tokens/s{bench.parts_text(timing)}", flush=True)
  for name, why in skipped.items():
    print(f"{name:>13}: not run: {why}")
  print("\n".join(table(sides, skipped, args.methods)))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "machine": load, "sides": sides, "skipped": skipped}, f, indent=2)


if __name__ == "__main__":
  main()
