"""DPO with precomputed reference logps (`algorithm.precompute_ref=true`): the same metrics as the
on-the-fly reference, one cache file per (data, model), reused by a rerun without recomputing."""

import json
import pathlib

import chz
import pytest

from jrlhf.algorithms.dpo import DPOConfig
from jrlhf.config import Config
from jrlhf.data import DataConfig
from jrlhf.models import ModelConfig
from jrlhf.train import loop, ref_cache
from jrlhf.train.config import OptimConfig, TrainConfig

TINY_MODEL = ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, mlp_dim=64, max_position_embeddings=128)
TINY_DATA = DataConfig(num_train_examples=96, num_eval_examples=16, batch_size=8,
                       max_length=32, min_bucket=32)


def config(precompute: bool, **train_kwargs) -> Config:
  train = dict(log_every=1, eval_every=3, checkpoint_every=3, num_samples=0, progress=False,
               async_checkpoints=False, **train_kwargs)
  return Config(model=TINY_MODEL, data=TINY_DATA, optim=OptimConfig(lr=1e-2, warmup_steps=0),
                train=TrainConfig(**train), steps=3, seed=0,
                algorithm=DPOConfig(beta=0.5, precompute_ref=precompute))


def rows(run_dir):
  return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
          for line in pathlib.Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def assert_same_rows(a, b):
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for key in ra:
      assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)


def test_precomputed_reference_matches_on_the_fly_and_is_reused(tmp_path, monkeypatch):
  on_the_fly = loop.train(config(False), tmp_path / "fly")
  cached = loop.train(config(True), tmp_path / "cached")
  assert rows(tmp_path / "cached")[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # pi == ref
  assert on_the_fly["rewards/margins"] != 0.0  # the policy moved, so the reference mattered
  assert_same_rows(rows(tmp_path / "fly"), rows(tmp_path / "cached"))
  assert cached["eval/loss"] == pytest.approx(on_the_fly["eval/loss"], rel=1e-4)
  assert cached["compiles"] == 1

  files = list((tmp_path / "cached" / "ref_cache").glob("*.npz"))
  assert len(files) == 1
  mtime = files[0].stat().st_mtime_ns

  # A rerun from scratch in the same run dir reads the file: computing again would fail here.
  def no_compute(*args, **kwargs):
    raise AssertionError("the reference logps were computed again")

  monkeypatch.setattr(ref_cache, "compute", no_compute)
  again = loop.train(config(True, resume=False), tmp_path / "cached")
  assert files[0].stat().st_mtime_ns == mtime
  assert list((tmp_path / "cached" / "ref_cache").glob("*")) == files
  assert again["loss"] == pytest.approx(cached["loss"], rel=1e-5)


def test_the_cache_key_follows_data_and_model_not_beta():
  cfg, data_fp = config(True), "0123456789abcdef"
  key = ref_cache.cache_key(cfg, data_fp)
  assert ref_cache.cache_key(cfg, "fedcba9876543210") != key
  assert ref_cache.cache_key(chz.replace(cfg, init_from="some/dir"), data_fp) != key
  assert ref_cache.cache_key(chz.replace(cfg, model=chz.replace(TINY_MODEL, dtype="bfloat16")),
                             data_fp) != key
  assert ref_cache.cache_key(chz.replace(cfg, algorithm=DPOConfig(beta=0.1)), data_fp) == key
