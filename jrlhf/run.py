"""Run an experiment: `python -m jrlhf.run experiment=NAME key=value ...`.

    python -m jrlhf.run experiment=tiny/sft                      # runs/tiny-sft
    python -m jrlhf.run experiment=tiny/sft optim.lr=1e-3 steps=50
    python -m jrlhf.run experiment=tiny/sft print_config=true    # resolved config, then exit
    python -m jrlhf.run experiment=tiny/sft plan=v5p:2x2x1       # will it fit? (jrlhf.plan)
    python -m jrlhf.run experiment=tiny/sft --help               # every key, type and value
    python -m jrlhf.run -m experiment=tiny/sft optim.lr=1e-3,3e-4 seed=0,1 -j 2   # a sweep
    python -m jrlhf.run experiment=tiny/sft dist.coordinator=host0:8476 \
        dist.num_processes=2 dist.process_id=0                   # host 0 of 2 (see jrlhf.distributed)

Precedence: defaults < the experiment's CONFIG < the command line. Values are parsed by the
key's type (`true`/`false`, `3e-4`, `None`, tuples as `64,128`). An unknown key or a bad value
exits with status 2 and says what would be valid. The run directory defaults to
`runs/<experiment>,<key=value,...>` (sorted keys; identical on every host), where `config.json`
(every key, resolved) is written before training starts. Running the same command again
resumes from the run directory's last checkpoint (unless `train.resume=false`).

On a Cloud TPU VM slice the same command runs on every worker and the workers find each other
(`jrlhf.distributed`); only process 0 writes config.json, metrics and samples. `run_dir` may be
a bucket (`run_dir=gs://bucket/runs/x`): on several hosts it must be storage they all share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from jrlhf import config, distributed, sweep
from jrlhf.algorithms.dpo import DPOConfig
from jrlhf.algorithms.grpo import GRPOConfig
from jrlhf.algorithms.ppo import PPOConfig
from jrlhf.algorithms.rm import RMConfig
from jrlhf.algorithms.sft import SFTConfig

USAGE = ("usage: python -m jrlhf.run [experiment=NAME] [key=value ...] [print_config=true]\n"
         "       python -m jrlhf.run -m [-j N] [experiment=A,B] [key=v1,v2 ...]   (sweep)\n"
         "       python -m jrlhf.run [experiment=NAME] --help")

Trainer = Callable[[Any, Path], dict]


def trainers() -> dict[type, Trainer]:
  """Algorithm config type -> the function that trains it.

  Imported here rather than at the top so that `--help` and `print_config=true` answer without
  loading the training stack (orbax, optax).
  """
  from jrlhf.train import loop, online  # noqa: PLC0415

  return {SFTConfig: loop.train, RMConfig: loop.train, DPOConfig: loop.train,
          GRPOConfig: online.train, PPOConfig: online.train}


def parse_argv(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
  """Split flags (`--help`, `-m`, `-j N`) from `key=value` arguments."""
  flags: dict[str, Any] = {"help": False, "multirun": False, "jobs": None}
  rest: list[str] = []
  args = iter(argv)
  for arg in args:
    if arg in ("-h", "--help"):
      flags["help"] = True
    elif arg in ("-m", "--multirun"):
      flags["multirun"] = True
    elif arg in ("-j", "--jobs"):
      flags["jobs"] = _jobs(arg, next(args, ""))
    elif arg.startswith("--jobs=") or (arg.startswith("-j") and arg[2:].isdigit()):
      flags["jobs"] = _jobs(arg, arg.removeprefix("--jobs=").removeprefix("-j"))
    elif arg.startswith("-"):
      raise config.ConfigError(f"unknown flag {arg!r}\n{USAGE}")
    else:
      rest.append(arg)
  if flags["jobs"] is not None and not flags["multirun"]:
    raise config.ConfigError("-j runs sweep points in parallel; it needs -m")
  return flags, rest


def _jobs(flag: str, value: str) -> int:
  if not value.isdigit() or int(value) < 1:
    raise config.ConfigError(f"{flag} needs a positive number of parallel runs, e.g. -j 4")
  return int(value)


def help_text(experiment: str, overrides: Mapping[str, str]) -> str:
  bp = config.blueprint(experiment, overrides)
  lines = [__doc__.split("\n\n")[0], "", USAGE, "",
           bp.get_help(color=sys.stdout.isatty()).rstrip(), "",
           f"algorithm=NAME: {', '.join(config.ALGORITHMS)}",
           f"experiment=NAME: {', '.join(config.list_experiments()) or '(none)'}"]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, train_fns: Mapping[type, Trainer] | None = None) -> int:
  """The CLI. `train_fns` replaces the dispatch table (tests inject a fake trainer)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  overrides: dict[str, str] = {}
  try:
    flags, args = parse_argv(argv)
    overrides = config.parse_overrides(args)
    if flags["multirun"]:
      if flags["help"]:
        print(sweep.__doc__)
        return 0
      return sweep.main(overrides, jobs=flags["jobs"] or 1)
    experiment = overrides.pop("experiment", "")
    if flags["help"]:
      print(help_text(experiment, overrides), end="")
      return 0
    cfg = config.resolve(experiment, overrides)
  except config.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    if any("," in v for v in overrides.values()):
      print("  (to sweep over a comma list, add -m: python -m jrlhf.run -m ...)", file=sys.stderr)
    return 2

  run_dir = config.run_dir(cfg, overrides)
  if cfg.print_config:
    print(config.describe(cfg))
    print(f"# run dir: {run_dir}")
    return 0
  if cfg.plan:
    from jrlhf import plan  # noqa: PLC0415 - see trainers()

    return plan.main(cfg)  # compiles only: no run dir, no distributed setup

  fns = trainers() if train_fns is None else train_fns
  fn = fns.get(type(cfg.algorithm))
  if fn is None:
    print(f"error: no trainer for {type(cfg.algorithm).__name__}; trainers exist for "
          f"{', '.join(t.__name__ for t in fns)}", file=sys.stderr)
    return 2
  try:
    # Before anything touches a device: afterwards jax.devices() spans every host.
    distributed.initialize(cfg.dist)
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if distributed.is_writer():
    run_dir.mkdir(parents=True, exist_ok=True)
    _warn_if_config_changed(run_dir / "config.json", config.flatten(cfg))
    config.write_config(cfg, run_dir / "config.json")
  _warn_if_not_shared(run_dir)
  from jrlhf.train.checkpoint import ResumeMismatch  # noqa: PLC0415 - see trainers()
  from jrlhf.train.loop import NonFiniteLoss  # noqa: PLC0415

  try:
    fn(cfg, run_dir)
  except (NonFiniteLoss, ResumeMismatch) as e:  # the message says what to change; no traceback
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def _warn_if_not_shared(run_dir: Path) -> None:
  """Every host writes its own shards of a checkpoint: on local disks they end up scattered."""
  import jax  # noqa: PLC0415 - after distributed.initialize

  if jax.process_count() > 1 and distributed.is_writer() and not distributed.is_url(run_dir):
    print(f"warning: {jax.process_count()} processes checkpoint into the local path {run_dir}; "
          f"unless it is a filesystem every host shares, the checkpoints are incomplete. Use "
          f"run_dir=gs://BUCKET/... on a pod", file=sys.stderr)


def _warn_if_config_changed(path: Path, flat: dict[str, Any]) -> None:
  """A resumed run whose config changed is rarely intended: say which keys differ."""
  if not path.is_file():
    return
  try:
    old = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return
  ignore = set(config.NOT_IN_NAME) | {"train.resume"}
  changed = sorted(k for k in set(old) | set(flat)
                   if k not in ignore and old.get(k) != flat.get(k))
  if changed:
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {flat.get(k)!r}" for k in changed[:8])
    more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    print(f"warning: {path} was written by a different config: {shown}{more}. If this run "
          f"resumes from a checkpoint it continues under the new values.", file=sys.stderr)


if __name__ == "__main__":
  sys.exit(main())
