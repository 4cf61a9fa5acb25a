"""Ahead-of-time plans: compile for a TPU topology or local devices, report, judge the budget."""

import importlib.util
import sys

import jax
import pytest

from jrlhf import config, plan, run

TPU = "v5p:2x2x1"  # the smallest v5p slice: 4 chips, one host


def plan_for(experiment: str, target: str, **overrides):
  cfg = config.resolve(experiment, {"plan": target, **overrides})
  return cfg, plan.make_plan(cfg, plan.parse_target(target))


def test_tpu_plan_of_tiny_sft_compiles_and_reports():
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail(f"libtpu is not installed, so a TPU plan cannot be compiled or tested. Install "
                f"it (.ci/run does): pip install 'jax[tpu]=={jax.__version__}'")
  cfg, report = plan_for("tiny/sft", TPU)
  step = report.programs[0]
  assert report.target.chips == 4 and report.mesh_shape["fsdp"] == 4 and report.fits
  assert step.memory["total"] > 0 and step.memory["arguments"] > 0
  assert step.compiler_flops > 0 and step.est_seconds > 0
  assert 0 < step.mfu(report.target) < 1
  # Per chip: the 4 chips' compiler FLOPs together are about the model FLOPs (plus elementwise
  # work), not a quarter of them (a per-host or single-layer count would be).
  assert 0.8 < 4 * step.compiler_flops / step.model_flops < 2
  text = plan.describe(report, cfg)
  assert "4 x TPU v5p" in text and "estimated MFU" in text and "verdict: fits" in text


def test_plan_counts_every_scanned_layer():
  # XLA's cost analysis reads a scanned layer stack as one layer; the plan extrapolates in depth.
  # One device (gpu:SIZE compiles for the local CPU): cheaper than partitioning over 8.
  _, two = plan_for("tiny/sft", "gpu:64GB", **{"model.num_layers": "2"})
  _, four = plan_for("tiny/sft", "gpu:64GB", **{"model.num_layers": "4"})
  a, b = two.programs[0], four.programs[0]
  assert a.memory["total"] > 0 and a.est_seconds is None  # XLA:CPU has no time estimate
  assert 1.7 < b.compiler_flops / a.compiler_flops < 2.1
  assert 1.7 < b.model_flops / a.model_flops < 2.1
  assert two.target.chips == 1 and 0.8 < a.compiler_flops / a.model_flops < 2
  # The gradient-accumulation scan is a loop too: two micro-batches cost twice one.
  _, accum = plan_for("tiny/sft", "gpu:64GB", **{"model.num_layers": "2", "optim.grad_accum": "2"})
  assert 1.8 < accum.programs[0].compiler_flops / a.compiler_flops < 2.1


def test_over_budget_exits_nonzero_with_a_verdict(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert run.main(["experiment=tiny/sft", "plan=gpu:1MB"]) == 1
  out = capsys.readouterr().out
  assert "verdict: DOES NOT FIT" in out and "stand-in" in out and "per chip total" in out
  assert not (tmp_path / "runs").exists()  # a plan never creates a run dir


def test_bad_targets_are_actionable(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  for spec, message in [("v9z:2x2", "expected a TPU topology"), ("gpu", "gpu:16GB"),
                        ("v5p:two", "chips per dimension"), ("cpu:lots", "16GB")]:
    assert run.main(["experiment=tiny/sft", f"plan={spec}"]) == 2
    assert message in capsys.readouterr().err
  assert not (tmp_path / "runs").exists()


def test_missing_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # makes `import libtpu` fail
  with pytest.raises(plan.PlanError, match=r"pip install 'jax\[tpu\]=="):
    plan.parse_target(TPU)


def test_plan_is_never_part_of_a_run():
  assert config.run_name("tiny/sft", {"plan": "cpu", "seed": "1"}) == "tiny-sft,seed=1"
  assert "plan" in config.NOT_IN_EXPERIMENT
  assert plan.parse_size("16GB") == 16 * 2**30 == plan.parse_size("16GiB")


def test_online_rl_plans_the_rollout_and_the_updates():
  from jrlhf import plan as plan_lib
  from jrlhf.config import resolve

  cfg = resolve("tiny/ppo", {"algorithm.prompts_per_step": "16", "algorithm.num_mini_batches": "2",
                             "model.num_layers": "1"})
  plan = plan_lib.make_plan(cfg, plan_lib.parse_target("cpu"), costs=False)
  names = [p.name for p in plan.programs]
  assert names == ["rollout", "policy_step", "critic_step"]
  for p in plan.programs:
    assert p.memory["total"] > 0 and p.model_flops > 0
  # The rollout's FLOPs are the model count over prompt + response tokens (16 rollouts).
  expected = 2 * plan_lib.matmul_params(cfg.model) * 16 * (64 + cfg.algorithm.max_new_tokens)
  assert plan.programs[0].model_flops == expected

  # A value head on the policy's trunk: one shared step instead of a policy and a critic step,
  # and less memory than the two (no second model).
  shared = resolve("tiny/ppo", {"algorithm.prompts_per_step": "16", "model.num_layers": "1",
                                "algorithm.num_mini_batches": "2",
                                "algorithm.value_model": "shared"})
  shared_plan = plan_lib.make_plan(shared, plan_lib.parse_target("cpu"), costs=False)
  assert [p.name for p in shared_plan.programs] == ["rollout", "shared_step"]
  assert 0 < shared_plan.programs[1].memory["total"] < (
      plan.programs[1].memory["total"] + plan.programs[2].memory["total"])
