"""Online RL's rollout: sampler tokens/s vs HF `generate`, and where one PPO iteration's time goes.

  .venv/bin/python benchmarks/rollout.py                  # workload.py's shape; tiny/ppo split
  .venv/bin/python benchmarks/rollout.py --tiny           # seconds-long smoke run
  .venv/bin/python benchmarks/rollout.py --ppo-steps 0    # the sampler comparison only

(a) Rollout tokens/s, as PPO samples: temperature --temperature (top-k and top-p off), the
behaviour log-prob of every sampled token recorded. jrlhf: the jitted KV-cache `Sampler` (it
always returns log-probs). HF: `generate(do_sample=True, output_scores=True)` then
`compute_transition_scores(..., normalize_logits=True)`, the log-probs of the sampled tokens
under logits / T. Same random Llama weights (benchmarks/generate.py's twin model), same
left-padded prompts; both sides produce exactly --new-tokens tokens per row (no stop tokens;
`min_new_tokens` for HF). Warm-up first, then interleaved timed runs; median of --repeats.

(b) One PPO iteration of experiments/tiny/ppo.py (from the tiny SFT export when it exists, else
random init), split into the loop's own phases: `perf/rollout_s`, `perf/score_s`,
`perf/reference_s`, `perf/update_s`, `perf/reshard_s` (each waits on the device before its clock
is read). The first step compiles every program, so the split is the median over steps 2..N.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile

import jax
import jax.numpy as jnp

import generate as gen_bench  # benchmarks/generate.py: its prompts and timing
import workload  # benchmarks/workload.py: the shared model shape
from jrlhf.models import Transformer
from jrlhf.models.generate import Sampler, SamplingConfig
from jrlhf.models.hf import params_from_state_dict

EXPORT = "runs/tiny-sft,train.export=true,train.progress=false/export"
PHASES = ("rollout", "score", "reference", "update", "reshard")
# --tiny: a random-init policy small enough for seconds per step, one update per iteration.
TINY_PPO = {"model.hidden_size": "32", "model.num_layers": "1", "model.num_heads": "2",
            "model.num_kv_heads": "2", "model.head_dim": "16", "model.mlp_dim": "64",
            "algorithm.prompts_per_step": "8", "algorithm.max_new_tokens": "4",
            "algorithm.num_ppo_epochs": "1", "algorithm.num_mini_batches": "1"}


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  workload.add_model_args(ap)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.7)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--ppo-steps", type=int, default=None,
                  help="PPO iterations (default 6, 2 with --tiny; 0 = skip part b)")
  ap.add_argument("--init-from", default=EXPORT,
                  help="the PPO start (random init when the directory does not exist)")
  args = ap.parse_args()
  workload.apply_tiny(args)
  if args.tiny:
    args.batch, args.prompt_len, args.new_tokens = 2, 8, 8
  if args.ppo_steps is None:
    args.ppo_steps = 2 if args.tiny else 6
  return args


def rollout_sides(args) -> dict:
  """{name: fn} sampling one batch with behaviour log-probs; each fn blocks until it is done."""
  cfg = workload.model_config(args)
  model = Transformer(cfg)
  prompt_BxP, mask_BxP = gen_bench.prompts(args)
  import torch  # noqa: PLC0415 - only for the HF side

  torch.set_num_threads(args.torch_threads)
  hf_model = workload.hf_llama(cfg, pad_token_id=0).eval()
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  params = jax.tree.map(jnp.asarray, params_from_state_dict(tensors, model))
  sampler = Sampler(model, SamplingConfig(temperature=args.temperature,
                                          max_new_tokens=args.new_tokens))
  prompt_dev, mask_dev = jnp.asarray(prompt_BxP), jnp.asarray(mask_BxP)
  rng = [jax.random.key(0)]

  def ours():
    rng[0], key = jax.random.split(rng[0])
    out = jax.block_until_ready(sampler(params, prompt_dev, mask_dev, key))
    assert out.logprobs_BxN.shape == (args.batch, args.new_tokens)

  sides = {"jrlhf": ours}
  if args.no_hf:
    return sides
  ids, attn = torch.from_numpy(prompt_BxP).long(), torch.from_numpy(mask_BxP).long()

  def hf():
    with torch.inference_mode():
      out = hf_model.generate(
          input_ids=ids, attention_mask=attn, do_sample=True, temperature=args.temperature,
          top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
          pad_token_id=0, use_cache=True, output_scores=True, return_dict_in_generate=True)
      logp_BxN = hf_model.compute_transition_scores(out.sequences, out.scores,
                                                    normalize_logits=True)
    assert logp_BxN.shape == (args.batch, args.new_tokens), logp_BxN.shape

  sides["hf"] = hf
  return sides


def rollout_benchmark(args) -> dict:
  sides = rollout_sides(args)
  out = {name: {"warmup_s": gen_bench.seconds(fn), "times_s": []} for name, fn in sides.items()}
  for _ in range(args.repeats):
    for name, fn in sides.items():
      out[name]["times_s"].append(gen_bench.seconds(fn))
  for name in sides:
    out[name]["tokens_per_s"] = args.batch * args.new_tokens / statistics.median(
        out[name]["times_s"])
  if "hf" in out:
    out["ratio_ours_over_hf"] = out["jrlhf"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
  return out


def ppo_split(args) -> dict:
  """Runs tiny/ppo for --ppo-steps iterations; the median seconds of each phase after step 1."""
  from jrlhf.config import resolve  # noqa: PLC0415
  from jrlhf.train import online  # noqa: PLC0415

  overrides = {"steps": str(args.ppo_steps), "train.log_every": "1", "train.eval_every": "0",
               "train.num_samples": "0", "train.checkpoint_every": "0", "train.progress": "false"}
  init_from = None
  if args.tiny:
    overrides.update(TINY_PPO)
  elif pathlib.Path(args.init_from).is_dir():
    init_from = overrides["init_from"] = args.init_from
  cfg = resolve("tiny/ppo", overrides)
  with tempfile.TemporaryDirectory() as run_dir:
    online.train(cfg, pathlib.Path(run_dir))
    rows = [json.loads(line) for line in
            (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  steady = rows[1:] or rows
  seconds = {p: statistics.median(r[f"perf/{p}_s"] for r in steady) for p in PHASES}
  alg = cfg.algorithm
  return {"init_from": init_from, "steps": [r["step"] for r in steady],
          "rollouts": alg.prompts_per_step, "new_tokens": alg.max_new_tokens,
          "epochs": alg.num_ppo_epochs, "mini_batches": alg.num_mini_batches,
          "first_step_s": {p: rows[0][f"perf/{p}_s"] for p in PHASES},
          "seconds": seconds, "total_s": sum(seconds.values())}


def report(args, results) -> None:
  r = results.get("rollout")
  if r:
    print(f"rollout: B{args.batch} prompt {args.prompt_len} + {args.new_tokens} new, "
          f"T={args.temperature}, behaviour log-probs; hidden {args.hidden}, {args.layers} "
          f"layers, vocab {args.vocab}, f32")
    print(f"{'':8} {'tok/s':>9} {'median s':>9} {'warmup s':>9}")
    for name in ("jrlhf", "hf"):
      if name in r:
        print(f"{name:8} {r[name]['tokens_per_s']:9.1f} {statistics.median(r[name]['times_s']):9.3f}"
              f" {r[name]['warmup_s']:9.2f}")
    if "ratio_ours_over_hf" in r:
      print(f"ratio jrlhf / hf: {r['ratio_ours_over_hf']:.2f}x")
  p = results.get("ppo")
  if p:
    start = p["init_from"] or "random init"
    print(f"\njrlhf PPO iteration (tiny/ppo from {start}): {p['rollouts']} rollouts x "
          f"{p['new_tokens']} new tokens, {p['epochs']} epochs x {p['mini_batches']} "
          f"mini-batches; median of steps {p['steps'][0]}-{p['steps'][-1]}")
    print(f"{'phase':10} {'s':>8} {'%':>6}")
    for phase, s in p["seconds"].items():
      print(f"{phase:10} {s:8.3f} {100 * s / p['total_s']:6.1f}")
    print(f"{'total':10} {p['total_s']:8.3f}")
  print(f"load average (1 min) at the end: {results['load_average_1m']:.1f} "
        f"on {os.cpu_count()} cores")


def main():
  args = parse_args()
  results = {"config": vars(args), "devices": str(jax.devices())}
  results["rollout"] = rollout_benchmark(args)
  if args.ppo_steps:
    results["ppo"] = ppo_split(args)
  # A busy machine (load above its core count) slows every side; say so next to the numbers.
  results["load_average_1m"] = os.getloadavg()[0]
  report(args, results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
