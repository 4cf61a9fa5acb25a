"""The online loop end to end on the embedded task (tiny random-init model, a few steps): GRPO
and PPO run, log TRL's metric names, stay on-policy on the first update, and resume exactly."""

import os
import signal
from unittest import mock

import chz
import pytest

from jrlhf.algorithms.grpo import GRPOConfig
from jrlhf.algorithms.ppo import PPOConfig
from jrlhf.models import from_pretrained
from jrlhf.train import online
from tests.train.test_loop import config, deterministic, read

ALGORITHMS = {
    "grpo": GRPOConfig(group_size=4, prompts_per_step=4, max_new_tokens=8),
    "ppo": PPOConfig(prompts_per_step=8, max_new_tokens=8, num_ppo_epochs=1,
                     num_mini_batches=1),
}


def online_config(name, **train):
  cfg = config(steps=3, eval_every=3, checkpoint_every=1, num_samples=4, max_new_tokens=8,
               **train)
  return chz.replace(cfg, algorithm=ALGORITHMS[name])


def preempted_then_resumed(cfg, run_dir):
  """SIGTERM during step 2 (a preemption): the run finishes the step, saves and exits; the same
  command then continues from step 2. Returns the resumed run's metrics rows."""
  rollout = online._Online.rollout

  def preempted(self, step):
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return rollout(self, step)

  with mock.patch.object(online._Online, "rollout", preempted), pytest.raises(SystemExit):
    online.train(cfg, run_dir)
  assert [r["step"] for r in read(run_dir / "metrics.jsonl")] == [1, 2]
  online.train(cfg, run_dir)
  return read(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_online_run_logs_trl_metrics_and_resumes_exactly(tmp_path, name):
  cfg = online_config(name)
  whole = online.train(chz.replace(cfg, train=chz.replace(cfg.train, export=True)),
                       tmp_path / "whole")
  assert whole["step"] == 3 and "eval/accuracy" in whole
  # The trained policy is exported like any run's (an HF checkpoint, the next run's init_from).
  _, exported = from_pretrained(tmp_path / "whole" / "export")
  assert exported["embed"].shape[0] == cfg.model.vocab_size
  rows = read(tmp_path / "whole" / "metrics.jsonl")
  first = rows[0]
  for key in ("objective/scores", "objective/kl", "policy/clipfrac", "val/ratio",
              "rollout/eos_fraction", "perf/episodes_per_sec"):
    assert key in first, key
  # Where each step's time went, every phase waited on (a phase never measured would be absent).
  for row in rows:
    assert all(row[f"perf/{phase}_s"] > 0 for phase in
               ("reshard", "rollout", "reference", "score", "update")), row
  # One update per rollout batch: the ratio to the sampling policy is exactly 1 (the sampler's
  # logprobs are the trainer's), so nothing is clipped and the KL to the start is 0 at step 1.
  assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
  assert first["policy/clipfrac"] == 0.0
  assert abs(first["objective/kl"]) < 1e-4
  if name == "ppo":
    assert {"loss/value", "objective/rlhf_reward", "objective/non_score_reward"} <= set(first)

  assert deterministic(preempted_then_resumed(cfg, tmp_path / "split")) == deterministic(rows)


def test_grpo_with_several_epochs_counts_rollout_steps_and_resumes_exactly(tmp_path):
  """epochs=2: two updates per rollout step; state.step still counts rollout steps (the loop
  resumes from it) and the schedule spans every update, so a preempted run continues exactly."""
  cfg = chz.replace(online_config("grpo"), algorithm=GRPOConfig(
      group_size=4, prompts_per_step=4, max_new_tokens=8, epochs=2))
  cfg = chz.replace(cfg, optim=chz.replace(cfg.optim, schedule="linear", warmup_steps=1,
                                          min_lr_ratio=0.0))
  online.train(cfg, tmp_path / "whole")
  rows = read(tmp_path / "whole" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert rows[-1]["lr"] > 0  # a schedule built for 3 updates would have ended at update 3
  assert deterministic(preempted_then_resumed(cfg, tmp_path / "split")) == deterministic(rows)
