"""The top-level `Config`, experiment files, and resolving `key=value` overrides into a Config.

    cfg = resolve("tiny/sft", {"optim.lr": "3e-4", "steps": "50"})   # defaults < experiment < CLI
    flat = flatten(cfg)              # {"algorithm": "sft", "optim.lr": 0.0003, "steps": 50, ...}
    run_name("tiny/sft", {"optim.lr": "3e-4"})                       # "tiny-sft,optim.lr=3e-4"

Each module owns its config class; this file only composes them. chz does the typed parsing and
construction (values are cast by the field's type: `true`/`false`, ints, floats, `None`, tuples as
`a,b`); this file adds what a research CLI needs on top: experiment files as the middle layer,
keys checked against the full key table before anything is built (with "did you mean"), a
polymorphic `algorithm` chosen by name from an explicit table, and deterministic run names.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import runpy
import typing
from pathlib import Path
from typing import Any, Mapping

import chz
from chz.tiepin import CastError, is_subtype_instance, type_repr

from jrlhf.algorithms.dpo import DPOConfig
from jrlhf.algorithms.grpo import GRPOConfig
from jrlhf.algorithms.ppo import PPOConfig
from jrlhf.algorithms.rm import RMConfig
from jrlhf.algorithms.sft import SFTConfig
from jrlhf.data.config import DataConfig
from jrlhf.distributed import DistConfig, storage_path
from jrlhf.models.config import ModelConfig
from jrlhf.peft.config import PEFT_METHODS, FullFinetune, PeftConfig, check_export
from jrlhf.sharding.mesh import MeshConfig
from jrlhf.train.config import OptimConfig, TrainConfig

# `algorithm=NAME` selects the class; a new algorithm joins this table and the union below.
ALGORITHMS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig,
                               "grpo": GRPOConfig, "ppo": PPOConfig}
AlgorithmConfig = SFTConfig | RMConfig | DPOConfig | GRPOConfig | PPOConfig

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
RUNS_DIR = "runs"
# Keys that say where or how to run, not what to train: they never enter a run's name.
NOT_IN_NAME = ("experiment", "run_dir", "print_config", "plan", "dist.enable", "dist.coordinator",
               "dist.num_processes", "dist.process_id")
# Keys an experiment file may not set: they are about the invocation, not the experiment.
NOT_IN_EXPERIMENT = ("experiment", "print_config", "plan")
MAX_NAME = 100


class ConfigError(ValueError):
  """A config the user can fix: unknown key, bad value, missing experiment. Exits non-zero."""


class _Named(chz.factories.MetaFactory):
  """Construct a config group from an explicit name table (`algorithm=sft`), never by import.

  chz's default would also accept `module:Class` and import it; a table keeps every choice
  greppable and makes a typo an error that lists the valid names.
  """

  def __init__(self, group: str, default: type, table: Mapping[str, type] | None = None):
    super().__init__()
    self.group, self.default, self.table = group, default, dict(table or {})

  def unspecified_factory(self):
    return self.default

  def from_string(self, factory: str):
    if factory in self.table:
      return self.table[factory]
    if not self.table:
      raise chz.factories.MetaFromString(
          f"{self.group!r} is a group of keys, not a value; set its fields, e.g. "
          f"{self.group}.<field>=... (--help lists them)")
    raise chz.factories.MetaFromString(
        f"no {self.group} named {factory!r}{_did_you_mean(factory, self.table)}; "
        f"choose one of: {', '.join(self.table)}")

  def perform_cast(self, value: str):
    raise CastError(f"{self.group} is chosen by name ({', '.join(self.table) or 'fixed'})")


def _group(name: str, cls: type, table: Mapping[str, type] | None = None, doc: str = ""):
  return chz.field(default_factory=cls, meta_factory=_Named(name, cls, table), doc=doc)


@chz.chz
class Config:
  """One training run. CLI keys are dotted paths into it: `optim.lr=3e-4 model.num_layers=4`."""

  model: ModelConfig = _group("model", ModelConfig)
  init_from: str | None = chz.field(
      default=None, doc="HF checkpoint dir or hub id to start from; None = random init")
  data: DataConfig = _group("data", DataConfig)
  optim: OptimConfig = _group("optim", OptimConfig)
  train: TrainConfig = _group("train", TrainConfig)
  algorithm: AlgorithmConfig = _group(
      "algorithm", SFTConfig, ALGORITHMS, doc=f"one of: {', '.join(ALGORITHMS)}")
  peft: PeftConfig = _group(
      "peft", FullFinetune, PEFT_METHODS,
      doc=f"one of: {', '.join(PEFT_METHODS)} (none = full fine-tuning)")
  mesh: MeshConfig = _group("mesh", MeshConfig)
  rollout_mesh: MeshConfig | None = chz.field(
      default=None, doc="online RL: the sampler's mesh over the same devices (e.g. "
      "rollout_mesh.fsdp=1 rollout_mesh.tensor=8); None = the same as mesh")
  dist: DistConfig = _group("dist", DistConfig)
  steps: int = chz.field(default=1000, doc="optimizer steps")
  seed: int = chz.field(default=0, doc="seeds init, data order and sampling")
  run_dir: str | None = chz.field(
      default=None, doc=f"default {RUNS_DIR}/<name from experiment + overrides>")
  experiment: str = chz.field(default="", doc="experiments/<NAME>.py supplies the middle layer")
  print_config: bool = chz.field(default=False, doc="print the resolved config and exit")
  plan: str | None = chz.field(
      default=None, doc="compile ahead of time for a target and report memory and FLOPs, no run: "
      "a TPU topology (v5p:2x2x1), cpu, or gpu:16GB (see jrlhf.plan)")

  @chz.validate
  def _check_export(self):
    if self.train.export:
      check_export(self.peft)


# ---------------------------------------------------------------------------------------------
# The key table: every dotted key, its type and its default.


def _polymorphic(cls: type = Config) -> dict[str, _Named]:
  """Top-level fields chosen by name (`algorithm`), with their tables."""
  out = {}
  for field in chz.chz_fields(cls).values():
    factory = field.meta_factory
    if isinstance(factory, _Named) and factory.table:
      out[field.logical_name] = factory
  return out


def optional_group(typ: Any) -> type | None:
  """The config class of a `SomeConfig | None` field (`rollout_mesh`), else None."""
  args = [a for a in typing.get_args(typ) if a is not type(None)]
  if type(None) in typing.get_args(typ) and len(args) == 1 and chz.is_chz(args[0]):
    return args[0]
  return None


def _walk(obj: Any, prefix: str, out: dict[str, tuple[Any, Any]]) -> None:
  for field in chz.chz_fields(obj).values():
    key = prefix + field.logical_name
    value = getattr(obj, field.logical_name)
    out[key] = (field.x_type, value)
    if chz.is_chz(value):
      _walk(value, key + ".", out)
    elif value is None and optional_group(field.x_type):
      # Unset (None) by default, yet its keys are valid: `rollout_mesh.tensor=8` builds one.
      _walk(optional_group(field.x_type)(), key + ".", out)


def key_table(selected: Mapping[str, str] | None = None, cls: type = Config) -> dict[str, tuple]:
  """{dotted key: (type, default)} for the given choices of the polymorphic groups."""
  selected = dict(selected or {})
  out: dict[str, tuple] = {}
  _walk(cls(), "", out)
  for group, factory in _polymorphic(cls).items():
    name = selected.get(group)
    if name in factory.table:
      for key in [k for k in out if k.startswith(group + ".")]:
        del out[key]
      _walk(factory.table[name](), group + ".", out)
  return out


def _did_you_mean(word: str, candidates) -> str:
  candidates = list(candidates)
  close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
  # A bare field name (`lr`) most likely means the key that ends with it (`optim.lr`).
  leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == word.rsplit(".", 1)[-1]]
  close = list(dict.fromkeys(leaf + close))[:3]
  return f"; did you mean {' or '.join(close)}?" if close else ""


def check_overrides(overrides: Mapping[str, Any], selected: Mapping[str, str], source: str,
                    cls: type = Config) -> None:
  """Raise ConfigError for the first unknown key or ill-typed value, with the alternatives."""
  table = key_table(selected, cls)
  poly = _polymorphic(cls)
  leaves = [k for k, (_, default) in table.items() if not chz.is_chz(default) or k in poly]
  for key, value in overrides.items():
    if key not in table:
      group = key.split(".", 1)[0]
      if group in poly and "." in key:
        # The key may belong to another choice of the group: say which one to select.
        owners = [name for name in poly[group].table if key in key_table({group: name}, cls)]
        if owners:
          current = selected.get(group, _default_choice(poly[group]))
          raise ConfigError(f"{source}: {key} belongs to {group}={' or '.join(owners)}, but "
                            f"{group}={current}; set {group}={owners[0]} too")
      raise ConfigError(
          f"{source}: unknown key {key!r}{_did_you_mean(key, leaves)}\n"
          f"  (`python -m jrlhf.run --help` lists every key with its type and default)")
    typ, default = table[key]
    if key in poly:
      name = value.value if isinstance(value, chz.Castable) else value
      if name not in poly[key].table:
        raise ConfigError(f"{source}: {key}={name!r} is not one of: {', '.join(poly[key].table)}"
                          f"{_did_you_mean(str(name), poly[key].table)}")
    elif chz.is_chz(default):
      raise ConfigError(f"{source}: {key} is a group of keys, not a value; set its fields, e.g. "
                        f"{next(k for k in table if k.startswith(key + '.'))}=...")
    elif not _fits(value, typ):
      shown = value.value if isinstance(value, chz.Castable) else value
      hint = " (use true or false)" if typ is bool else ""
      raise ConfigError(f"{source}: {key}={shown!r} is not a valid {type_repr(typ)}{hint}; "
                        f"the default is {key}={_show(default)}")


def _fits(value: Any, typ: Any) -> bool:
  if not isinstance(value, chz.Castable):
    return is_subtype_instance(value, typ)
  cast = getattr(chz.tiepin, "_simplistic_try_cast", None)
  if cast is None:  # chz moved its caster: let Blueprint.make report the bad value instead.
    return True
  try:
    cast(value.value, typ)
    return True
  except CastError:
    return False


def _default_choice(factory: _Named) -> str:
  return next((n for n, c in factory.table.items() if c is factory.default), "?")


# ---------------------------------------------------------------------------------------------
# Experiments: a docstring (command, expected result, hardware) and a flat dict. Data, not code.


def experiment_path(name: str, root: Path = EXPERIMENTS_DIR) -> Path:
  """`tiny/sft` -> experiments/tiny/sft.py; a path to a .py file is taken as is."""
  if name.endswith(".py"):
    return Path(name)
  return root / f"{name}.py"


# experiments/ablations/ holds studies (`jrlhf.study`: STUDY dicts), not single runs.
STUDIES = "ablations"


def list_experiments(root: Path = EXPERIMENTS_DIR, studies: bool = False) -> list[str]:
  """Experiment names (`tiny/sft`), or with `studies=True` the study names (`ablations/peft`)."""
  names = (p.relative_to(root) for p in root.rglob("*.py") if not p.name.startswith("_"))
  return sorted(str(n.with_suffix("")) for n in names if (n.parts[0] == STUDIES) == studies)


def load_experiment(name: str, root: Path = EXPERIMENTS_DIR) -> tuple[str, dict[str, Any]]:
  """(docstring, CONFIG) of an experiment file. Loaded by path: it is data, not a dispatch."""
  path = experiment_path(name, root)
  if not path.is_file():
    raise ConfigError(
        f"experiment {name!r}: no file {path}{_did_you_mean(name, list_experiments(root))}\n"
        f"  available: {', '.join(list_experiments(root)) or '(none)'}")
  module = runpy.run_path(str(path))
  doc, config = module.get("__doc__"), module.get("CONFIG")
  if not doc or not doc.strip():
    raise ConfigError(f"{path}: an experiment opens with a docstring: the command that runs it, "
                      f"what it should show, and on what hardware")
  if not isinstance(config, dict):
    raise ConfigError(f"{path}: an experiment defines CONFIG = {{'dotted.key': value, ...}}")
  for key, value in config.items():
    if not isinstance(key, str) or key in NOT_IN_EXPERIMENT:
      raise ConfigError(f"{path}: key {key!r} cannot be set by an experiment")
    if not _is_data(value):
      raise ConfigError(f"{path}: {key}={value!r} is not plain data (str, number, bool, None, "
                        f"or a tuple of those)")
  return doc, config


def _is_data(value: Any) -> bool:
  if isinstance(value, (tuple, list)):
    return all(_is_data(v) for v in value)
  return value is None or isinstance(value, (str, int, float, bool))


# ---------------------------------------------------------------------------------------------
# Resolution: defaults < experiment < command line.


def _as_blueprint_value(value: Any) -> Any:
  # Strings in experiment files read like the command line (`"algorithm": "sft"`, `"3e-4"` is
  # not allowed to stay a string for a float): chz casts them by the field's type.
  if isinstance(value, str):
    return chz.Castable(value)
  if isinstance(value, list):
    return tuple(value)
  return value


def blueprint(experiment: str = "", overrides: Mapping[str, str] | None = None,
              *, cls: type = Config, root: Path = EXPERIMENTS_DIR) -> chz.Blueprint:
  """The layered blueprint, keys checked. Raises ConfigError."""
  overrides = dict(overrides or {})
  layers: list[tuple[str, dict[str, Any]]] = []
  if experiment:
    _, config = load_experiment(experiment, root)
    layers.append((f"experiment {experiment}",
                   {k: _as_blueprint_value(v) for k, v in config.items()}))
  layers.append(("command line", {k: chz.Castable(v) for k, v in overrides.items()}))
  selected: dict[str, str] = {}
  for _, values in layers:
    for group in _polymorphic(cls):
      if group in values:
        value = values[group]
        selected[group] = value.value if isinstance(value, chz.Castable) else str(value)
  bp = chz.Blueprint(cls)
  for source, values in layers:
    check_overrides(values, selected, source, cls)
    bp = bp.apply(values, layer_name=source)
  if experiment:
    bp = bp.apply({"experiment": experiment}, layer_name="experiment")
  return bp


def resolve(experiment: str = "", overrides: Mapping[str, str] | None = None,
            *, cls: type = Config, root: Path = EXPERIMENTS_DIR):
  """The Config for `experiment` with `overrides` (CLI strings) on top. Raises ConfigError."""
  bp = blueprint(experiment, overrides, cls=cls, root=root)
  try:
    return bp.make()
  except chz.blueprint.EntrypointHelpException:
    raise
  except (chz.blueprint.InvalidBlueprintArg, chz.blueprint.ExtraneousBlueprintArg,
          chz.blueprint.MissingBlueprintArg, chz.blueprint.ConstructionException) as e:
    raise ConfigError(str(e)) from None
  except (ValueError, TypeError) as e:
    # Validators (`@chz.validate`) raise ValueError with a message meant for the user.
    raise ConfigError(f"invalid config: {e}") from None


def parse_overrides(args: list[str]) -> dict[str, str]:
  """`["optim.lr=3e-4", "steps=10"]` -> {"optim.lr": "3e-4", "steps": "10"}; strict."""
  out: dict[str, str] = {}
  for arg in args:
    key, sep, value = arg.partition("=")
    if not sep or not key:
      raise ConfigError(f"argument {arg!r} is not key=value (e.g. optim.lr=3e-4)")
    if key in out:
      raise ConfigError(f"{key} is given twice ({key}={out[key]} and {arg}); give it once")
    out[key] = value
  return out


# ---------------------------------------------------------------------------------------------
# Serialising a resolved Config: flat dotted keys, the same form as the CLI and experiments.


def flatten(cfg: Any, cls: type = Config) -> dict[str, Any]:
  """{dotted key: value} of every leaf; polymorphic groups appear as their name."""
  out: dict[str, Any] = {}
  poly = _polymorphic(cls)

  def walk(obj, prefix):
    for field in chz.chz_fields(obj).values():
      key, value = prefix + field.logical_name, getattr(obj, field.logical_name)
      if chz.is_chz(value):
        if key in poly:
          out[key] = next(n for n, c in poly[key].table.items() if type(value) is c)
        walk(value, key + ".")
      else:
        out[key] = list(value) if isinstance(value, tuple) else value
  walk(cfg, "")
  return out


def write_config(cfg: Any, path: Path, cls: type = Config) -> None:
  path.write_text(json.dumps(flatten(cfg, cls), indent=1) + "\n")


def load_config(path: str | os.PathLike, cls: type = Config) -> Any:
  """Rebuild the Config a run wrote to its config.json (keys checked, values typed)."""
  flat = json.loads(Path(path).read_text())
  bp = chz.Blueprint(cls)
  values = {k: _as_blueprint_value(v) for k, v in flat.items()}
  check_overrides(values, {g: flat[g] for g in _polymorphic(cls) if g in flat}, str(path), cls)
  return bp.apply(values, layer_name=str(path)).make()


def describe(cfg: Any, cls: type = Config) -> str:
  """`key=value` lines: paste-able back onto the command line or into an experiment file."""
  return "\n".join(f"{k}={_show(v)}" for k, v in flatten(cfg, cls).items())


def _show(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return ",".join(map(str, value))
  return str(value)


# ---------------------------------------------------------------------------------------------
# Run names: a pure function of the command line, so every host of a pod agrees on it.


def run_name(experiment: str, overrides: Mapping[str, str]) -> str:
  """`tiny/sft` + {seed: 1, optim.lr: 3e-4} -> `tiny-sft,optim.lr=3e-4,seed=1`.

  Keys are sorted (argument order does not matter), values are kept as typed. Characters outside
  [A-Za-z0-9._=+-] become `-`; when that loses information, or the name is long, a hash of the
  full name is appended so that distinct commands never share a directory.
  """
  parts = [experiment.replace("/", "-") or "default"]
  parts += [f"{k}={overrides[k]}" for k in sorted(overrides) if k not in NOT_IN_NAME]
  full = ",".join(parts)
  safe = re.sub(r"[^A-Za-z0-9._=+,-]", "-", full).lstrip(".-") or "run"
  if safe != full or len(safe) > MAX_NAME:
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    safe = f"{safe[:MAX_NAME - 9]}-{digest}"
  return safe


def run_dir(cfg: Any, overrides: Mapping[str, str]) -> Path:
  """`Path`, or an `etils.epath.Path` when `cfg.run_dir` is a bucket URL (`gs://...`)."""
  if cfg.run_dir:
    return storage_path(cfg.run_dir)
  return Path(RUNS_DIR) / run_name(cfg.experiment, overrides)
