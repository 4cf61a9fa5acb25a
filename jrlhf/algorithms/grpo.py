"""GRPO and RLOO: policy-gradient updates on groups of sampled responses with a group baseline.

    batch = rollout_batch(prompt_BxP, prompt_mask_BxP, gen)          # [prompt; response] rows
    logp_BxN = response_logprobs(model, params, batch, temperature)  # what the sampler recorded
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
from jrlhf.models.transformer import default_positions

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


def rollout_batch(prompt_BxP: Array, prompt_mask_BxP: Array, tokens_BxN: Array,
                  lengths_B: Array) -> dict[str, Array]:
  """Left-padded prompts followed by the sampled responses, as one forward pass's inputs."""
  n = tokens_BxN.shape[1]
  response_mask_BxN = ppo.response_mask(lengths_B, n)
  mask_BxL = jnp.concatenate([prompt_mask_BxP.astype(bool), response_mask_BxN], axis=1)
  return {"tokens": jnp.concatenate([prompt_BxP, tokens_BxN], axis=1).astype(jnp.int32),
          "attention_mask": mask_BxL, "response_mask": response_mask_BxN}


def response_logprobs(model, params: Any, batch: dict[str, Array], temperature: float) -> Array:
  """log softmax(logits / T) of each response token, from one pass over [prompt; response].

  Positions come from the mask exactly as the sampler assigns them, so on the sampling params
  this reproduces the sampler's logprobs (the first ratio is 1)."""
  tokens_BxL, mask_BxL = batch["tokens"], batch["attention_mask"]
  n = batch["response_mask"].shape[1]
  logits_BxLxV = model.apply({"params": params}, tokens_BxL, attention_mask_BxL=mask_BxL,
                             positions_BxL=default_positions(tokens_BxL, mask_BxL))
  # Logits at column t predict token t + 1: the last N predictions cover the response.
  logits_BxNxV = logits_BxLxV[:, -n - 1:-1].astype(jnp.float32) / temperature
  logp_BxNxV = jax.nn.log_softmax(logits_BxNxV, axis=-1)
  return jnp.take_along_axis(logp_BxNxV, tokens_BxL[:, -n:, None], axis=-1)[..., 0]


def reference_logprobs(state, batch: dict[str, Array], model, temperature: float) -> Array:
  params = step.reference_params(state.trainable, state.frozen)
  return response_logprobs(model, params, batch, temperature)


def loss_fn(trainable: Any, state, batch: dict[str, Array], model, cfg: GRPOConfig
            ) -> tuple[Array, dict[str, Array]]:
  params = step.combine_params(trainable, state.frozen)
  logp_BxN = response_logprobs(model, params, batch, cfg.temperature)
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
