"""Where metrics go: `metrics.jsonl` always, TensorBoard and W&B when asked (process 0 only).

metrics.jsonl has one JSON object per logged step, `{"step": N, "loss": ..., "lr": ...}`; eval
metrics are prefixed `eval/`, timing ones `perf/` (the only values that differ between an
uninterrupted run and a resumed one). A resumed run first drops the lines logged after its
checkpoint, so the file reads as if the run had never stopped.

The run dir may be a bucket (`gs://...`, via `jrlhf.distributed.storage_path`). Buckets cannot
append to an object, so there the writer keeps the lines and rewrites the file at most every
`REMOTE_FLUSH_S` seconds and at close.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

from jrlhf.distributed import is_url, is_writer, storage_path

REMOTE_FLUSH_S = 60.0


def _plain(value: Any) -> Any:
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; "nan" keeps the line parseable
  return value


def truncate_after(path: pathlib.Path, step: int) -> None:
  """Keeps only the lines with `step <= step` (those the checkpoint at `step` already covers)."""
  if not path.exists():
    return
  kept = [line for line in path.read_text().splitlines()
          if line.strip() and json.loads(line).get("step", 0) <= step]
  path.write_text("".join(line + "\n" for line in kept))


def last_logged_step(path: pathlib.Path) -> int | None:
  """The largest `step` in a metrics.jsonl, None without one; unreadable lines (the cut-short
  last line of a killed run) are skipped."""
  steps = []
  for line in path.read_text().splitlines() if path.exists() else ():
    try:
      steps.append(int(json.loads(line)["step"]))
    except (ValueError, KeyError, TypeError):
      continue
  return max(steps, default=None)


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
  """Appends to run_dir/metrics.jsonl; mirrors to TensorBoard (tensorboardX) / W&B if enabled."""

  def __init__(self, run_dir: pathlib.Path, *, resume_step: int, tensorboard: bool = False,
               wandb: bool = False, wandb_project: str = "jrlhf",
               config: dict[str, Any] | None = None):
    run_dir = storage_path(run_dir)
    self.path = run_dir / "metrics.jsonl"
    self.active = is_writer()
    self._remote = is_url(run_dir)
    self._tb = self._wandb = None
    if not self.active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step:
      truncate_after(self.path, resume_step)
    else:
      self.path.write_text("")
    if self._remote:
      self._lines = [line + "\n" for line in self.path.read_text().splitlines() if line.strip()]
      self._flushed_at = time.monotonic()
    else:
      self._file = self.path.open("a")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - optional dependency
      except ImportError as e:
        raise ImportError("train.tensorboard=true needs tensorboardX: pip install tensorboardX"
                          ) from e
      self._tb = SummaryWriter(str(run_dir / "tensorboard"))
    if wandb:
      try:
        import wandb as wandb_lib  # noqa: PLC0415 - optional dependency
      except ImportError as e:
        raise ImportError("train.wandb=true needs wandb: pip install wandb") from e
      # W&B keeps its own files in a local dir; a bucket run leaves it the default.
      self._wandb = wandb_lib.init(project=wandb_project, name=run_dir.name, config=config,
                                   resume="allow", dir=None if self._remote else str(run_dir))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    line = json.dumps(row) + "\n"
    if self._remote:
      self._lines.append(line)
      if time.monotonic() - self._flushed_at > REMOTE_FLUSH_S:
        self._flush_remote()
    else:
      self._file.write(line)
      self._file.flush()
    numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    if self._tb is not None:
      for key, value in numeric.items():
        self._tb.add_scalar(key, value, step)
    if self._wandb is not None:
      self._wandb.log(numeric, step=step)

  def _flush_remote(self) -> None:
    self.path.write_text("".join(self._lines))
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    if not self.active:
      return
    if self._remote:
      self._flush_remote()
    else:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def write_samples(path: pathlib.Path, step: int, rows: list[dict[str, Any]]) -> None:
  """Appends one JSON line per generated sample, tagged with the step (process 0 only)."""
  if not is_writer():
    return
  text = "".join(json.dumps({"step": step, **row}) + "\n" for row in rows)
  if is_url(path):  # no append on a bucket; samples come only at eval, so rewriting is cheap
    path.write_text((path.read_text() if path.exists() else "") + text)
    return
  with path.open("a") as f:
    f.write(text)
