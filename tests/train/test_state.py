"""The state is born sharded: params by the rules, Adam moments like their params, counters
replicated; `init_from` loads HF weights onto the mesh."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jrlhf.models import ModelConfig, save_pretrained
from jrlhf.sharding import MeshConfig, make_mesh
from jrlhf.train.config import OptimConfig
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.state import create_state

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)


def test_optimizer_moments_are_sharded_like_their_params():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  opt = make_optimizer(OptimConfig(weight_decay=0.1), 10)
  _, state, state_sh = create_state(CFG, opt, mesh)
  up = state.trainable["layers"]["mlp"]["up"]["kernel"]
  expected = jax.sharding.NamedSharding(mesh, P(None, "fsdp", "tensor"))
  assert up.sharding.is_equivalent_to(expected, 3)
  adam = state.opt_state[1][0]
  for moment in (adam.mu, adam.nu):
    jax.tree.map(lambda m, p: np.testing.assert_equal(
        m.sharding.is_equivalent_to(p.sharding, p.ndim), True), moment, state.trainable)
  assert adam.count.sharding.is_fully_replicated and state.step.sharding.is_fully_replicated
  assert state.frozen == {} and int(state.step) == 0
  # The shardings handed to jit describe the live state exactly.
  jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.is_equivalent_to(s, x.ndim), True),
               state, state_sh)


def test_init_from_loads_the_checkpoint_with_run_settings(tmp_path):
  mesh = make_mesh(MeshConfig())
  opt = make_optimizer(OptimConfig(), 10)
  model, state, _ = create_state(CFG, opt, mesh, seed=1)
  save_pretrained(tmp_path, model, state.trainable)
  run_cfg = ModelConfig(remat="full")  # shapes come from the checkpoint, runtime from the run
  loaded_model, loaded, _ = create_state(run_cfg, opt, mesh, init_from=str(tmp_path))
  assert loaded_model.cfg.hidden_size == 32 and loaded_model.cfg.remat == "full"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.trainable),
               jax.device_get(state.trainable))


def test_peft_and_plans_use_the_checkpoints_shapes_not_model_defaults(tmp_path):
  """init_from's config.json decides the shapes: a run config left at the default model (as an
  experiment that only names init_from) must still build prompt tokens of the checkpoint's
  width, and its ahead-of-time plan must count the checkpoint's parameters."""
  from jrlhf import config as config_lib, plan  # noqa: PLC0415
  from jrlhf.peft.config import LoraConfig, PromptConfig  # noqa: PLC0415

  mesh = make_mesh(MeshConfig())
  opt = make_optimizer(OptimConfig(), 10)
  model, state, _ = create_state(CFG, opt, mesh, seed=1)
  save_pretrained(tmp_path, model, state.trainable)
  default = ModelConfig()
  assert default.hidden_size != CFG.hidden_size
  loaded, prompted, _ = create_state(default, opt, mesh, init_from=str(tmp_path),
                                     peft=PromptConfig(num_virtual_tokens=3))
  assert loaded.cfg.hidden_size == CFG.hidden_size
  (prompt,) = jax.tree.leaves(prompted.trainable)
  assert prompt.shape == (3, CFG.hidden_size)

  run = config_lib.Config(init_from=str(tmp_path), peft=LoraConfig(rank=2))
  planned = plan.make_plan(run, plan.parse_target("cpu"), costs=False)
  _, lora, _ = create_state(CFG, opt, mesh, init_from=str(tmp_path), peft=LoraConfig(rank=2))
  assert planned.trainable_params == sum(x.size for x in jax.tree.leaves(lora.trainable))
