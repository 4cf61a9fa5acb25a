"""On-policy preference pairs: sample k responses per prompt from a policy, score them, pair them.

  python -m jrlhf.onpolicy --policy runs/tiny-sft,train.export=true/export --out pairs.jsonl \\
      --num-prompts 512 --k 8 --temperature 1.0            # scored by the tiny task's scorer
  python -m jrlhf.onpolicy --policy DIR --reward-model runs/<an RM run>/export \\
      --mode margin --margin 0.5 --out pairs.jsonl data.source=prompts.jsonl data.tokenizer=DIR
  python -m jrlhf.run experiment=tiny/dpo init_from=DIR data.pairs=pairs.jsonl   # DPO on them

Prompts are the training split of the data config (`data.KEY=VALUE` as for jrlhf.run, on top
of `--experiment`'s; the tiny task by default; any file or hub id whose rows are chat
`messages`, `prompt` [+ `completion`], or preference pairs): a seeded sample of `--num-prompts`,
less those of data.max_length tokens or more. Each is encoded as the DPO reader will encode it
(the policy continues exactly the prompt DPO trains on), repeated k times, left-padded and
sampled with the jitted `Sampler` (EOS stops a row, as in the online loop). Scores come from the
source's reward function (`jrlhf.train.online.REWARD_FNS`: the tiny task's exact match against
the reference) or, with `--reward-model`, from an RM run's export on [prompt; response]. A
response that never emitted EOS loses `--missing-eos-penalty`. Empty responses cannot be a pair
side: they are left out of pairing (counted).

Pairs (`make_pairs`), always with chosen scored strictly above rejected:
  best_worst  one per prompt: the highest- against the lowest-scored response; a prompt whose
              responses all tie (or differ by less than --margin) gives none and is counted.
  margin      every pair of distinct responses whose scores differ by > 0 and >= --margin.
The file holds `{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}` rows (chat
prompts as message lists), and `<out>.summary.json` the counts and the mean sampled score.

Measured on the tiny task: see experiments/tiny/dpo_onpolicy.py (rounds of `jrlhf.iterative_dpo`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jrlhf import config as config_lib
from jrlhf import data as data_lib
from jrlhf.algorithms import ppo
from jrlhf.data.formats import MalformedRow, check_messages
from jrlhf.models import from_pretrained
from jrlhf.models.generate import Sampler, SamplingConfig
from jrlhf.sample import fixed_batches
from jrlhf.sharding import batch_ways, make_mesh

MODES = ("best_worst", "margin")
# Encodes a prompt with this stand-in response when its row has none: only the tokens before
# the response are kept, the ones the Encoder gives any response.
_STAND_IN = "x"


@dataclasses.dataclass(frozen=True)
class PairSettings:
  """How responses are drawn and paired. num_prompts: training prompts used (a seeded sample).
  k: responses per prompt. batch_size: rows per sampler call, rounded up to the mesh's batch
  ways (one compiled program for every call). mode / margin: see the module docstring."""

  num_prompts: int = 256
  k: int = 4
  temperature: float = 1.0
  top_p: float = 1.0
  max_new_tokens: int = 16
  seed: int = 0
  batch_size: int = 256
  mode: str = "best_worst"
  margin: float = 0.0
  missing_eos_penalty: float = 0.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
    if self.k < 2:
      raise ValueError(f"k={self.k}: a pair needs at least 2 responses per prompt")
    if self.num_prompts < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
      raise ValueError(f"num_prompts={self.num_prompts}, batch_size={self.batch_size} and "
                       f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if not self.margin >= 0:
      raise ValueError(f"margin={self.margin} must be >= 0 (pairs need chosen - rejected >= it)")


def make_pairs(texts_PxK: Sequence[Sequence[str]], scores_PxK: np.ndarray, mode: str = "best_worst",
               margin: float = 0.0) -> tuple[list[tuple[int, int, int]], int]:
  """(pairs as (prompt, chosen, rejected) indices into the P x K grid, prompts without a pair).

  Every pair has score_chosen > score_rejected and score_chosen - score_rejected >= margin.
  NaN scores (unusable responses) never enter a pair. `margin` mode keeps one pair per distinct
  (chosen text, rejected text), so a response sampled twice does not double its pairs.

    make_pairs([["a", "b", "c"]], np.array([[0., 1., .5]]))            # ([(0, 1, 0)], 0)
    make_pairs([["a", "b"]], np.array([[1., 1.]]))                     # ([], 1): a tie
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
  scores_PxK = np.asarray(scores_PxK, np.float64)
  if scores_PxK.ndim != 2 or len(texts_PxK) != scores_PxK.shape[0] or any(
      len(t) != scores_PxK.shape[1] for t in texts_PxK):
    raise ValueError(f"texts ({len(texts_PxK)} prompts) and scores {scores_PxK.shape} must both "
                     f"be P x K")
  pairs, unpaired = [], 0
  for p, (texts_K, scores_K) in enumerate(zip(texts_PxK, scores_PxK)):
    valid = [i for i in range(len(scores_K)) if not math.isnan(scores_K[i])]
    found = []
    if mode == "best_worst" and valid:
      best = max(valid, key=lambda i: scores_K[i])  # the first of tied maxima
      worst = min(valid, key=lambda i: scores_K[i])
      gap = scores_K[best] - scores_K[worst]
      if gap > 0 and gap >= margin:
        found.append((p, best, worst))
    elif mode == "margin":
      seen = set()
      for c, r in itertools.permutations(valid, 2):
        gap = scores_K[c] - scores_K[r]
        if gap > 0 and gap >= margin and (texts_K[c], texts_K[r]) not in seen:
          seen.add((texts_K[c], texts_K[r]))
          found.append((p, c, r))
    pairs += found
    unpaired += not found
  return pairs, unpaired


def prompt_of(row: dict[str, Any]) -> tuple[Any, str | None]:
  """(prompt, reference answer or None) of a data row; raises MalformedRow.

  messages: the turns before the last assistant turn, and that turn's text; prompt [+
  completion]: as given; preference rows: the shared prompt, and the chosen response."""
  if "messages" in row and row["messages"] is not None:
    messages = check_messages(row["messages"])
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
      return messages, None
    if last == 0:
      raise MalformedRow("the first turn is the assistant's: no prompt before it")
    return messages[:last], messages[last]["content"]
  if "chosen" in row:
    prompt, chosen, _ = data_lib.preference.normalise(row)
    return prompt, chosen[-1]["content"] if isinstance(chosen, list) else chosen
  if row.get("prompt") is not None:
    prompt, completion = row["prompt"], row.get("completion")
    if isinstance(prompt, list):
      prompt = check_messages(prompt, "prompt")
    elif not isinstance(prompt, str) or not prompt:
      raise MalformedRow("prompt must be a non-empty string or a message list")
    if isinstance(completion, list) and completion:
      completion = completion[-1].get("content")
    return prompt, completion if isinstance(completion, str) else None
  raise MalformedRow(f"no prompt: expected messages, prompt [+ completion] or a preference row "
                     f"(found {sorted(row)})")


def as_response(prompt: Any, text: str) -> Any:
  """A sampled text as a pair side of the prompt's kind: an assistant turn for chats."""
  return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def prompt_tokens(encoder, prompt: Any) -> np.ndarray:
  """The tokens the DPO reader puts before any response to `prompt` (template, generation
  prompt and BOS included): what the policy continues."""
  tokens_L, mask_L = encoder.encode(
      {"prompt": prompt, "completion": as_response(prompt, _STAND_IN)}, "prompt_completion")
  return tokens_L[:int(np.argmax(mask_L))]


@dataclasses.dataclass
class Prompts:
  """The prompts sampled from: raw (for the pairs file), as tokens, and their references."""

  raw: list[Any]
  tokens: list[np.ndarray]
  references: list[str | None]
  skipped: int = 0  # malformed rows, or prompts too long for data.max_length


def load_prompts(cfg: data_lib.DataConfig, tokenizer, num_prompts: int, seed: int) -> Prompts:
  """A seeded sample of `num_prompts` training prompts of `cfg.source` (fewer if it has fewer)."""
  rows, _ = data_lib.load_rows(cfg)
  order = np.random.default_rng(seed).permutation(len(rows))
  encoder = data_lib.Encoder(tokenizer, completion_only_loss=True)
  out = Prompts([], [], [])
  for i in order:
    if len(out.raw) == num_prompts:
      break
    try:
      prompt, reference = prompt_of(rows[int(i)])
      tokens = prompt_tokens(encoder, prompt)
    except MalformedRow:
      out.skipped += 1
      continue
    if not len(tokens) or len(tokens) >= cfg.max_length:
      out.skipped += 1
      continue
    out.raw.append(prompt)
    out.tokens.append(tokens)
    out.references.append(reference)
  if not out.raw:
    raise ValueError(f"no usable prompts in data.source={cfg.source!r} ({out.skipped} skipped: "
                     f"malformed rows, or prompts of data.max_length={cfg.max_length} tokens or "
                     f"more)")
  return out


class RewardModel:
  """A frozen scalar-head model (an RM run's export) scoring [prompt; response] at its last
  real token (`ppo.sequence_scores`)."""

  def __init__(self, directory: str | os.PathLike, mesh, dtype: str = "float32"):
    model, self.params = from_pretrained(directory, dtype=dtype, head="scalar", mesh=mesh)
    self._scores = jax.jit(functools.partial(ppo.sequence_scores, model))

  def __call__(self, prompt_BxP, mask_BxP, tokens_BxN, lengths_B) -> np.ndarray:
    batch = ppo.rollout_batch(prompt_BxP, mask_BxP, tokens_BxN, lengths_B)
    return np.asarray(self._scores(self.params, batch), np.float64)


@dataclasses.dataclass
class Samples:
  """k responses per prompt: decoded texts, whether each stopped, reward-model scores if any."""

  texts_PxK: list[list[str]]
  done_PxK: np.ndarray
  rm_scores_PxK: np.ndarray | None


def sample_responses(model, params, prompts: Sequence[np.ndarray], decode: Callable, *,
                     settings: PairSettings, stop_tokens: tuple[int, ...], pad_id: int, mesh,
                     reward_model: RewardModel | None = None) -> Samples:
  """`settings.k` samples of every prompt, in fixed-shape batches (one compile)."""
  ways = batch_ways(mesh)
  size = -(-settings.batch_size // ways) * ways
  sampler = Sampler(model, SamplingConfig(
      temperature=settings.temperature, top_p=settings.top_p,
      max_new_tokens=settings.max_new_tokens, stop_tokens=stop_tokens, pad_id=pad_id))
  k = settings.k
  rows = [i for i in range(len(prompts)) for _ in range(k)]  # k consecutive rows per prompt
  texts, done, rm_scores = [], [], []
  rng = jax.random.PRNGKey(settings.seed)
  for n, (_, real, placed) in enumerate(fixed_batches(prompts, rows, size, pad_id, mesh)):
    gen = sampler(params, placed["p"], placed["m"], jax.random.fold_in(rng, n))
    if reward_model is not None:
      rm_scores += reward_model(placed["p"], placed["m"], gen.tokens_BxN, gen.lengths_B
                                )[:real].tolist()
    tokens_BxN, lengths_B, done_B = jax.device_get((gen.tokens_BxN, gen.lengths_B, gen.done_B))
    texts += [decode(tokens_BxN[r, :lengths_B[r]].tolist()) for r in range(real)]
    done += done_B[:real].tolist()
  grid = [texts[p * k:(p + 1) * k] for p in range(len(prompts))]
  return Samples(grid, np.asarray(done, bool).reshape(-1, k),
                 np.asarray(rm_scores).reshape(-1, k) if reward_model is not None else None)


def score_samples(samples: Samples, references: Sequence[str | None],
                  score_fn: Callable[[str, str], float] | None, missing_eos_penalty: float
                  ) -> np.ndarray:
  """P x K scores: the reward model's, else `score_fn(text, reference)`; minus the penalty for
  responses that never stopped; NaN for empty responses (no pair side can hold them)."""
  if samples.rm_scores_PxK is not None:
    scores_PxK = samples.rm_scores_PxK.astype(np.float64)
  else:
    missing = [p for p, ref in enumerate(references) if ref is None]
    if score_fn is None or missing:
      raise ValueError(f"a reward function needs a reference answer per prompt ({len(missing)} "
                       f"prompts have none); give --reward-model instead")
    scores_PxK = np.array([[score_fn(t, ref) for t in texts_K]
                           for texts_K, ref in zip(samples.texts_PxK, references)], np.float64)
  scores_PxK = scores_PxK - missing_eos_penalty * ~samples.done_PxK
  empty_PxK = np.array([[not t.strip() for t in texts_K] for texts_K in samples.texts_PxK])
  return np.where(empty_PxK, np.nan, scores_PxK)


def pair_rows(prompts: Prompts, samples: Samples, scores_PxK: np.ndarray,
              pairs: Sequence[tuple[int, int, int]]) -> list[dict[str, Any]]:
  """The pairs as preference rows the DPO reader accepts, scores kept alongside."""
  return [{"prompt": prompts.raw[p],
           "chosen": as_response(prompts.raw[p], samples.texts_PxK[p][c]),
           "rejected": as_response(prompts.raw[p], samples.texts_PxK[p][r]),
           "score_chosen": float(scores_PxK[p, c]), "score_rejected": float(scores_PxK[p, r])}
          for p, c, r in pairs]


def _write_atomic(path: pathlib.Path, text: str) -> None:
  """Written whole or not at all: a rerun never mistakes a cut-off file for a finished one."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def summary_path(out: str | os.PathLike) -> pathlib.Path:
  out = pathlib.Path(out)
  return out.with_name(out.stem + ".summary.json")


def generate_pairs(policy: str | os.PathLike, data_cfg: data_lib.DataConfig,
                   out: str | os.PathLike, settings: PairSettings = PairSettings(), *,
                   reward_model: str | None = None,
                   reward_fn: Callable[[str, str], float] | None = None,
                   dtype: str = "float32", mesh=None) -> dict[str, Any]:
  """Samples, scores and pairs (see the module docstring); writes `out` (JSONL) and its
  summary; returns the summary. `reward_fn(text, reference)` replaces the source's scorer."""
  from jrlhf.train.online import REWARD_FNS  # noqa: PLC0415 - the training stack, on first use

  if jax.process_count() > 1:
    raise NotImplementedError("on-policy pairs are generated on one process; run it on one host")
  score_fn = reward_fn or REWARD_FNS.get(data_cfg.source)
  if score_fn is None and not reward_model:
    raise ValueError(f"data.source={data_cfg.source!r} has no reward function (known: "
                     f"{', '.join(REWARD_FNS)}); give a reward model (--reward-model DIR, an RM "
                     f"run's export)")
  out = pathlib.Path(out)
  tokenizer = data_lib.load_tokenizer(data_cfg.tokenizer)
  prompts = load_prompts(data_cfg, tokenizer, settings.num_prompts, settings.seed)
  mesh = make_mesh(config_lib.Config().mesh) if mesh is None else mesh
  model, params = from_pretrained(policy, dtype=dtype, mesh=mesh)
  rm = RewardModel(reward_model, mesh, dtype) if reward_model else None
  eos = tokenizer.eos_token_id
  pad_id = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
  samples = sample_responses(
      model, params, prompts.tokens, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
      settings=settings, stop_tokens=() if eos is None else (eos,), pad_id=pad_id, mesh=mesh,
      reward_model=rm)
  scores_PxK = score_samples(samples, prompts.references, score_fn, settings.missing_eos_penalty)
  pairs, unpaired = make_pairs(samples.texts_PxK, scores_PxK, settings.mode, settings.margin)
  rows = pair_rows(prompts, samples, scores_PxK, pairs)
  scored_P = ~np.all(np.isnan(scores_PxK), axis=1)
  summary = {
      "policy": str(policy), "source": data_cfg.source, "reward": reward_model or "function",
      "mode": settings.mode, "margin": settings.margin, "k": settings.k,
      "prompts": len(prompts.raw), "prompts_skipped": prompts.skipped,
      "samples": int(scores_PxK.size), "empty_samples": int(np.isnan(scores_PxK).sum()),
      "pairs": len(rows), "prompts_without_pair": unpaired,
      "mean_score": float(np.nanmean(scores_PxK)) if scored_P.any() else math.nan,
      # Best of k, averaged over prompts: the task's pass@k for an exact-match scorer.
      "mean_best_score": float(np.nanmax(scores_PxK[scored_P], axis=1).mean())
                         if scored_P.any() else math.nan,
      "eos_fraction": float(samples.done_PxK.mean()),
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  _write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
  _write_atomic(summary_path(out), json.dumps(summary, indent=1) + "\n")
  return summary


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jrlhf.onpolicy",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--policy", required=True, help="the policy: an HF export directory")
  parser.add_argument("--out", required=True, help="the pairs file to write (.jsonl)")
  parser.add_argument("--experiment", default="",
                      help="take the data section (source, tokenizer, split) from this experiment")
  parser.add_argument("--reward-model", help="an RM run's export (default: the source's scorer)")
  parser.add_argument("--dtype", default="float32")
  fields = {f.name: f for f in dataclasses.fields(PairSettings)}
  for name, f in fields.items():
    parser.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default,
                        **({"choices": MODES} if name == "mode" else {}))
  parser.add_argument("data", nargs="*", metavar="data.KEY=VALUE",
                      help="the prompts' data config, as for jrlhf.run (default: the tiny task)")
  args = parser.parse_args(argv)
  try:
    settings = PairSettings(**{name: getattr(args, name) for name in fields})
    overrides = config_lib.parse_overrides(args.data)
    other = [k for k in overrides if not k.startswith("data.")]
    if other:
      raise ValueError(f"{', '.join(other)}: only data.* keys choose the prompts")
    data_cfg = config_lib.resolve(args.experiment, overrides).data
    summary = generate_pairs(args.policy, data_cfg, args.out, settings,
                             reward_model=args.reward_model, dtype=args.dtype)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  print(f"[jrlhf] pairs: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
