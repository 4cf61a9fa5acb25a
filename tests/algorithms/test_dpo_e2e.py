"""The preference pipeline through the CLI, as the experiment docstrings chain it: a short tiny
SFT run exports an HF checkpoint; tiny/rm and tiny/dpo start from it (shortened)."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(experiment, *args, cwd):
  # One CPU device, as a user runs it: the 8 fake devices of the in-process tests add nothing
  # here, and XLA:CPU's collectives among 8 device threads on 2 cores have deadlocked (rarely,
  # a rendezvous timeout) in these long runs.
  env = dict(os.environ, TQDM_DISABLE="1", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "jrlhf.run", f"experiment={experiment}", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def rows(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_then_rm_and_dpo_from_its_export(tmp_path):
  sft = tmp_path / "sft"
  proc = run_cli("tiny/sft", "steps=40", "train.eval_every=0", "train.num_samples=0",
                 "train.export=true", f"run_dir={sft}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  short = ("steps=20", "train.log_every=1", "train.eval_every=20", "data.num_train_examples=800",
           "data.num_eval_examples=32", "data.batch_size=16")
  rm_dir, dpo_dir = tmp_path / "rm", tmp_path / "dpo"
  # The experiment's LoRA at a rate that moves it within these 20 steps.
  proc = run_cli("tiny/rm", *short, f"init_from={sft}/export", "optim.lr=1e-2",
                 "train.export=true", f"run_dir={rm_dir}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rm_rows = rows(rm_dir)
  assert rm_rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # zero score head
  assert "eval/accuracy" in rm_rows[-1] and rm_rows[-1]["loss"] < rm_rows[0]["loss"]
  assert "LlamaForSequenceClassification" in (rm_dir / "export" / "config.json").read_text()
  # Plain DPO (the experiment adds an NLL term): its loss is exactly log 2 at the start.
  proc = run_cli("tiny/dpo", *short, "train.num_samples=16", f"init_from={sft}/export",
                 "algorithm.loss=sigmoid", "algorithm.loss_weights=1",
                 f"run_dir={dpo_dir}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  dpo_rows = rows(dpo_dir)
  assert dpo_rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # policy == reference
  assert "eval/accuracy" in dpo_rows[-1] and "rewards/margins" in dpo_rows[-1]
