"""Reports on hand-made run dirs: tables, best/final, crashed runs, plots."""

import csv
import json

import pytest

from jrlhf import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, cfg=None, rows=None, tail=""):
  path = root / name
  path.mkdir(parents=True)
  if cfg is not None:
    base = {"experiment": "tiny/sft", "steps": 4, "seed": 0, "optim.lr": 1e-3,
            "data.buckets": [64, 128], "run_dir": None}
    (path / "config.json").write_text(json.dumps({**base, **cfg}))
  if rows is not None:
    lines = [json.dumps(r) for r in rows]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
  return path


def curve(loss0, acc0):
  rows = []
  for step in range(5):
    row = {"step": step, "loss": loss0 - 0.5 * step + (0.7 if step == 4 else 0), "lr": 1e-3}
    if step % 2 == 0:
      row["eval/exact_match"] = acc0 + 0.1 * step - (0.3 if step == 4 else 0)
    rows.append(row)
  return rows


@pytest.fixture
def runs(tmp_path):
  return [
      make_run(tmp_path, "a", {"optim.lr": 1e-3, "run_dir": "runs/a"}, curve(3.0, 0.1)),
      make_run(tmp_path, "b", {"optim.lr": 3e-4, "run_dir": "runs/b"}, curve(4.0, 0.0)),
      # Killed mid-write: two steps, then half a line.
      make_run(tmp_path, "c", {"optim.lr": 1e-2}, curve(5.0, 0.0)[:2], tail='{"step": 2, "lo'),
      make_run(tmp_path, "d"),  # crashed before writing anything
  ]


def read_csv(path):
  with open(path) as f:
    rows = list(csv.reader(f))
  return rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]


def test_direction_of_metrics():
  assert report.direction("loss") == "min" and report.direction("eval/loss") == "min"
  assert report.direction("eval/perplexity") == "min"
  assert report.direction("token_accuracy") == "max"
  assert report.direction("eval/exact_match") == "max"
  assert report.direction("lr") is None and report.direction("grad_norm") is None


def test_tables_have_expected_columns_and_rows(runs, tmp_path):
  out = report.report(runs, tmp_path / "out")
  header, rows = read_csv(out / "report.csv")
  assert header == ["run", "status", "optim.lr", "step", "final loss", "best loss (min)",
                    "final lr", "final eval/exact_match", "best eval/exact_match (max)"]
  assert [r["run"] for r in rows] == ["a", "b", "c", "d"]
  a = rows[0]
  assert a["status"] == "ok" and a["optim.lr"] == "0.001" and a["step"] == "4"
  assert float(a["final loss"]) == pytest.approx(3.0 - 2.0 + 0.7)
  assert float(a["best loss (min)"]) == pytest.approx(3.0 - 1.5)
  assert float(a["final eval/exact_match"]) == pytest.approx(0.1 + 0.4 - 0.3)
  assert float(a["best eval/exact_match (max)"]) == pytest.approx(0.1 + 0.2)
  assert "stopped at step 1 of 4" in rows[2]["status"]
  assert "1 unreadable metrics lines" in rows[2]["status"]
  assert "no config.json" in rows[3]["status"] and "no metrics.jsonl" in rows[3]["status"]
  assert rows[3]["final loss"] == "" and rows[3]["optim.lr"] == ""
  md = (out / "report.md").read_text()
  assert md.startswith("| run | status | optim.lr |") and md.count("\n| ") == 4  # one line per run
  assert "best = min for loss-like" in md and "](plots/loss.png)" in md


def test_plots_written_one_per_metric(runs, tmp_path):
  out = report.report(runs, tmp_path / "out")
  pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
  assert pngs == ["eval-exact_match.png", "loss.png", "lr.png"]
  for name in pngs:
    assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_single_run_reports_into_its_dir(runs):
  out = report.report(runs[:1])
  assert out == runs[0]
  assert (out / "report.md").exists() and (out / "plots" / "loss.png").exists()
  header, _ = read_csv(out / "report.csv")
  assert header[:3] == ["run", "status", "step"]  # nothing differs from itself


def test_cli(runs, tmp_path, capsys):
  assert report.main([str(p) for p in runs] + ["--out", str(tmp_path / "cli"), "--no-plots"]) == 0
  assert "| a | ok |" in capsys.readouterr().out
  assert not (tmp_path / "cli" / "plots").exists()
  assert report.main([str(tmp_path / "nope")]) == 2


def test_default_out_for_several_runs_is_beside_them(runs):
  out = report.default_out(runs[:2])
  assert out.parent == runs[0].parent.resolve() and out.name.startswith("report-")
