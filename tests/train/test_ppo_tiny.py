"""PPO on the embedded task: exact resume with several updates per step (host state included),
and, slow, a short run from a briefly trained SFT model that raises the scorer's reward."""

import json
import os
import signal
import subprocess
import sys
from unittest import mock

import chz
import numpy as np
import pytest

from jrlhf.algorithms.ppo import PPOConfig
from jrlhf.train import online
from tests.train.test_loop import config, deterministic, read


def ppo_config(**algorithm):
  cfg = config(steps=3, eval_every=3, checkpoint_every=1, num_samples=4, max_new_tokens=8)
  # Two epochs of two mini-batches: four optimizer updates per rollout step.
  alg = PPOConfig(prompts_per_step=16, max_new_tokens=8, num_ppo_epochs=2, num_mini_batches=2,
                  **algorithm)
  return chz.replace(cfg, algorithm=alg)


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_ppo_with_several_updates_per_step_resumes_exactly(tmp_path, value_model):
  # Running score moments and the adaptive KL live on the host: resume must restore them too.
  cfg = ppo_config(value_model=value_model, score_norm="running", score_clip=3.0,
                   kl_target=0.01, kl_horizon=100.0)
  whole = online.train(cfg, tmp_path / "whole")
  rows = read(tmp_path / "whole" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3] and whole["step"] == 3
  assert {"loss/value", "objective/entropy", "objective/scores_normalized"} <= set(rows[0])
  # The adaptive controller moved beta, so a resume that restarted it would show.
  assert rows[2]["objective/kl_coef"] != rows[0]["objective/kl_coef"]

  rollout = online._Online.rollout

  def preempted(self, step):
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return rollout(self, step)

  with mock.patch.object(online._Online, "rollout", preempted), pytest.raises(SystemExit):
    online.train(cfg, tmp_path / "split")
  online.train(cfg, tmp_path / "split")
  assert deterministic(read(tmp_path / "split" / "metrics.jsonl")) == deterministic(rows)
  host = json.loads((tmp_path / "split" / "ppo_host_state.json").read_text())
  assert "3" in host and host["3"]["moments"]["count"] == 3 * 16
