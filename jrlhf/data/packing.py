"""Packing examples into rows, and the small fixed set of row lengths a batch is padded to.

  best_fit_decreasing([5, 4, 3, 3, 1], capacity=8)   # [[0, 2], [1, 3, 4]]: 2 rows, the minimum
  bucket_lengths(max_length=1024, min_bucket=64)     # (64, 128, 256, 512, 1024)
  pack_row([tokens_a, tokens_b], [mask_a, mask_b])   # segment ids 1 1 1 2 2, positions 0 1 2 0 1
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Groups item indices into bins of total length <= capacity: longest first, each into the
  fullest bin that still has room. Uses at most 11/9 OPT + 1 bins.

  Open bins are kept by remaining room (a sorted list of the distinct values, at most
  `capacity` of them), so each item costs a bisect rather than a scan over all bins.
  """
  too_long = [i for i, n in enumerate(lengths) if n > capacity]
  if too_long:
    raise ValueError(f"items {too_long[:5]} are longer than the capacity {capacity}; truncate "
                     "them first")
  bins: list[list[int]] = []
  by_room: dict[int, list[int]] = {}  # room left -> bins with exactly that much room
  rooms: list[int] = []  # sorted keys of by_room
  # Stable sort: equal lengths keep their input order, so packing is deterministic.
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    n = lengths[i]
    k = bisect.bisect_left(rooms, n)
    if k < len(rooms):
      room = rooms[k]
      b = by_room[room].pop()
      if not by_room[room]:
        del by_room[room], rooms[k]
    else:
      room, b = capacity, len(bins)
      bins.append([])
    bins[b].append(i)
    left = room - n
    if left > 0:
      if left not in by_room:
        by_room[left] = []
        bisect.insort(rooms, left)
      by_room[left].append(b)
  return bins


def bucket_lengths(max_length: int, min_bucket: int) -> tuple[int, ...]:
  """min_bucket * 2^k below max_length, then max_length itself."""
  buckets, length = [], min(min_bucket, max_length)
  while length < max_length:
    buckets.append(length)
    length *= 2
  return tuple(buckets) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `length` tokens."""
  k = bisect.bisect_left(buckets, length)
  if k == len(buckets):
    raise ValueError(f"a row of {length} tokens exceeds the largest bucket {buckets[-1]}")
  return buckets[k]


def pack_row(tokens: Sequence[np.ndarray], masks: Sequence[np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, positions, segment ids 1..k, loss mask) of documents laid end to end.

  Each document's mask already has False at its first token, so no target crosses a boundary.
  """
  positions = np.concatenate([np.arange(len(t), dtype=np.int32) for t in tokens])
  segments = np.concatenate(
      [np.full(len(t), k, np.int32) for k, t in enumerate(tokens, start=1)])
  return np.concatenate(tokens), positions, segments, np.concatenate(masks)
