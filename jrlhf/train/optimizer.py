"""AdamW from `OptimConfig`: warmup + decay schedule, global-norm clipping, weight-decay mask.

  opt = make_optimizer(cfg.optim, total_steps=cfg.steps)
  opt.tx.init(trainable)        # optax GradientTransformation over the trainable tree
  opt.schedule(step)            # the lr used by optimizer step `step` (0-based)
  opt.grad_accum                # micro-batches per step, consumed inside the jitted step

Gradient accumulation is not an optax wrapper here (no `optax.MultiSteps`): the algorithm's
train step scans over the micro-batches of one window and divides the summed gradient by the
window's token count (`jrlhf.algorithms.step.accumulate_gradients`), so a step of 4 x 2
sequences is the same update as one of 8, and one call is one optimizer step.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import optax

from jrlhf.peft.spec import path_str
from jrlhf.train.config import OptimConfig

# Params that HF Trainer / TRL exclude from weight decay: biases and norm scales (LayerNorm and
# RMSNorm `scale`, LayerNorm `bias`). Matched on the path, never on shapes: scanned layers stack
# a norm scale to 2-D (layers, D), so "1-D means norm" would decay every layer's norms.
NO_DECAY = re.compile(r"(^|/)(bias|scale)$")


class Optimizer(NamedTuple):
  """What a train step needs from the optimizer config."""

  tx: optax.GradientTransformation
  schedule: optax.Schedule
  grad_accum: int


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """lr(step): linear 0 -> lr over warmup_steps, then cosine / linear / constant to the end.

  Matches HF `get_{cosine,linear,constant}_schedule_with_warmup` (with min_lr_ratio=0): lr(0)
  is 0 when warming up, and the decay reaches lr * min_lr_ratio at step `total_steps`.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1 (set steps=N)")
  warmup = min(cfg.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.min_lr_ratio
  decay = {
      "cosine": lambda: optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio),
      "linear": lambda: optax.linear_schedule(cfg.lr, end, decay_steps),
      "constant": lambda: optax.constant_schedule(cfg.lr),
  }[cfg.schedule]()
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: everything except biases and norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: NO_DECAY.search(path_str(path)) is None, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> Optimizer:
  """AdamW (decoupled decay, masked) after global-norm clipping, with the config's schedule."""
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return Optimizer(optax.chain(*parts), schedule, cfg.grad_accum)
