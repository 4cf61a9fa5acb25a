"""Batches as a pure function of the step: bounded shapes, deterministic shuffling, slicing."""

import numpy as np
import pytest

from jrlhf.data import Batches, DataConfig
from tests.data.test_packing import dataset

LENGTHS = np.random.default_rng(0).integers(2, 200, size=101)


def row_ids(batch):
  """Rows identified by their first tokens (random tokens: unique in practice)."""
  return [tuple(r[:2]) for r in batch["tokens"]]


@pytest.mark.parametrize("packing", [False, True])
def test_buckets_bound_the_shapes(packing):
  cfg = DataConfig(max_length=256, min_bucket=16, batch_size=2, packing=packing)
  batches = Batches(dataset(LENGTHS), cfg, seed=0)
  shapes = {batches.get(s)["tokens"].shape for s in range(3 * batches.steps_per_epoch)}
  assert len(shapes) <= batches.num_compiled_shapes <= len(batches.bucket_lengths) == 5
  assert {L for _, L in shapes} <= set(batches.bucket_lengths)


def test_get_is_a_pure_function_of_seed_and_step():
  cfg = DataConfig(max_length=256, batch_size=8)
  a, b = Batches(dataset(LENGTHS), cfg, seed=3), Batches(dataset(LENGTHS), cfg, seed=3)
  for step in (0, 5, 17, 40):  # 12 steps per epoch: several epochs
    for key, value in a.get(step).items():
      np.testing.assert_array_equal(value, b.get(step)[key])
  # A resumed reader asked for step 17 first gets what an uninterrupted one got.
  assert row_ids(Batches(dataset(LENGTHS), cfg, seed=3).get(17)) == row_ids(a.get(17))


def test_shuffling_depends_on_seed_and_epoch():
  cfg = DataConfig(max_length=256, batch_size=8)
  batches = Batches(dataset(LENGTHS), cfg, seed=0)
  n = batches.steps_per_epoch
  assert n == 12
  epoch0 = [r for s in range(n) for r in row_ids(batches.get(s))]
  epoch1 = [r for s in range(n, 2 * n) for r in row_ids(batches.get(s))]
  assert len(set(epoch0)) == len(epoch0) == 96  # no row twice in an epoch
  assert epoch0 != epoch1
  other_seed = Batches(dataset(LENGTHS), cfg, seed=1)
  assert row_ids(other_seed.get(0)) != row_ids(batches.get(0))
  unshuffled = Batches(dataset(LENGTHS), DataConfig(max_length=256, batch_size=8, shuffle=False), 0)
  assert np.array_equal(unshuffled.row_indices(n + 1), np.arange(8, 16))


def test_process_slices_make_the_global_batch():
  cfg = DataConfig(max_length=256, batch_size=8, packing=True)
  batches = Batches(dataset(LENGTHS), cfg, seed=0)
  for step in (0, 3):
    full = batches.get(step)
    parts = [batches.get(step, process_index=i, process_count=4) for i in range(4)]
    for key in full:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
  with pytest.raises(ValueError, match="split evenly"):
    batches.get(0, process_index=0, process_count=3)


def test_eval_batches_cover_every_row_once_with_one_batch_size():
  cfg = DataConfig(max_length=256, batch_size=8)
  batches = Batches(dataset(LENGTHS), cfg, seed=0)
  out = list(batches.eval_batches())
  assert len(out) == 13 and all(b["tokens"].shape[0] == 8 for b in out)
  ids = [r for b in out for r, seg in zip(row_ids(b), b["segment_ids"]) if seg.any()]
  assert len(ids) == len(set(ids)) == 101
  assert not out[-1]["loss_mask"][5:].any()  # 101 = 12 * 8 + 5: three empty rows


def test_too_small_dataset_is_explained():
  batches = Batches(dataset([5, 6]), DataConfig(batch_size=8), seed=0)
  with pytest.raises(ValueError, match="fewer than data.batch_size=8"):
    batches.get(0)
  assert len(list(batches.eval_batches())) == 1  # still usable for eval
