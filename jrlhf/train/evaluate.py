"""Evaluation at the loop's eval cadence: held-out loss and sampled generations scored by match.

  loss_metrics = eval_loss(eval_fn, state, batches, mesh, metrics_fn)   # eval loss, perplexity
  gen = Generations(model, prompts, references, score, decode, ...)
  metrics, rows = gen(params, rng)           # {"accuracy": ...}, rows for samples.jsonl
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jrlhf.models.generate import Sampler, SamplingConfig
from jrlhf.sharding import batch_ways, put_batch


def pad_rows(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Appends all-padding rows (no targets) so the row count splits over the mesh."""
  rows = next(iter(batch.values())).shape[0]
  extra = -rows % multiple
  if not extra:
    return batch
  return {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def eval_loss(eval_fn: Callable, state: Any, batches: Iterable[dict[str, np.ndarray]], mesh,
              metrics_fn: Callable[[dict[str, float]], dict[str, float]],
              max_batches: int = 0) -> dict[str, float]:
  """Sums `eval_fn`'s per-batch sums over the held-out batches, then `metrics_fn` of the totals."""
  totals: dict[str, Any] = {}
  ways = batch_ways(mesh)
  batches = itertools.islice(batches, max_batches) if max_batches else batches
  for batch in batches:
    sums = eval_fn(state, put_batch(pad_rows(batch, ways), mesh))
    totals = sums if not totals else jax.tree.map(lambda a, b: a + b, totals, sums)
  if not totals:
    return {}
  return metrics_fn({k: float(v) for k, v in jax.device_get(totals).items()})


class Generations:
  """Greedy completions of fixed held-out prompts, decoded and scored against references.

  Prompts are left-padded to the longest one and rows padded to a multiple of the mesh's batch
  ways, once, so every eval reuses one compiled sampler.
  """

  def __init__(self, model, prompts: Sequence[np.ndarray], references: Sequence[str],
               score: Callable[[str, str], float], decode: Callable[[Sequence[int]], str], *,
               max_new_tokens: int, stop_tokens: tuple[int, ...], pad_id: int, mesh):
    if not prompts:
      raise ValueError("no held-out prompts to generate from; set train.num_samples=0")
    self.references, self.score, self.decode = list(references), score, decode
    self.prompts = [np.asarray(p, np.int32) for p in prompts]
    empty = [i for i, p in enumerate(self.prompts) if len(p) == 0]
    if empty:
      raise ValueError(f"held-out prompts {empty[:5]} are empty: the sampler needs at least one "
                       f"prompt token per row")
    self.mesh = mesh
    # Rows split over the mesh's batch ways and evenly over processes (each feeds its slice).
    multiple = math.lcm(batch_ways(mesh), jax.process_count())
    rows = len(self.prompts) + (-len(self.prompts) % multiple)
    width = max(len(p) for p in self.prompts)
    self.prompt_BxP = np.full((rows, width), pad_id, np.int32)
    self.mask_BxP = np.zeros((rows, width), bool)
    for i, p in enumerate(self.prompts):
      self.prompt_BxP[i, width - len(p):] = p
      self.mask_BxP[i, width - len(p):] = True
    self.mask_BxP[len(self.prompts):, -1] = True  # filler rows: one real token each
    self.sampler = Sampler(model, SamplingConfig(
        temperature=0.0, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, pad_id=pad_id))

  def __call__(self, params: Any, rng) -> tuple[dict[str, float], list[dict[str, Any]]]:
    rank, ranks = jax.process_index(), jax.process_count()
    per = len(self.prompt_BxP) // ranks
    local = {"p": self.prompt_BxP[rank * per:(rank + 1) * per],
             "m": self.mask_BxP[rank * per:(rank + 1) * per]}
    placed = put_batch(local, self.mesh)
    out = self.sampler(params, placed["p"], placed["m"], rng)
    # Every process scores every row (cheap, host-side) so all agree on the metric.
    out = multihost_utils.process_allgather(out, tiled=True) if ranks > 1 else jax.device_get(out)
    rows, scores = [], []
    for i, reference in enumerate(self.references):
      tokens = out.tokens_BxN[i, :out.lengths_B[i]].tolist()
      completion = self.decode(tokens)
      score = float(self.score(completion, reference))
      scores.append(score)
      rows.append({"prompt": self.decode(self.prompts[i].tolist()), "completion": completion,
                   "reference": reference, "score": score, "stopped": bool(out.done_B[i])})
    return {"accuracy": float(np.mean(scores)) if scores else math.nan}, rows
