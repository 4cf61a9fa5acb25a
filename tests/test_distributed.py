"""Multi-host runs: when jax.distributed starts, log prefixes, bucket paths, and a real
two-process `tiny/sft` run whose metrics equal the single-process run's."""

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jrlhf import config, distributed
from jrlhf.distributed import DistConfig, init_args

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def not_on_a_tpu_vm(monkeypatch):
  monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)


def test_a_plain_run_is_one_process():
  assert init_args(DistConfig(), env={}) is None
  assert init_args(DistConfig(num_processes=1), env={}) is None
  assert init_args(DistConfig(enable=False, coordinator="h:1"), env={}) is None


def test_command_line_wins_over_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "env:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert init_args(DistConfig(), env=env) == {
      "coordinator_address": "env:1", "num_processes": 4, "process_id": 3}
  cli = DistConfig(coordinator="h0:8476", num_processes=2, process_id=1)
  assert init_args(cli, env=env) == {
      "coordinator_address": "h0:8476", "num_processes": 2, "process_id": 1}


def test_launchers_that_jax_can_query_turn_it_on(monkeypatch):
  everything_detected = {"coordinator_address": None, "num_processes": None, "process_id": None}
  assert init_args(DistConfig(), env={"SLURM_NTASKS": "8"}) == everything_detected
  assert init_args(DistConfig(), env={"SLURM_NTASKS": "1"}) is None
  assert init_args(DistConfig(), env={"OMPI_COMM_WORLD_SIZE": "2"}) == everything_detected
  monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
  assert init_args(DistConfig(), env={}) == everything_detected  # TPU VM metadata knows
  assert init_args(DistConfig(enable=False), env={}) is None


def test_bad_settings_say_what_to_change(monkeypatch):
  with pytest.raises(ValueError, match="not host:port"):
    DistConfig(coordinator="localhost")
  with pytest.raises(ValueError, match="process_id=2 must be below dist.num_processes=2"):
    DistConfig(num_processes=2, process_id=2)
  with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES='two'"):
    init_args(DistConfig(), env={"JAX_NUM_PROCESSES": "two"})

  def no_launcher(**kwargs):  # what JAX says when nothing names the coordinator
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", no_launcher)
  with pytest.raises(distributed.DistributedError, match="dist.coordinator=HOST:PORT"):
    distributed.initialize(DistConfig(enable=True), env={})


def test_dist_keys_never_change_the_run_name():
  plain = config.resolve("tiny/sft", {"steps": "4"})
  host1 = {"steps": "4", "dist.coordinator": "h0:8476", "dist.num_processes": "2",
           "dist.process_id": "1", "dist.enable": "true"}
  assert config.run_dir(config.resolve("tiny/sft", host1), host1) == config.run_dir(
      plain, {"steps": "4"})


def test_bucket_run_dir_keeps_its_scheme():
  cfg = config.resolve("", {"run_dir": "gs://bkt/runs/x"})
  run_dir = config.run_dir(cfg, {"run_dir": "gs://bkt/runs/x"})
  assert str(run_dir / "checkpoints") == "gs://bkt/runs/x/checkpoints"
  assert run_dir.name == "x" and distributed.is_url(run_dir)
  assert not distributed.is_url(distributed.storage_path("runs/x"))


def test_other_processes_prefix_every_line():
  out = io.StringIO()
  stream = distributed.PrefixedStream(out, "[jrlhf p1/2] ")
  stream.write("one\ntw")
  stream.write("o\n\nthree")
  stream.flush()
  assert out.getvalue() == "[jrlhf p1/2] one\n[jrlhf p1/2] two\n[jrlhf p1/2] \n[jrlhf p1/2] three"


# A real two-process run over localhost (CPU collectives) against one process with the same
# 8 devices and mesh: same global batch, same program, so the same numbers.
ARGS = ["experiment=tiny/sft", "steps=4", "train.log_every=1", "train.eval_every=4",
        "train.checkpoint_every=4", "train.num_samples=4", "train.max_new_tokens=8",
        "train.progress=false"]


def _start(cwd: Path, devices: int, *extra: str) -> subprocess.Popen:
  cwd.mkdir(exist_ok=True)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "jrlhf.run", *ARGS, *extra], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(run_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# 55-90 s on 2 shared cores (three runs compile the step and the sampler): the slow CI step.
@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  # Both hosts share one working dir (as a pod shares a bucket) and name the run themselves.
  shared = tmp_path / "two"
  dist = [f"dist.coordinator=localhost:{port}", "dist.num_processes=2"]
  procs = {"single": _start(tmp_path / "one", 8),
           "p0": _start(shared, 4, *dist, "dist.process_id=0"),
           "p1": _start(shared, 4, *dist, "dist.process_id=1")}
  outs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
  for name, p in procs.items():
    assert p.returncode == 0, f"{name}:\n{outs[name][-3000:]}"

  [one] = (tmp_path / "one" / "runs").iterdir()
  [two] = (shared / "runs").iterdir()
  assert one.name == two.name  # same name from the same command line, on every host
  single, multi = _rows(one), _rows(two)
  assert [r["step"] for r in multi] == [1, 2, 3, 4]
  for a, b in zip(single, multi):
    for key in a:
      if not key.startswith("perf/"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
  assert "eval/loss" in multi[-1]
  assert (one / "samples.jsonl").read_text() == (two / "samples.jsonl").read_text()
  assert (two / "checkpoints" / "4").is_dir()
  # Only process 0 reports; the other says nothing of its own.
  assert "[jrlhf] metrics:" in outs["p0"] and "[jrlhf] metrics:" not in outs["p1"]
