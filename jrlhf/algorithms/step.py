"""What every algorithm's train step shares: micro-batch accumulation and the optimizer update.

The state is duck-typed (`jrlhf.train.state.TrainState`: `trainable`, `frozen`, `opt_state`,
`step`, `rng`, `.replace`) so that algorithms do not import the training loop's package.

Accumulation layout: a batch of `A * B` rows holds A micro-batches of B rows interleaved, row
`b * A + a` belonging to micro-batch `a` (the loop builds it with `interleave_micro_batches`).
Reshaped to (B, A, ...) the leading B axis keeps the batch sharding of the mesh, so every
micro-batch is spread over all devices, not parked on 1/A of them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jrlhf.peft import trainable as peft_trainable

Array = jax.Array
# fn(trainable, micro_batch) -> (loss_sum, aux): a loss summed (not averaged) over its units
# (tokens, pairs) and a dict of sums; the step divides by the window's total afterwards.
SumLossFn = Callable[[Any, dict[str, Array]], tuple[Array, dict[str, Array]]]


# Under full fine-tuning, an algorithm that needs a reference model (DPO) keeps a frozen copy of
# the initial params here: `frozen = {REFERENCE: params}`. Not a param name of any model.
REFERENCE = "reference"


def combine_params(trainable: Any, frozen: Any) -> Any:
  """The model's full param tree from the two halves of the state (DESIGN decision 3): for full
  fine-tuning `frozen` is empty (or holds only the reference copy) and this is `trainable`; with
  PEFT it is `jrlhf.peft.combine` (adapter weights back inside their leaves, over the frozen
  base)."""
  if isinstance(frozen, dict) and REFERENCE in frozen:
    frozen = {k: v for k, v in frozen.items() if k != REFERENCE}
  return peft_trainable.combine(trainable, frozen)


def reference_params(trainable: Any, frozen: Any) -> Any:
  """The reference model's params: the frozen copy under full fine-tuning, else the base model
  inside the PEFT tree (every method stripped; shares the frozen arrays, no copy)."""
  if isinstance(frozen, dict) and REFERENCE in frozen:
    return frozen[REFERENCE]
  if not jax.tree.leaves(frozen):
    # Full fine-tuning without a copy: the "reference" would be the moving policy itself.
    raise ValueError("full fine-tuning has no frozen reference model; build the state with "
                     "create_state(..., reference=True) (the loop does for DPO)")
  return peft_trainable.base_params(combine_params(trainable, frozen))


def interleave_micro_batches(micro_batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """A micro-batches of B rows (host numpy) -> one batch of A * B rows, row b * A + a from
  micro-batch a. Shorter micro-batches are right-padded to the longest (0 = padding in every
  contract field: segment 0, no loss)."""
  length = max(mb["tokens"].shape[1] for mb in micro_batches)

  def pad(x):
    if x.ndim < 2:  # per-row columns (DPO's precomputed `ref_logps`) have no length axis
      return x
    return np.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

  keys = micro_batches[0].keys()
  return {k: np.stack([pad(np.asarray(mb[k])) for mb in micro_batches], axis=1).reshape(
      -1, length, *micro_batches[0][k].shape[2:]) for k in keys}


def split_micro_batches(batch: dict[str, Array], num_micro: int) -> dict[str, Array]:
  """(A * B, ...) leaves -> (A, B, ...), undoing `interleave_micro_batches`."""
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(
          f"a batch of {x.shape[0]} rows cannot be split into grad_accum={num_micro} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


# Aux entries are sums, except `min_*` / `max_*` ones (a reward model's extremes), which combine
# over micro-batches by min / max.
_AUX_MERGE = {"min": jnp.minimum, "max": jnp.maximum}
_AUX_START = {"min": jnp.inf, "max": -jnp.inf}


def accumulate_gradients(loss_fn: SumLossFn, trainable: Any, batch: dict[str, Array],
                         num_micro: int) -> tuple[Any, Array, dict[str, Array]]:
  """(sum of gradients, sum of losses, sums of aux) over the micro-batches of one window; `aux`
  is a flat dict of scalars.

  Gradients of *sums* are added up; the caller divides by the window's total count, so
  `sum_i loss_sum_i / sum_i n_i` is exactly the full-batch loss (a mean of per-micro-batch
  means would weigh a micro-batch with few targets as much as one with many).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    (loss_sum, aux), grads = grad_fn(trainable, batch)
    return grads, loss_sum, aux

  micro = split_micro_batches(batch, num_micro)

  def body(carry, micro_batch):
    (loss_sum, aux), grads = grad_fn(trainable, micro_batch)
    grads_acc, loss_acc, aux_acc = carry
    merged = {k: _AUX_MERGE.get(k.split("_", 1)[0], jnp.add)(aux_acc[k], v)
              for k, v in aux.items()}
    return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss_sum, merged), None

  first = jax.tree.map(lambda x: x[0], micro)
  (loss0, aux0), grads0 = jax.tree.map(jnp.zeros_like,
                                       jax.eval_shape(lambda: grad_fn(trainable, first)))
  aux0 = {k: jnp.full_like(v, _AUX_START.get(k.split("_", 1)[0], 0.0)) for k, v in aux0.items()}
  (grads, loss_sum, aux), _ = jax.lax.scan(body, (grads0, loss0, aux0), micro)
  return grads, loss_sum, aux


def apply_gradients(state, grads: Any, opt) -> tuple[Any, dict[str, Array]]:
  """One optimizer step on `state.trainable` with already-normalised `grads`.

  Returns the new state and {grad_norm (before clipping), lr (used by this step)}.
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = opt.tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  rng, _ = jax.random.split(state.rng)
  new_state = state.replace(trainable=trainable, opt_state=opt_state, step=state.step + 1, rng=rng)
  return new_state, {"grad_norm": grad_norm, "lr": jnp.asarray(opt.schedule(state.step))}
