r"""Compare runs: `python -m jrlhf.report RUN_DIR... [--out DIR] [--no-plots] [--no-aggregate]
[--xy X,Y [--series KEY]]`.

Reads each run's config.json, metrics.jsonl, policy_eval.json and plan.json (when there are) and
writes
to DIR (default: the run dir itself for one run, `<common parent>/report-<hash>` for several):

  report.md    one row per run: status, the keys whose values differ across the runs, the last
               step, and for every metric its final value and its best value
  report.csv   the same table, full precision
  plots/*.png  one figure per metric, one line per run

Best is the minimum for loss-like metrics (loss, perplexity, nll, error) and the maximum for
accuracy-like ones (accuracy, exact_match, reward, score, win rate); other metrics (lr,
grad_norm, tokens, ...) get only a final value. A run that crashed still gets a row: its status
says what is missing (no config.json, no metrics, stopped at step N of M, unreadable lines).

policy_eval.json (`jrlhf.policy_eval`) and plan.json (`jrlhf.study`'s compiled-step memory),
`{"step": 400, "metrics": {"policy/reward": 0.61, "policy/kl": 2.3, ...}}`, each count as one
more metrics row at that step: their metrics get final/best columns and a last point on the
plots. A file that does not parse is a note in the run's status (so the run is not ok, and is
left out of the means below). `--metrics eval/accuracy,params/*` keeps only the metrics that
match those names or shell patterns in the tables and plots; `--keys algorithm,peft` shows
only those config keys (it refuses keys that would merge two different configurations).

Seeds. When the runs differ in `seed`, the report is by configuration (the differing keys other
than `seed`); the runs that share one are its seeds:

  python -m jrlhf.run -m experiment=tiny/dpo algorithm.beta=0.1,0.3 seed=0,1,2   # 6 runs
  python -m jrlhf.report runs/tiny-dpo,*

  report.md    one row per configuration: `seeds` (n) and, per metric, the mean ± std over the
               seeds of the final (and best) values, `0.712 ± 0.008`; then the per-run table
  report.csv   the configuration table, `<column> mean` and `<column> std` at full precision
  runs.csv     the per-run table
  plots/*.png  one line per configuration: the mean over seeds at the steps every seed logged,
               in a band of ± std

std is the sample standard deviation (n - 1 in the denominator); with one seed it is left empty,
since one seed says nothing about spread. Only runs whose status is ok are averaged: a crashed
seed is named in its configuration's status (`2 of 3 ok; left out: ...`, and `2 of 3 seeds` in
the plot legend) and `seeds` counts the ones averaged. A metric that only some seeds logged
shows `(n=k)` in report.md. `--no-aggregate` keeps one row and one line per run.

Frontiers. `--xy X,Y` (repeatable) plots metric Y against metric X: a point per configuration
(final values; mean over seeds with ± std error bars), the points of a series joined in order
of X, one colour per series, each point labelled with the keys that vary within its series
(`beta=0.1`). `--series KEY` names a config key whose value is the series (`algorithm`);
without it all points are one series. With --no-aggregate every run is a point.

  python -m jrlhf.report runs/tiny-dpo,* runs/tiny-grpo,* --xy policy/kl,policy/reward \
      --xy policy/kl,policy/accuracy --series algorithm

  plots/<Y>-vs-<X>.png  one per --xy
  frontier.md / .csv    a row per configuration: series, configuration keys, `<metric> mean`
                        and `<metric> std` of every --xy metric, seeds, status
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MAXIMIZE = ("acc", "exact_match", "reward", "score", "win")
MINIMIZE = ("loss", "perplexity", "ppl", "nll", "error")
# Keys that say where a run lives, not what it trained; never a reason for two rows to differ.
IGNORED_KEYS = ("run_dir", "print_config")
# Metrics written after a run, by jrlhf.policy_eval and jrlhf.study.
POST_RUN_FILES = ("policy_eval.json", "plan.json")
NOTE = ("best = min for loss-like metrics (loss, perplexity, nll, error), max for accuracy-like "
        "ones (accuracy, exact_match, reward, score, win); final = last logged value.")


class ReportError(ValueError):
  """Bad arguments (an --xy metric or --series key no run has); the message says what exists."""


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
  name: str = ""  # the run column: the dir name, or its path below the runs' common parent
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

  def final(self, metric: str) -> float | None:
    _, ys = self.curve(metric)
    return ys[-1] if ys else None

  def best(self, metric: str) -> float | None:
    """min or max (per `direction`) of the finite values; None without a direction or values."""
    finite = [y for y in self.curve(metric)[1] if math.isfinite(y)]
    if not direction(metric) or not finite:
      return None
    return max(finite) if direction(metric) == "max" else min(finite)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(path: str | os.PathLike) -> Run:
  run = Run(Path(path))
  problems = []
  run.config, problem = _read_config(run.path / "config.json")
  problems += [problem] if problem else []
  problems += _read_metrics(run, run.path / "metrics.jsonl")
  steps = (run.config or {}).get("steps")
  if run.rows and _is_number(steps) and (run.last_step or 0) < steps:
    problems.append(f"stopped at step {run.last_step} of {steps}")
  if run.bad_lines:
    problems.append(f"{run.bad_lines} unreadable metrics lines")
  for name in POST_RUN_FILES:
    row, problem = _read_post_run(run.path / name)
    if row:
      _insert_by_step(run.rows, row)
    problems += [problem] if problem else []
  run.status = "; ".join(problems) or "ok"
  return run


def _read_config(path: Path) -> tuple[dict[str, Any] | None, str | None]:
  try:
    config = json.loads(path.read_text())
  except FileNotFoundError:
    return None, "no config.json"
  except (OSError, ValueError) as e:
    return None, f"bad config.json ({e.__class__.__name__})"
  return (config, None) if isinstance(config, dict) else (None, "bad config.json (not an object)")


def _read_metrics(run: Run, path: Path) -> list[str]:
  """Appends metrics.jsonl's rows to run.rows; returns the problems found."""
  try:
    with open(path) as f:
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
    return ["no metrics.jsonl"]
  return [] if run.rows else ["no metrics"]


def _read_post_run(path: Path) -> tuple[dict[str, Any] | None, str | None]:
  """({"step": s, **metrics}, None), or (None, what is wrong); (None, None) without the file."""
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError:
    return None, None
  except (OSError, ValueError) as e:
    return None, f"bad {path.name} ({e.__class__.__name__})"
  if not (isinstance(data, dict) and _is_number(data.get("step"))
          and isinstance(data.get("metrics"), dict)):
    return None, f'bad {path.name} (not {{"step": int, "metrics": {{name: value}}}})'
  return {**data["metrics"], "step": data["step"]}, None


def _names(value: list[str] | str) -> list[str]:
  return [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]


def name_runs(runs: list[Run]) -> None:
  """Run names: dir names, or (when those repeat, as `<arm>/run` in a study) the paths below
  the runs' common parent."""
  names = [r.path.name for r in runs]
  if len(set(names)) < len(names):
    parent = Path(os.path.commonpath([r.path.resolve() for r in runs]))
    names = [str(r.path.resolve().relative_to(parent)) for r in runs]
  for run, name in zip(runs, names):
    run.name = name


def keep_keys(runs: list[Run], keys: list[str]) -> None:
  """Shows only these config keys (and seed); refuses a choice that would merge two different
  configurations into one row."""
  seen: dict[str, tuple[str, str]] = {}
  for run in runs:
    if run.config is None:
      continue
    full = json.dumps({k: v for k, v in run.config.items()
                       if k not in (*IGNORED_KEYS, "seed")}, sort_keys=True, default=str)
    shown = json.dumps({k: run.config.get(k) for k in keys}, sort_keys=True, default=str)
    if shown in seen and seen[shown][0] != full:
      raise ReportError(f"--keys {','.join(keys)}: runs {seen[shown][1]} and {run.name} differ "
                        f"in other keys; add the keys that tell them apart")
    seen[shown] = (full, run.name)
    run.config = {k: run.config[k] for k in (*keys, "seed") if k in run.config}


def keep_only(runs: list[Run], patterns: list[str]) -> None:
  """Drops every metric that matches none of `patterns` (names or shell patterns)."""
  for run in runs:
    rows = []
    for row in run.rows:
      kept = {k: row[k] for p in patterns for k in row if k != "step" and fnmatch.fnmatchcase(k, p)}
      if kept:
        rows.append({"step": row.get("step"), **kept})
    run.rows = rows


def _insert_by_step(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
  """After the last row logged at or before row's step, so curves stay in step order."""
  i = len(rows)
  while i and not (_is_number(rows[i - 1].get("step")) and rows[i - 1]["step"] <= row["step"]):
    i -= 1
  rows.insert(i, row)


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


def metric_columns(metrics: list[str]) -> list[tuple[str, Callable[[Run], float | None]]]:
  """(header, value of a run): `final m` for every metric, `best m (max|min)` if it has a best."""
  columns: list[tuple[str, Callable[[Run], float | None]]] = []
  for m in metrics:
    columns.append((f"final {m}", lambda run, m=m: run.final(m)))
    if direction(m):
      columns.append((f"best {m} ({direction(m)})", lambda run, m=m: run.best(m)))
  return columns


def table(runs: list[Run]) -> tuple[list[str], list[list[Any]]]:
  """(header, rows): run, status, differing keys, last step, final/best of each metric."""
  keys, columns = differing_keys(runs), metric_columns(metric_names(runs))
  header = ["run", "status", *keys, "step", *(name for name, _ in columns)]
  rows = []
  for run in runs:
    row: list[Any] = [run.name or run.path.name, run.status]
    row += [cell((run.config or {}).get(k, "")) for k in keys]
    row.append("" if run.last_step is None else run.last_step)
    row += [_blank(value(run)) for _, value in columns]
    rows.append(row)
  return header, rows


def _blank(value: Any) -> Any:
  return "" if value is None else value


def cell(value: Any) -> Any:
  """A config value as a table cell: lists as a,b."""
  return ",".join(map(str, value)) if isinstance(value, list) else value


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value).replace("|", "\\|")


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([[cell(c) for c in row] for row in rows])


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
  """Lines of a markdown table; a cell shows as `_fmt` (4 significant digits) writes it."""
  lines = ["| " + " | ".join(_fmt(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def markdown(sections: list[list[str]], notes: list[str], plots: list[Path], out: Path) -> str:
  """Sections (lines each) and notes, blank-line separated, then the plots as images."""
  lines = [line for section in sections for line in [*section, ""]]
  lines += [line for note in notes for line in [note, ""]]
  lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
  return "\n".join(lines).rstrip("\n") + "\n"


@dataclass
class Line:
  """One line of a metric's figure; `std` (mean over seeds) draws a shaded band of ± std."""
  label: str
  xs: list[float]
  ys: list[float]
  std: list[float] | None = None


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display); only the plots need it."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def plot_path(out: Path, name: str) -> Path:
  (out / "plots").mkdir(parents=True, exist_ok=True)
  return out / "plots" / (re.sub(r"[^A-Za-z0-9._-]", "-", name) + ".png")


def save(fig, path: Path) -> Path:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  pyplot().close(fig)
  return path


def plot_metrics(metrics: list[str], lines: Callable[[str], list[Line]], out: Path) -> list[Path]:
  """One PNG per metric under out/plots with `lines(metric)` on it."""
  plt, paths = pyplot(), []
  for metric in metrics:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = [line for line in lines(metric) if line.xs]
    for line in drawn:
      (artist,) = ax.plot(line.xs, line.ys, label=line.label,
                          marker="." if len(line.xs) < 30 else None)
      if line.std:
        low = [y - s for y, s in zip(line.ys, line.std)]
        high = [y + s for y, s in zip(line.ys, line.std)]
        ax.fill_between(line.xs, low, high, color=artist.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    if len(drawn) > 1:
      ax.legend(fontsize="small")
    paths.append(save(fig, plot_path(out, metric)))
  return paths


def plot(runs: list[Run], labels: list[str], out: Path) -> list[Path]:
  """One PNG per metric under out/plots, one line per run."""
  return plot_metrics(metric_names(runs),
                      lambda m: [Line(label, *run.curve(m)) for run, label in zip(runs, labels)],
                      out)


def describe(values: dict[str, Any]) -> str:
  """`k=v, k=v` of config values (lists as a,b)."""
  return ", ".join(f"{k}={cell(v)}" for k, v in values.items())


def labels(runs: list[Run]) -> list[str]:
  keys = differing_keys(runs)
  return [describe({k: run.config[k] for k in keys if run.config and k in run.config})
          or run.name or run.path.name for run in runs]


def default_out(paths: list[Path]) -> Path:
  if len(paths) == 1:
    return paths[0]
  parent = Path(os.path.commonpath([p.resolve() for p in paths]))
  digest = hashlib.sha1("\n".join(sorted(p.name for p in paths)).encode()).hexdigest()[:8]
  return parent / f"report-{digest}"


def report(paths: list[str | os.PathLike], out: str | os.PathLike | None = None,
           with_plots: bool = True, *, aggregate: bool = True, xy: Any = None,
           series: str | None = None, metrics: list[str] | str | None = None,
           keys: list[str] | str | None = None) -> Path:
  """Write report.md, report.csv, plots/ (and runs.csv, frontier.*: see the module docstring)
  for the runs; returns the output dir."""
  from jrlhf import report_aggregate as agg  # noqa: PLC0415 (it builds on this module)

  paths = [Path(p) for p in paths]
  runs = [load_run(p) for p in paths]
  pairs = agg.parse_xy(xy)
  name_runs(runs)
  if metrics:
    keep_only(runs, [*_names(metrics), *(m for pair in pairs for m in pair)])
  if keys:
    keep_keys(runs, list(dict.fromkeys([*_names(keys), *([series] if series else [])])))
  agg.check_frontier_args(runs, pairs, series)
  out = Path(out) if out else default_out(paths)
  out.mkdir(parents=True, exist_ok=True)
  header, rows = table(runs)
  metrics = metric_names(runs)
  if not metrics:
    raise ReportError("no metrics left to report (check --metrics against metrics.jsonl)")
  if aggregate and "seed" in differing_keys(runs):
    keys, groups = agg.by_configuration(runs)
    summary = agg.summary_table(keys, groups, metrics)
    write_csv(out / "report.csv", *summary.for_csv())
    write_csv(out / "runs.csv", header, rows)
    sections = [["## By configuration: mean ± std over seeds", "",
                 *markdown_table(summary.header, summary.rows)],
                ["## Runs", "", *markdown_table(header, rows)]]
    notes = [NOTE, agg.NOTE]
    plots = agg.plot_groups(groups, metrics, out) if with_plots else []
  else:
    keys, groups = agg.one_per_run(runs)
    write_csv(out / "report.csv", header, rows)
    sections, notes = [markdown_table(header, rows)], [NOTE]
    plots = plot(runs, labels(runs), out) if with_plots else []
  if pairs:
    plots += agg.write_frontier(keys, groups, pairs, series, out, with_plots)
  (out / "report.md").write_text(markdown(sections, notes, plots, out))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jrlhf.report",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
  parser.add_argument("--out", help="output directory (default: see module docstring)")
  parser.add_argument("--no-plots", action="store_true", help="tables only")
  parser.add_argument("--no-aggregate", action="store_true",
                      help="one row and one plot line per run, even when the runs differ in seed")
  parser.add_argument("--xy", action="append", metavar="X,Y",
                      help="plot metric Y against metric X, a point per configuration "
                           "(repeatable; writes frontier.md/.csv)")
  parser.add_argument("--metrics", metavar="M,M",
                      help="only these metrics (names or shell patterns, comma-separated)")
  parser.add_argument("--keys", metavar="K,K",
                      help="config keys to show (default: every key that differs)")
  parser.add_argument("--series", metavar="KEY",
                      help="config key whose value names a --xy series (e.g. algorithm)")
  args = parser.parse_args(argv)
  missing = [p for p in args.runs if not Path(p).is_dir()]
  if missing:
    print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
    return 2
  if args.series and not args.xy:
    print("note: --series only names the series of --xy plots; without --xy it does nothing",
          file=sys.stderr)
  try:
    out = report(args.runs, args.out, with_plots=not args.no_plots,
                 aggregate=not args.no_aggregate, xy=args.xy, series=args.series,
                 metrics=args.metrics, keys=args.keys)
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print((out / "report.md").read_text(), end="")
  written = [n for n in ("report.md", "report.csv", "runs.csv", "frontier.md", "frontier.csv")
             if (out / n).exists()]
  print(f"\nwrote {', '.join(str(out / n) for n in written)}"
        + ("" if args.no_plots else f" and {out / 'plots'}/"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
