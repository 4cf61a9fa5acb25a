"""A rollout mesh other than the update mesh (`rollout_mesh`): the same first step as with one
mesh, the sampler really on the rollout layout and its outputs back on the update's batch
sharding, the time split logged, and bad layouts refused with the key to change."""

import chz
import jax
import numpy as np
import pytest

from jrlhf import config as config_lib
from jrlhf import plan_online
from jrlhf.algorithms.grpo import GRPOConfig
from jrlhf.peft.config import LoraConfig
from jrlhf.plan import PlanError
from jrlhf.sharding import MeshConfig, batch_sharding, make_mesh, sharding_context
from jrlhf.train import online
from tests.train.test_loop import config, read

TENSOR = MeshConfig(fsdp=1, tensor=8)  # decode tensor-parallel; updates stay FSDP (1, 8, 1)
PHASES = ("reshard", "rollout", "reference", "score", "update")
ROLLOUT_PARAMS, LEARN = online._Online.rollout_params, online._Online.learn


def grpo_config(**fields):
  cfg = config(steps=1, eval_every=0, num_samples=0, checkpoint_every=0)
  # Responses that never stop lose 1: scores differ within a group, so the advantages, the loss
  # and the gradient are not all zero and the update has something to agree on.
  alg = GRPOConfig(group_size=4, prompts_per_step=4, max_new_tokens=8, missing_eos_penalty=1.0)
  return chz.replace(cfg, algorithm=alg, **fields)


def mesh_shapes(tree):
  return {tuple(x.sharding.mesh.shape.values()) for x in jax.tree.leaves(tree)}


class Spy:
  """Records, in a run, the mesh of the params the sampler gets and the batch the update gets."""

  def __init__(self, monkeypatch):
    def rollout_params(run):
      out = ROLLOUT_PARAMS(run)
      self.sampler_meshes = mesh_shapes(out)
      return out

    def spy_learn(run, step, batch, scores_B):
      self.batch_sharding = batch["tokens"].sharding
      self.batch, self.scores_B = jax.device_get(batch), np.asarray(scores_B)
      return LEARN(run, step, batch, scores_B)

    monkeypatch.setattr(online._Online, "rollout_params", rollout_params)
    monkeypatch.setattr(online._Online, "learn", spy_learn)


def assert_same_batch(a, b):
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_array_equal(a["response_mask"], b["response_mask"])
  for key in ("old_logprobs", "ref_logprobs"):
    np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_rollout_mesh_gives_the_first_step_of_one_mesh(tmp_path, monkeypatch):
  runs = {}
  for name, rollout_mesh in (("one", None), ("two", TENSOR)):
    spy = Spy(monkeypatch)
    cfg = grpo_config(rollout_mesh=rollout_mesh)
    online.train(cfg, tmp_path / name)
    runs[name] = spy, read(tmp_path / name / "metrics.jsonl")[0]
    update_mesh = make_mesh(cfg.mesh)
    assert spy.batch_sharding.is_equivalent_to(batch_sharding(update_mesh), 2)
  (one, one_row), (two, two_row) = runs["one"], runs["two"]
  assert one.sampler_meshes == {(1, 8, 1)} and two.sampler_meshes == {(1, 1, 8)}

  assert_same_batch(one.batch, two.batch)
  np.testing.assert_array_equal(one.scores_B, two.scores_B)
  assert np.ptp(one.scores_B) > 0
  assert one_row["grad_norm"] > 0
  assert set(one_row) == set(two_row)
  for key in one_row:
    if not key.startswith("perf/"):
      assert two_row[key] == pytest.approx(one_row[key], rel=1e-4, abs=1e-6), key

  for row in (one_row, two_row):
    spent = [row[f"perf/{phase}_s"] for phase in PHASES]
    assert all(s > 0 for s in spent), row
    # The phases tile the step: together they are its whole time (episodes/s = 16 / that).
    assert sum(spent) == pytest.approx(16 / row["perf/episodes_per_sec"], rel=1e-6)


def test_peft_rollout_reads_the_frozen_base_from_the_rollout_layout(tmp_path):
  batches = []
  for name, rollout_mesh in (("one", None), ("two", MeshConfig(data=2, fsdp=1, tensor=4))):
    run = online._Online(grpo_config(rollout_mesh=rollout_mesh, peft=LoraConfig(rank=4)),
                         tmp_path / name)
    try:
      shape = tuple(run.rollout_mesh.shape.values())
      assert mesh_shapes(run.rollout_frozen) == {shape}
      assert mesh_shapes(run.rollout_params()) == {shape}
      assert mesh_shapes(run.state.frozen) == {(1, 8, 1)}  # the update's copy stays
      with sharding_context(run.mesh):
        batch, _, _ = run.rollout(0)
      assert set(run.timer.seconds) == {"reshard", "rollout", "reference", "score"}
      batches.append(jax.device_get(batch))
    finally:
      run.close()
  assert_same_batch(*batches)


def test_bad_rollout_meshes_name_the_key(tmp_path):
  cfg = grpo_config()
  mesh = make_mesh(cfg.mesh)
  with pytest.raises(ValueError, match=r"rollout_mesh: mesh data=3.* cannot fill 8 devices"):
    online.train(chz.replace(cfg, rollout_mesh=MeshConfig(data=3)), tmp_path)
  twelve = chz.replace(cfg, mesh=MeshConfig(data=2, fsdp=1, tensor=4),
                       algorithm=chz.replace(cfg.algorithm, prompts_per_step=3),
                       rollout_mesh=MeshConfig(data=8, fsdp=1))
  with pytest.raises(ValueError, match=r"12 rollouts per step .*rollout_mesh\.data=8"):
    online.make_rollout_mesh(twelve, make_mesh(twelve.mesh))
  with pytest.raises(PlanError, match=r"12 rollouts per step"):
    plan_online.build_rollout(twelve, make_mesh(twelve.mesh))
  # The update mesh's own shape is no second layout: the same mesh, no copies.
  assert online.make_rollout_mesh(chz.replace(cfg, rollout_mesh=MeshConfig(fsdp=8)), mesh) is mesh
  with pytest.raises(config_lib.ConfigError, match=r"rollout_mesh\.tensor or"):
    config_lib.resolve("tiny/grpo", {"rollout_mesh.tensr": "8"})


def test_rollout_mesh_on_the_command_line_and_in_config_json(tmp_path):
  assert config_lib.resolve("tiny/grpo").rollout_mesh is None
  cfg = config_lib.resolve("tiny/grpo", {"rollout_mesh.fsdp": "1", "rollout_mesh.tensor": "8"})
  assert cfg.rollout_mesh == TENSOR
  config_lib.write_config(cfg, tmp_path / "config.json")
  assert config_lib.load_config(tmp_path / "config.json") == cfg


def test_plan_compiles_the_rollout_for_its_own_layout():
  cfg = config_lib.resolve("tiny/grpo", {"model.num_layers": "1", "rollout_mesh.fsdp": "1",
                                         "rollout_mesh.tensor": "8"})
  mesh = make_mesh(cfg.mesh)
  fn, args = plan_online.build_rollout(cfg, mesh)
  assert mesh_shapes(args) == {(1, 1, 8)}
  with sharding_context(mesh):  # as `plan` lowers every program: under the update mesh
    compiled = fn.lower(*args).compile()
  assert compiled.memory_analysis().argument_size_in_bytes > 0


def test_phase_timer_charges_each_lap_to_its_phase():
  timer = online.PhaseTimer()
  x = jax.numpy.ones((64, 64))
  assert timer.lap("a", x @ x) is not None
  timer.lap("b")
  timer.lap("a", {"host": 1.0, "device": x})
  assert set(timer.metrics()) == {"perf/a_s", "perf/b_s"}
  assert sum(timer.seconds.values()) == pytest.approx(timer.total())
  timer.start()
  assert timer.metrics() == {}
