"""PPO on the online loop: a separate critic, an optional reward model, GAE and mini-batch
epochs (`jrlhf.algorithms.ppo`; REFERENCE.md "PPO").

The rollout (sampler, reference log-probs, the task's scores) is `online._Online`'s. Here:
scores from a frozen reward model when `algorithm.reward_model` names an RM run's export; the
critic, a scalar-head model started from the reward model (else from `init_from`, with a zero
head) under the run's PEFT method, with its own optimizer state and checkpoints; per-token
rewards with the KL penalty (fixed or adaptive beta), GAE, whitened advantages; then
`num_ppo_epochs` passes over `num_mini_batches` shuffled mini-batches, each one policy step and
one critic step.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.algorithms import ppo
from jrlhf.algorithms.step import combine_params
from jrlhf.models import from_pretrained
from jrlhf.sharding import batch_ways
from jrlhf.train import checkpoint
from jrlhf.train.online import _Online
from jrlhf.train.state import create_state


def _critic_values(state, batch, *, model):
  return ppo.sequence_values(model, combine_params(state.trainable, state.frozen), batch)


class PPORun(_Online):
  """`_Online` with PPO's reward model, critic and update."""

  def setup_algorithm(self) -> None:
    cfg, alg = self.cfg, self.alg
    per = alg.prompts_per_step // alg.num_mini_batches
    if per % batch_ways(self.mesh):
      raise ValueError(f"mini-batches of {per} rollouts must divide over the mesh's "
                       f"{batch_ways(self.mesh)} batch ways; change algorithm.prompts_per_step "
                       f"or algorithm.num_mini_batches")
    self.critic_model, critic, critic_sh = create_state(
        cfg.model, self.opt, self.mesh, seed=cfg.seed + 7,
        init_from=alg.reward_model or cfg.init_from, peft=cfg.peft, head="scalar")
    self.critic_ckpt = checkpoint.Checkpointer(
        self.run_dir / "critic_checkpoints", every=cfg.train.checkpoint_every,
        keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoints)
    self.critic = self.critic_ckpt.restore_or(critic, self.fingerprint)
    if alg.reward_model:
      rm_model, self.rm = from_pretrained(alg.reward_model, head="scalar", mesh=self.mesh,
                                          dtype=cfg.model.param_dtype,
                                          compute_dtype=cfg.model.dtype)
      self._scores = jax.jit(functools.partial(ppo.sequence_scores, rm_model))
    self._values = jax.jit(functools.partial(_critic_values, model=self.critic_model))
    self._advantages = jax.jit(functools.partial(ppo.advantages, cfg=alg))
    self.policy_step = jax.jit(
        functools.partial(ppo.policy_step, model=self.model, cfg=alg, opt=self.opt),
        in_shardings=(self.state_sh, None), out_shardings=(self.state_sh, None),
        donate_argnums=0)
    self.critic_step = jax.jit(
        functools.partial(ppo.critic_step, model=self.critic_model, cfg=alg, opt=self.opt),
        in_shardings=(critic_sh, None), out_shardings=(critic_sh, None), donate_argnums=0)
    # The adaptive controller's beta lives on the host (it changes once per step); a resumed
    # run restarts it from algorithm.kl_coef.
    self.kl_coef = alg.kl_coef

  def reward_scores(self, batch) -> np.ndarray:
    return np.asarray(jax.device_get(self._scores(self.rm, batch)))

  def learn(self, step: int, batch: dict[str, Any], scores_B: np.ndarray) -> dict[str, Any]:
    alg = self.alg
    values_BxN = self._values(self.critic, batch)
    adv_BxN, returns_BxN, stats = self._advantages(
        batch, jnp.asarray(scores_B, jnp.float32), values_BxN, jnp.float32(self.kl_coef))
    batch = {**batch, "advantages": adv_BxN, "returns": returns_BxN, "old_values": values_BxN}
    rows = len(scores_B)
    per = rows // alg.num_mini_batches
    order_rng = np.random.default_rng([self.cfg.seed, step])
    for _ in range(alg.num_ppo_epochs):
      order = order_rng.permutation(rows)
      for m in range(alg.num_mini_batches):
        idx = jnp.asarray(order[m * per:(m + 1) * per])
        mini = jax.tree.map(lambda x: x[idx], batch)
        self.state, policy_metrics = self.policy_step(self.state, mini)
        self.critic, critic_metrics = self.critic_step(self.critic, mini)
    stats = jax.device_get(stats)
    out = {**stats, **jax.device_get(policy_metrics), **jax.device_get(critic_metrics),
           "objective/kl_coef": self.kl_coef}
    if alg.kl_target > 0:
      self.kl_coef = float(ppo.adaptive_kl_coef(self.kl_coef, stats["objective/kl"],
                                                alg.kl_target, alg.kl_horizon, rows))
    return out

  def save(self, n: int, final: bool) -> None:
    super().save(n, final)
    if final:
      self.critic_ckpt.save(n, self.critic, self.fingerprint)
      self.critic_ckpt.wait()
    else:
      self.critic_ckpt.maybe_save(n, self.critic, self.fingerprint)

  def close(self) -> None:
    super().close()
    self.critic_ckpt.close()
