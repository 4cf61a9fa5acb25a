"""Reports on hand-made run dirs: tables, best/final, crashed runs, plots, policy_eval.json,
mean ± std over seeds, frontier (x-vs-y) plots and tables."""

import csv
import json
import math

import pytest

from jrlhf import report, report_aggregate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, cfg=None, rows=None, tail="", policy_eval=None):
  path = root / name
  path.mkdir(parents=True)
  if cfg is not None:
    base = {"experiment": "tiny/sft", "steps": 4, "seed": 0, "optim.lr": 1e-3,
            "data.buckets": [64, 128], "run_dir": None}
    (path / "config.json").write_text(json.dumps({**base, **cfg}))
  if rows is not None:
    lines = [json.dumps(r) for r in rows]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
  if policy_eval is not None:
    text = policy_eval if isinstance(policy_eval, str) else json.dumps(policy_eval)
    (path / "policy_eval.json").write_text(text)
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
  assert not (out / "runs.csv").exists()  # one seed everywhere: no aggregation


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


# ---------------------------------------------------------------------------------------------
# policy_eval.json, seeds, frontiers.


def policy_run(root, algo, key, value, seed, loss0, reward=None, kl=None, *, crashed=False,
               skip_step=None):
  """A run whose loss falls by 0.5 a step to step 3 then rises by 0.5 (final = loss0 - 1, best =
  loss0 - 1.5), with policy_eval.json at step 4; a crashed one stops at step 1 without it."""
  rows = [{"step": s, "loss": loss0 - 0.5 * s + (1.0 if s == 4 else 0.0), "lr": 1e-3}
          for s in range(2 if crashed else 5) if s != skip_step]
  cfg = {"experiment": f"tiny/{algo}", "algorithm": algo, key: value, "seed": seed}
  evaluated = None if crashed else {
      "step": 4, "metrics": {"policy/reward": reward, "policy/kl": kl, "policy/kl_stderr": 0.1,
                             "policy/accuracy": reward / 2, "policy/name": "not a number"}}
  return make_run(root, f"{algo},{key}={value},seed={seed}", cfg, rows, policy_eval=evaluated)


@pytest.fixture
def seeded(tmp_path):
  """2 DPO configurations x 3 seeds; seed 2 of beta=0.3 crashed (with an absurd loss)."""
  return [
      policy_run(tmp_path, "dpo", "algorithm.beta", 0.1, 0, 3.0, 0.70, 2.0),
      policy_run(tmp_path, "dpo", "algorithm.beta", 0.1, 1, 3.2, 0.72, 2.5),
      policy_run(tmp_path, "dpo", "algorithm.beta", 0.1, 2, 3.4, 0.74, 3.0, skip_step=1),
      policy_run(tmp_path, "dpo", "algorithm.beta", 0.3, 0, 3.0, 0.60, 1.0),
      policy_run(tmp_path, "dpo", "algorithm.beta", 0.3, 1, 3.6, 0.64, 1.2),
      policy_run(tmp_path, "dpo", "algorithm.beta", 0.3, 2, 100.0, crashed=True),
  ]


@pytest.fixture
def grpo(tmp_path):
  """2 GRPO configurations x 2 seeds (the second without spread in its policy metrics)."""
  return [
      policy_run(tmp_path, "grpo", "algorithm.kl_coef", 0.05, 0, 2.0, 0.80, 4.0),
      policy_run(tmp_path, "grpo", "algorithm.kl_coef", 0.05, 1, 2.0, 0.82, 4.4),
      policy_run(tmp_path, "grpo", "algorithm.kl_coef", 0.2, 0, 2.0, 0.75, 3.0),
      policy_run(tmp_path, "grpo", "algorithm.kl_coef", 0.2, 1, 2.0, 0.75, 3.0),
  ]


def mean_std(values):
  mean = sum(values) / len(values)
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_policy_eval_metrics_are_the_last_logged_step(seeded, tmp_path):
  run = report.load_run(seeded[0])
  assert run.status == "ok" and run.last_step == 4
  assert run.curve("policy/kl") == ([4], [2.0])
  assert run.final("policy/reward") == 0.70 and run.best("policy/reward") == 0.70
  out = report.report(seeded[:1], tmp_path / "one")
  header, rows = read_csv(out / "report.csv")
  assert header == ["run", "status", "step", "final loss", "best loss (min)", "final lr",
                    "final policy/reward", "best policy/reward (max)", "final policy/kl",
                    "final policy/kl_stderr", "final policy/accuracy",
                    "best policy/accuracy (max)"]
  assert float(rows[0]["final policy/kl"]) == 2.0
  assert float(rows[0]["best policy/accuracy (max)"]) == 0.35
  assert (out / "plots" / "policy-reward.png").read_bytes()[:8] == PNG_MAGIC


def test_policy_eval_before_the_last_step_keeps_curves_in_order(tmp_path):
  rows = [{"step": s, "policy/reward": 0.1 * s} for s in range(5)]
  path = make_run(tmp_path, "r", {}, rows, policy_eval={"step": 2, "metrics": {"policy/reward": 9}})
  xs, ys = report.load_run(path).curve("policy/reward")
  assert xs == [0, 1, 2, 2, 3, 4] and ys[3] == 9.0 and ys[-1] == pytest.approx(0.4)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"step": "4", "metrics": {}}',
                                  '{"step": 4, "metrics": [1]}'])
def test_malformed_policy_eval_is_a_status_note(tmp_path, text):
  path = make_run(tmp_path, "r", {}, curve(3.0, 0.1), policy_eval=text)
  run = report.load_run(path)
  assert "bad policy_eval.json" in run.status and run.final("loss") == pytest.approx(1.7)
  header, rows = read_csv(report.report([path], tmp_path / "out", False) / "report.csv")
  assert "bad policy_eval.json" in rows[0]["status"]


def test_seeds_aggregate_to_mean_and_std_per_configuration(seeded, tmp_path):
  out = report.report(seeded, tmp_path / "out", with_plots=False)
  header, rows = read_csv(out / "report.csv")
  stats = [f"{c} {s}" for c in ["final loss", "best loss (min)", "final lr",
                                "final policy/reward", "best policy/reward (max)",
                                "final policy/kl", "final policy/kl_stderr",
                                "final policy/accuracy", "best policy/accuracy (max)"]
           for s in ("mean", "std")]
  assert header == ["algorithm.beta", "seeds", "status", *stats]
  low, high = rows
  assert low["algorithm.beta"] == "0.1" and low["seeds"] == "3" and low["status"] == "ok"
  for column, values in [("final loss", [2.0, 2.2, 2.4]), ("best loss (min)", [1.5, 1.7, 1.9]),
                         ("final policy/reward", [0.70, 0.72, 0.74]),
                         ("final policy/kl", [2.0, 2.5, 3.0])]:
    mean, std = mean_std(values)
    assert float(low[f"{column} mean"]) == pytest.approx(mean)
    assert float(low[f"{column} std"]) == pytest.approx(std)
  assert float(low["final policy/kl std"]) == pytest.approx(0.5)  # the hand sum, spelled out
  # The crashed seed (final loss 99.5) is named, counted out and not averaged.
  assert high["seeds"] == "2"
  assert high["status"].startswith("2 of 3 ok; left out: dpo,algorithm.beta=0.3,seed=2 (stopped")
  mean, std = mean_std([2.0, 2.6])
  assert float(high["final loss mean"]) == pytest.approx(mean) == pytest.approx(2.3)
  assert float(high["final loss std"]) == pytest.approx(std)
  assert float(high["final policy/reward mean"]) == pytest.approx(0.62)
  assert float(high["final lr std"]) == 0.0
  # Nothing is lost: every run keeps its row.
  run_header, run_rows = read_csv(out / "runs.csv")
  assert run_header[:4] == ["run", "status", "seed", "algorithm.beta"] and len(run_rows) == 6
  assert float(run_rows[5]["final loss"]) == 99.5
  md = (out / "report.md").read_text()
  assert "| algorithm.beta | seeds | status | final loss |" in md
  assert "| 0.1 | 3 | ok | 2.2 ± 0.2 | 1.7 ± 0.2 |" in md
  assert "## Runs" in md and "| dpo,algorithm.beta=0.3,seed=2 |" in md
  assert "sample standard deviation" in md


def test_one_seed_has_no_std_and_a_missing_metric_shows_its_n(tmp_path):
  runs = [policy_run(tmp_path, "dpo", "algorithm.beta", 0.1, 0, 3.0, 0.7, 2.0),
          policy_run(tmp_path, "dpo", "algorithm.beta", 0.3, 1, 3.0, 0.6, 1.0),
          policy_run(tmp_path, "dpo", "algorithm.beta", 0.3, 2, 3.0, 0.6, 1.0)]
  (runs[2] / "policy_eval.json").unlink()
  out = report.report(runs, tmp_path / "out", with_plots=False)
  _, rows = read_csv(out / "report.csv")
  assert rows[0]["seeds"] == "1" and rows[0]["final loss std"] == ""
  assert float(rows[0]["final loss mean"]) == 2.0
  assert rows[1]["final policy/kl std"] == "" and float(rows[1]["final policy/kl mean"]) == 1.0
  md = (out / "report.md").read_text()
  assert "| 0.1 | 1 | ok | 2 | 1.5 |" in md and "| 1 (n=1) |" in md


def test_aggregated_plots_are_the_mean_over_seeds_with_a_band(seeded, tmp_path, monkeypatch):
  keys, groups = report_aggregate.by_configuration([report.load_run(p) for p in seeded])
  assert keys == ["algorithm.beta"] and [len(g.runs) for g in groups] == [3, 3]
  line = groups[0].curve("loss")
  assert line.xs == [0, 2, 3, 4]  # seed 2 skipped step 1: only steps every seed logged
  assert line.ys[0] == pytest.approx(3.2) and line.std[0] == pytest.approx(0.2)
  assert line.label == "algorithm.beta=0.1 (n=3)"
  crashed = groups[1].curve("loss")
  assert crashed.ys == pytest.approx([3.3, 2.8, 2.3, 1.8, 2.3])  # the two ok seeds only
  assert crashed.label == "algorithm.beta=0.3 (2 of 3 seeds)"
  figures = {}

  def keep(fig, path):
    ax = fig.axes[0]
    figures[path.name] = ([ln.get_label() for ln in ax.lines], len(ax.collections))
    return save(fig, path)

  save = report_aggregate.save
  monkeypatch.setattr(report_aggregate, "save", keep)
  monkeypatch.setattr(report, "save", keep)
  out = report.report(seeded, tmp_path / "out")
  assert figures["loss.png"] == (["algorithm.beta=0.1 (n=3)",
                                  "algorithm.beta=0.3 (2 of 3 seeds)"], 2)  # two ± std bands
  assert (out / "plots" / "loss.png").read_bytes()[:8] == PNG_MAGIC
  assert "](plots/policy-reward.png)" in (out / "report.md").read_text()


def test_no_aggregate_keeps_one_row_per_run(seeded, tmp_path, capsys):
  out = report.report(seeded, tmp_path / "py", False, aggregate=False)
  header, rows = read_csv(out / "report.csv")
  assert header[:5] == ["run", "status", "seed", "algorithm.beta", "step"] and len(rows) == 6
  assert not (out / "runs.csv").exists()
  assert report.main([str(p) for p in seeded] + ["--out", str(tmp_path / "cli"),
                                                 "--no-aggregate", "--no-plots"]) == 0
  assert (tmp_path / "cli" / "report.csv").read_text() == (out / "report.csv").read_text()
  assert "## Runs" not in capsys.readouterr().out


def test_frontier_table_and_plot(seeded, grpo, tmp_path, monkeypatch):
  texts = {}

  def keep(fig, path):
    ax = fig.axes[0]
    texts[path.name] = (sorted(t.get_text() for t in ax.texts),
                        [t.get_text() for t in ax.get_legend().get_texts()])
    return save(fig, path)

  save = report_aggregate.save
  monkeypatch.setattr(report_aggregate, "save", keep)
  out = report.report(seeded + grpo, tmp_path / "out", xy="policy/kl,policy/reward",
                      series="algorithm")
  header, rows = read_csv(out / "frontier.csv")
  assert header == ["series", "experiment", "algorithm.beta", "algorithm.kl_coef",
                    "policy/kl mean", "policy/kl std", "policy/reward mean",
                    "policy/reward std", "seeds", "status"]
  got = [(r["series"], r["algorithm.beta"], r["algorithm.kl_coef"], r["seeds"]) for r in rows]
  assert got == [("dpo", "0.3", "", "2"), ("dpo", "0.1", "", "3"),  # by series, then by x
                 ("grpo", "", "0.2", "2"), ("grpo", "", "0.05", "2")]
  kl_mean, kl_std = mean_std([4.0, 4.4])
  assert float(rows[3]["policy/kl mean"]) == pytest.approx(kl_mean)
  assert float(rows[3]["policy/kl std"]) == pytest.approx(kl_std)
  assert float(rows[1]["policy/reward std"]) == pytest.approx(0.02)
  assert float(rows[2]["policy/reward std"]) == 0.0
  assert rows[0]["status"].startswith("2 of 3 ok")
  assert (out / "plots" / "policy-reward-vs-policy-kl.png").read_bytes()[:8] == PNG_MAGIC
  labels, legend = texts["policy-reward-vs-policy-kl.png"]
  assert labels == ["beta=0.1", "beta=0.3 (2 of 3 seeds)", "kl_coef=0.05", "kl_coef=0.2"]
  assert legend == ["dpo", "grpo"]
  md = (out / "frontier.md").read_text()
  assert md.startswith("| series | experiment |") and md.count("\n| ") == 4
  assert "| 2.5 ± 0.5 | 0.72 ± 0.02 | 3 | ok |" in md
  assert "](plots/policy-reward-vs-policy-kl.png)" in (out / "report.md").read_text()


def test_frontier_cli_takes_several_xy(seeded, tmp_path):
  args = [str(p) for p in seeded] + ["--out", str(tmp_path / "cli"), "--xy",
                                     "policy/kl,policy/reward", "--xy", "policy/kl,policy/accuracy"]
  assert report.main(args) == 0
  assert sorted(p.name for p in (tmp_path / "cli" / "plots").glob("*-vs-*")) == [
      "policy-accuracy-vs-policy-kl.png", "policy-reward-vs-policy-kl.png"]
  header, rows = read_csv(tmp_path / "cli" / "frontier.csv")
  assert header[:2] == ["series", "algorithm.beta"] and header[-2:] == ["seeds", "status"]
  assert [h for h in header if h.endswith(" mean")] == [
      "policy/kl mean", "policy/reward mean", "policy/accuracy mean"]
  assert [r["series"] for r in rows] == ["all", "all"]


def test_frontier_without_seeds_has_a_point_per_run(seeded, tmp_path):
  out = report.report(seeded[:3], tmp_path / "out", xy=[("policy/kl", "policy/reward")],
                      aggregate=False)
  header, rows = read_csv(out / "frontier.csv")
  assert header[:2] == ["series", "seed"] and [r["seed"] for r in rows] == ["0", "1", "2"]
  assert all(r["policy/kl std"] == "" and r["seeds"] == "1" for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--xy", "policy/kl"], "give two metric names"),
    (["--xy", "policy/kl,policy/rewrd"], "did you mean policy/reward"),
    (["--xy", "policy/kl,policy/reward", "--series", "algorithmm"], "did you mean algorithm"),
])
def test_bad_frontier_arguments_exit_2_with_a_hint(seeded, tmp_path, capsys, args, message):
  out = tmp_path / "cli"
  assert report.main([str(p) for p in seeded] + ["--out", str(out), *args]) == 2
  assert message in capsys.readouterr().err
  assert not out.exists()  # checked before anything is written


def test_xy_forms_and_series_without_xy(seeded, tmp_path, capsys):
  pair = ("policy/kl", "policy/reward")
  for xy in ["policy/kl,policy/reward", pair, list(pair), [pair], ["policy/kl, policy/reward"]]:
    assert report_aggregate.parse_xy(xy) == [pair]
  with pytest.raises(report.ReportError, match="give two metric names"):
    report_aggregate.parse_xy(["a", "b", "c"])
  args = [str(p) for p in seeded] + ["--out", str(tmp_path / "cli"), "--no-plots"]
  assert report.main(args + ["--series", "algorithm"]) == 0
  assert "only names the series of --xy" in capsys.readouterr().err
  assert not (tmp_path / "cli" / "frontier.csv").exists()


def test_plan_json_and_a_metrics_filter_make_the_peft_table(tmp_path):
  paths = []
  for name, trainable, gib in (("full", 1e6, 0.5), ("lora", 2e4, 0.1)):
    path = make_run(tmp_path, name, {"peft": name}, curve(3.0, 0.1))
    (path / "plan.json").write_text(json.dumps(
        {"step": 4, "metrics": {"params/trainable": trainable, "memory/train_step_gib": gib}}))
    paths.append(path)
  out = report.report(paths, tmp_path / "out", metrics="eval/exact_match,params/*,memory/*")
  header, rows = read_csv(out / "report.csv")
  assert header == ["run", "status", "peft", "step", "final eval/exact_match",
                    "best eval/exact_match (max)", "final params/trainable",
                    "final memory/train_step_gib"]
  assert [float(r["final params/trainable"]) for r in rows] == [1e6, 2e4]
  assert sorted(p.name for p in (out / "plots").iterdir()) == [
      "eval-exact_match.png", "memory-train_step_gib.png", "params-trainable.png"]
  with pytest.raises(report.ReportError, match="no metrics left"):
    report.report(paths, tmp_path / "none", metrics="nothing/*")


def test_keys_choose_the_config_columns_and_runs_are_named_by_path(tmp_path):
  paths = [make_run(tmp_path / arm, "run", {"peft": arm, "optim.lr": lr}, curve(3.0, 0.1))
           for arm, lr in (("lora", 1e-3), ("prompt", 3e-2))]
  out = report.report(paths, tmp_path / "out", keys="peft")
  header, rows = read_csv(out / "report.csv")
  assert header[:4] == ["run", "status", "peft", "step"]
  assert [r["run"] for r in rows] == ["lora/run", "prompt/run"]
  same = make_run(tmp_path / "lora2", "run", {"peft": "lora", "optim.lr": 5e-4}, curve(3.0, 0.1))
  with pytest.raises(report.ReportError, match="add the keys that tell them apart"):
    report.report([*paths, same], tmp_path / "bad", keys="peft")


def test_single_seed_error_bars_are_the_measurements_stderr(tmp_path):
  runs = [report.load_run(policy_run(tmp_path, "dpo", "algorithm.beta", b, 0, 3.0, 0.7, kl))
          for b, kl in ((0.1, 2.0), (0.3, 1.0))]
  _, groups = report_aggregate.one_per_run(runs)
  stats = [g.stat(report_aggregate._final("policy/kl")) for g in groups]
  assert report_aggregate._errors(stats, groups, "policy/kl") == [0.1, 0.1]  # policy/kl_stderr
  rewards = [g.stat(report_aggregate._final("policy/reward")) for g in groups]
  assert report_aggregate._errors(rewards, groups, "policy/reward") is None  # none logged
