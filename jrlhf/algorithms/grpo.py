"""GRPO and RLOO: policy-gradient updates on groups of sampled responses with a group baseline.

    batch = ppo.rollout_batch(prompt_BxP, prompt_mask_BxP, gen)      # [prompt; response] rows
    logp_BxN = ppo.response_logprobs(model, params, batch, temperature)  # the sampler's logprobs
    state, metrics = train_step(state, batch, model=model, cfg=cfg, opt=opt)

G = `group_size` responses are sampled per prompt (rows grouped consecutively); each gets the
advantage of its sequence score against its group (`ppo.group_advantages`), the same on every
token. The loss is PPO's clipped surrogate on the ratio to the sampling policy, plus
`kl_coef * k3(policy, reference)` per token when kl_coef > 0 (the reference is the frozen base:
`peft.base_params`, or the frozen copy under full fine-tuning).
"""

from __future__ import annotations

from typing import Any

import chz
import jax
import jax.numpy as jnp

from jrlhf.algorithms import common, ppo, step

Array = jax.Array


@chz.chz
class GRPOConfig:
  """Online RL with a group baseline (REFERENCE.md "Relatives": GRPO, RLOO).

  baseline: grpo ((r - mean) / (std + 1e-4) per group) or rloo (r - mean of the others).
  group_size: responses per prompt (G). prompts_per_step: prompts per rollout batch.
  max_new_tokens / temperature: sampling (top_k off, top_p 1, as PPO's reference setup).
  clip: epsilon of the clipped ratio. kl_coef: weight of the k3 KL to the reference in the loss
  (0 = none; the KL is logged either way). epochs: updates per rollout batch (1 = on-policy, ratio 1).
  missing_eos_penalty: subtracted from the score of responses that never stopped.
  """

  baseline: str = "grpo"
  group_size: int = 8
  prompts_per_step: int = 8
  max_new_tokens: int = 32
  temperature: float = 1.0
  clip: float = 0.2
  kl_coef: float = 0.04
  epochs: int = 1
  missing_eos_penalty: float = 0.0

  @chz.validate
  def _check(self):
    if self.baseline not in ("grpo", "rloo"):
      raise ValueError(f"algorithm.baseline={self.baseline!r} is not one of grpo, rloo")
    if self.group_size < 2:
      raise ValueError(f"algorithm.group_size={self.group_size}: a group baseline needs >= 2")
    if self.temperature <= 0:
      raise ValueError(f"algorithm.temperature={self.temperature} must be > 0 (sampling)")
    for name in ("prompts_per_step", "max_new_tokens", "epochs"):
      if getattr(self, name) < 1:
        raise ValueError(f"algorithm.{name}={getattr(self, name)} must be >= 1")


def loss_fn(trainable: Any, state, batch: dict[str, Array], model, cfg: GRPOConfig
            ) -> tuple[Array, dict[str, Array]]:
  params = step.combine_params(trainable, state.frozen)
  logp_BxN = ppo.response_logprobs(model, params, batch, cfg.temperature)
  mask_BxN = batch["response_mask"]
  adv_BxN = jnp.broadcast_to(batch["advantages"][:, None], mask_BxN.shape)
  pg, stats = ppo.policy_loss(logp_BxN, batch["old_logprobs"], adv_BxN, mask_BxN, cfg.clip)
  kl_BxN = ppo.kl_penalty(logp_BxN, batch["ref_logprobs"], "k3")
  kl = common.masked_mean(kl_BxN, mask_BxN)
  loss = pg + cfg.kl_coef * kl if cfg.kl_coef else pg
  return loss, {"loss/policy": pg, "objective/kl": kl, **stats}


def train_step(state, batch: dict[str, Array], *, model, cfg: GRPOConfig, opt
               ) -> tuple[Any, dict[str, Array]]:
  """One optimizer step on a rollout batch (carrying advantages, old and reference logprobs)."""
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.trainable, state, batch, model, cfg)
  state, update_metrics = step.apply_gradients(state, grads, opt)
  return state, {"loss": loss, **metrics, **update_metrics}
