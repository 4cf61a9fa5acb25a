"""Ahead-of-time programs of online RL (`plan=` for algorithm=grpo / ppo): the rollout (the
jitted sampler) and the updates, built from abstract state exactly as `jrlhf.train.online` and
`jrlhf.train.ppo_critic` build them.

Prompt width is `data.max_length` (an upper bound of the run's longest prompt); responses are
`algorithm.max_new_tokens`. The rollout's decode is a while loop, so its FLOPs are the model
count (2 x matmul params per token, prompt and response), not XLA's (which counts one step).
The rollout compiles for its own layout (`rollout_mesh`, when set, over the target's devices);
its memory is that program's alone, while a run also holds the state in the update layout.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jrlhf.algorithms import grpo, ppo
from jrlhf.algorithms.step import combine_params
from jrlhf.plan import PlanError, Program, matmul_params


def _rows(cfg) -> int:
  return cfg.algorithm.prompts_per_step * cfg.algorithm.group_size


def _state(cfg, mesh, head: str = "lm"):
  from jrlhf.train.optimizer import make_optimizer  # noqa: PLC0415
  from jrlhf.train.state import abstract_state  # noqa: PLC0415

  opt = make_optimizer(cfg.optim, cfg.steps)
  model, state = abstract_state(cfg.model, opt, mesh, seed=cfg.seed, peft=cfg.peft, head=head,
                                reference=head == "lm")
  return model, state, opt, jax.tree.map(lambda x: x.sharding, state)


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


class _OnMesh:
  """A jitted program that lowers under its own mesh's sharding context: the rollout's
  activation constraints must name the rollout mesh, not the update mesh the plan sets."""

  def __init__(self, fn, mesh):
    self.fn, self.mesh = fn, mesh

  def lower(self, *args):
    from jrlhf.sharding import sharding_context  # noqa: PLC0415

    with sharding_context(self.mesh):
      return self.fn.lower(*args)


def build_rollout(cfg, mesh) -> tuple[Any, tuple]:
  from jrlhf.models.generate import Sampler, SamplingConfig  # noqa: PLC0415
  from jrlhf.sharding import batch_sharding  # noqa: PLC0415
  from jrlhf.train.online import make_rollout_mesh  # noqa: PLC0415

  try:
    mesh = make_rollout_mesh(cfg, mesh)
  except ValueError as e:
    raise PlanError(f"{mesh.devices.size} devices: {e}") from None
  model, state, _, _ = _state(cfg, mesh)
  params = combine_params(state.trainable, state.frozen)
  sampler = Sampler(model, SamplingConfig(max_new_tokens=cfg.algorithm.max_new_tokens,
                                          temperature=cfg.algorithm.temperature))
  sh, rows, width = batch_sharding(mesh), _rows(cfg), cfg.data.max_length
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  prompt = _sds((rows, width), jnp.int32, sh)
  return _OnMesh(sampler._generate, mesh), (params, prompt, prompt,
                                            _sds((2,), jnp.uint32, replicated))


def _update_batch(cfg, rows: int, mesh, *fields: str) -> dict[str, jax.ShapeDtypeStruct]:
  from jrlhf.sharding import batch_sharding  # noqa: PLC0415

  sh, p, n = batch_sharding(mesh), cfg.data.max_length, cfg.algorithm.max_new_tokens
  batch = {"tokens": _sds((rows, p + n), jnp.int32, sh),
           "attention_mask": _sds((rows, p + n), jnp.bool_, sh),
           "response_mask": _sds((rows, n), jnp.bool_, sh)}
  for name in fields:
    batch[name] = _sds((rows,) if name == "advantages" and isinstance(
        cfg.algorithm, grpo.GRPOConfig) else (rows, n), jnp.float32, sh)
  return batch


def _jit_step(fn, state_sh):
  return jax.jit(fn, in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                 donate_argnums=0)


def build_grpo_update(cfg, mesh) -> tuple[Any, tuple]:
  model, state, opt, state_sh = _state(cfg, mesh)
  step = _jit_step(functools.partial(grpo.train_step, model=model, cfg=cfg.algorithm, opt=opt),
                   state_sh)
  return step, (state, _update_batch(cfg, _rows(cfg), mesh, "old_logprobs", "ref_logprobs",
                                     "advantages"))


def _mini_rows(cfg) -> int:
  return _rows(cfg) // cfg.algorithm.num_mini_batches


def build_ppo_policy(cfg, mesh) -> tuple[Any, tuple]:
  model, state, opt, state_sh = _state(cfg, mesh)
  step = _jit_step(functools.partial(ppo.policy_step, model=model, cfg=cfg.algorithm, opt=opt),
                   state_sh)
  return step, (state, _update_batch(cfg, _mini_rows(cfg), mesh, "old_logprobs", "advantages"))


def build_ppo_critic(cfg, mesh) -> tuple[Any, tuple]:
  model, state, opt, state_sh = _state(cfg, mesh, head="scalar")
  step = _jit_step(functools.partial(ppo.critic_step, model=model, cfg=cfg.algorithm, opt=opt),
                   state_sh)
  return step, (state, _update_batch(cfg, _mini_rows(cfg), mesh, "old_values", "returns"))


def build_ppo_shared(cfg, mesh) -> tuple[Any, tuple]:
  """algorithm.value_model=shared: one step trains the policy and the value head on its trunk
  (the head's state is a D-vector and its moments, replicated)."""
  from jrlhf.train.ppo_critic import value_head_state  # noqa: PLC0415

  model, state, opt, state_sh = _state(cfg, mesh)
  head = jax.eval_shape(lambda: value_head_state(model.cfg.hidden_size, opt, mesh, cfg.seed)[0])
  head_sh = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), head)
  head = jax.tree.map(lambda x, sh: _sds(x.shape, x.dtype, sh), head, head_sh)
  shardings = (state_sh, head_sh)
  step = jax.jit(functools.partial(ppo.shared_step, model=model, cfg=cfg.algorithm, opt=opt),
                 in_shardings=(shardings, None), out_shardings=(shardings, None),
                 donate_argnums=0)
  return step, ((state, head), _update_batch(cfg, _mini_rows(cfg), mesh, "old_logprobs",
                                             "advantages", "old_values", "returns"))


def _tokens(cfg, rows: int) -> int:
  return rows * (cfg.data.max_length + cfg.algorithm.max_new_tokens)


def rollout_flops(cfg) -> float:
  return 2.0 * matmul_params(cfg.model) * _tokens(cfg, _rows(cfg))


def update_flops(cfg, rows: int, passes: int) -> float:
  return float(passes * matmul_params(cfg.model) * _tokens(cfg, rows))


ROLLOUT = Program("rollout", build_rollout, rollout_flops, compiler_costs=False)
def _step_flops(cfg) -> float:
  return update_flops(cfg, _mini_rows(cfg), 6 if cfg.peft.full else 4)


def ppo_programs(cfg) -> tuple[Program, ...]:
  """The rollout, then a policy and a critic step, or one shared step (value_model=shared)."""
  if cfg.algorithm.value_model == "shared":
    return ROLLOUT, Program("shared_step", build_ppo_shared, _step_flops)
  return (ROLLOUT, Program("policy_step", build_ppo_policy, _step_flops),
          Program("critic_step", build_ppo_critic, _step_flops))


# algorithm config type -> its programs, or a function of the run config giving them.
PROGRAMS: dict[type, Any] = {
    grpo.GRPOConfig: (ROLLOUT, Program(
        "update", build_grpo_update,
        lambda cfg: update_flops(cfg, _rows(cfg), 6 if cfg.peft.full else 4))),
    ppo.PPOConfig: ppo_programs,
}
