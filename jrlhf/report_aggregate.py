"""Seeds and frontiers for `jrlhf.report` (the user documentation is that module's docstring).

A configuration is the values of the config keys that differ across the runs, `seed` left out;
the runs that share one are its seeds. A configuration's final (and best) values become a Stat:
mean, sample std (n - 1 in the denominator: the seeds are a sample of what the configuration
does; None for one seed, which says nothing about spread) and n. Only runs whose status is ok
count; the others are named in the configuration's status, never averaged in.

  keys, groups = by_configuration(runs)        # [Group(values={"algorithm.beta": 0.1}, runs=[...])]
  groups[0].stat(lambda run: run.final("policy/reward"))   # Stat(mean=0.71, std=0.008, n=3, of=3)
"""

from __future__ import annotations

import difflib
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from jrlhf.report import (Line, ReportError, Run, cell, describe, differing_keys, markdown,
                          markdown_table, metric_columns, metric_names, plot_metrics, plot_path,
                          pyplot, save, write_csv)

NOTE = ("mean ± std over the seeds whose status is ok; std is the sample standard deviation "
        "(n - 1), empty for one seed; (n=k): only k of the seeds logged that metric.")
FRONTIER_NOTE = ("Final values; mean ± std over the seeds whose status is ok (sample std, empty "
                 "for one seed).")


@dataclass(frozen=True)
class Stat:
  mean: float
  std: float | None
  n: int
  of: int  # the seeds that could have had a value

  def __str__(self) -> str:
    text = f"{self.mean:.4g}" + ("" if self.std is None else f" ± {self.std:.4g}")
    return text if self.n == self.of else f"{text} (n={self.n})"


def summarize(values: list[float], of: int | None = None) -> Stat | None:
  """Mean and sample std (None for one value) of the values; None for no values."""
  n = len(values)
  if not n:
    return None
  if all(map(math.isfinite, values)):
    # statistics computes exactly: seeds with equal values get std 0, not 1e-17.
    mean, std = statistics.mean(values), statistics.stdev(values) if n > 1 else None
  else:  # a diverged seed (nan, inf) shows as such instead of being dropped
    mean, std = sum(values) / n, math.nan if n > 1 else None
  return Stat(mean, std, n, n if of is None else of)


@dataclass
class Group:
  """The runs (seeds) of one configuration; `values` maps its configuration keys to values."""
  values: dict[str, Any]
  runs: list[Run]

  @property
  def ok(self) -> list[Run]:
    return [r for r in self.runs if r.status == "ok"]

  @property
  def config(self) -> dict[str, Any]:
    return next((r.config for r in self.runs if r.config), {})

  @property
  def status(self) -> str:
    left_out = [f"{r.name or r.path.name} ({r.status})" for r in self.runs if r.status != "ok"]
    if not left_out:
      return "ok"
    return f"{len(self.ok)} of {len(self.runs)} ok; left out: " + "; ".join(left_out)

  @property
  def seeds(self) -> str:
    """`n=3`, or `2 of 3 seeds` when some crashed."""
    n, total = len(self.ok), len(self.runs)
    return f"n={n}" if n == total else f"{n} of {total} seeds"

  def stat(self, value: Callable[[Run], float | None]) -> Stat | None:
    values = [v for v in map(value, self.ok) if v is not None]
    return summarize(values, of=len(self.ok))

  def curve(self, metric: str) -> Line:
    """Mean ± std over the ok seeds at the steps that every one of them logged."""
    # A step logged twice (a resumed run, policy_eval.json at the last step) counts its later value.
    curves = [dict(zip(*run.curve(metric))) for run in self.ok]
    steps = sorted(set.intersection(*map(set, curves))) if curves else []
    stats = [summarize([c[s] for c in curves]) for s in steps]
    std = [s.std or 0.0 for s in stats] if len(curves) > 1 else None
    label = f"{describe(self.values) or 'all runs'} ({self.seeds})"
    return Line(label, steps, [s.mean for s in stats], std)


def _values(run: Run, keys: list[str]) -> dict[str, Any]:
  return {k: run.config[k] for k in keys if run.config and k in run.config}


def by_configuration(runs: list[Run]) -> tuple[list[str], list[Group]]:
  """(configuration keys, groups in first-seen order); a run without a config is its own group."""
  keys = [k for k in differing_keys(runs) if k != "seed"]
  groups: dict[str, Group] = {}
  for run in runs:
    values = _values(run, keys)
    ident = json.dumps(values, sort_keys=True, default=str) if run.config else str(run.path)
    groups.setdefault(ident, Group(values, [])).runs.append(run)
  return keys, list(groups.values())


def one_per_run(runs: list[Run]) -> tuple[list[str], list[Group]]:
  """Every run its own configuration (--no-aggregate, or runs that share their seed)."""
  keys = differing_keys(runs)
  return keys, [Group(_values(run, keys), [run]) for run in runs]


@dataclass
class Table:
  """Rows whose `stat_columns` hold Stats: `mean ± std` in markdown, two columns in CSV."""
  header: list[str]
  rows: list[list[Any]]
  stat_columns: frozenset[int]

  def for_csv(self) -> tuple[list[str], list[list[Any]]]:
    header: list[str] = []
    for i, name in enumerate(self.header):
      header += [f"{name} mean", f"{name} std"] if i in self.stat_columns else [name]
    rows = []
    for row in self.rows:
      cells: list[Any] = []
      for i, value in enumerate(row):
        if i not in self.stat_columns:
          cells.append(value)
        else:
          cells += [value.mean, "" if value.std is None else value.std] if value else ["", ""]
      rows.append(cells)
    return header, rows


def summary_table(keys: list[str], groups: list[Group], metrics: list[str]) -> Table:
  """One row per configuration: its keys, seeds (n averaged), status, final/best mean ± std."""
  columns = metric_columns(metrics)
  header = [*keys, "seeds", "status", *(name for name, _ in columns)]
  rows = [[*(cell(g.values.get(k, "")) for k in keys), len(g.ok), g.status,
           *(g.stat(value) or "" for _, value in columns)] for g in groups]
  return Table(header, rows, frozenset(range(len(keys) + 2, len(header))))


def plot_groups(groups: list[Group], metrics: list[str], out: Path) -> list[Path]:
  return plot_metrics(metrics, lambda m: [g.curve(m) for g in groups], out)


# ---------------------------------------------------------------------------------------------
# Frontiers: metric Y against metric X, a point per configuration, a line per series.


def parse_xy(xy: Any) -> list[tuple[str, str]]:
  """--xy as (x, y) metric pairs: None, "x,y", an (x, y) pair, or a list of those."""
  if xy is None:
    return []
  items = [xy] if isinstance(xy, (str, tuple)) else list(xy)
  if len(items) == 2 and all(isinstance(i, str) and "," not in i for i in items):
    items = [tuple(items)]  # ["x", "y"] (a JSON pair) is one pair, not two
  pairs = []
  for item in items:
    parts = item.split(",") if isinstance(item, str) else list(item)
    if len(parts) != 2 or not all(isinstance(p, str) and p.strip() for p in parts):
      raise ReportError(f"--xy {item!r}: give two metric names, X,Y "
                        "(e.g. --xy policy/kl,policy/reward)")
    pairs.append((parts[0].strip(), parts[1].strip()))
  return pairs


def check_frontier_args(runs: list[Run], pairs: list[tuple[str, str]], series: str | None) -> None:
  """Refuse --xy metrics and a --series key that no run has, before anything is written."""
  metrics = metric_names(runs)
  for name in dict.fromkeys(m for pair in pairs for m in pair):
    if name not in metrics:
      raise ReportError(f"--xy: no run logged a metric {name!r}{_suggest(name, metrics)}")
  if series is not None:
    keys = list(dict.fromkeys(k for r in runs for k in (r.config or {})))
    if series not in keys:
      raise ReportError(f"--series {series!r} is not a config key of these runs"
                        f"{_suggest(series, keys)}")


def _suggest(name: str, names: Iterable[str]) -> str:
  names = list(names)
  close = difflib.get_close_matches(name, names, n=3)
  if close:
    return f"; did you mean {' or '.join(close)}?"
  return f"; there are: {', '.join(names[:20])}" if names else ""


def _final(metric: str) -> Callable[[Run], float | None]:
  return lambda run: run.final(metric)


def by_series(groups: list[Group], series: str | None) -> dict[str, list[Group]]:
  """Series name (the config value of `series`; `all` without one) -> its groups."""
  out: dict[str, list[Group]] = {}
  for g in groups:
    name = "all" if series is None else str(cell(g.config.get(series, "")))
    out.setdefault(name, []).append(g)
  return out


def frontier_table(keys: list[str], groups: list[Group], pairs: list[tuple[str, str]],
                   series: str | None) -> Table:
  """series, configuration keys, mean ± std of each --xy metric, seeds, status; ordered by series
  then by the first X. Configurations with none of the metrics are left out."""
  keys = [k for k in keys if k != series]
  metrics = list(dict.fromkeys(m for pair in pairs for m in pair))
  header = ["series", *keys, *metrics, "seeds", "status"]
  rows = []
  for name, members in by_series(groups, series).items():
    stats = [[g.stat(_final(m)) for m in metrics] for g in members]
    found = sorted((s for s in zip(members, stats) if any(s[1])),
                   key=lambda s: s[1][0].mean if s[1][0] else math.inf)
    rows += [[name, *(cell(g.values.get(k, "")) for k in keys), *(s or "" for s in row),
              len(g.ok), g.status] for g, row in found]
  return Table(header, rows, frozenset(range(1 + len(keys), 1 + len(keys) + len(metrics))))


def _varying(groups: list[Group], keys: list[str]) -> list[str]:
  return [k for k in keys if len({json.dumps(g.values.get(k), default=str) for g in groups}) > 1]


def _point_label(group: Group, keys: list[str], series: str | None) -> str:
  """`beta=0.1` for `algorithm.beta` in the `algorithm` series; `(2 of 3 seeds)` if any crashed."""
  short = {k: k.removeprefix(f"{series}.") if series else k for k in keys}
  text = ", ".join(f"{short[k]}={cell(group.values[k])}" for k in keys if k in group.values)
  return text if len(group.ok) == len(group.runs) else f"{text} ({group.seeds})".strip()


def plot_frontier(keys: list[str], groups: list[Group], x: str, y: str, series: str | None,
                  out: Path) -> Path:
  """plots/<y>-vs-<x>.png: a point per configuration with ± std error bars (one seed: ± its
  `<metric>_stderr` if logged), a line per series."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.5))
  keys = [k for k in keys if k != series]
  for i, (name, members) in enumerate(by_series(groups, series).items()):
    points = [(g, g.stat(_final(x)), g.stat(_final(y))) for g in members]
    points = sorted((p for p in points if p[1] and p[2]), key=lambda p: p[1].mean)
    if not points:
      continue
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    groups_here = [p[0] for p in points]
    ax.errorbar([s.mean for s in xs], [s.mean for s in ys], xerr=_errors(xs, groups_here, x),
                yerr=_errors(ys, groups_here, y), fmt="o-", color=f"C{i}", capsize=3, label=name)
    varying = _varying([p[0] for p in points], keys)
    for g, sx, sy in points:
      ax.annotate(_point_label(g, varying, series), (sx.mean, sy.mean), fontsize="x-small",
                  textcoords="offset points", xytext=(4, 4))
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.set_title(f"{y} vs {x}")
  ax.grid(alpha=0.3)
  if series is not None:
    ax.legend(fontsize="small", title=series)
  return save(fig, plot_path(out, f"{y}-vs-{x}"))


def _errors(stats: list[Stat], groups: list[Group], metric: str) -> list[float] | None:
  """± std over seeds; for a single seed, the run's own standard error of the metric when it
  logged one as `<metric>_stderr` (policy_eval does: a measurement's sampling noise)."""
  errors = []
  for stat, group in zip(stats, groups):
    stderr = group.stat(_final(f"{metric}_stderr")) if len(group.ok) == 1 else None
    errors.append(stat.std or (stderr.mean if stderr else 0.0))
  return errors if any(errors) else None


def write_frontier(keys: list[str], groups: list[Group], pairs: list[tuple[str, str]],
                   series: str | None, out: Path, with_plots: bool = True) -> list[Path]:
  """frontier.md, frontier.csv and (with_plots) one plot per pair; returns the plots."""
  table = frontier_table(keys, groups, pairs, series)
  write_csv(out / "frontier.csv", *table.for_csv())
  plots = [plot_frontier(keys, groups, x, y, series, out) for x, y in pairs] if with_plots else []
  (out / "frontier.md").write_text(
      markdown([markdown_table(table.header, table.rows)], [FRONTIER_NOTE], plots, out))
  return plots
