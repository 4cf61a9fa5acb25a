"""Best-fit-decreasing packing and packed rows: segments, positions, no loss across documents."""

import itertools

import numpy as np
import pytest

from jrlhf.data import Batches, DataConfig, TokenizedDataset, best_fit_decreasing, bucket_lengths
from jrlhf.data.packing import bucket_for, pack_row


def test_best_fit_decreasing_hand_example():
  # 5+3 and 4+3+1 fill two bins of 8; first-fit in input order would need three.
  assert best_fit_decreasing([5, 4, 3, 3, 1], capacity=8) == [[0, 2], [1, 3, 4]]
  # Best fit, not first fit: the 2 goes to the bin with room 2, not the one with room 4.
  assert best_fit_decreasing([6, 4, 2], capacity=8) == [[0, 2], [1]]


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_is_a_valid_near_optimal_packing(seed):
  lengths = np.random.default_rng(seed).integers(1, 65, size=300).tolist()
  bins = best_fit_decreasing(lengths, capacity=64)
  assert sorted(itertools.chain(*bins)) == list(range(300))
  assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
  lower_bound = -(-sum(lengths) // 64)
  assert len(bins) <= 11 / 9 * lower_bound + 1


def test_too_long_item_is_refused():
  with pytest.raises(ValueError, match="longer than the capacity"):
    best_fit_decreasing([3, 9], capacity=8)


def test_pack_row():
  tokens, positions, segments, mask = pack_row(
      [np.array([1, 5, 6]), np.array([1, 7])],
      [np.array([False, True, True]), np.array([False, True])])
  assert tokens.tolist() == [1, 5, 6, 1, 7]
  assert positions.tolist() == [0, 1, 2, 0, 1]
  assert segments.tolist() == [1, 1, 1, 2, 2]
  assert mask.tolist() == [False, True, True, False, True]


def dataset(lengths, seed=0):
  rng = np.random.default_rng(seed)
  tokens = [rng.integers(4, 100, n).astype(np.int32) for n in lengths]
  masks = [np.arange(n) >= 1 for n in lengths]
  return TokenizedDataset(tokens, masks, pad_id=0)


def test_packed_batches_keep_documents_apart():
  lengths = np.random.default_rng(1).integers(2, 40, size=200)
  data = dataset(lengths)
  cfg = DataConfig(max_length=64, min_bucket=16, batch_size=4, packing=True)
  batches = Batches(data, cfg, seed=0)
  assert len(batches) < len(data) / 2  # really packed
  seen = []
  for step in range(batches.steps_per_epoch):
    b = batches.get(step)
    seg, pos, mask, tok = b["segment_ids"], b["positions"], b["loss_mask"], b["tokens"]
    for r in range(seg.shape[0]):
      k = seg[r].max()
      n = int((seg[r] > 0).sum())
      assert (seg[r, :n] > 0).all() and (seg[r, n:] == 0).all()  # documents first, then padding
      assert np.array_equal(np.unique(seg[r, :n]), np.arange(1, k + 1))
      for s in range(1, k + 1):
        idx = np.flatnonzero(seg[r] == s)
        assert np.array_equal(pos[r, idx], np.arange(len(idx)))  # positions restart
        seen.append(tuple(tok[r, idx]))
      # A target's predecessor is in the same document: loss never crosses a boundary.
      t = np.flatnonzero(mask[r])
      assert (t > 0).all() and (seg[r, t] == seg[r, t - 1]).all()
      assert not mask[r][pos[r] == 0].any() and not mask[r][seg[r] == 0].any()
      assert (tok[r, n:] == 0).all() and (pos[r, n:] == 0).all()
  # One epoch sees each document at most once, and all but one batch's worth of rows.
  assert len(seen) == len(set(seen))
  assert len(seen) <= len(data)


def test_unpacked_rows_are_single_right_padded_examples():
  data = dataset([3, 10, 5, 7])
  b = Batches(data, DataConfig(max_length=16, min_bucket=4, batch_size=4, shuffle=False), 0).get(0)
  assert b["tokens"].shape == (4, 16)
  for r, n in enumerate([3, 10, 5, 7]):
    assert b["segment_ids"][r].tolist() == [1] * n + [0] * (16 - n)
    assert b["positions"][r, :n].tolist() == list(range(n))
    assert np.array_equal(b["tokens"][r, :n], data.tokens[r])


def test_bucket_lengths():
  assert bucket_lengths(1024, 64) == (64, 128, 256, 512, 1024)
  assert bucket_lengths(100, 32) == (32, 64, 100)
  assert bucket_lengths(128, 128) == (128,)
  assert bucket_for(65, (64, 128)) == 128 and bucket_for(64, (64, 128)) == 64
