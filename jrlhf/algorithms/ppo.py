"""The math of online RL on sampled responses: PPO (per-token KL reward, GAE, clipped policy and
value losses) and the group baselines of GRPO and RLOO. Pure functions of arrays; the rollout
engine and the update loop build on them.

    mask_BxN = response_mask(lengths_B, n)                  # real response tokens (EOS included)
    kl_BxN = kl_penalty(logp_BxN, ref_logp_BxN, "k1")
    rewards_BxN = token_rewards(score_B, kl_BxN, mask_BxN, kl_coef)   # score on the last real token
    adv_BxN, returns_BxN = gae(rewards_BxN, values_BxN, mask_BxN, gamma, lam)
    adv_BxN = whiten(adv_BxN, mask_BxN)
    pg, stats = policy_loss(new_logp_BxN, old_logp_BxN, adv_BxN, mask_BxN, clip=0.2)

Shapes: B rollouts, N response columns (the sampler's `max_new_tokens`); everything after a
row's first stop token is padding and carries no loss (`mask_BxN` False). Formulas and defaults:
REFERENCE.md "PPO"; metric names are TRL's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chz
import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.algorithms import step
from jrlhf.algorithms.common import masked_mean
from jrlhf.models.transformer import default_positions

Array = jax.Array


def response_mask(lengths_B: Array, n: int) -> Array:
  """(B, N) True on each row's first `lengths_B` columns: its real tokens, the stop included."""
  return jnp.arange(n)[None, :] < lengths_B[:, None]


def kl_penalty(logp_BxN: Array, ref_logp_BxN: Array, kind: str = "k1") -> Array:
  """Per-token estimate of KL(policy || reference) from the sampled token's log-probs.

  k1: logp - ref (unbiased, can be negative per token); k3: exp(ref - logp) - 1 - (ref - logp)
  (unbiased and always >= 0; Schulman's estimator, GRPO's default).
  """
  log_ratio_BxN = logp_BxN - ref_logp_BxN
  if kind == "k1":
    return log_ratio_BxN
  if kind == "k3":
    return jnp.expm1(-log_ratio_BxN) + log_ratio_BxN
  raise ValueError(f"KL estimator {kind!r} is not one of 'k1', 'k3'")


def last_token_index(mask_BxN: Array) -> Array:
  """Column of each row's last real token (0 for an empty row)."""
  n = mask_BxN.shape[1]
  return jnp.maximum(jnp.max(jnp.where(mask_BxN, jnp.arange(n), -1), axis=1), 0)


def token_rewards(score_B: Array, kl_BxN: Array, mask_BxN: Array, kl_coef) -> Array:
  """r_t = -kl_coef * kl_t on real tokens, plus the sequence's score on its last real token
  (never on a pad: an empty row gets its score at column 0, where the mask keeps it out of the
  loss anyway)."""
  rewards_BxN = jnp.where(mask_BxN, -kl_coef * kl_BxN, 0.0)
  last_B = last_token_index(mask_BxN)
  return rewards_BxN.at[jnp.arange(rewards_BxN.shape[0]), last_B].add(score_B)


def gae(rewards_BxN: Array, values_BxN: Array, mask_BxN: Array, gamma: float, lam: float
        ) -> tuple[Array, Array]:
  """(advantages, returns) by generalised advantage estimation, backwards over the columns:

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t

  Values and rewards past a row's end count as 0, so padding adds nothing; A and R are 0 there.
  """
  values_BxN = jnp.where(mask_BxN, values_BxN, 0.0)
  rewards_BxN = jnp.where(mask_BxN, rewards_BxN, 0.0)
  next_values_BxN = jnp.concatenate(
      [values_BxN[:, 1:], jnp.zeros_like(values_BxN[:, :1])], axis=1)
  deltas_BxN = rewards_BxN + gamma * next_values_BxN - values_BxN

  def step(next_adv_B, delta_B):
    adv_B = delta_B + gamma * lam * next_adv_B
    return adv_B, adv_B

  _, adv_NxB = jax.lax.scan(step, jnp.zeros(deltas_BxN.shape[0], deltas_BxN.dtype),
                            deltas_BxN.T, reverse=True)
  adv_BxN = jnp.where(mask_BxN, adv_NxB.T, 0.0)
  return adv_BxN, jnp.where(mask_BxN, adv_BxN + values_BxN, 0.0)


def whiten(x_BxN: Array, mask_BxN: Array, shift_mean: bool = True) -> Array:
  """(x - mean) / std over the masked entries (unbiased variance, as TRL); the mean is added
  back when `shift_mean` is False. Zero outside the mask."""
  mean = masked_mean(x_BxN, mask_BxN)
  count = jnp.maximum(jnp.sum(mask_BxN), 2)
  var = jnp.sum(jnp.where(mask_BxN, (x_BxN - mean) ** 2, 0.0)) / (count - 1)
  out_BxN = (x_BxN - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    out_BxN += mean
  return jnp.where(mask_BxN, out_BxN, 0.0)


def policy_loss(logp_BxN: Array, old_logp_BxN: Array, adv_BxN: Array, mask_BxN: Array,
                clip: float) -> tuple[Array, dict[str, Array]]:
  """PPO's clipped surrogate mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(logp - old),
  over real tokens; with r = 1 it is -mean(A). Stats: policy/approxkl (0.5 mean (log r)^2),
  policy/clipfrac, val/ratio (mean r)."""
  log_ratio_BxN = logp_BxN - old_logp_BxN
  ratio_BxN = jnp.exp(log_ratio_BxN)
  unclipped_BxN = -adv_BxN * ratio_BxN
  clipped_BxN = -adv_BxN * jnp.clip(ratio_BxN, 1.0 - clip, 1.0 + clip)
  loss = masked_mean(jnp.maximum(unclipped_BxN, clipped_BxN), mask_BxN)
  return loss, {
      "policy/approxkl": 0.5 * masked_mean(log_ratio_BxN ** 2, mask_BxN),
      "policy/clipfrac": masked_mean((clipped_BxN > unclipped_BxN).astype(jnp.float32),
                                     mask_BxN),
      "val/ratio": masked_mean(ratio_BxN, mask_BxN),
  }


def value_loss(values_BxN: Array, old_values_BxN: Array, returns_BxN: Array, mask_BxN: Array,
               clip: float) -> tuple[Array, dict[str, Array]]:
  """0.5 mean(max((v - R)^2, (v_clip - R)^2)), v_clip = clip(v, v_old - eps, v_old + eps)."""
  clipped_BxN = jnp.clip(values_BxN, old_values_BxN - clip, old_values_BxN + clip)
  losses_BxN = jnp.maximum((values_BxN - returns_BxN) ** 2, (clipped_BxN - returns_BxN) ** 2)
  loss = 0.5 * masked_mean(losses_BxN, mask_BxN)
  clipped = ((clipped_BxN - returns_BxN) ** 2 > (values_BxN - returns_BxN) ** 2)
  return loss, {"value/clipfrac": masked_mean(clipped.astype(jnp.float32), mask_BxN)}


def group_advantages(score_B: Array, group_size: int, kind: str = "grpo",
                     eps: float = 1e-4) -> Array:
  """One advantage per sample, rows grouped as G consecutive samples of the same prompt.

  grpo: (r - mean_group) / (std_group + eps), the sample std (Bessel-corrected, as TRL);
  rloo: r - mean of the other G - 1 samples of its group (leave-one-out baseline).
  """
  if score_B.shape[0] % group_size:
    raise ValueError(f"{score_B.shape[0]} samples do not split into groups of {group_size}")
  if group_size < 2:
    raise ValueError(f"group_size={group_size}: a group baseline needs at least 2 samples")
  r_GxS = score_B.reshape(-1, group_size)
  if kind == "grpo":
    std = r_GxS.std(axis=1, keepdims=True, ddof=1)
    adv = (r_GxS - r_GxS.mean(axis=1, keepdims=True)) / (std + eps)
  elif kind == "rloo":
    others = (r_GxS.sum(axis=1, keepdims=True) - r_GxS) / (group_size - 1)
    adv = r_GxS - others
  else:
    raise ValueError(f"group advantage {kind!r} is not one of 'grpo', 'rloo'")
  return adv.reshape(-1)


def adaptive_kl_coef(coef, kl, target: float, horizon: float, n_steps: int):
  """Ziegler et al.'s controller: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e n / horizon."""
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return coef * (1.0 + error * n_steps / horizon)


# ---------------------------------------------------------------------------------------------
# Rollout batches: left-padded prompts followed by sampled responses (shared with GRPO).


def rollout_batch(prompt_BxP: Array, prompt_mask_BxP: Array, tokens_BxN: Array,
                  lengths_B: Array) -> dict[str, Array]:
  """Left-padded prompts followed by the sampled responses, as one forward pass's inputs."""
  n = tokens_BxN.shape[1]
  response_mask_BxN = response_mask(lengths_B, n)
  mask_BxL = jnp.concatenate([prompt_mask_BxP.astype(bool), response_mask_BxN], axis=1)
  return {"tokens": jnp.concatenate([prompt_BxP, tokens_BxN], axis=1).astype(jnp.int32),
          "attention_mask": mask_BxL, "response_mask": response_mask_BxN}


def response_logprobs(model, params: Any, batch: dict[str, Array], temperature: float) -> Array:
  """log softmax(logits / T) of each response token, from one pass over [prompt; response].

  Positions come from the mask exactly as the sampler assigns them, so on the sampling params
  this reproduces the sampler's logprobs (the first ratio is 1)."""
  tokens_BxL, mask_BxL = batch["tokens"], batch["attention_mask"]
  logits_BxLxV = model.apply({"params": params}, tokens_BxL, attention_mask_BxL=mask_BxL,
                             positions_BxL=default_positions(tokens_BxL, mask_BxL))
  return _sampled_logprobs(logits_BxLxV, batch, temperature)


def _sampled_logprobs(logits_BxLxV: Array, batch: dict[str, Array], temperature: float) -> Array:
  n = batch["response_mask"].shape[1]
  # Logits at column t predict token t + 1: the last N predictions cover the response.
  logits_BxNxV = logits_BxLxV[:, -n - 1:-1].astype(jnp.float32) / temperature
  logp_BxNxV = jax.nn.log_softmax(logits_BxNxV, axis=-1)
  return jnp.take_along_axis(logp_BxNxV, batch["tokens"][:, -n:, None], axis=-1)[..., 0]


def reference_logprobs(state, batch: dict[str, Array], model, temperature: float) -> Array:
  params = step.reference_params(state.trainable, state.frozen)
  return response_logprobs(model, params, batch, temperature)


def sequence_values(model, params: Any, batch: dict[str, Array]) -> Array:
  """(B, N) values of a scalar-head model, aligned as `response_logprobs`: the value before
  response token t is read where the policy predicts it (the previous position)."""
  tokens_BxL, mask_BxL = batch["tokens"], batch["attention_mask"]
  n = batch["response_mask"].shape[1]
  values_BxL = model.apply({"params": params}, tokens_BxL, attention_mask_BxL=mask_BxL,
                           positions_BxL=default_positions(tokens_BxL, mask_BxL))
  return values_BxL[:, -n - 1:-1]


def sequence_scores(model, params: Any, batch: dict[str, Array]) -> Array:
  """(B,) a reward model's score of each [prompt; response]: its value at the last real token
  (found from the response mask; never a pad)."""
  tokens_BxL, mask_BxL = batch["tokens"], batch["attention_mask"]
  values_BxL = model.apply({"params": params}, tokens_BxL, attention_mask_BxL=mask_BxL,
                           positions_BxL=default_positions(tokens_BxL, mask_BxL))
  p = tokens_BxL.shape[1] - batch["response_mask"].shape[1]
  last_B = p + jnp.sum(batch["response_mask"], axis=1) - 1
  return jnp.take_along_axis(values_BxL, last_B[:, None], axis=1)[:, 0]


# ---------------------------------------------------------------------------------------------
# Shared trunk (value_model=shared): a value head on the policy's last hidden state, so one
# forward pass gives the log-probs and the values. Its params are a small tree of their own
# (`init_value_head`), not a leaf of the model's: the sampler, the reference and checkpoints of
# the policy stay as they are, and the head is trainable under every PEFT method.


def init_value_head(hidden_size: int) -> dict[str, Array]:
  """A zero value head (every value starts at 0, as the separate critic's zero score head), in
  float32: it is D + 1 numbers, and values are regression targets."""
  return {"kernel": jnp.zeros((hidden_size, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}


def logprobs_and_values(model, params: Any, head: dict[str, Array], batch: dict[str, Array],
                        temperature: float) -> tuple[Array, Array]:
  """(`response_logprobs`, values aligned as `sequence_values`) from one pass of the policy:
  values = hidden . kernel + bias on the trunk's final-normed hidden state."""
  tokens_BxL, mask_BxL = batch["tokens"], batch["attention_mask"]
  logits_BxLxV, hidden_BxLxD = model.apply(
      {"params": params}, tokens_BxL, attention_mask_BxL=mask_BxL,
      positions_BxL=default_positions(tokens_BxL, mask_BxL), return_hidden=True)
  values_BxL = jnp.einsum("BLD,D->BL", hidden_BxLxD.astype(jnp.float32),
                          head["kernel"][:, 0]) + head["bias"][0]
  n = batch["response_mask"].shape[1]
  return _sampled_logprobs(logits_BxLxV, batch, temperature), values_BxL[:, -n - 1:-1]


def shared_values(model, params: Any, head: dict[str, Array], batch: dict[str, Array]) -> Array:
  """The values alone (the unused logits are dead code under jit)."""
  return logprobs_and_values(model, params, head, batch, 1.0)[1]


# ---------------------------------------------------------------------------------------------
# Score normalisation (host side: scores arrive as numpy from the scorer or the reward model).


@dataclasses.dataclass(frozen=True)
class RunningMoments:
  """Mean and variance of every score seen so far, merged batch by batch (Chan et al.'s
  parallel update, as TRL's RunningMoments); `var` is the population variance, `std` the
  Bessel-corrected one. A plain value: `update` returns a new one."""

  mean: float = 0.0
  var: float = 0.0
  count: int = 0

  def update(self, x_B: np.ndarray) -> "RunningMoments":
    x_B = np.asarray(x_B, np.float64)
    n, mean, var = x_B.size, float(x_B.mean()), float(x_B.var())
    total = self.count + n
    delta = mean - self.mean
    m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
    return RunningMoments(self.mean + delta * n / total, m2 / total, total)

  @property
  def std(self) -> float:
    return float(np.sqrt(self.var * self.count / max(self.count - 1, 1)))


SCORE_NORMS = ("none", "batch", "running")


def normalize_scores(score_B: np.ndarray, kind: str, clip: float = 0.0,
                     moments: RunningMoments | None = None
                     ) -> tuple[np.ndarray, RunningMoments | None]:
  """(scores as the rewards use them, updated moments).

  none: as they are; batch: (s - mean) / std over this batch; running: (s - mean) / std over
  every score so far, this batch included (`moments` in, updated moments out). Then, with
  clip > 0, clipped to [-clip, clip]. std is Bessel-corrected, plus 1e-8 (all-equal scores
  become 0).
  """
  score_B = np.asarray(score_B, np.float32)
  if kind == "batch":
    std = score_B.std(ddof=1) if score_B.size > 1 else 0.0
    score_B = (score_B - score_B.mean()) / (std + 1e-8)
  elif kind == "running":
    moments = (moments or RunningMoments()).update(score_B)
    score_B = (score_B - moments.mean) / (moments.std + 1e-8)
  elif kind != "none":
    raise ValueError(f"score normalisation {kind!r} is not one of {', '.join(SCORE_NORMS)}")
  if clip > 0:
    score_B = np.clip(score_B, -clip, clip)
  return score_B.astype(np.float32), moments


@chz.chz
class PPOConfig:
  """PPO on sampled responses (REFERENCE.md "PPO"; defaults as there, TRL's names).

  prompts_per_step: rollouts per step. max_new_tokens / temperature: sampling (top_k off).
  num_ppo_epochs x num_mini_batches: updates per rollout batch. kl_coef: beta of the per-token
  KL reward (kl_estimator k1 | k3); kl_target > 0 turns on the adaptive controller (horizon
  kl_horizon). gamma, lam: GAE. clip / clip_value: policy ratio and value clipping. vf_coef:
  weight of the value loss. missing_eos_penalty: subtracted from the score of responses that
  never stopped. score_norm: none | batch | running (`normalize_scores`), then clipped to
  +-score_clip when > 0. reward_model: an RM run's export (HF dir); empty = the task's scorer.
  value_model: separate (a critic of its own: a scalar-head model started from reward_model,
  else from init_from with a zero head) or shared (a zero value head on the policy's last
  hidden state, trained with the policy in one step: loss = pg + vf_coef * vf).
  """

  prompts_per_step: int = 16
  max_new_tokens: int = 32
  temperature: float = 0.7
  num_ppo_epochs: int = 4
  num_mini_batches: int = 1
  kl_coef: float = 0.05
  kl_estimator: str = "k1"
  kl_target: float = 0.0
  kl_horizon: float = 10000.0
  gamma: float = 1.0
  lam: float = 0.95
  clip: float = 0.2
  clip_value: float = 0.2
  vf_coef: float = 0.1
  missing_eos_penalty: float = 0.0
  whiten_rewards: bool = False
  score_norm: str = "none"
  score_clip: float = 0.0
  reward_model: str = ""
  value_model: str = "separate"

  @chz.validate
  def _check(self):
    if self.kl_estimator not in ("k1", "k3"):
      raise ValueError(f"algorithm.kl_estimator={self.kl_estimator!r} is not one of k1, k3")
    if self.temperature <= 0:
      raise ValueError(f"algorithm.temperature={self.temperature} must be > 0 (sampling)")
    if self.score_norm not in SCORE_NORMS:
      raise ValueError(f"algorithm.score_norm={self.score_norm!r} is not one of "
                       f"{', '.join(SCORE_NORMS)}")
    if self.score_clip < 0:
      raise ValueError(f"algorithm.score_clip={self.score_clip} must be >= 0 (0 = no clipping)")
    if self.value_model not in ("separate", "shared"):
      raise ValueError(f"algorithm.value_model={self.value_model!r} is not one of separate "
                       f"(a critic of its own), shared (a value head on the policy's trunk)")
    for name in ("prompts_per_step", "max_new_tokens", "num_ppo_epochs", "num_mini_batches"):
      if getattr(self, name) < 1:
        raise ValueError(f"algorithm.{name}={getattr(self, name)} must be >= 1")
    if self.prompts_per_step % self.num_mini_batches:
      raise ValueError(f"algorithm.prompts_per_step={self.prompts_per_step} does not split into "
                       f"num_mini_batches={self.num_mini_batches}")

  @property
  def group_size(self) -> int:
    return 1  # one response per prompt; the critic is the baseline


def advantages(batch: dict[str, Array], score_B: Array, values_BxN: Array, kl_coef,
               cfg: PPOConfig, raw_score_B: Array | None = None
               ) -> tuple[Array, Array, dict[str, Array]]:
  """(whitened advantages, returns, metrics) of a rollout batch with its scores (as the rewards
  use them: normalised, clipped) and values. The objective/* metrics report `raw_score_B`, the
  scores before normalisation, when given."""
  mask_BxN = batch["response_mask"]
  kl_BxN = kl_penalty(batch["old_logprobs"], batch["ref_logprobs"], cfg.kl_estimator)
  rewards_BxN = token_rewards(score_B, kl_BxN, mask_BxN, kl_coef)
  if cfg.whiten_rewards:
    rewards_BxN = whiten(rewards_BxN, mask_BxN, shift_mean=False)
  adv_BxN, returns_BxN = gae(rewards_BxN, values_BxN, mask_BxN, cfg.gamma, cfg.lam)
  kl_B = jnp.sum(jnp.where(mask_BxN, kl_BxN, 0.0), axis=1)
  raw_B = score_B if raw_score_B is None else raw_score_B
  return whiten(adv_BxN, mask_BxN), returns_BxN, {
      "objective/kl": jnp.mean(kl_B),
      # TRL's: the sampled responses' summed -log p (a one-sample estimate of their entropy).
      "objective/entropy": jnp.mean(jnp.sum(jnp.where(mask_BxN, -batch["old_logprobs"], 0.0),
                                            axis=1)),
      "objective/scores": jnp.mean(raw_B),
      "objective/rlhf_reward": jnp.mean(raw_B - kl_coef * kl_B),
      "objective/non_score_reward": jnp.mean(-kl_coef * kl_B),
      "val/advantages_mean": masked_mean(adv_BxN, mask_BxN),
      "val/values_mean": masked_mean(values_BxN, mask_BxN),
  }


def policy_step(state, batch: dict[str, Array], *, model, cfg: PPOConfig, opt):
  """One optimizer step of the policy on a mini-batch (clipped surrogate)."""
  def loss_fn(trainable):
    params = step.combine_params(trainable, state.frozen)
    logp_BxN = response_logprobs(model, params, batch, cfg.temperature)
    return policy_loss(logp_BxN, batch["old_logprobs"], batch["advantages"],
                       batch["response_mask"], cfg.clip)

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  state, update = step.apply_gradients(state, grads, opt)
  return state, {"loss/policy": loss, **stats, **update}


def critic_step(state, batch: dict[str, Array], *, model, cfg: PPOConfig, opt):
  """One optimizer step of the critic on a mini-batch (clipped value loss x vf_coef)."""
  def loss_fn(trainable):
    values_BxN = sequence_values(model, step.combine_params(trainable, state.frozen), batch)
    loss, stats = value_loss(values_BxN, batch["old_values"], batch["returns"],
                             batch["response_mask"], cfg.clip_value)
    return cfg.vf_coef * loss, (loss, stats)

  (_, (loss, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  state, update = step.apply_gradients(state, grads, opt)
  return state, {"loss/value": loss, **stats, "value/grad_norm": update["grad_norm"]}


def shared_step(states, batch: dict[str, Array], *, model, cfg: PPOConfig, opt):
  """One optimizer step of the policy and its value head on a mini-batch, `states` = (policy
  state, value-head state): loss = pg + vf_coef * vf, so the value loss also shapes the trunk
  (scaled down by vf_coef). Each half steps with `opt` on its own gradients."""
  state, head = states

  def loss_fn(trainable, head_params):
    params = step.combine_params(trainable, state.frozen)
    logp_BxN, values_BxN = logprobs_and_values(model, params, head_params, batch,
                                               cfg.temperature)
    mask_BxN = batch["response_mask"]
    pg, pg_stats = policy_loss(logp_BxN, batch["old_logprobs"], batch["advantages"], mask_BxN,
                               cfg.clip)
    vf, vf_stats = value_loss(values_BxN, batch["old_values"], batch["returns"], mask_BxN,
                              cfg.clip_value)
    return pg + cfg.vf_coef * vf, (pg, vf, {**pg_stats, **vf_stats})

  (loss, (pg, vf, stats)), (grads, head_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.trainable, head.trainable)
  state, update = step.apply_gradients(state, grads, opt)
  head, head_update = step.apply_gradients(head, head_grads, opt)
  return (state, head), {"loss/policy": pg, "loss/value": vf, "loss/total": loss, **stats,
                         **update, "value/grad_norm": head_update["grad_norm"]}
