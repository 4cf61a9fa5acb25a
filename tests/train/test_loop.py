"""The loop end to end on the embedded task: exact resume, signals, NaN, one compile, export."""

import json
import os
import pathlib
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jrlhf.config import Config
from jrlhf.data import DataConfig
from jrlhf.models import ModelConfig, from_pretrained
from jrlhf.train import loop
from jrlhf.train.config import OptimConfig, TrainConfig

TINY_MODEL = ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, mlp_dim=64, max_position_embeddings=128)
TINY_DATA = DataConfig(num_train_examples=256, num_eval_examples=16, batch_size=8,
                       max_length=64, min_bucket=64)


def config(**train_kwargs):
  steps = train_kwargs.pop("steps", 6)
  optim = train_kwargs.pop("optim", OptimConfig(lr=3e-3, warmup_steps=2))
  train = dict(log_every=1, eval_every=3, checkpoint_every=2, num_samples=4, max_new_tokens=6,
               progress=False, async_checkpoints=True)
  train.update(train_kwargs)
  return Config(model=TINY_MODEL, data=TINY_DATA, optim=optim, train=TrainConfig(**train),
                steps=steps, seed=0)


def deterministic(rows):
  return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def read(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def final_params(run_dir, step):
  restored = ocp.StandardCheckpointer().restore(
      pathlib.Path(run_dir).absolute() / "checkpoints" / str(step) / "state")
  return restored["trainable"], restored["opt_state"]


def stop_at(data: loop.RunData, micro_index: int) -> loop.RunData:
  """SIGTERM arrives while the host prepares micro-batch `micro_index` (a preemption)."""
  get = data.micro_batch

  def micro_batch(i):
    if i == micro_index:
      os.kill(os.getpid(), signal.SIGTERM)
    return get(i)

  data.micro_batch = micro_batch
  return data


def test_resume_is_exact_and_the_step_compiles_once(tmp_path):
  cfg = config(export=True)
  whole = loop.train(cfg, tmp_path / "whole")
  assert whole["compiles"] == 1
  assert whole["step"] == 6 and "eval/accuracy" in whole and "eval/perplexity" in whole

  # The same run stopped by SIGTERM after step 3, then the same command again.
  with pytest.raises(SystemExit) as stopped:
    loop.run(cfg, tmp_path / "split", stop_at(loop.load_run_data(cfg), 2))
  assert stopped.value.code == 128 + signal.SIGTERM
  assert (tmp_path / "split" / "checkpoints" / "3").is_dir()
  assert [r["step"] for r in read(tmp_path / "split" / "metrics.jsonl")] == [1, 2, 3]
  resumed = loop.train(cfg, tmp_path / "split")
  assert resumed["step"] == 6

  logged = read(tmp_path / "whole" / "metrics.jsonl")
  assert all(r["perf/step_time_s"] > 0 and r["perf/tokens_per_sec"] > 0 for r in logged)
  rows = deterministic(logged)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert deterministic(read(tmp_path / "split" / "metrics.jsonl")) == rows
  assert read(tmp_path / "split" / "samples.jsonl") == read(tmp_path / "whole" / "samples.jsonl")
  whole_params, whole_opt = final_params(tmp_path / "whole", 6)
  split_params, split_opt = final_params(tmp_path / "split", 6)
  for a, b in zip(jax.tree.leaves((whole_params, whole_opt)),
                  jax.tree.leaves((split_params, split_opt))):
    np.testing.assert_array_equal(a, b)

  # Export: a Hugging Face checkpoint holding the final params.
  _, exported = from_pretrained(tmp_path / "whole" / "export")
  np.testing.assert_array_equal(np.asarray(exported["embed"]), whole_params["embed"])


def test_nan_saves_then_stops_naming_the_step(tmp_path, capsys):
  cfg = config(optim=OptimConfig(lr=1e30, max_grad_norm=0, schedule="constant"), eval_every=0,
               num_samples=0, checkpoint_every=0, steps=20)
  with pytest.raises(loop.NonFiniteLoss, match=r"loss is (nan|inf) at step \d+"):
    loop.train(cfg, tmp_path)
  assert "stopped" in capsys.readouterr().err
  saved = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved, "no checkpoint saved before stopping"


def test_resume_false_starts_over(tmp_path):
  loop.train(config(steps=2, eval_every=0, num_samples=0), tmp_path)
  fresh = config(steps=1, eval_every=0, num_samples=0, resume=False)
  assert loop.train(fresh, tmp_path)["step"] == 1
  assert [r["step"] for r in read(tmp_path / "metrics.jsonl")] == [1]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
