"""The memory table: full fine-tuning vs LoRA vs QLoRA, per chip, from ahead-of-time plans.

    python benchmarks/memory_plan.py                  # every row (tens of minutes on 2 cores)
    python benchmarks/memory_plan.py --only llama2_7b # rows whose key contains the text
    python benchmarks/memory_plan.py --table          # re-render the table from saved results

Each row compiles the SFT train step (`jrlhf.plan`, nothing allocated) for Llama-2-7B,
Llama-3-8B and Llama-2-70B shapes: bf16 params and compute, remat=full, one sequence of 1024
tokens per chip (70B: 512), LoRA/QLoRA rank 8 on every linear layer (QLoRA: NF4 base with
double-quantized scales, bf16 LoRA). Targets: the preset TPU slices (v5p-8 for 7B/8B, v5p-128 for
70B, params/grads/optimizer state split over every chip) and one device, judged against 16, 48
and 80 GB. One device is compiled as a single TPU v5p chip (compile only, libtpu): XLA:CPU
computes bf16 matmuls in float32 and counts those upcast copies of every weight as temporaries
(Llama-2-7B LoRA: 26 GiB of temporaries on CPU), so the TPU compiler is the closer stand-in for
a GPU. Results accumulate in benchmarks/results/memory_plan.json (rows already there are
skipped); the table goes to stdout and benchmarks/results/memory.md.

MFU rows compile twice more (1 and 2 layers unrolled: XLA's cost analysis counts a scanned layer
stack as one layer) and divide the model FLOPs by the compiler's estimated step time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import chz

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configs import models  # noqa: E402
from jrlhf import config, plan  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SINGLE = "v5p:1x1x1"  # one device's stand-in (see the docstring)
BUDGETS_GB = (16, 48, 80)
METHODS = {"full": "none", "LoRA": "lora", "QLoRA": "qlora"}
# model -> (sequence length, preset slice topology)
MODELS = {"llama2_7b": (1024, "v5p:2x2x1"), "llama3_8b": (1024, "v5p:2x2x1"),
          "llama2_70b": (512, "v5p:4x4x4")}
SLICE_NAMES = {"v5p:2x2x1": "v5p-8", "v5p:4x4x4": "v5p-128", SINGLE: "1 device"}
# (model, per-chip rows, length, topology): the MFU goal's workload, full fine-tuning.
MFU_ROWS = [("llama3_8b", 1, 1024, "v5p:2x2x1"), ("llama3_8b", 4, 2048, "v5p:2x2x1")]


def make_cfg(model: str, peft: str, rows: int, length: int):
  cfg = config.resolve("", {"peft": peft, "data.batch_size": str(rows),
                            "data.max_length": str(length), "train.num_samples": "0"})
  shape = chz.replace(models.PRESETS[model], param_dtype="bfloat16", dtype="bfloat16",
                      remat="full")
  return chz.replace(cfg, model=shape)


def run_row(model: str, method: str, topology: str, rows_per_chip: int, length: int,
            costs: bool) -> dict:
  target = plan.parse_target(topology)
  cfg = make_cfg(model, METHODS[method], rows_per_chip * target.chips, length)
  start = time.perf_counter()
  p = plan.make_plan(cfg, target, costs=costs)
  prog = p.programs[0]
  return {"model": model, "method": method, "topology": topology, "chips": target.chips,
          "batch": f"{rows_per_chip * target.chips} x {length}", "memory": prog.memory,
          "error": prog.error, "state": p.state_bytes, "trainable": p.trainable_params,
          "model_flops": prog.model_flops, "compiler_flops": prog.compiler_flops,
          "est_seconds": prog.est_seconds, "mfu": prog.mfu(target),
          "seconds": round(time.perf_counter() - start, 1)}


def gib(n) -> str:
  return f"{n / plan.GiB:.1f}"


def render(results: dict) -> str:
  lines = ["| model | method | target | batch | per-chip total GiB | args GiB | temps GiB "
           "| vs full | fits 16 / 48 / 80 GB |", "|---|---|---|---|---|---|---|---|---|"]
  for key, r in results.items():
    if key.startswith("mfu/"):
      continue
    full = results.get(f"{r['model']}/full/{r['topology']}")
    where = SLICE_NAMES.get(r["topology"], r["topology"])
    if r["topology"] != SINGLE:
      where += f" ({r['chips']} chips)"
    if r["error"]:
      lines.append(f"| {r['model']} | {r['method']} | {where} | {r['batch']} | does not fit "
                   f"(compiler) | | | | no / no / no |")
      continue
    m = r["memory"]
    share = (f"{m['total'] / full['memory']['total']:.1%}" if full and not full["error"]
             else "")
    fits = " / ".join("yes" if m["total"] <= gb * plan.GiB else "no" for gb in BUDGETS_GB)
    if r["topology"] != SINGLE:
      fits = "yes (95 GiB)" if m["total"] <= 95 * plan.GiB else "no (95 GiB)"
    lines.append(f"| {r['model']} | {r['method']} | {where} | {r['batch']} | "
                 f"**{gib(m['total'])}** | {gib(m['arguments'])} | {gib(m['temporaries'])} | "
                 f"{share} | {fits} |")
  mfu = [r for k, r in results.items() if k.startswith("mfu/")]
  if mfu:
    lines += ["", "| model | target | batch | model TFLOP/step | compiler's step time | "
              "estimated MFU |", "|---|---|---|---|---|---|"]
    for r in mfu:
      est = f"{r['est_seconds'] * 1e3:.0f} ms" if r["est_seconds"] else "n/a"
      value = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
      lines.append(f"| {r['model']} ({r['method']}) | "
                   f"{SLICE_NAMES.get(r['topology'], r['topology'])} | {r['batch']} | "
                   f"{r['model_flops'] / 1e12:.1f} | {est} | {value} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="", help="run rows whose key contains this text")
  parser.add_argument("--table", action="store_true", help="only re-render saved results")
  args = parser.parse_args()
  RESULTS.mkdir(parents=True, exist_ok=True)
  store = RESULTS / "memory_plan.json"
  results = json.loads(store.read_text()) if store.exists() else {}
  jobs = []
  for model, (length, topology) in MODELS.items():
    for method in METHODS:
      for where in (SINGLE, topology):
        jobs.append((f"{model}/{method}/{where}", (model, method, where, 1, length, False)))
  for model, rows, length, topology in MFU_ROWS:
    jobs.append((f"mfu/{model}/{rows}x{length}/{topology}",
                 (model, "full", topology, rows, length, True)))
  for key, job in jobs if not args.table else ():
    if key in results or args.only not in key:
      continue
    print(f"[memory_plan] {key} ...", file=sys.stderr, flush=True)
    results[key] = run_row(*job)
    print(f"[memory_plan] {key}: {results[key]['seconds']} s", file=sys.stderr, flush=True)
    store.write_text(json.dumps(results, indent=1) + "\n")
  table = render(results)
  (RESULTS / "memory.md").write_text(table)
  print(table)


if __name__ == "__main__":
  main()
