"""PPO on the embedded task: exact resume with several updates per step (host state included),
and, slow, a short run from a briefly trained SFT model that raises the scorer's reward."""

import json
import os
import subprocess
import sys

import chz
import numpy as np
import pytest

from jrlhf.algorithms.ppo import PPOConfig
from jrlhf.train import online
from tests.train.test_loop import config, deterministic, read
from tests.train.test_online import preempted_then_resumed


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
  # The (cosine) schedule spans steps x updates: the last step still learns (its updates ran at
  # lr 0 when the schedule ended after `steps` updates).
  assert all(r["policy/approxkl"] > 0 and r["lr"] > 0 for r in rows)

  assert deterministic(preempted_then_resumed(cfg, tmp_path / "split")) == deterministic(rows)
  host = json.loads((tmp_path / "split" / "ppo_host_state.json").read_text())
  assert "3" in host and host["3"]["moments"]["count"] == 3 * 16

  # Starting over in a used run dir (train.resume=false) clears the critic's checkpoints with
  # the policy's, so it repeats the first run instead of starting from the last critic.
  online.train(chz.replace(cfg, train=chz.replace(cfg.train, resume=False)), tmp_path / "whole")
  assert deterministic(read(tmp_path / "whole" / "metrics.jsonl")) == deterministic(rows)


def run_cli(experiment, *args, cwd):
  # One CPU device, as a user runs it (tests/conftest.py: 8 fake devices' collectives have
  # deadlocked XLA:CPU in long runs on 2 cores).
  env = dict(os.environ, TQDM_DISABLE="1", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "jrlhf.run", f"experiment={experiment}", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_short_ppo_run_raises_the_task_reward(tmp_path):
  # The start: a brief SFT run (~0.29 greedy exact match: `sort` mostly learnt, the rest not).
  sft = tmp_path / "sft"
  proc = run_cli("tiny/sft", "steps=250", "optim.warmup_steps=25", "train.eval_every=0",
                 "train.num_samples=0", "train.checkpoint_every=250", "train.export=true",
                 f"run_dir={sft}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Sampling at T = 1.5 from it scores ~0.09 where its greedy answers score ~0.29: a reward
  # PPO can raise within a CI budget by sharpening what the model already knows.
  ppo_dir = tmp_path / "ppo"
  proc = run_cli("tiny/ppo", f"init_from={sft}/export", "steps=40", "optim.lr=3e-4",
                 "algorithm.temperature=1.5", "algorithm.prompts_per_step=128",
                 "algorithm.num_ppo_epochs=2", "algorithm.num_mini_batches=1",
                 "train.log_every=1", "train.eval_every=0", "train.num_samples=0",
                 "train.checkpoint_every=40", f"run_dir={ppo_dir}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = read(ppo_dir / "metrics.jsonl")
  scores = np.array([r["objective/scores"] for r in rows])
  kl = np.array([r["objective/kl"] for r in rows])
  assert len(scores) == 40
  # Each step's score is a mean over 128 samples (std ~0.03 at these rates), so means over 10
  # steps differ by chance with a std of ~0.013; measured: 0.087 over steps 1-10, 0.138 over
  # steps 31-40.
  first, last = scores[:10].mean(), scores[-10:].mean()
  assert last > first + 0.02, scores.round(3).tolist()
  # The KL to the start stays bounded (measured at most 0.6 nats per response).
  assert np.isfinite(kl).all() and kl.max() < 2.0, kl.round(3).tolist()
  assert all(0.5 < r["val/ratio"] < 1.5 for r in rows)
