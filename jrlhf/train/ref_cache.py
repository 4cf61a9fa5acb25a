"""DPO's reference log-probs, computed once per (data, model) and kept in the run directory.

  path, computed = fill(cfg, data, run_dir, model, state, mesh)   # before training (the loop)

With `algorithm.precompute_ref=true` the loop calls `fill` on the freshly created state (before
any checkpoint is restored, so the reference is the starting model even on a restart). It runs
the reference over every train and held-out pair once, in batches shaped like training's, and
writes `run_dir/ref_cache/<key>.npz`; a rerun with the same key reads the file instead. The
logps then ride in the pairs' `ref_chosen_logps` / `ref_rejected_logps` columns, which batches
carry as the per-row `ref_logps` column (`jrlhf.data.preference`), so no reference forward runs
in any step and full fine-tuning needs no frozen copy of the model.

The key (`cache_key`) covers what the logps depend on: the data fingerprint (data config, seed,
pair count), where the weights come from (`init_from`, or the seed of a random init), the model
config (shape, dtypes) and the PEFT method (QLoRA's reference is the quantized base). No DPO
key changes them: beta and the loss act on the logps afterwards.
"""

from __future__ import annotations

import io
from typing import Any

import chz
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jrlhf.algorithms import dpo
from jrlhf.algorithms.step import REFERENCE, combine_params
from jrlhf.data.preference import PreferenceBatches, PreferenceDataset
from jrlhf.peft import trainable as peft_trainable
from jrlhf.sharding import put_batch, sharding_context
from jrlhf.train import checkpoint

CHOSEN, REJECTED = "ref_chosen_logps", "ref_rejected_logps"


def cache_key(cfg, data_fingerprint: str) -> str:
  return checkpoint.fingerprint(data=data_fingerprint, init_from=cfg.init_from, seed=cfg.seed,
                                model=chz.asdict(cfg.model), peft=chz.asdict(cfg.peft))


def starting_reference(state) -> Any:
  """The reference params of a state that has not trained yet: the frozen copy if there is one,
  the base under PEFT, else (full fine-tuning without a copy) the starting policy itself."""
  if isinstance(state.frozen, dict) and REFERENCE in state.frozen:
    return state.frozen[REFERENCE]
  params = combine_params(state.trainable, state.frozen)
  return peft_trainable.base_params(params) if jax.tree.leaves(state.frozen) else params


def compute(splits: dict[str, PreferenceDataset], data_cfg, model, ref_params, mesh
            ) -> dict[str, np.ndarray]:
  """{"<split>/chosen": (N,), "<split>/rejected": (N,)} summed reference logps of every pair."""
  # Replicated output: every process reads back all rows, not only the ones it fed.
  logps = jax.jit(lambda p, b: dpo.sequence_logps(p, b, model),
                  out_shardings=NamedSharding(mesh, PartitionSpec()))
  rank, ranks = jax.process_index(), jax.process_count()
  out = {}
  with sharding_context(mesh):
    for name, pairs in splits.items():
      batches = PreferenceBatches(pairs, data_cfg, seed=0, shuffle=False)
      chosen, rejected = [], []
      for batch in batches.eval_batches():  # every pair once, in order; 2 * batch_size rows
        per = len(batch["tokens"]) // ranks
        local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
        row_B = np.asarray(jax.device_get(logps(ref_params, put_batch(local, mesh))))
        half = len(row_B) // 2
        chosen.append(row_B[:half])
        rejected.append(row_B[half:])
      n = len(pairs)
      out[f"{name}/chosen"] = np.concatenate(chosen)[:n] if n else np.zeros(0, np.float32)
      out[f"{name}/rejected"] = np.concatenate(rejected)[:n] if n else np.zeros(0, np.float32)
  return out


def fill(cfg, data, run_dir, model, state, mesh) -> tuple[Any, bool]:
  """Reads or computes the reference logps of `data.pairs` (the loop's `RunData`) and puts them
  in the pairs' columns. Returns (the cache file, whether it was computed now)."""
  if data.pairs is None:
    raise ValueError("algorithm.precompute_ref=true needs the run's preference pairs; this run's "
                     "data has none (a custom RunData without `pairs`)")
  path = run_dir / "ref_cache" / f"{cache_key(cfg, data.fingerprint)}.npz"
  computed = not path.exists()
  if computed:
    arrays = compute(data.pairs, cfg.data, model, starting_reference(state), mesh)
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      buffer = io.BytesIO()  # through bytes: the run dir may be a bucket path
      np.savez(buffer, **arrays)
      tmp = path.parent / f"{path.name}.tmp"
      tmp.write_bytes(buffer.getvalue())
      tmp.rename(path)  # a run killed mid-write leaves no half file under the real name
  else:
    with np.load(io.BytesIO(path.read_bytes())) as npz:
      arrays = {k: npz[k] for k in npz.files}
  for name, pairs in data.pairs.items():
    chosen, rejected = arrays.get(f"{name}/chosen"), arrays.get(f"{name}/rejected")
    if chosen is None or len(chosen) != len(pairs) or len(rejected) != len(pairs):
      raise ValueError(f"{path} holds no reference logps for the {len(pairs)} {name} pairs of "
                       f"this run (found {None if chosen is None else len(chosen)}); delete it to "
                       "recompute")
    pairs.extras[CHOSEN], pairs.extras[REJECTED] = chosen, rejected
  return path, computed
