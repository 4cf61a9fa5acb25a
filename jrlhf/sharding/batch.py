"""Host batches onto the mesh: the leading (batch) axis split over ("data", "fsdp").

Each process passes only the rows it loaded itself (global batch = local batch * process
count); they become the slice of the global batch that its own devices hold, so hosts never
exchange data.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jrlhf.sharding.mesh import BATCH_AXES


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over every batch axis of the mesh, other axes replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_ways(mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the mesh's batch axes."""
  return int(np.prod([mesh.shape[name] for name in BATCH_AXES]))


def put_batch(batch_tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of host (numpy) arrays, this process's rows, on `mesh` as global arrays."""
  sharding = batch_sharding(mesh)
  ways = batch_ways(mesh)
  processes = jax.process_count()
  mesh_desc = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())

  def put(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(
          f"batch entry {jax.tree_util.keystr(path)} is a scalar; every batch entry needs a "
          f"leading batch axis (keep per-batch constants out of the batch)")
    global_shape = (x.shape[0] * processes,) + x.shape[1:]
    if global_shape[0] % ways:
      raise ValueError(
          f"batch entry {jax.tree_util.keystr(path)} has global batch size {global_shape[0]} "
          f"({x.shape[0]} rows x {processes} process(es)), which the mesh ({mesh_desc}) cannot "
          f"split {ways} ways over data*fsdp; use a batch size that is a multiple of {ways}, "
          f"or change the mesh's data/fsdp sizes")
    if processes == 1:
      return jax.device_put(x, sharding)
    # An explicit placement, but JAX counts this path as implicit: allow it under the loop's
    # transfer guard, which is there for accidental copies inside the step.
    with jax.transfer_guard_host_to_device("allow"):
      return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree_util.tree_map_with_path(put, batch_tree)
