"""The CLI and sweeps, with a fake trainer and fake child commands (nothing trains here)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jrlhf import config, run, sweep
from jrlhf.algorithms.sft import SFTConfig

# A child that records its arguments and fails for seed=1.
FAKE_CHILD = ("import json, os, sys; "
              "open(os.environ['FAKE_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n'); "
              "print('child', *sys.argv[1:]); sys.exit(3 if 'seed=1' in sys.argv else 0)")


def fake_command(args):
  return [sys.executable, "-c", FAKE_CHILD, *args]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
  return tmp_path


def calls(tmp_path):
  path = tmp_path / "calls.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class FakeTrainer:
  def __init__(self):
    self.calls = []

  def __call__(self, cfg, run_dir):
    self.calls.append((cfg, run_dir))
    return {"loss": 0.0}


def test_typo_exits_nonzero_with_suggestion(in_tmp, capsys):
  trainer = FakeTrainer()
  assert run.main(["optim.lrr=1e-3"], train_fns={SFTConfig: trainer}) == 2
  assert "did you mean optim.lr" in capsys.readouterr().err
  assert not trainer.calls and not (in_tmp / "runs").exists()


def test_wrong_type_exits_nonzero(in_tmp, capsys):
  assert run.main(["steps=ten"], train_fns={SFTConfig: FakeTrainer()}) == 2
  assert "steps='ten' is not a valid int" in capsys.readouterr().err


def test_comma_value_without_m_hints_at_sweeps(in_tmp, capsys):
  assert run.main(["optim.lr=1e-3,3e-4"], train_fns={}) == 2
  assert "add -m" in capsys.readouterr().err


def test_help_lists_keys_types_and_defaults(capsys):
  assert run.main(["--help"]) == 0
  out = capsys.readouterr().out
  for text in ("optim.lr", "float", "model.num_layers", "data.source", "train.resume",
               "algorithm.label_smoothing", "steps", "seed", "run_dir", "tiny/sft"):
    assert text in out, text


def test_help_shows_experiment_values(capsys):
  assert run.main(["experiment=tiny/sft", "--help"]) == 0
  assert "(from experiment tiny/sft)" in capsys.readouterr().out


def test_print_config_prints_and_exits(in_tmp, capsys):
  trainer = FakeTrainer()
  assert run.main(["experiment=tiny/sft", "steps=3", "print_config=true"],
                  train_fns={SFTConfig: trainer}) == 0
  out = capsys.readouterr().out
  assert "steps=3" in out and "optim.lr=" in out and "runs/tiny-sft,steps=3" in out
  assert not trainer.calls and not (in_tmp / "runs").exists()


def test_run_writes_config_then_dispatches_by_type(in_tmp):
  trainer = FakeTrainer()
  assert run.main(["experiment=tiny/sft", "steps=3", "seed=1"],
                  train_fns={SFTConfig: trainer}) == 0
  [(cfg, run_dir)] = trainer.calls
  assert run_dir == in_tmp.joinpath("runs", "tiny-sft,seed=1,steps=3").relative_to(in_tmp)
  assert config.load_config(run_dir / "config.json") == cfg
  assert isinstance(cfg.algorithm, SFTConfig) and cfg.steps == 3


def test_changed_config_in_existing_run_dir_warns(in_tmp, capsys):
  trainer = FakeTrainer()
  run.main(["run_dir=r", "steps=3"], train_fns={SFTConfig: trainer})
  run.main(["run_dir=r", "steps=3", "optim.lr=1e-3"], train_fns={SFTConfig: trainer})
  assert "optim.lr" in capsys.readouterr().err


def test_a_run_that_stops_on_bad_values_says_why_without_a_traceback(in_tmp, capsys):
  from jrlhf.train.loop import NonFiniteLoss

  def diverges(cfg, run_dir):
    raise NonFiniteLoss("loss is nan at step 7; checkpoint saved")

  assert run.main(["run_dir=r"], train_fns={SFTConfig: diverges}) == 1
  err = capsys.readouterr().err
  assert "error: loss is nan at step 7" in err and "Traceback" not in err


def test_the_real_dispatch_table_covers_every_algorithm():
  assert set(run.trainers()) == set(config.ALGORITHMS.values())


def test_cli_exit_code_in_a_subprocess(in_tmp):
  proc = subprocess.run([sys.executable, "-m", "jrlhf.run", "optim.lrr=1"], capture_output=True,
                        text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 2 and "did you mean optim.lr" in proc.stderr


# --- sweeps -----------------------------------------------------------------------------------


def test_expand_is_the_cartesian_product():
  points = sweep.expand({"optim.lr": "1e-3,3e-4", "seed": "0,1,2", "steps": "5"})
  assert len(points) == 6
  assert points[0] == {"optim.lr": "1e-3", "seed": "0", "steps": "5"}
  assert points[1] == {"optim.lr": "1e-3", "seed": "1", "steps": "5"}
  assert {(p["optim.lr"], p["seed"]) for p in points} == {
      (lr, s) for lr in ("1e-3", "3e-4") for s in ("0", "1", "2")}


def test_brackets_keep_a_tuple_as_one_value():
  assert sweep.expand({"data.x": "[64,128]", "seed": "0,1"}) == [
      {"data.x": "64,128", "seed": "0"}, {"data.x": "64,128", "seed": "1"}]
  with pytest.raises(config.ConfigError, match="empty item"):
    sweep.expand({"seed": "0,"})


def test_plan_gives_distinct_run_dirs():
  points = sweep.expand({"experiment": "tiny/sft", "optim.lr": "1e-3,3e-4", "seed": "0,1"})
  dirs = sweep.plan(points)
  assert len(set(dirs)) == 4
  assert str(dirs[0]) == "runs/tiny-sft,optim.lr=1e-3,seed=0"


def test_given_run_dir_becomes_a_parent_per_point():
  points = sweep.expand({"seed": "0,1", "run_dir": "/tmp/sw"})
  assert [p["run_dir"] for p in points] == ["/tmp/sw/default,seed=0", "/tmp/sw/default,seed=1"]
  assert len(set(sweep.plan(points))) == 2


def test_sweep_validates_every_point_before_starting(in_tmp):
  with pytest.raises(config.ConfigError, match="point 1.*not a valid int"):
    sweep.main({"steps": "3,x"}, command=fake_command)
  assert calls(in_tmp) == []


def test_sweep_runs_each_point_and_reports_failures(in_tmp, capsys):
  rc = sweep.main({"optim.lr": "1e-3,3e-4", "seed": "0,1"}, command=fake_command)
  assert rc == 1
  got = calls(in_tmp)
  assert sorted(map(tuple, got)) == sorted(
      (f"optim.lr={lr}", f"seed={s}") for lr in ("1e-3", "3e-4") for s in ("0", "1"))
  out = capsys.readouterr().out
  table = out[out.index("#  exit"):].splitlines()
  assert len(table) >= 5 and sum("FAILED" in line for line in table) == 2
  assert "python -m jrlhf.report" in out


def test_sweep_in_parallel_logs_per_point(in_tmp):
  rc = sweep.main({"seed": "0,2,4"}, jobs=3, command=fake_command)
  assert rc == 0 and len(calls(in_tmp)) == 3
  for seed in (0, 2, 4):
    assert "child" in (in_tmp / "runs" / f"default,seed={seed}" / "sweep.log").read_text()


def test_run_main_multirun_rejects_typos(in_tmp, capsys):
  assert run.main(["-m", "seed=0,1", "optim.lrr=1"]) == 2
  assert "did you mean optim.lr" in capsys.readouterr().err


def test_jobs_needs_multirun():
  with pytest.raises(config.ConfigError, match="needs -m"):
    run.parse_argv(["-j", "2", "seed=1"])
  assert run.parse_argv(["-m", "-j2", "seed=1"]) == (
      {"help": False, "multirun": True, "jobs": 2}, ["seed=1"])


SWEEP_SCRIPT = """
import sys
from jrlhf import sweep
child = ["import signal, sys, time",
         "signal.signal(signal.SIGINT, lambda *a: sys.exit(7))",
         "print('ready', flush=True)",
         "time.sleep(60)"]
cmd = lambda args: [sys.executable, "-c", "; ".join(child[:2]) + "; " + "; ".join(child[2:])]
sys.exit(sweep.main({"seed": "0,1,2"}, jobs=2, command=cmd))
"""


def test_ctrl_c_stops_the_children(in_tmp):
  proc = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  started = 0
  deadline = time.time() + 120
  while started < 2 and time.time() < deadline:
    line = proc.stdout.readline()
    started += line.startswith("[sweep] point")
  time.sleep(1.0)  # let both children install their SIGINT handler
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == sweep.INTERRUPTED, out
  table = out[out.index("#  exit"):].splitlines()
  assert sum("FAILED" in line for line in table) == 2, out  # both stopped by the forwarded SIGINT
  assert sum("not run" in line for line in table) == 1, out  # the third never started


# --- multi-host -------------------------------------------------------------------------------


def test_joins_the_other_processes_before_training_and_only_process_0_writes(in_tmp, monkeypatch):
  from jrlhf import distributed

  events = []
  monkeypatch.setattr(distributed, "initialize", lambda cfg: events.append(("init", cfg)))
  monkeypatch.setattr(distributed, "is_writer", lambda: False)  # as on process 1
  args = ["run_dir=r", "dist.coordinator=h0:8476", "dist.num_processes=2", "dist.process_id=1"]
  assert run.main(args, train_fns={SFTConfig: lambda cfg, d: events.append(("train", d))}) == 0
  assert [name for name, _ in events] == ["init", "train"]
  dist_cfg, run_dir = events[0][1], events[1][1]
  assert (dist_cfg.coordinator, dist_cfg.num_processes, dist_cfg.process_id) == ("h0:8476", 2, 1)
  assert str(run_dir) == "r" and not (in_tmp / "r").exists()  # process 0 writes config.json


def test_a_run_that_cannot_join_says_what_to_set(in_tmp, capsys, monkeypatch):
  import jax

  def no_launcher(**kwargs):  # what JAX says when nothing names the coordinator
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", no_launcher)
  assert run.main(["dist.enable=true"], train_fns={SFTConfig: FakeTrainer()}) == 2
  assert "dist.coordinator=HOST:PORT" in capsys.readouterr().err


def test_bucket_run_dir_per_sweep_point_keeps_its_scheme():
  points = sweep.expand({"seed": "0,1", "run_dir": "gs://bkt/sw"})
  assert [p["run_dir"] for p in points] == ["gs://bkt/sw/default,seed=0",
                                            "gs://bkt/sw/default,seed=1"]
  dirs = sweep.plan(points)
  assert [str(d) for d in dirs] == [p["run_dir"] for p in points]
  assert str(sweep.log_path(dirs[0])) == "runs/default,seed=0/sweep.log"  # local: no append there
