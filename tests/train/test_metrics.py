"""metrics.jsonl rows and their TensorBoard mirror."""

import json

from jrlhf.train.metrics import MetricsWriter


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
