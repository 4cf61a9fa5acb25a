"""The embedded default end to end, through the CLI exactly as the README runs it."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, cwd):
  # One CPU device, as a user runs it: the 8 fake devices of the in-process tests add nothing
  # here, and XLA:CPU's collectives among 8 device threads on 2 cores have deadlocked (rarely,
  # a rendezvous timeout) in these long runs.
  env = dict(os.environ, TQDM_DISABLE="1", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "jrlhf.run", "experiment=tiny/sft", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def read_metrics(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shortened_tiny_sft_loss_falls(tmp_path):
  run_dir = tmp_path / "run"
  proc = run_cli("steps=60", "train.log_every=10", "train.eval_every=60",
                 "train.checkpoint_every=60", "train.num_samples=8", f"run_dir={run_dir}",
                 cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = read_metrics(run_dir)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < 0.6 * losses[0], losses
  assert any("eval/accuracy" in r for r in rows)
  assert (run_dir / "samples.jsonl").exists() and (run_dir / "checkpoints" / "60").exists()
  tail = proc.stdout.strip().splitlines()[-3:]
  assert [line.split(":")[0] for line in tail] == [
      "[jrlhf] metrics", "[jrlhf] samples", "[jrlhf] checkpoint"], tail


@pytest.mark.slow
def test_full_tiny_sft_beats_chance_by_far(tmp_path):
  run_dir = tmp_path / "run"
  proc = run_cli(f"run_dir={run_dir}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  accuracy = [r["eval/accuracy"] for r in read_metrics(run_dir) if "eval/accuracy" in r]
  # Chance is ~0.25% (jrlhf.data.tiny_task.chance_accuracy); a full run reaches ~70%.
  assert accuracy[-1] > 0.4, accuracy


# Learning rates per method (IA3's few scales need larger steps). The loss of steps 1-2 (the
# random-init model, ~ln 256) against steps 36-40; prompt tuning has the least leverage on a
# random-init 2-layer model, so its bar is lower, still well beyond the batch noise (~0.03).
PEFT_RUNS = {
    "lora": (["peft=lora", "peft.rank=16", "peft.dropout=0.05"], "1e-2", 0.95),
    "qlora": (["peft=qlora", "peft.rank=16"], "1e-2", 0.95),
    "houlsby": (["peft=adapter"], "1e-2", 0.95),
    "parallel": (["peft=adapter", "peft.kind=parallel"], "1e-2", 0.95),
    "ia3": (["peft=ia3"], "1e-1", 0.95),
    "prompt": (["peft=prompt", "peft.num_virtual_tokens=16"], "3e-3", 0.97),
    "prefix": (["peft=prefix", "peft.projection=true"], "1e-2", 0.95),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(PEFT_RUNS))
def test_each_peft_method_trains_tiny_sft_to_a_lower_loss(tmp_path, method):
  args, lr, ratio = PEFT_RUNS[method]
  run_dir = tmp_path / "run"
  proc = run_cli(*args, "steps=40", f"optim.lr={lr}", "optim.warmup_steps=5",
                 "train.log_every=1", "train.eval_every=40", "train.num_samples=4",
                 "train.checkpoint_every=40", f"run_dir={run_dir}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
  first, last = sum(losses[:2]) / 2, sum(losses[-5:]) / 5
  assert last < ratio * first, losses
