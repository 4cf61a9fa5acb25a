"""Sweeps: `python -m jrlhf.run -m key=a,b,c other=1,2 [-j N]`.

Every comma list is an axis; the cartesian product of the axes gives the points, and each point
runs as its own process, `python -m jrlhf.run <its key=value ...>`, in its own run directory
(the name derives from the point's overrides, so reruns of a sweep resume point by point).
Points run one at a time unless `-j N`; with -j their output goes to `<run_dir>/sweep.log`
(`runs/<name>/sweep.log` when the run dir is a bucket). On a TPU pod the same sweep command runs
on every worker: each worker's sweep starts the same points in the same order, and each point's
processes join up as one multi-host run (one point at a time: a point uses the whole pod).
A value in brackets is one value, not an axis: `data.buckets=[64,128]` passes `64,128`.

Every point is resolved before the first one starts, so a typo fails the sweep in a second, not
after the first run. A failing point does not stop the others; a table of points and exit codes
comes at the end and the sweep exits non-zero if any failed. Ctrl-C forwards SIGINT to the
running points (they checkpoint and exit) and starts no new ones; a second Ctrl-C kills them.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

from jrlhf import config
from jrlhf.distributed import is_url, storage_path

Command = Callable[[list[str]], list[str]]
INTERRUPTED = 130


def jrlhf_run(args: list[str]) -> list[str]:
  return [sys.executable, "-m", "jrlhf.run", *args]


def axis(key: str, value: str) -> list[str]:
  """The values of one axis: `a,b` -> [a, b]; `[a,b]` -> [`a,b`] (one tuple value)."""
  if value.startswith("[") and value.endswith("]"):
    return [value[1:-1]]
  items = value.split(",")
  if len(items) > 1 and not all(items):
    raise config.ConfigError(f"{key}={value}: an empty item in a sweep list; drop the extra comma")
  return items


def expand(overrides: Mapping[str, str]) -> list[dict[str, str]]:
  """The cartesian product of the axes, last key varying fastest (as itertools.product)."""
  keys = list(overrides)
  values = [axis(k, overrides[k]) for k in keys]
  points = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
  if "run_dir" in overrides:
    # One given run_dir for all points would make them share (and resume) one directory.
    for point in points:
      rest = {k: v for k, v in point.items() if k != "experiment"}
      point["run_dir"] = str(storage_path(point["run_dir"]) / config.run_name(
          point.get("experiment", ""), rest))
  return points


def plan(points: list[dict[str, str]]) -> list[Path]:
  """The run dir of each point; raises ConfigError naming every point that does not resolve."""
  dirs, errors = [], []
  for i, point in enumerate(points):
    rest = {k: v for k, v in point.items() if k != "experiment"}
    try:
      cfg = config.resolve(point.get("experiment", ""), rest)
      dirs.append(config.run_dir(cfg, rest))
    except config.ConfigError as e:
      errors.append(f"point {i} ({_show(point)}): {e}")
  if errors:
    raise config.ConfigError("the sweep was not started:\n" + "\n".join(errors))
  if len(set(dirs)) < len(dirs):
    raise config.ConfigError("two sweep points would share a run dir; vary a key that names runs")
  return dirs


def run(points: list[dict[str, str]], dirs: list[Path], jobs: int = 1,
        command: Command = jrlhf_run, poll_s: float = 0.2) -> tuple[list[int | None], bool]:
  """Run every point: (exit codes, None where Ctrl-C came first; whether Ctrl-C came)."""
  codes: list[int | None] = [None] * len(points)
  running: dict[int, subprocess.Popen] = {}
  pending = list(range(len(points)))
  env = dict(os.environ)
  if jobs > 1:
    # Parallel points on one accelerator must not each grab most of its memory up front.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  interrupted = False
  try:
    while pending or running:
      while pending and len(running) < jobs:
        i = pending.pop(0)
        args = [f"{k}={v}" for k, v in points[i].items()]
        print(f"[sweep] point {i + 1}/{len(points)}: {' '.join(args)} -> {dirs[i]}", flush=True)
        out = None
        if jobs > 1:
          log = log_path(dirs[i])
          log.parent.mkdir(parents=True, exist_ok=True)
          out = open(log, "ab")
        # Own session: the terminal's Ctrl-C reaches only the sweep, which forwards it once.
        running[i] = subprocess.Popen(command(args), stdout=out, stderr=out, env=env,
                                      start_new_session=True)
        if out is not None:
          out.close()
      for i, proc in list(running.items()):
        if proc.poll() is not None:
          codes[i] = proc.returncode
          del running[i]
          print(f"[sweep] point {i + 1}/{len(points)} exited {proc.returncode}", flush=True)
      if running:
        time.sleep(poll_s)
  except KeyboardInterrupt:
    interrupted = True
    print("\n[sweep] interrupted: stopping the running points (Ctrl-C again to kill them)",
          file=sys.stderr, flush=True)
    _signal(running.values(), signal.SIGINT)
    try:
      for i, proc in running.items():
        codes[i] = proc.wait()
    except KeyboardInterrupt:
      _signal(running.values(), signal.SIGKILL)
      for i, proc in running.items():
        codes[i] = proc.wait()
  return codes, interrupted


def log_path(run_dir) -> Path:
  """A point's output under -j; local even for a bucket run dir (buckets cannot append)."""
  if is_url(run_dir):
    return Path(config.RUNS_DIR) / run_dir.name / "sweep.log"
  return Path(run_dir) / "sweep.log"


def _signal(procs, sig) -> None:
  for proc in procs:
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        pass


def summary(points: list[dict[str, str]], dirs: list[Path], codes: list[int | None]) -> str:
  keys = [k for k in points[0] if len({p[k] for p in points}) > 1] or list(points[0])
  rows = [["#", "exit", "status", "run_dir", *keys]]
  for i, (point, d, code) in enumerate(zip(points, dirs, codes)):
    status = "not run" if code is None else "ok" if code == 0 else "FAILED"
    rows.append([str(i + 1), "-" if code is None else str(code), status, str(d),
                 *(point[k] for k in keys)])
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def main(overrides: Mapping[str, str], jobs: int = 1, command: Command = jrlhf_run) -> int:
  points = expand(overrides)
  dirs = plan(points)
  print(f"[sweep] {len(points)} points, {jobs} at a time", flush=True)
  codes, interrupted = run(points, dirs, jobs, command)
  print("\n" + summary(points, dirs, codes))
  failed = [i for i, c in enumerate(codes) if c not in (0, None)]
  finished = [str(d) for d, c in zip(dirs, codes) if c is not None]
  if finished:
    print(f"\ncompare: python -m jrlhf.report {' '.join(finished)}")
  if interrupted:
    return INTERRUPTED
  if failed:
    print(f"[sweep] {len(failed)} of {len(points)} points failed", file=sys.stderr)
    return 1
  return 0


def _show(point: Mapping[str, str]) -> str:
  return " ".join(f"{k}={v}" for k, v in point.items())
