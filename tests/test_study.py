"""Studies: every study file resolves (full and reduced), the reduced/seed rules, resuming, and
the reduced frontier end to end through the CLI (slow)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from jrlhf import config, study

STUDIES = config.list_experiments(studies=True)


def test_there_are_studies_and_they_are_not_experiments():
  assert {"ablations/frontier", "ablations/peft"} <= set(STUDIES)
  assert not set(STUDIES) & set(config.list_experiments())


@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("name", STUDIES)
def test_every_study_resolves(name, reduced):
  doc, _ = study.load_study(name)
  assert doc.strip().splitlines()[0].startswith(f"python -m jrlhf.study {name}")
  assert "hardware" in doc.lower()
  _, root, _, points = study.plan_study(name, reduced=reduced)
  assert points and len({p.run_dir for p in points}) == len(points)
  assert all(p.run_dir.parent.parent == root for p in points)


def test_frontier_arms_start_from_the_start_and_export():
  _, root, start, points = study.plan_study("ablations/frontier")
  assert start is not None and start.export
  assert {p.arm for p in points} == {"dpo", "ppo", "grpo"}
  for p in points:
    assert p.overrides["init_from"] == str((root / "start" / "export").absolute())
    assert p.export  # policy_eval reads the export


def test_seeds_multiply_points_and_name_runs():
  _, _, _, one = study.plan_study("ablations/frontier", reduced=True)
  _, _, _, three = study.plan_study("ablations/frontier", reduced=True, seeds=3)
  assert len(three) == 3 * len(one)
  assert sorted(p.run_dir.name for p in three if p.arm == "dpo") == ["seed=0", "seed=1", "seed=2"]


def test_reduced_replaces_values_and_drops_arms():
  raw = {"arms": {"a": {"steps": 100, "x": "1,2"}, "b": {"steps": 50}},
         "common": {"k": 1}, "seeds": 2,
         "reduced": {"arms": {"a": {"steps": 3}}, "drop": ["b"], "common": {"k": 2}, "seeds": 1}}
  out = study.resolve_study(raw, reduced=True, seeds=None)
  assert out["arms"] == {"a": {"steps": 3, "x": "1,2"}} and out["common"] == {"k": 2}
  assert out["seeds"] == 1
  assert study.resolve_study(raw, reduced=False, seeds=None)["arms"]["b"] == {"steps": 50}
  with pytest.raises(study.StudyError, match="not arms"):
    study.resolve_study({**raw, "reduced": {"drop": ["c"]}}, reduced=True, seeds=None)


def test_only_selects_arms():
  _, _, _, points = study.plan_study("ablations/frontier", only=["dpo"])
  assert {p.arm for p in points} == {"dpo"}
  with pytest.raises(study.StudyError, match="not arms"):
    study.plan_study("ablations/frontier", only=["dpo", "sft"])


def test_cli_values():
  assert study.cli_value(True) == "true" and study.cli_value(None) == "None"
  assert study.cli_value(("sigmoid", "sft")) == "[sigmoid,sft]" and study.cli_value(3e-4) == "0.0003"


def test_finished_needs_the_last_step_and_the_export(tmp_path):
  point = study.Point("a", {}, tmp_path, steps=4, export=True)
  assert not study.finished(point)
  (tmp_path / "metrics.jsonl").write_text('{"step": 2}\n{"step": 4}\n')
  assert not study.finished(point)  # no export yet
  (tmp_path / "export").mkdir()
  (tmp_path / "export" / "config.json").write_text("{}")
  assert study.finished(point)
  assert not study.finished(study.Point("a", {}, tmp_path, steps=5, export=False))


def test_unknown_study_keys_and_missing_files_say_what_to_change(tmp_path, monkeypatch):
  path = tmp_path / "bad.py"
  path.write_text('"""python -m jrlhf.study bad\nHardware: none."""\nSTUDY = {"arms": {"a": {}}, '
                  '"seed": 3}\n')
  with pytest.raises(study.StudyError, match="unknown STUDY keys.*'seed'"):
    study.load_study(str(path))
  with pytest.raises(study.StudyError, match="no file"):
    study.load_study("ablations/nope")


@pytest.mark.slow
def test_reduced_frontier_writes_its_table_and_plot(tmp_path):
  env = dict(os.environ, TQDM_DISABLE="1", XLA_FLAGS="")  # one device, as tests/test_tiny_sft.py
  proc = subprocess.run([sys.executable, "-m", "jrlhf.study", "ablations/frontier", "--reduced"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  root = tmp_path / "runs" / "ablations-frontier-reduced"
  for arm in ("dpo", "grpo"):
    evaluated = json.loads((root / arm / "run" / "policy_eval.json").read_text())
    assert {"policy/reward", "policy/kl", "policy/accuracy"} <= set(evaluated["metrics"])
  with open(root / "report" / "frontier.csv") as f:
    rows = list(csv.DictReader(f))
  assert {r["series"] for r in rows} == {"sft", "dpo", "grpo"}  # the start is the origin
  assert [float(r["policy/kl mean"]) for r in rows if r["series"] == "sft"] == [0.0]
  assert {"policy/kl mean", "policy/reward mean", "seeds"} <= set(rows[0])
  assert all(float(r["policy/kl mean"]) >= -0.5 for r in rows)  # a KL estimate, near >= 0
  assert (root / "report" / "plots" / "policy-reward-vs-policy-kl.png").stat().st_size > 1000
  assert "policy/reward" in (root / "report" / "report.md").read_text()
