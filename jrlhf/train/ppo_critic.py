"""PPO on the online loop: the value model, an optional reward model, score normalisation, GAE
and mini-batch epochs (`jrlhf.algorithms.ppo`; REFERENCE.md "PPO").

The rollout (sampler, reference log-probs, the task's scores) is `online._Online`'s. Here:
scores from a frozen reward model when `algorithm.reward_model` names an RM run's export;
the value model, either a separate critic (a scalar-head model started from the reward model,
else from `init_from` with a zero head, under the run's PEFT method, with its own optimizer
state) or a value head on the policy's trunk (`value_model=shared`: a zero head whose params
and Adam moments sit beside the policy's state, trained in the policy's step); scores
normalised and clipped as configured; per-token rewards with the KL penalty (fixed or adaptive
beta), GAE, whitened advantages; then `num_ppo_epochs` passes over `num_mini_batches`
shuffled mini-batches.

Steps and schedules: `state.step` counts rollout steps (the loop resumes from it), so after a
step's updates it is set to the step's number; the optimizer's own count (which drives its
schedule) counts updates, so the schedule is stretched over `steps x updates per step`
(warmup too). Host state (the adaptive KL's beta, the running score moments) is written beside
each checkpoint (`ppo_host_state.json`, keyed by step) and read back on resume, so a resumed run
continues exactly.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jrlhf.algorithms import ppo
from jrlhf.algorithms.step import combine_params
from jrlhf.distributed import is_writer
from jrlhf.models import from_pretrained
from jrlhf.sharding import batch_ways
from jrlhf.train import checkpoint
from jrlhf.train.online import _Online
from jrlhf.train.state import TrainState, create_state

HOST_STATE = "ppo_host_state.json"


def _critic_values(state, batch, *, model):
  return ppo.sequence_values(model, combine_params(state.trainable, state.frozen), batch)


def _shared_values(state, head, batch, *, model):
  return ppo.shared_values(model, combine_params(state.trainable, state.frozen), head.trainable,
                           batch)


def value_head_state(hidden_size: int, opt, mesh, seed: int) -> tuple[TrainState, TrainState]:
  """(state, shardings) of a zero value head and its optimizer state, replicated (D + 1 numbers)."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def init():
    head = ppo.init_value_head(hidden_size)
    return TrainState(trainable=head, frozen={}, opt_state=opt.tx.init(head),
                      step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed))

  shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(init))
  return jax.jit(init, out_shardings=shardings)(), shardings


class PPORun(_Online):
  """`_Online` with PPO's reward model, value model and update."""

  def updates_per_rollout(self) -> int:
    return self.alg.num_ppo_epochs * self.alg.num_mini_batches

  def setup_algorithm(self) -> None:
    cfg, alg = self.cfg, self.alg
    per = alg.prompts_per_step // alg.num_mini_batches
    if per % batch_ways(self.mesh):
      raise ValueError(f"mini-batches of {per} rollouts must divide over the mesh's "
                       f"{batch_ways(self.mesh)} batch ways; change algorithm.prompts_per_step "
                       f"or algorithm.num_mini_batches")
    self.shared = alg.value_model == "shared"
    critic, critic_sh = self._value_model()
    critic_dir = self.run_dir / "critic_checkpoints"
    if not cfg.train.resume:  # as the policy's: a fresh run must not pick up an old critic
      checkpoint.clear(critic_dir)
    self.critic_ckpt = checkpoint.Checkpointer(
        critic_dir, every=cfg.train.checkpoint_every, keep=cfg.train.keep_checkpoints,
        async_save=cfg.train.async_checkpoints)
    self.critic = self.critic_ckpt.restore_or(critic, self.fingerprint)
    if alg.reward_model:
      rm_model, self.rm = from_pretrained(alg.reward_model, head="scalar", mesh=self.mesh,
                                          dtype=cfg.model.param_dtype,
                                          compute_dtype=cfg.model.dtype)
      self._scores = jax.jit(functools.partial(ppo.sequence_scores, rm_model))
    self._advantages = jax.jit(functools.partial(ppo.advantages, cfg=alg))
    self._jit_updates(critic_sh)
    self.kl_coef, self.moments = alg.kl_coef, ppo.RunningMoments()
    self._restore_host_state(int(jax.device_get(self.state.step)))

  def _value_model(self) -> tuple[TrainState, TrainState]:
    """(state, shardings) of the critic: a zero value head (shared trunk), or a scalar-head
    model from the reward model, else from the run's start, under the run's PEFT method."""
    cfg, alg = self.cfg, self.alg
    if self.shared:
      return value_head_state(self.model.cfg.hidden_size, self.opt, self.mesh, cfg.seed + 7)
    self.critic_model, critic, critic_sh = create_state(
        cfg.model, self.opt, self.mesh, seed=cfg.seed + 7,
        init_from=alg.reward_model or cfg.init_from, peft=cfg.peft, head="scalar")
    return critic, critic_sh

  def _jit_updates(self, critic_sh) -> None:
    alg, state_sh = self.alg, self.state_sh
    if self.shared:
      self._values = jax.jit(functools.partial(_shared_values, model=self.model))
      self.shared_step = jax.jit(
          functools.partial(ppo.shared_step, model=self.model, cfg=alg, opt=self.opt),
          in_shardings=((state_sh, critic_sh), None), out_shardings=((state_sh, critic_sh), None),
          donate_argnums=0)
      return
    self._values = jax.jit(functools.partial(_critic_values, model=self.critic_model))
    self.policy_step = jax.jit(
        functools.partial(ppo.policy_step, model=self.model, cfg=alg, opt=self.opt),
        in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=0)
    self.critic_step = jax.jit(
        functools.partial(ppo.critic_step, model=self.critic_model, cfg=alg, opt=self.opt),
        in_shardings=(critic_sh, None), out_shardings=(critic_sh, None), donate_argnums=0)

  # -------------------------------------------------------------------------------------------
  # Host state: the adaptive KL's beta and the running score moments.

  def _host_state_path(self):
    return self.run_dir / HOST_STATE

  def _restore_host_state(self, step: int) -> None:
    if not step:
      return
    path = self._host_state_path()
    saved = json.loads(path.read_text()).get(str(step)) if path.exists() else None
    if saved is None:
      print(f"[jrlhf] no {HOST_STATE} entry for step {step}: the KL coefficient and the score "
            f"moments restart from the config", flush=True)
      return
    self.kl_coef = saved["kl_coef"]
    self.moments = ppo.RunningMoments(**saved["moments"])

  def _save_host_state(self, step: int) -> None:
    if not is_writer():
      return
    path = self._host_state_path()
    entries = json.loads(path.read_text()) if path.exists() and step > 0 else {}
    kept = {str(s) for s in self.ckpt.all_steps()} | {str(step)}
    entries = {k: v for k, v in entries.items() if k in kept}
    entries[str(step)] = {"kl_coef": self.kl_coef, "moments": {
        "mean": self.moments.mean, "var": self.moments.var, "count": self.moments.count}}
    path.write_text(json.dumps(entries, indent=1, sort_keys=True))

  # -------------------------------------------------------------------------------------------

  def reward_scores(self, batch) -> np.ndarray:
    return np.asarray(jax.device_get(self._scores(self.rm, batch)))

  def _value_estimates(self, batch):
    if self.shared:
      return self._values(self.state, self.critic, batch)
    return self._values(self.critic, batch)

  def _update(self, mini) -> dict[str, Any]:
    if self.shared:
      (self.state, self.critic), metrics = self.shared_step((self.state, self.critic), mini)
      return metrics
    self.state, policy_metrics = self.policy_step(self.state, mini)
    self.critic, critic_metrics = self.critic_step(self.critic, mini)
    return {**policy_metrics, **critic_metrics}

  def learn(self, step: int, batch: dict[str, Any], scores_B: np.ndarray) -> dict[str, Any]:
    alg = self.alg
    rewards_B, self.moments = ppo.normalize_scores(scores_B, alg.score_norm, alg.score_clip,
                                                   self.moments)
    values_BxN = self._value_estimates(batch)
    adv_BxN, returns_BxN, stats = self._advantages(
        batch, jnp.asarray(rewards_B), values_BxN, jnp.float32(self.kl_coef),
        raw_score_B=jnp.asarray(scores_B, jnp.float32))
    batch = {**batch, "advantages": adv_BxN, "returns": returns_BxN, "old_values": values_BxN}
    rows = len(scores_B)
    per = rows // alg.num_mini_batches
    order_rng = np.random.default_rng([self.cfg.seed, step])
    for _ in range(alg.num_ppo_epochs):
      order = order_rng.permutation(rows)
      for m in range(alg.num_mini_batches):
        idx = jnp.asarray(order[m * per:(m + 1) * per])
        metrics = self._update(jax.tree.map(lambda x: x[idx], batch))
    # The loop resumes from state.step: make it count rollout steps, not updates.
    self.state, self.critic = self.set_step(self.state, step + 1), self.set_step(
        self.critic, step + 1)
    stats = jax.device_get(stats)
    out = {**stats, **jax.device_get(metrics), "objective/kl_coef": self.kl_coef,
           "lr": float(self.opt.schedule((step + 1) * self.updates_per_step - 1))}
    if alg.score_norm != "none":
      out["objective/scores_normalized"] = float(np.mean(rewards_B))
    if alg.kl_target > 0:
      self.kl_coef = float(ppo.adaptive_kl_coef(self.kl_coef, stats["objective/kl"],
                                                alg.kl_target, alg.kl_horizon, rows))
    return out

  def save(self, n: int, final: bool) -> None:
    super().save(n, final)
    if final:
      self.critic_ckpt.save(n, self.critic, self.fingerprint)
      self.critic_ckpt.wait()
    elif not self.critic_ckpt.maybe_save(n, self.critic, self.fingerprint):
      return
    self._save_host_state(n)

  def close(self) -> None:
    super().close()
    self.critic_ckpt.close()
