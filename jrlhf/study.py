"""Studies: one command runs a whole ablation and writes its tables and plots.

  python -m jrlhf.study ablations/frontier            # experiments/ablations/frontier.py
  python -m jrlhf.study ablations/frontier --reduced  # the CI-sized version of the same study
  python -m jrlhf.study ablations/peft --seeds 3 -j 2 --out docs/ablations/peft

A study file is data, like an experiment: a docstring (the command, what it shows, on what
hardware and how long) and a dict `STUDY`:

  start       optional: the run every arm starts from (an experiment + overrides, exported);
              "{start}" in an arm's values is its export directory.
  arms        name -> an experiment + overrides; a comma list is a sweep axis (`jrlhf.sweep`).
  common      overrides for every arm's runs (and the start).
  seeds       each arm point repeats over seed=0..seeds-1 (`--seeds` overrides it).
  policy_eval optional settings of `jrlhf.policy_eval` (prompts, samples, ...): after each arm
              run, the task reward and the sequence-level KL to the start, measured one way for
              every arm (and for the start itself, the origin: it joins the report).
  plan        optional `plan=` target ("cpu", "v5p:2x2x1"): each arm point's compiled train-step
              memory and trainable parameters, from an ahead-of-time compile.
  report      keyword arguments of `jrlhf.report.report` (`xy`, `series`, ...).
  reduced     {"start": {...}, "arms": {name: overrides}, "common": {...}, "policy_eval": {...},
              "drop": [arm, ...]}: replaces values for `--reduced` (a few steps, fewer points),
              run under `<study>-reduced`.

Runs live in runs/<study>/<arm>/<point> (`runs/<study>/start` for the start). A point that
already finished (its last logged step is the config's `steps`, and its export exists where one
is needed) is not run again, so an interrupted study continues where it stopped. Failed points
are listed and left out of the report; the study exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from jrlhf import config, sweep
from jrlhf.train.metrics import last_logged_step

STUDY_KEYS = ("start", "arms", "common", "seeds", "policy_eval", "plan", "report", "reduced")
PLAN_FILE = "plan.json"


class StudyError(ValueError):
  """A study file or command that cannot run; the message says what to change. Exits 2."""


@dataclasses.dataclass
class Point:
  arm: str
  overrides: dict[str, str]  # experiment + key=value, as the CLI takes them
  run_dir: Path
  steps: int
  export: bool


def load_study(name: str) -> tuple[str, dict[str, Any]]:
  """(docstring, STUDY) of experiments/<name>.py, checked for unknown keys."""
  path = config.experiment_path(name)
  if not path.is_file():
    raise StudyError(f"study {name!r}: no file {path}")
  module = runpy.run_path(str(path))
  doc, study = module.get("__doc__") or "", module.get("STUDY")
  if not doc.strip():
    raise StudyError(f"{path}: a study opens with a docstring: its command, what it shows, "
                     f"and on what hardware")
  if not isinstance(study, dict) or not isinstance(study.get("arms"), dict) or not study["arms"]:
    raise StudyError(f"{path}: a study defines STUDY = {{'arms': {{name: {{...}}}}, ...}}")
  unknown = sorted(set(study) - set(STUDY_KEYS))
  if unknown:
    raise StudyError(f"{path}: unknown STUDY keys {unknown}; known: {', '.join(STUDY_KEYS)}")
  return doc, study


def resolve_study(study: Mapping[str, Any], reduced: bool, seeds: int | None) -> dict[str, Any]:
  """The study with its `reduced` replacements applied (when asked) and the seed count set."""
  out = {k: v for k, v in study.items() if k != "reduced"}
  out["arms"] = {name: dict(arm) for name, arm in study["arms"].items()}
  out["common"] = dict(study.get("common", {}))
  if reduced:
    extra = study.get("reduced", {})
    for name, arm in extra.get("arms", {}).items():
      if name not in out["arms"]:
        raise StudyError(f"reduced.arms names {name!r}, not an arm ({', '.join(out['arms'])})")
      out["arms"][name].update(arm)
    unknown = sorted(set(extra.get("drop", ())) - set(out["arms"]))
    if unknown:
      raise StudyError(f"reduced.drop names {unknown}, not arms ({', '.join(out['arms'])})")
    out["arms"] = {n: a for n, a in out["arms"].items() if n not in extra.get("drop", ())}
    out["common"].update(extra.get("common", {}))
    if "start" in extra:
      out["start"] = {**study.get("start", {}), **extra["start"]}
    if "policy_eval" in extra:
      out["policy_eval"] = {**study.get("policy_eval", {}), **extra["policy_eval"]}
    if "seeds" in extra:
      out["seeds"] = extra["seeds"]
  if seeds is not None:
    out["seeds"] = seeds
  return out


def cli_value(value: Any) -> str:
  """A study value as the command line spells it (tuples as one bracketed value)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return "[" + ",".join(cli_value(v) for v in value) + "]"
  return "None" if value is None else str(value)


def _resolved(overrides: dict[str, str]):
  rest = {k: v for k, v in overrides.items() if k != "experiment"}
  return config.resolve(overrides.get("experiment", ""), rest)


def arm_points(name: str, arm: Mapping[str, Any], common: Mapping[str, Any], seeds: int,
               root: Path, start_export: Path | None) -> list[Point]:
  """One arm's points: the product of its comma-list axes (and the seeds), each resolved."""
  overrides = {k: cli_value(v) for k, v in {**common, **arm}.items()}
  if seeds > 1:
    overrides["seed"] = ",".join(str(s) for s in range(seeds))
  if any("{start}" in v for v in overrides.values()):
    if start_export is None:
      raise StudyError(f"arm {name!r} uses {{start}} but the study has no start run")
    overrides = {k: v.replace("{start}", str(start_export)) for k, v in overrides.items()}
  varying = [k for k, v in overrides.items() if len(sweep.axis(k, v)) > 1]
  points = []
  for point in sweep.expand(overrides):
    label = {k: point[k] for k in varying}
    run_dir = root / name / (config.run_name("", label).removeprefix("default,") if label else "run")
    point["run_dir"] = str(run_dir)
    try:
      cfg = _resolved(point)
    except config.ConfigError as e:
      raise StudyError(f"arm {name!r}, point {label or '(only one)'}: {e}") from None
    points.append(Point(name, point, run_dir, cfg.steps, cfg.train.export))
  return points


def finished(point: Point) -> bool:
  done = (last_logged_step(point.run_dir / "metrics.jsonl") or 0) >= point.steps
  return done and (not point.export or (point.run_dir / "export" / "config.json").exists())


def run_points(points: list[Point], jobs: int) -> list[bool]:
  """Runs the unfinished points (`jobs` at a time); whether each point is finished after."""
  todo = [p for p in points if not finished(p)]
  for p in points:
    if p not in todo:
      print(f"[study] {p.run_dir}: finished earlier, not run again", flush=True)
  if todo:
    codes, interrupted = sweep.run([p.overrides for p in todo], [p.run_dir for p in todo], jobs)
    if interrupted:
      raise KeyboardInterrupt
    for p, code in zip(todo, codes):
      if code != 0:
        print(f"[study] FAILED (exit {code}): {p.run_dir}", file=sys.stderr, flush=True)
  return [finished(p) for p in points]


def write_plan(point: Point, target: str) -> None:
  """The point's compiled train-step memory (per device) and trainable params -> plan.json."""
  from jrlhf import plan  # noqa: PLC0415 - imports JAX; only studies that plan need it

  result = plan.make_plan(_resolved(point.overrides), plan.parse_target(target), costs=False)
  step = result.programs[0]
  metrics = {"params/trainable": float(result.trainable_params),
             "memory/train_step_gib": step.memory["total"] / plan.GiB}
  (point.run_dir / PLAN_FILE).write_text(json.dumps(
      {"step": point.steps, "metrics": metrics, "target": target, "program": step.name}) + "\n")


def plan_study(name: str, *, reduced: bool = False, seeds: int | None = None,
               only: list[str] | None = None
               ) -> tuple[dict[str, Any], Path, Point | None, list[Point]]:
  """(resolved study, its runs root, the start point or None, the arm points); every point is
  resolved here, so a typo in any arm fails before the first run starts."""
  _, raw = load_study(name)
  study = resolve_study(raw, reduced, seeds)
  if only:
    unknown = sorted(set(only) - set(study["arms"]))
    if unknown:
      raise StudyError(f"--only {','.join(unknown)}: not arms of {name} "
                       f"({', '.join(study['arms'])})")
    study["arms"] = {n: a for n, a in study["arms"].items() if n in only}
  root = Path(config.RUNS_DIR) / (name.replace("/", "-") + ("-reduced" if reduced else ""))
  start_point = None
  if study.get("start"):
    start = {k: cli_value(v) for k, v in {**study["common"], **study["start"]}.items()}
    start.update({"train.export": "true", "run_dir": str(root / "start")})
    try:
      cfg = _resolved(start)
    except config.ConfigError as e:
      raise StudyError(f"the start run: {e}") from None
    start_point = Point("start", start, root / "start", cfg.steps, True)
  start_export = (root / "start" / "export").absolute() if start_point else None
  points = []
  for arm_name, arm in study["arms"].items():
    points += arm_points(arm_name, arm, study["common"], int(study.get("seeds", 1)), root,
                         start_export)
  return study, root, start_point, points


def run_study(name: str, *, reduced: bool = False, seeds: int | None = None, jobs: int = 1,
              out: str | Path | None = None, only: list[str] | None = None) -> int:
  """Runs study `name` (see the module docstring); 0 if every point finished."""
  study, root, start_point, points = plan_study(name, reduced=reduced, seeds=seeds, only=only)
  started = time.perf_counter()
  start_export = None
  if start_point is not None:
    if not run_points([start_point], 1)[0]:
      print(f"[study] the start run failed; see {start_point.run_dir}", file=sys.stderr)
      return 1
    start_export = (start_point.run_dir / "export").absolute()
  print(f"[study] {name}: {len(points)} runs in {root}", flush=True)
  ok = run_points(points, jobs)
  done = [p for p, good in zip(points, ok) if good]
  if study.get("policy_eval") is not None:
    from jrlhf import policy_eval  # noqa: PLC0415 - imports JAX

    settings = policy_eval.EvalSettings(**study["policy_eval"])
    if start_point is not None:
      # The start itself: the frontier's origin (KL 0, the reward the arms start from).
      done = [start_point, *done]
    for p in done:
      if not (p.run_dir / policy_eval.EVAL_FILE).exists():
        policy_eval.evaluate_run(p.run_dir, reference=start_export, settings=settings)
  if study.get("plan"):
    for p in done:
      if not (p.run_dir / PLAN_FILE).exists():
        write_plan(p, study["plan"])
  from jrlhf import report  # noqa: PLC0415

  out = Path(out) if out else root / "report"
  if done:
    report.report([p.run_dir for p in done], out, **study.get("report", {}))
  minutes = (time.perf_counter() - started) / 60
  finished_arms = sum(good for good in ok)
  print(f"[study] {finished_arms} of {len(points)} runs finished; {minutes:.1f} min; report: {out}")
  return 0 if finished_arms == len(points) else 1


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jrlhf.study", description=__doc__.split("\n\n")[0])
  parser.add_argument("study", help="a file under experiments/, e.g. ablations/frontier")
  parser.add_argument("--reduced", action="store_true", help="the study's CI-sized version")
  parser.add_argument("--seeds", type=int, help="repeat every arm point over this many seeds")
  parser.add_argument("-j", "--jobs", type=int, default=1, help="runs at a time")
  parser.add_argument("--out", help="report directory (default runs/<study>/report)")
  parser.add_argument("--only", help="run only these arms (comma-separated); the report covers "
                                     "them only")
  args = parser.parse_args(argv)
  try:
    return run_study(args.study, reduced=args.reduced, seeds=args.seeds, jobs=args.jobs,
                     out=args.out, only=args.only.split(",") if args.only else None)
  except (StudyError, config.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
