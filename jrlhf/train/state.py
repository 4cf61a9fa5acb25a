"""The training state, created directly in its sharded layout on the mesh.

  model, state, state_sh = create_state(model_cfg, opt, mesh, seed=0)              # random init
  model, state, state_sh = create_state(model_cfg, opt, mesh, init_from="hf/dir")  # HF weights
  model, state, state_sh = create_state(model_cfg, opt, mesh, peft=LoraConfig())   # PEFT
  model, shapes = abstract_state(model_cfg, opt, mesh, peft=QLoraConfig())  # nothing allocated

`trainable` is what the optimizer updates (the full params for full fine-tuning, adapters with
PEFT); `frozen` is the rest (empty for full fine-tuning, or `{"reference": copy}` when the
algorithm needs a reference model; the base model with PEFT, which then doubles as the DPO/PPO
reference: DESIGN decision 3). Only `trainable`, `opt_state`, `step` and
`rng` are checkpointed: `frozen` is rebuilt from `init_from` / the seed.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jrlhf.algorithms.step import REFERENCE
from jrlhf.models import ModelConfig, Transformer, from_pretrained
from jrlhf.models.hf import read_hf_config
from jrlhf.models.hf_config import config_from_hf
from jrlhf.peft.config import FullFinetune
from jrlhf.peft.trainable import split_trainable
from jrlhf.sharding import init_sharded, param_shardings
from jrlhf.sharding.rules import unbox
from jrlhf.train.optimizer import Optimizer

Array = jax.Array

# Fields of ModelConfig that describe how to run a model rather than what it is; with
# `init_from` they come from the run's config, everything else from the checkpoint.
# The reward model's score head: trainable under every PEFT method (see `_split`).
SCORE_REGEX = r"^score/"
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


def checkpoint_model_config(model_cfg: ModelConfig, init_from: str | None) -> ModelConfig:
  """The model a run builds: `init_from`'s shapes (its config.json, no weights read) with the
  run's runtime fields (dtypes, remat, ...), as `load_model` would; `model_cfg` itself without
  init_from. For ahead-of-time plans, which never load the weights."""
  if not init_from:
    return model_cfg
  runtime = {name: getattr(model_cfg, name) for name in RUNTIME_FIELDS}
  return config_from_hf(read_hf_config(init_from), **runtime)


def load_model(model_cfg: ModelConfig, init_from: str | None, mesh: Mesh, seed: int,
               head: str = "lm") -> tuple[Transformer, Any, Any]:
  """(model, params, param shardings): random init from the seed, or an HF checkpoint.

  `head="scalar"` (a reward model) from a causal-LM checkpoint (the usual start: the SFT model)
  drops the LM head and starts a zero score head, so every reward starts at 0.
  """
  if init_from is None:
    model = Transformer(model_cfg, head=head)
    params, shardings = init_sharded(model, jax.random.PRNGKey(seed), _example_tokens(),
                                     mesh=mesh)
    return model, params, shardings
  runtime = {name: getattr(model_cfg, name) for name in RUNTIME_FIELDS}
  load = functools.partial(from_pretrained, init_from, dtype=runtime.pop("param_dtype"),
                           compute_dtype=runtime.pop("dtype"), mesh=mesh, **runtime)
  try:
    model, params = load(head=head)
  except ValueError:
    if head != "scalar":
      raise
    # Not a *ForSequenceClassification checkpoint: a causal LM whose body the RM starts from.
    lm, params = load(head="lm")
    model = Transformer(lm.cfg, head="scalar")
    params = {k: v for k, v in params.items() if k != "lm_head"}
    score_sh = param_shardings(model, _example_tokens(), mesh=mesh)["score"]
    params["score"] = jax.jit(
        lambda: {"kernel": jnp.zeros((lm.cfg.hidden_size, 1), params["embed"].dtype)},
        out_shardings=score_sh)()
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


def _peft_rng(seed: int) -> Array:
  # Distinct from the init key (seed) and the state's key (seed + 1).
  return jax.random.PRNGKey(seed + 2)


def _split(peft: FullFinetune, tree: Any, head: str = "lm", reference: bool = False
           ) -> tuple[Any, Any]:
  """(trainable, frozen) of a param (or sharding / shape) tree under `peft`.

  A scalar head is new (random or zero), so it trains under every PEFT method. Under full
  fine-tuning, `reference=True` puts a frozen copy of the params in `frozen[REFERENCE]` (DPO's
  reference model; under PEFT the frozen base already is one).
  """
  if peft.full:
    return tree, ({REFERENCE: tree} if reference else {})
  regex = peft.train_regex
  if head == "scalar":
    regex = SCORE_REGEX if regex is None else f"(?:{regex})|{SCORE_REGEX}"
  return split_trainable(tree, regex)


def apply_peft(peft: FullFinetune, params: Any, params_sh: Any, model_cfg: ModelConfig,
               mesh: Mesh, seed: int, encode=None) -> tuple[Any, Any]:
  """(PEFT tree, its shardings): the transform runs under jit, so new leaves (LoRA factors,
  4-bit codes) are born sharded and the replaced 16-bit kernels are donated."""
  if peft.full:
    return params, params_sh
  transform = functools.partial(peft.transform, rng=_peft_rng(seed), model_cfg=model_cfg,
                                encode=encode)
  shapes = jax.eval_shape(transform, params)
  shardings = peft.shardings(shapes, params_sh, mesh)
  with warnings.catch_warnings():
    # 16-bit kernels replaced by 4-bit codes cannot alias an output; donating still frees them.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    params = jax.jit(transform, out_shardings=shardings, donate_argnums=0)(params)
  return peft.load_weights(params), shardings


def create_state(model_cfg: ModelConfig, opt: Optimizer, mesh: Mesh, *, seed: int = 0,
                 init_from: str | None = None, peft: FullFinetune | None = None, encode=None,
                 head: str = "lm", reference: bool = False
                 ) -> tuple[Transformer, TrainState, TrainState]:
  """(model, state, state shardings), every leaf born sharded. `peft` (a `jrlhf.peft.config`
  method; None = full fine-tuning) decides the trainable / frozen split; `encode` (text ->
  token ids) is for methods initialised from text. `head`: "lm" or "scalar" (reward model);
  `reference`: keep a frozen reference copy under full fine-tuning (DPO)."""
  peft = peft or FullFinetune()
  model, params, params_sh = load_model(model_cfg, init_from, mesh, seed, head)
  # model.cfg, not model_cfg: with init_from the shapes are the checkpoint's.
  params, params_sh = apply_peft(peft, params, params_sh, model.cfg, mesh, seed, encode)
  split = functools.partial(_split, peft, head=head, reference=reference)
  (trainable, frozen), (trainable_sh, frozen_sh) = split(params), split(params_sh)
  if REFERENCE in frozen:
    # A copy, not an alias: the step donates `trainable`, which must not free the reference.
    frozen = {REFERENCE: jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                 out_shardings=params_sh)(params)}
  shapes = jax.eval_shape(lambda p: p, trainable)
  state_sh = state_shardings(opt, trainable_sh, frozen_sh, shapes, mesh)

  def init_rest(trainable):
    return opt.tx.init(trainable), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed + 1)

  opt_state, step, rng = jax.jit(
      init_rest, out_shardings=(state_sh.opt_state, state_sh.step, state_sh.rng))(trainable)
  state = TrainState(trainable=trainable, frozen=frozen, opt_state=opt_state, step=step, rng=rng)
  return model, state, state_sh


def abstract_state(model_cfg: ModelConfig, opt: Optimizer, mesh: Mesh, *, seed: int = 0,
                   peft: FullFinetune | None = None, head: str = "lm", reference: bool = False
                   ) -> tuple[Transformer, TrainState]:
  """(model, state of ShapeDtypeStructs carrying shardings): what `create_state` would build,
  from shapes alone (nothing is allocated), for ahead-of-time compiles and memory plans.
  Prompt initialised from text is planned as random init (same shapes)."""
  peft = peft or FullFinetune()
  model = Transformer(model_cfg, head=head)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(seed), _example_tokens())
  params = unbox(boxed)["params"]
  params_sh = param_shardings(model, _example_tokens(), mesh=mesh)
  if not peft.full:
    params = jax.eval_shape(functools.partial(
        peft.transform, rng=_peft_rng(seed), model_cfg=model_cfg,
        encode=lambda text: [0] * max(1, len(text))), params)
    params_sh = peft.shardings(params, params_sh, mesh)
  split = functools.partial(_split, peft, head=head, reference=reference)
  (trainable, frozen), (trainable_sh, frozen_sh) = split(params), split(params_sh)
  state_sh = state_shardings(opt, trainable_sh, frozen_sh, trainable, mesh)
  opt_state = jax.eval_shape(opt.tx.init, trainable)
  shapes = TrainState(trainable=trainable, frozen=frozen, opt_state=opt_state,
                      step=jax.ShapeDtypeStruct((), jnp.int32),
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  with_sh = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
  return model, jax.tree.map(with_sh, shapes, state_sh)


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: a restore target for orbax."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
