"""Supervised fine-tuning: next-token cross-entropy on the target tokens of each batch.

  step = functools.partial(sft.train_step, model=model, cfg=SFTConfig(), opt=opt)
  state, metrics = step(state, batch)         # metrics: loss, token_accuracy, entropy, ...
  sums = sft.eval_step(state, batch, model=model, cfg=cfg)   # summed; see `eval_metrics`
"""

from __future__ import annotations

import math
from typing import Any

import chz
import jax
import jax.numpy as jnp

from jrlhf.algorithms import common, step

Array = jax.Array


@chz.chz
class SFTConfig:
  """label_smoothing: weight e of the uniform distribution in the target (0 = plain NLL)."""

  label_smoothing: float = 0.0

  @chz.validate
  def _check(self):
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"algorithm.label_smoothing={self.label_smoothing} must be in [0, 1)")


def cross_entropy(logits_BxLxV: Array, targets_BxL: Array, *, label_smoothing: float) -> Array:
  """Per-token loss (B, L), float32:

    (1 - e) * -log p(y_t)  +  e * -(1/V) sum_v log p(v)

  with p = softmax(logits) and e = label_smoothing (TRL/HF `label_smoothing_factor`, which also
  spreads e over the whole vocabulary, the target included).
  """
  nll_BxL = -common.token_logprobs(logits_BxLxV, targets_BxL)
  if label_smoothing == 0:
    return nll_BxL
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  uniform_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1) - jnp.mean(logits_BxLxV, axis=-1)
  return (1 - label_smoothing) * nll_BxL + label_smoothing * uniform_BxL


def loss_fn(params: Any, batch: dict[str, Array], model, cfg: SFTConfig
            ) -> tuple[Array, dict[str, Array]]:
  """(loss summed over target tokens, metric sums). Divide by `tokens` for the means.

  Sums rather than means so that gradient accumulation can normalise by the token count of the
  whole window (REFERENCE.md: not a mean of per-micro-batch means).
  """
  logits_BxLxV = model.apply({"params": params}, batch["tokens"], **common.model_inputs(batch))
  targets_BxL, mask_BxL = common.next_token_targets(batch)
  loss_BxL = cross_entropy(logits_BxLxV, targets_BxL, label_smoothing=cfg.label_smoothing)
  nll_BxL = -common.token_logprobs(logits_BxLxV, targets_BxL)
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  sums = {
      "tokens": jnp.sum(mask_BxL, dtype=jnp.float32),
      "nll": common.masked_sum(nll_BxL, mask_BxL),
      "correct": common.masked_sum(correct_BxL, mask_BxL),
      # Entropy of the model's next-token distribution: a collapse to ~0 flags overfitting.
      "entropy": common.masked_sum(common.entropy(logits_BxLxV), mask_BxL),
  }
  return common.masked_sum(loss_BxL, mask_BxL), sums


def train_step(state, batch: dict[str, Array], *, model, cfg: SFTConfig, opt
               ) -> tuple[Any, dict[str, Array]]:
  """One optimizer step over `opt.grad_accum` micro-batches; loss / tokens of the window."""
  def summed_loss(trainable, micro_batch):
    return loss_fn(step.combine_params(trainable, state.frozen), micro_batch, model, cfg)

  grads, loss_sum, sums = step.accumulate_gradients(summed_loss, state.trainable, batch,
                                                    opt.grad_accum)
  denom = jnp.maximum(sums["tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
  state, update_metrics = step.apply_gradients(state, grads, opt)
  return state, {
      "loss": loss_sum / denom,
      "token_accuracy": sums["correct"] / denom,
      "entropy": sums["entropy"] / denom,
      "tokens": sums["tokens"],
      **update_metrics,
  }


def eval_step(state, batch: dict[str, Array], *, model, cfg: SFTConfig) -> dict[str, Array]:
  """Sums over one eval batch (`tokens`, `nll`, `correct`, `entropy`); see `eval_metrics`."""
  params = step.combine_params(state.trainable, state.frozen)
  return loss_fn(params, batch, model, cfg)[1]


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
  """Eval loss (plain NLL, no smoothing), perplexity exp(loss), token accuracy from sums."""
  tokens = max(float(sums["tokens"]), 1.0)
  loss = float(sums["nll"]) / tokens
  return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
          "token_accuracy": float(sums["correct"]) / tokens, "tokens": float(sums["tokens"])}
