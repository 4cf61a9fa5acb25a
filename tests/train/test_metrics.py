"""metrics.jsonl rows, their TensorBoard mirror, process-0-only writes and bucket run dirs."""

import json

import jax

from jrlhf.distributed import storage_path
from jrlhf.train.metrics import MetricsWriter, read_jsonl, write_samples
from tests.fake_bucket import fake_bucket


def test_jsonl_and_tensorboard_get_every_scalar(tmp_path):
  writer = MetricsWriter(tmp_path, resume_step=0, tensorboard=True)
  writer.write(1, {"loss": 2.5, "eval/accuracy": 0.25})
  writer.write(2, {"loss": 1.5})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 2.5, "eval/accuracy": 0.25}, {"step": 2, "loss": 1.5}]
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1
  data = events[0].read_bytes()
  assert b"loss" in data and b"eval/accuracy" in data


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
  writer = MetricsWriter(tmp_path, resume_step=0)
  for step in (1, 2, 3):
    writer.write(step, {"loss": float(step)})
  writer.close()
  writer = MetricsWriter(tmp_path, resume_step=2)  # resumed from the step-2 checkpoint
  writer.write(3, {"loss": 30.0})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = MetricsWriter(tmp_path, resume_step=0)
  writer.write(1, {"loss": 1.0})
  writer.close()
  write_samples(tmp_path / "samples.jsonl", 1, [{"completion": "x"}])
  assert not list(tmp_path.iterdir())


def test_a_bucket_run_dir_keeps_its_url_and_never_appends(tmp_path):
  with fake_bucket(tmp_path):
    writer = MetricsWriter("gs://bkt/runs/a", resume_step=0)
    assert str(writer.path) == "gs://bkt/runs/a/metrics.jsonl"
    for step in (1, 2, 3):
      writer.write(step, {"loss": float(step)})
    writer.close()
    writer = MetricsWriter("gs://bkt/runs/a", resume_step=2)
    writer.write(3, {"loss": 30.0})
    writer.close()
    samples = storage_path("gs://bkt/runs/a") / "samples.jsonl"
    write_samples(samples, 3, [{"completion": "x"}])
    write_samples(samples, 4, [{"completion": "y"}])
  rows = read_jsonl(tmp_path / "bkt/runs/a/metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  assert [r["step"] for r in read_jsonl(tmp_path / "bkt/runs/a/samples.jsonl")] == [3, 4]
