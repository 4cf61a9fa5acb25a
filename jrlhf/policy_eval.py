"""Reward and KL of a trained policy, measured the same way whatever trained it.

  python -m jrlhf.policy_eval RUN_DIR [--reference DIR] [--prompts 256] [--samples 4]
  metrics = evaluate_run("runs/tiny-dpo,...", reference="runs/tiny-sft,.../export")

The policy is the run's HF export (`RUN_DIR/export`, so run with `train.export=true`); the
reference defaults to the run's `init_from` (the SFT model a DPO/PPO/GRPO run started from, and
its KL reference). On the held-out prompts of the run's data source, `--samples` responses per
prompt are drawn from the policy itself at `--temperature` (1 by default: the policy's own
distribution) and scored by the task's reward function. Per response, both models score the
sampled tokens (one forward pass each, the same function for both) and the sequence-level KL
estimate is the sum over response tokens of log pi(y_t) - log pi_ref(y_t): its mean over samples
is an unbiased Monte Carlo estimate of KL(pi || pi_ref) on those prompts (REFERENCE.md, the DPO
paper's reward-vs-KL comparison). Greedy exact match on the same prompts is reported too.

Writes `RUN_DIR/policy_eval.json`, `{"step": N, "metrics": {...}}`, which `jrlhf.report` reads
as the run's last logged step:

  policy/reward      mean task score of the sampled responses
  policy/kl          mean sequence-level KL to the reference (nats per response)
  policy/accuracy    greedy exact match (the runs' eval/accuracy, on the same prompts)
  policy/*_stderr    the standard error of each of those three (the report's error bars)
  policy/length      mean response length (tokens, EOS included); policy/eos_fraction
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import config as config_lib
from jrlhf import data as data_lib
from jrlhf.algorithms import ppo
from jrlhf.models import from_pretrained
from jrlhf.models.generate import Sampler, SamplingConfig
from jrlhf.sample import fixed_batches
from jrlhf.sharding import batch_ways, make_mesh
from jrlhf.train import evaluate, metrics as metrics_lib
from jrlhf.train.online import REWARD_FNS

EVAL_FILE = "policy_eval.json"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How the policy is probed. prompts: held-out prompts used (at most the eval split).
  samples: responses per prompt. batch_size: rows per sampler call (a multiple of the mesh's
  batch ways; one compiled program for every call)."""

  prompts: int = 256
  samples: int = 4
  temperature: float = 1.0
  max_new_tokens: int = 16
  seed: int = 0
  batch_size: int = 128


def sequence_kl(logp_BxN: jax.Array, ref_logp_BxN: jax.Array, mask_BxN: jax.Array) -> jax.Array:
  """Per-response sum of log pi - log pi_ref over the response tokens (k1, summed)."""
  return jnp.sum(jnp.where(mask_BxN, logp_BxN - ref_logp_BxN, 0.0), axis=-1)


def stderr(values) -> float:
  """Standard error of the mean (sample std / sqrt(n)); 0 for fewer than two values."""
  values = np.asarray(values, np.float64)
  return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def _logprobs(model, params, batch, temperature):
  return ppo.response_logprobs(model, params, batch, temperature)


def evaluate_policy(policy_dir: str | pathlib.Path, reference_dir: str | pathlib.Path,
                    prompts: Sequence[Sequence[int]], references: Sequence[str],
                    score: Callable[[str, str], float], decode: Callable[[Sequence[int]], str], *,
                    stop_tokens: tuple[int, ...], pad_id: int, settings: EvalSettings = EvalSettings(),
                    mesh=None) -> dict[str, float]:
  """The metrics above for the policy at `policy_dir` (an HF export) against `reference_dir`."""
  if jax.process_count() > 1:
    raise NotImplementedError("policy_eval runs on one process; run it on one host of the pod")
  prompts, references = list(prompts), list(references)
  if not prompts:
    raise ValueError("no held-out prompts to evaluate on (the data source's eval split is empty)")
  mesh = make_mesh(config_lib.Config().mesh) if mesh is None else mesh
  ways = batch_ways(mesh)
  if settings.batch_size % ways:
    raise ValueError(f"batch_size={settings.batch_size} must be a multiple of the mesh's {ways} "
                     f"batch ways")
  model, params = from_pretrained(policy_dir, mesh=mesh)
  ref_model, ref_params = from_pretrained(reference_dir, mesh=mesh)
  if ref_model.cfg.vocab_size != model.cfg.vocab_size:
    raise ValueError(f"reference {reference_dir} has vocab {ref_model.cfg.vocab_size}, the policy "
                     f"{model.cfg.vocab_size}: a KL needs the same tokenizer")
  sampler = Sampler(model, SamplingConfig(max_new_tokens=settings.max_new_tokens,
                                          temperature=settings.temperature,
                                          stop_tokens=stop_tokens, pad_id=pad_id))
  policy_logp = jax.jit(functools.partial(_logprobs, model, temperature=settings.temperature))
  ref_logp = jax.jit(functools.partial(_logprobs, ref_model, temperature=settings.temperature))

  kl, rewards, lengths, done = [], [], [], []
  rng = jax.random.PRNGKey(settings.seed)
  sampled_rows = [i for i in range(len(prompts)) for _ in range(settings.samples)]
  batches = fixed_batches(prompts, sampled_rows, settings.batch_size, pad_id, mesh)
  for n, (idx, real, placed) in enumerate(batches):
    gen = sampler(params, placed["p"], placed["m"], jax.random.fold_in(rng, n))
    batch = ppo.rollout_batch(placed["p"], placed["m"], gen.tokens_BxN, gen.lengths_B)
    kl_B = sequence_kl(policy_logp(params, batch), ref_logp(ref_params, batch),
                       batch["response_mask"])
    tokens_BxN, lengths_B, done_B, kl_B = jax.device_get(
        (gen.tokens_BxN, gen.lengths_B, gen.done_B, kl_B))
    rewards += [float(score(decode(tokens_BxN[r, :lengths_B[r]].tolist()), references[idx[r]]))
                for r in range(real)]
    kl += kl_B[:real].tolist()
    lengths += lengths_B[:real].tolist()
    done += done_B[:real].tolist()
  # Greedy exact match exactly as the runs' held-out eval computes eval/accuracy.
  _, greedy_rows = evaluate.Generations(
      model, prompts, references, score, decode, max_new_tokens=settings.max_new_tokens,
      stop_tokens=stop_tokens, pad_id=pad_id, mesh=mesh)(params, rng)
  greedy_scores = [row["score"] for row in greedy_rows]
  kl = np.asarray(kl, np.float64)
  return {
      "policy/reward": float(np.mean(rewards)),
      "policy/reward_stderr": stderr(rewards),
      "policy/kl": float(kl.mean()),
      "policy/kl_stderr": stderr(kl),
      "policy/accuracy": float(np.mean(greedy_scores)),
      "policy/accuracy_stderr": stderr(greedy_scores),
      "policy/length": float(np.mean(lengths)),
      "policy/eos_fraction": float(np.mean(done)),
      "policy/responses": float(len(kl)),
  }


def evaluate_run(run_dir: str | pathlib.Path, reference: str | pathlib.Path | None = None,
                 settings: EvalSettings = EvalSettings(), write: bool = True) -> dict[str, Any]:
  """Evaluates RUN_DIR's export against `reference` (default: the run's init_from); writes
  RUN_DIR/policy_eval.json unless `write=False`; returns its contents."""
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / "config.json").exists():
    raise FileNotFoundError(f"{run_dir} has no config.json: not a run directory")
  cfg = config_lib.load_config(run_dir / "config.json")
  export = run_dir / "export"
  if not (export / "config.json").exists():
    raise FileNotFoundError(f"{export} has no HF checkpoint: run the experiment with "
                            f"train.export=true (PEFT runs: a method that exports merged weights)")
  reference = reference or cfg.init_from
  if not reference:
    raise ValueError(f"{run_dir} has no init_from to measure the KL against; pass --reference DIR")
  score = REWARD_FNS.get(cfg.data.source)
  if score is None:
    raise ValueError(f"data.source={cfg.data.source!r} has no reward function (known: "
                     f"{', '.join(REWARD_FNS)})")
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  _, eval_ds, _ = data_lib.load_dataset(cfg.data, tokenizer)
  prompts, references = eval_ds.prompts_and_references(tokenizer, settings.prompts)
  eos = tokenizer.eos_token_id
  metrics = evaluate_policy(
      export, reference, prompts, references, score,
      lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
      stop_tokens=() if eos is None else (eos,), pad_id=eval_ds.pad_id, settings=settings,
      mesh=make_mesh(cfg.mesh))
  last = metrics_lib.last_logged_step(run_dir / "metrics.jsonl")
  out = {"step": cfg.steps if last is None else last, "metrics": metrics,
         "settings": {**dataclasses.asdict(settings), "reference": str(reference)}}
  if write:
    (run_dir / EVAL_FILE).write_text(json.dumps(out, indent=1) + "\n")
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jrlhf.policy_eval",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="run directories (each with export/)")
  parser.add_argument("--reference", help="HF checkpoint dir (default: each run's init_from)")
  defaults = EvalSettings()
  for field in dataclasses.fields(EvalSettings):
    parser.add_argument(f"--{field.name.replace('_', '-')}",
                        type=float if field.type == "float" else int,
                        default=getattr(defaults, field.name))
  args = parser.parse_args(argv)
  settings = EvalSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)})
  failed = 0
  for run in args.runs:
    try:
      out = evaluate_run(run, args.reference, settings)
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {run}: {e}", file=sys.stderr)
      failed += 1
      continue
    shown = ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in out["metrics"].items())
    print(f"[jrlhf] {run}: {shown}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
