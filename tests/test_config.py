"""Config resolution: strict keys and values, precedence, experiment files, run names."""

import json

import chz
import pytest

from jrlhf import config
from jrlhf.algorithms.sft import SFTConfig
from jrlhf.config import Config, ConfigError, resolve
from jrlhf.train.config import OptimConfig

EXPERIMENTS = config.list_experiments()


def write_experiment(root, name, body, doc='"""python -m jrlhf.run experiment={name}\n\nx\n"""'):
  path = root / f"{name}.py"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(doc.format(name=name) + "\n" + body)
  return path


def test_defaults_resolve():
  cfg = resolve()
  assert isinstance(cfg, Config) and isinstance(cfg.algorithm, SFTConfig)
  assert cfg.run_dir is None and cfg.experiment == ""


def test_typo_in_key_suggests_the_key():
  with pytest.raises(ConfigError, match="unknown key 'optim.lrr'; did you mean optim.lr"):
    resolve("", {"optim.lrr": "1e-3"})


def test_bare_field_name_suggests_its_dotted_key():
  with pytest.raises(ConfigError, match="did you mean optim.lr"):
    resolve("", {"lr": "1e-3"})


@pytest.mark.parametrize("key,value,match", [
    ("steps", "abc", "steps='abc' is not a valid int"),
    ("steps", "1.5", "is not a valid int"),
    ("optim.lr", "fast", "is not a valid float"),
    ("train.resume", "yes", "use true or false"),
])
def test_wrong_type_fails(key, value, match):
  with pytest.raises(ConfigError, match=match):
    resolve("", {key: value})


def test_validator_errors_become_config_errors():
  with pytest.raises(ConfigError, match="optim.schedule"):
    resolve("", {"optim.schedule": "cos"})


def test_algorithm_is_chosen_by_name_from_the_table():
  assert isinstance(resolve("", {"algorithm": "sft"}).algorithm, SFTConfig)
  with pytest.raises(ConfigError, match=r"not one of: sft(, \w+)*; did you mean sft"):
    resolve("", {"algorithm": "sfx"})


def test_group_is_not_a_value():
  with pytest.raises(ConfigError, match="model is a group of keys"):
    resolve("", {"model": "llama"})


def test_values_parsed_by_type():
  cfg = resolve("", {"train.resume": "false", "optim.lr": "3e-4", "steps": "7",
                     "init_from": "None", "model.sliding_window": "None", "seed": "3"})
  assert cfg.train.resume is False and cfg.optim.lr == 3e-4 and cfg.steps == 7
  assert cfg.init_from is None and cfg.model.sliding_window is None and cfg.seed == 3
  assert resolve("", {"init_from": "some/model"}).init_from == "some/model"


def test_duplicate_or_malformed_arguments_fail():
  with pytest.raises(ConfigError, match="given twice"):
    config.parse_overrides(["steps=1", "steps=2"])
  with pytest.raises(ConfigError, match="not key=value"):
    config.parse_overrides(["steps"])


def test_precedence_defaults_experiment_cli(tmp_path):
  write_experiment(tmp_path, "a/b", 'CONFIG = {"steps": 5, "optim.lr": 1e-3, "seed": 2}')
  cfg = resolve("a/b", {"steps": "9"}, root=tmp_path)
  assert (cfg.steps, cfg.optim.lr, cfg.seed, cfg.experiment) == (9, 1e-3, 2, "a/b")
  assert cfg.optim.warmup_steps == OptimConfig().warmup_steps


def test_experiment_errors_are_actionable(tmp_path):
  write_experiment(tmp_path, "typo", 'CONFIG = {"optim.lrr": 1e-3}')
  with pytest.raises(ConfigError, match="experiment typo: unknown key.*optim.lr"):
    resolve("typo", root=tmp_path)
  write_experiment(tmp_path, "badtype", 'CONFIG = {"steps": "many"}')
  with pytest.raises(ConfigError, match="steps='many' is not a valid int"):
    resolve("badtype", root=tmp_path)
  write_experiment(tmp_path, "logic", 'CONFIG = {"steps": object()}')
  with pytest.raises(ConfigError, match="not plain data"):
    resolve("logic", root=tmp_path)
  write_experiment(tmp_path, "nodoc", 'CONFIG = {}', doc="")
  with pytest.raises(ConfigError, match="docstring"):
    resolve("nodoc", root=tmp_path)
  with pytest.raises(ConfigError, match="did you mean typo"):
    resolve("typ", root=tmp_path)


def test_experiment_cannot_name_itself(tmp_path):
  write_experiment(tmp_path, "x", 'CONFIG = {"experiment": "y"}')
  with pytest.raises(ConfigError, match="cannot be set by an experiment"):
    resolve("x", root=tmp_path)


def test_there_are_experiments():
  assert "tiny/sft" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_loads_and_resolves(name):
  doc, values = config.load_experiment(name)
  first = doc.strip().splitlines()[0]
  assert first.startswith(f"python -m jrlhf.run experiment={name}"), (
      f"experiments/{name}.py: the docstring must open with the command that runs it")
  assert "hardware" in doc.lower(), f"experiments/{name}.py: say on what hardware it runs"
  cfg = resolve(name)
  flat = config.flatten(cfg)
  for key, value in values.items():
    expected = list(value) if isinstance(value, tuple) else value
    assert flat[key] == expected, key


def test_config_json_round_trip(tmp_path):
  cfg = resolve("", {"optim.lr": "3e-4", "model.num_layers": "3", "data.packing": "true"})
  config.write_config(cfg, tmp_path / "config.json")
  flat = json.loads((tmp_path / "config.json").read_text())
  assert flat["optim.lr"] == 3e-4 and flat["algorithm"] == "sft" and flat["peft"] == "none"
  chosen_by_name = ("algorithm", "peft")
  table = config.key_table()
  # An optional group left unset (rollout_mesh=None) is one key; its fields appear once set.
  unset = tuple(k + "." for k, (t, v) in table.items() if v is None and config.optional_group(t))
  assert set(flat) == set(table) - {
      k for k, (_, v) in table.items()
      if (chz.is_chz(v) and k not in chosen_by_name) or k.startswith(unset)}
  assert config.load_config(tmp_path / "config.json") == cfg

  lora = resolve("", {"peft": "qlora", "peft.rank": "4", "peft.targets": "attn/q/,attn/v/",
                      "peft.rank_pattern": "attn/v/:8"})
  assert lora.peft.spec().targets == ("attn/q/", "attn/v/")
  assert lora.peft.spec().rank_pattern == {"attn/v/": 8}
  config.write_config(lora, tmp_path / "lora.json")
  assert config.load_config(tmp_path / "lora.json") == lora


@pytest.mark.parametrize("overrides, message", [
    ({"peft": "lora", "peft.rank_pattern": "mlp"}, "REGEX:VALUE"),
    ({"peft": "lora", "peft.dropout": "1.5"}, "dropout"),
    ({"peft": "adapter", "peft.kind": "serial"}, "houlsby"),
    ({"peft": "prompt", "peft.init": "text"}, "init_text"),
    ({"peft": "prefix", "peft.zero_init": "true", "train.export": "true"}, "cannot be exported"),
    ({"peft": "adapter", "train.export": "true"}, "cannot be exported"),
    ({"peft": "lora", "peft.rnak": "4"}, "rank"),
])
def test_bad_peft_settings_say_what_to_change(overrides, message):
  with pytest.raises(config.ConfigError, match=message):
    resolve("", overrides)


def test_describe_lines_are_valid_overrides():
  cfg = resolve("", {"steps": "11"})
  lines = config.describe(cfg).splitlines()
  overrides = dict(line.split("=", 1) for line in lines)
  overrides.pop("experiment")
  assert resolve("", overrides) == cfg


def test_run_name_is_deterministic_and_order_free():
  a = config.run_name("tiny/sft", {"seed": "1", "optim.lr": "3e-4"})
  b = config.run_name("tiny/sft", {"optim.lr": "3e-4", "seed": "1"})
  assert a == b == "tiny-sft,optim.lr=3e-4,seed=1"
  assert config.run_name("tiny/sft", {}) == "tiny-sft"
  assert config.run_name("", {}) == "default"


def test_run_name_distinct_across_overrides():
  names = {config.run_name("tiny/sft", o) for o in [
      {}, {"seed": "1"}, {"seed": "2"}, {"optim.lr": "1e-3"}, {"optim.lr": "1e-3", "seed": "1"},
      {"data.source": "/a/b.jsonl"}, {"data.source": "/a-b.jsonl"}]}
  assert len(names) == 7
  assert config.run_name("other", {"seed": "1"}) != config.run_name("tiny/sft", {"seed": "1"})


def test_run_name_ignores_where_keys_and_is_sanitised():
  assert config.run_name("x", {"run_dir": "/tmp/a", "print_config": "true"}) == "x"
  name = config.run_name("x", {"data.source": "/data/my file.jsonl"})
  assert "/" not in name and " " not in name and name.startswith("x,data.source=")
  long = config.run_name("x", {f"model.k{i}": "1" * 20 for i in range(10)})
  assert len(long) <= config.MAX_NAME
  assert long != config.run_name("x", {f"model.k{i}": "1" * 20 for i in range(11)})


def test_run_dir_default_and_explicit():
  cfg = resolve("", {"seed": "1"})
  assert str(config.run_dir(cfg, {"seed": "1"})) == "runs/default,seed=1"
  cfg = resolve("", {"run_dir": "/tmp/x"})
  assert str(config.run_dir(cfg, {"run_dir": "/tmp/x"})) == "/tmp/x"
