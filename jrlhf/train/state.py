"""The training state, created directly in its sharded layout on the mesh.

  model, state, state_sh = create_state(model_cfg, opt, mesh, seed=0)              # random init
  model, state, state_sh = create_state(model_cfg, opt, mesh, init_from="hf/dir")  # HF weights

`trainable` is what the optimizer updates (the full params for full fine-tuning, adapters with
PEFT); `frozen` is the rest (empty for full fine-tuning; the base model with PEFT, which then
doubles as the DPO/PPO reference: DESIGN decision 3). Only `trainable`, `opt_state`, `step` and
`rng` are checkpointed: `frozen` is rebuilt from `init_from` / the seed.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jrlhf.models import ModelConfig, Transformer, from_pretrained
from jrlhf.sharding import init_sharded, param_shardings
from jrlhf.train.optimizer import Optimizer

Array = jax.Array

# Fields of ModelConfig that describe how to run a model rather than what it is; with
# `init_from` they come from the run's config, everything else from the checkpoint.
RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "scan_unroll", "attention_chunk")


@flax.struct.dataclass
class TrainState:
  trainable: Any
  frozen: Any
  opt_state: Any
  step: Array
  rng: Array

  def checkpointed(self) -> dict[str, Any]:
    """The part a checkpoint holds (frozen params are rebuilt, never saved)."""
    return {"trainable": self.trainable, "opt_state": self.opt_state, "step": self.step,
            "rng": self.rng}


def _example_tokens():
  return jnp.zeros((1, 1), jnp.int32)


def load_model(model_cfg: ModelConfig, init_from: str | None, mesh: Mesh, seed: int
               ) -> tuple[Transformer, Any, Any]:
  """(model, params, param shardings): random init from the seed, or an HF checkpoint."""
  if init_from is None:
    model = Transformer(model_cfg)
    params, shardings = init_sharded(model, jax.random.PRNGKey(seed), _example_tokens(),
                                     mesh=mesh)
    return model, params, shardings
  runtime = {name: getattr(model_cfg, name) for name in RUNTIME_FIELDS}
  model, params = from_pretrained(
      init_from, dtype=runtime.pop("param_dtype"), compute_dtype=runtime.pop("dtype"), mesh=mesh,
      **runtime)
  return model, params, param_shardings(model, _example_tokens(), mesh=mesh)


def state_shardings(opt: Optimizer, trainable_sh: Any, frozen_sh: Any, trainable_shapes: Any,
                    mesh: Mesh) -> TrainState:
  """Shardings of every state leaf: optimizer moments follow their param, the rest replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shapes = jax.eval_shape(opt.tx.init, trainable_shapes)
  opt_sh = optax.tree_map_params(opt.tx, lambda _, sh: sh, opt_shapes, trainable_sh,
                                 transform_non_params=lambda _: replicated)
  return TrainState(trainable=trainable_sh, frozen=frozen_sh, opt_state=opt_sh,
                    step=replicated, rng=replicated)


def create_state(model_cfg: ModelConfig, opt: Optimizer, mesh: Mesh, *, seed: int = 0,
                 init_from: str | None = None) -> tuple[Transformer, TrainState, TrainState]:
  """(model, state, state shardings) for full fine-tuning, every leaf born sharded."""
  model, params, params_sh = load_model(model_cfg, init_from, mesh, seed)
  shapes = jax.eval_shape(lambda p: p, params)
  state_sh = state_shardings(opt, params_sh, {}, shapes, mesh)

  def init_rest(params):
    return opt.tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed + 1)

  opt_state, step, rng = jax.jit(
      init_rest, out_shardings=(state_sh.opt_state, state_sh.step, state_sh.rng))(params)
  state = TrainState(trainable=params, frozen={}, opt_state=opt_state, step=step, rng=rng)
  return model, state, state_sh


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: a restore target for orbax."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
