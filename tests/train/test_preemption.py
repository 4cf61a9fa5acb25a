"""SIGTERM (a TPU preemption notice) mid-run: the process saves and exits 143; the same command
run again continues from that step to the end."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.train.conftest import _CACHE

SCRIPT = textwrap.dedent("""
    import pathlib, sys
    from jrlhf.config import resolve
    from jrlhf.train import loop
    cfg = resolve("", {
        "model.vocab_size": "128", "model.hidden_size": "32", "model.num_layers": "1",
        "model.num_heads": "4", "model.num_kv_heads": "2", "model.head_dim": "8",
        "model.mlp_dim": "64", "data.num_train_examples": "256", "data.num_eval_examples": "8",
        "data.batch_size": "8", "data.max_length": "64", "steps": "60", "optim.lr": "1e-3",
        "train.log_every": "1", "train.eval_every": "0", "train.num_samples": "0",
        "train.checkpoint_every": "0", "train.progress": "false"})
    loop.train(cfg, pathlib.Path(sys.argv[1]))
""")


def steps_logged(run_dir):
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sigterm_saves_and_the_rerun_continues(tmp_path):
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": _CACHE,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  cmd = [sys.executable, "-c", SCRIPT, str(tmp_path)]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while len(steps_logged(tmp_path)) < 3:
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, "the run never got going"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err
  stopped = max(steps_logged(tmp_path))
  assert stopped < 60, "the run finished before the signal arrived; make it longer"
  assert (tmp_path / "checkpoints" / str(stopped)).is_dir(), err
  assert f"stopped by signal after step {stopped}" in err

  rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert f"resuming from" in rerun.stdout
  assert steps_logged(tmp_path) == list(range(1, 61))
  assert (tmp_path / "checkpoints" / "60").is_dir()
