"""Fixed-size batches as a pure function of the step, so resuming needs only the step number.

  batches = Batches(train, cfg, seed=0)
  batch = batches.get(step)   # {"tokens", "positions", "segment_ids", "loss_mask"}, each (B, L)
  local = batches.get(step, process_index=jax.process_index(), process_count=jax.process_count())

Rows (one example each, or several packed by best-fit decreasing) are built once. Epoch
e = step // steps_per_epoch visits them in a permutation seeded by (seed, e), `batch_size` per
step; the few rows past the last full batch of an epoch wait for a later epoch's order. Each batch
is right-padded to the smallest bucket length holding its longest row (decided on the global
batch, so every process gets the same L), which bounds the shapes a jitted step compiles for.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from jrlhf.data.config import DataConfig
from jrlhf.data.dataset import TokenizedDataset
from jrlhf.data.packing import best_fit_decreasing, bucket_for, bucket_lengths, pack_row

KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


class Batches:
  """Global batches of `cfg.batch_size` rows; see the module docstring."""

  def __init__(self, dataset: TokenizedDataset, cfg: DataConfig, seed: int,
               *, shuffle: bool | None = None):
    self.dataset, self.seed = dataset, seed
    self.batch_size = cfg.batch_size
    self.shuffle = cfg.shuffle if shuffle is None else shuffle
    lengths = dataset.lengths
    if len(lengths) and lengths.max() > cfg.max_length:
      raise ValueError(f"an example has {lengths.max()} tokens, over data.max_length="
                       f"{cfg.max_length}; tokenize with the same DataConfig")
    if cfg.packing:
      self.rows = best_fit_decreasing(lengths.tolist(), cfg.max_length)
    else:
      self.rows = [[i] for i in range(len(dataset))]
    self.row_lengths = np.array([lengths[r].sum() for r in self.rows], np.int64)
    self.bucket_lengths = bucket_lengths(cfg.max_length, cfg.min_bucket)
    self.steps_per_epoch = len(self.rows) // self.batch_size
    # Not raised here: a small eval set still makes `eval_batches`, it just cannot `get`.
    self._too_small = None if self.steps_per_epoch else (
        f"{len(dataset)} examples make {len(self.rows)} rows, fewer than data.batch_size="
        f"{self.batch_size}; lower the batch size or add data")

  def __len__(self) -> int:
    return len(self.rows)

  @property
  def num_compiled_shapes(self) -> int:
    """An upper bound on the distinct (B, L) shapes `get` returns: the buckets between the
    shortest and the longest row."""
    if not len(self.row_lengths):
      return 0
    lo = bucket_for(int(self.row_lengths.min()), self.bucket_lengths)
    hi = bucket_for(int(self.row_lengths.max()), self.bucket_lengths)
    return sum(lo <= b <= hi for b in self.bucket_lengths)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not self.shuffle:
      return np.arange(len(self.rows))
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

  def row_indices(self, step: int) -> np.ndarray:
    if self._too_small:
      raise ValueError(self._too_small)
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    epoch, k = divmod(step, self.steps_per_epoch)
    return self.epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

  def get(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """The batch of `step`: all `batch_size` rows, or this process's contiguous slice of them."""
    if self.batch_size % process_count or not 0 <= process_index < process_count:
      raise ValueError(f"data.batch_size={self.batch_size} must split evenly over "
                       f"{process_count} processes (process_index={process_index})")
    rows = self.row_indices(step)
    length = bucket_for(int(self.row_lengths[rows].max()), self.bucket_lengths)
    per = self.batch_size // process_count
    return self.collate(rows[process_index * per:(process_index + 1) * per], length)

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order, `batch_size` at a time; the last batch is filled with empty
    rows (all padding, no targets), so every batch has the same number of rows."""
    for start in range(0, len(self.rows), self.batch_size):
      rows = np.arange(start, min(start + self.batch_size, len(self.rows)))
      length = bucket_for(int(self.row_lengths[rows].max()), self.bucket_lengths)
      yield self.collate(rows, length, num_rows=self.batch_size)

  def collate(self, rows: np.ndarray, length: int, num_rows: int | None = None
              ) -> dict[str, np.ndarray]:
    """Right-padded arrays of the given rows: pad id, position 0, segment 0, no target."""
    num_rows = len(rows) if num_rows is None else num_rows
    out = {
        "tokens": np.full((num_rows, length), self.dataset.pad_id, np.int32),
        "positions": np.zeros((num_rows, length), np.int32),
        "segment_ids": np.zeros((num_rows, length), np.int32),
        "loss_mask": np.zeros((num_rows, length), bool),
    }
    for b, r in enumerate(rows):
      docs = self.rows[r]
      arrays = pack_row([self.dataset.tokens[i] for i in docs],
                        [self.dataset.loss_mask[i] for i in docs])
      n = len(arrays[0])
      for key, array in zip(KEYS, arrays):
        out[key][b, :n] = array
    return out
