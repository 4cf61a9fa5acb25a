"""Compare runs: `python -m jrlhf.report RUN_DIR... [--out DIR]`.

Reads each run's config.json and metrics.jsonl and writes to DIR (default: the run dir itself
for one run, `<common parent>/report-<hash>` for several):

  report.md    one row per run: status, the keys whose values differ across the runs, the last
               step, and for every metric its final value and its best value
  report.csv   the same table, full precision
  plots/*.png  one figure per metric, one line per run

Best is the minimum for loss-like metrics (loss, perplexity, nll, error) and the maximum for
accuracy-like ones (accuracy, exact_match, reward, score, win rate); other metrics (lr,
grad_norm, tokens, ...) get only a final value. A run that crashed still gets a row: its status
says what is missing (no config.json, no metrics, stopped at step N of M, unreadable lines).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAXIMIZE = ("acc", "exact_match", "reward", "score", "win")
MINIMIZE = ("loss", "perplexity", "ppl", "nll", "error")
# Keys that say where a run lives, not what it trained; never a reason for two rows to differ.
IGNORED_KEYS = ("run_dir", "print_config")


def direction(metric: str) -> str | None:
  """"max", "min" or None (no meaningful best) for a metric name such as `eval/loss`."""
  leaf = metric.rsplit("/", 1)[-1].lower()
  if any(word in leaf for word in MAXIMIZE):
    return "max"
  if any(word in leaf for word in MINIMIZE):
    return "min"
  return None


@dataclass
class Run:
  path: Path
  config: dict[str, Any] | None = None
  rows: list[dict[str, Any]] = field(default_factory=list)
  bad_lines: int = 0
  status: str = "ok"

  @property
  def last_step(self) -> int | None:
    steps = [r["step"] for r in self.rows if isinstance(r.get("step"), (int, float))]
    return int(max(steps)) if steps else None

  def curve(self, metric: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in self.rows:
      value, step = row.get(metric), row.get("step")
      if _is_number(value) and _is_number(step):
        xs.append(step)
        ys.append(float(value))
    return xs, ys


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(path: str | os.PathLike) -> Run:
  run = Run(Path(path))
  problems = []
  try:
    run.config = json.loads((run.path / "config.json").read_text())
  except FileNotFoundError:
    problems.append("no config.json")
  except (OSError, json.JSONDecodeError) as e:
    problems.append(f"bad config.json ({e.__class__.__name__})")
  try:
    with open(run.path / "metrics.jsonl") as f:
      for line in f:
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          run.bad_lines += 1  # the last line of a killed run is often cut short
          continue
        if isinstance(row, dict):
          run.rows.append(row)
        else:
          run.bad_lines += 1
  except FileNotFoundError:
    problems.append("no metrics.jsonl")
  if not run.rows and "no metrics.jsonl" not in problems:
    problems.append("no metrics")
  steps = (run.config or {}).get("steps")
  if run.rows and _is_number(steps) and (run.last_step or 0) < steps:
    problems.append(f"stopped at step {run.last_step} of {steps}")
  if run.bad_lines:
    problems.append(f"{run.bad_lines} unreadable metrics lines")
  run.status = "; ".join(problems) or "ok"
  return run


def differing_keys(runs: list[Run]) -> list[str]:
  """Config keys whose values are not the same in every run that has a config."""
  configs = [r.config for r in runs if r.config is not None]
  keys = list(dict.fromkeys(k for c in configs for k in c))
  return [k for k in keys if k not in IGNORED_KEYS
          and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def metric_names(runs: list[Run]) -> list[str]:
  names = dict.fromkeys(k for r in runs for row in r.rows for k, v in row.items()
                        if k != "step" and _is_number(v))
  return list(names)


def table(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
  """(header, rows): run, status, differing keys, last step, final/best of each metric."""
  keys, metrics = differing_keys(runs), metric_names(runs)
  header = ["run", "status", *keys, "step"]
  for m in metrics:
    header.append(f"final {m}")
    if direction(m):
      header.append(f"best {m} ({direction(m)})")
  rows = []
  for run in runs:
    row: list[Any] = [run.path.name, run.status]
    row += [_cell((run.config or {}).get(k, "")) for k in keys]
    row.append("" if run.last_step is None else run.last_step)
    for m in metrics:
      _, ys = run.curve(m)
      finite = [y for y in ys if math.isfinite(y)]
      row.append(ys[-1] if ys else "")
      if direction(m):
        best = max if direction(m) == "max" else min
        row.append(best(finite) if finite else "")
    rows.append(row)
  return header, rows


def _cell(value: Any) -> Any:
  return ",".join(map(str, value)) if isinstance(value, list) else value


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value).replace("|", "\\|")


def markdown(header: list[str], rows: list[list[Any]], plots: list[Path], out: Path) -> str:
  lines = ["| " + " | ".join(_fmt(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
  lines += ["", "best = min for loss-like metrics (loss, perplexity, nll, error), max for "
            "accuracy-like ones (accuracy, exact_match, reward, score, win); final = last "
            "logged value."]
  if plots:
    lines += [""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
  return "\n".join(lines) + "\n"


def plot(runs: list[Run], labels: list[str], out: Path) -> list[Path]:
  """One PNG per metric under out/plots, one line per run."""
  import matplotlib  # noqa: PLC0415 (only the plots need it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  (out / "plots").mkdir(parents=True, exist_ok=True)
  paths = []
  for metric in metric_names(runs):
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, label in zip(runs, labels):
      xs, ys = run.curve(metric)
      if xs:
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
      ax.legend(fontsize="small")
    path = out / "plots" / (re.sub(r"[^A-Za-z0-9._-]", "-", metric) + ".png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def labels(runs: list[Run]) -> list[str]:
  keys = differing_keys(runs)
  out = []
  for run in runs:
    parts = [f"{k}={_cell(run.config[k])}" for k in keys if run.config and k in run.config]
    out.append(", ".join(parts) or run.path.name)
  return out


def default_out(paths: list[Path]) -> Path:
  if len(paths) == 1:
    return paths[0]
  parent = Path(os.path.commonpath([p.resolve() for p in paths]))
  digest = hashlib.sha1("\n".join(sorted(p.name for p in paths)).encode()).hexdigest()[:8]
  return parent / f"report-{digest}"


def report(paths: list[str | os.PathLike], out: str | os.PathLike | None = None,
           with_plots: bool = True) -> Path:
  """Write report.md, report.csv and plots/ for the runs; returns the output dir."""
  paths = [Path(p) for p in paths]
  out = Path(out) if out else default_out(paths)
  out.mkdir(parents=True, exist_ok=True)
  runs = [load_run(p) for p in paths]
  header, rows = table(runs)
  with open(out / "report.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([[_cell(c) for c in row] for row in rows])
  plots = plot(runs, labels(runs), out) if with_plots else []
  (out / "report.md").write_text(markdown(header, rows, plots, out))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jrlhf.report",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
  parser.add_argument("--out", help="output directory (default: see module docstring)")
  parser.add_argument("--no-plots", action="store_true", help="tables only")
  args = parser.parse_args(argv)
  missing = [p for p in args.runs if not Path(p).is_dir()]
  if missing:
    print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
    return 2
  out = report(args.runs, args.out, with_plots=not args.no_plots)
  print((out / "report.md").read_text(), end="")
  print(f"\nwrote {out / 'report.md'}, {out / 'report.csv'}"
        + ("" if args.no_plots else f" and {out / 'plots'}/"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
