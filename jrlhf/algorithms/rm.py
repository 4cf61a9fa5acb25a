"""Reward modelling (Bradley-Terry) on a scalar-head model, with TRL's RewardTrainer metrics.

  model = Transformer(cfg, head="scalar")        # the loop builds it: Algorithm head="scalar"
  step = functools.partial(rm.train_step, model=model, cfg=RMConfig(), opt=opt)
  state, metrics = step(state, batch)   # loss, accuracy, margin, mean/min/max_reward

Batches are `[chosen; rejected]` rows of prompt + response (see `jrlhf.algorithms.dpo`); an
optional per-row `margin` column (the same value on both rows of a pair) asks for a margin.
The reward of a row is the scalar head at its last real token, found from the segment ids (the
data contract's attention mask), never from the pad id: with pad == eos that would pick the
first eos, or none.
"""

from __future__ import annotations

from typing import Any

import chz
import jax
import jax.numpy as jnp

from jrlhf.algorithms import common, step
from jrlhf.algorithms.dpo import halves

Array = jax.Array


@chz.chz
class RMConfig:
  """center_rewards_coefficient: c of the centering term c * mean((r_c + r_r)^2) (TRL's name;
  0.01 recommended by Eisenstein et al., off by default)."""

  center_rewards_coefficient: float = 0.0

  @chz.validate
  def _check(self):
    if self.center_rewards_coefficient < 0:
      raise ValueError(f"algorithm.center_rewards_coefficient={self.center_rewards_coefficient}"
                       " must be >= 0")


def last_token_values(values_BxL: Array, segment_ids_BxL: Array) -> Array:
  """values at each row's last real token (segment id != 0); 0 for an all-padding row."""
  real_BxL = segment_ids_BxL != 0
  length = real_BxL.shape[1]
  last_B = length - 1 - jnp.argmax(real_BxL[:, ::-1], axis=1)
  picked_B = jnp.take_along_axis(values_BxL, last_B[:, None], axis=1)[:, 0]
  return jnp.where(real_BxL.any(axis=1), picked_B, 0.0)


def rewards(params: Any, batch: dict[str, Array], model) -> Array:
  """(2P,) float32 rewards of the rows of a batch."""
  values_BxL = model.apply({"params": params}, batch["tokens"], **common.model_inputs(batch))
  return last_token_values(values_BxL.astype(jnp.float32), batch["segment_ids"])


def valid_pairs(batch: dict[str, Array]) -> Array:
  """(P,) pairs whose two rows both hold tokens (eval's filler rows do not)."""
  real_c, real_r = halves(jnp.any(batch["segment_ids"] != 0, axis=1))
  return real_c & real_r


def bradley_terry(reward_c: Array, reward_r: Array, margin: Array) -> Array:
  """-log sigmoid(r_c - r_r - margin), per pair."""
  return -jax.nn.log_sigmoid(reward_c - reward_r - margin)


def loss_fn(params: Any, batch: dict[str, Array], model, cfg: RMConfig, pairs: Array
            ) -> tuple[Array, dict[str, Array]]:
  """(loss divided by the window's `pairs`, metric sums / extremes) of one (micro-)batch."""
  reward_c, reward_r = halves(rewards(params, batch, model))
  valid_P = valid_pairs(batch)
  margin_P = halves(batch["margin"])[0].astype(jnp.float32) if "margin" in batch else 0.0
  per_pair = bradley_terry(reward_c, reward_r, margin_P)
  if cfg.center_rewards_coefficient:
    # Pins the reward's free offset near 0 (Bradley-Terry only sees differences).
    per_pair += cfg.center_rewards_coefficient * (reward_c + reward_r) ** 2
  both = jnp.concatenate([reward_c, reward_r])
  both_valid = jnp.concatenate([valid_P, valid_P])
  sums = {
      "pairs": jnp.sum(valid_P, dtype=jnp.float32),
      "loss_sum": common.masked_sum(per_pair, valid_P),
      "correct": common.masked_sum(reward_c > reward_r, valid_P),
      "margin": common.masked_sum(reward_c - reward_r, valid_P),
      "reward": common.masked_sum(both, both_valid),
      "reward_sq": common.masked_sum(both**2, both_valid),
      "min_reward": jnp.min(jnp.where(both_valid, both, jnp.inf)),
      "max_reward": jnp.max(jnp.where(both_valid, both, -jnp.inf)),
  }
  return sums["loss_sum"] / jnp.maximum(pairs, 1.0), sums


def _metrics(sums: dict[str, Any]) -> dict[str, Any]:
  """TRL's names: accuracy mean(r_c > r_r), margin mean(r_c - r_r), mean/min/max_reward."""
  pairs = jnp.maximum(sums["pairs"], 1.0)
  mean = sums["reward"] / (2 * pairs)
  return {"loss": sums["loss_sum"] / pairs, "accuracy": sums["correct"] / pairs,
          "margin": sums["margin"] / pairs, "mean_reward": mean,
          "reward_std": jnp.sqrt(jnp.maximum(sums["reward_sq"] / (2 * pairs) - mean**2, 0.0)),
          "min_reward": sums["min_reward"], "max_reward": sums["max_reward"],
          "pairs": sums["pairs"]}


def train_step(state, batch: dict[str, Array], *, model, cfg: RMConfig, opt
               ) -> tuple[Any, dict[str, Array]]:
  """One optimizer step over `opt.grad_accum` micro-batches of pairs; mean loss per pair."""
  pairs = jnp.sum(valid_pairs(batch), dtype=jnp.float32)  # of the whole window

  def window_loss(trainable, micro_batch):
    return loss_fn(step.combine_params(trainable, state.frozen), micro_batch, model, cfg, pairs)

  grads, _, sums = step.accumulate_gradients(window_loss, state.trainable, batch, opt.grad_accum)
  state, update_metrics = step.apply_gradients(state, grads, opt)
  tokens = jnp.sum(batch["segment_ids"] != 0, dtype=jnp.float32)
  return state, {**_metrics(sums), "tokens": tokens, **update_metrics}


def eval_step(state, batch: dict[str, Array], *, model, cfg: RMConfig) -> dict[str, Array]:
  """Sums over one eval batch (extremes dropped: the eval loop adds batches up)."""
  params = step.combine_params(state.trainable, state.frozen)
  sums = loss_fn(params, batch, model, cfg, jnp.ones(()))[1]
  return {k: v for k, v in sums.items() if not k.startswith(("min_", "max_"))}


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
  """Held-out loss, accuracy (the RM's headline number), margin and reward mean / std."""
  out = _metrics({**sums, "min_reward": 0.0, "max_reward": 0.0})
  return {k: float(v) for k, v in out.items() if k not in ("min_reward", "max_reward")}
