"""The device mesh: three named axes, sized by a config in which -1 means "the rest".

  data    pure data parallelism (replicated params, split batch)
  fsdp    data parallelism with params, grads and optimizer state split along `embed`
  tensor  model parallelism over heads, MLP and vocab

Example: on 8 devices `MeshConfig(data=2)` is a 2x4x1 mesh (fsdp takes the remaining 4).
"""

from __future__ import annotations

import math
from typing import Sequence

import chz
import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")
# Mesh axes that split the batch; params are never split over `data`, only over `fsdp`.
BATCH_AXES = ("data", "fsdp")


@chz.chz
class MeshConfig:
  """Sizes of the mesh axes; exactly their product of devices is used. One may be -1 (the rest)."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  @chz.validate
  def _check(self):
    sizes = self.sizes()
    bad = [f"{name}={size}" for name, size in zip(AXES, sizes) if size == 0 or size < -1]
    if bad:
      raise ValueError(f"mesh axis sizes must be positive or -1 (the rest); got {', '.join(bad)}")
    if sizes.count(-1) > 1:
      rest = [name for name, size in zip(AXES, sizes) if size == -1]
      raise ValueError(
          f"at most one mesh axis may be -1 (the rest), got {' and '.join(rest)} = -1; "
          f"give all but one of them an explicit size")

  def sizes(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """The concrete (data, fsdp, tensor) sizes on `num_devices` devices, -1 filled in."""
    sizes = self.sizes()
    requested = ", ".join(f"{name}={size}" for name, size in zip(AXES, sizes))
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
      if num_devices % fixed:
        raise ValueError(
            f"mesh {requested} cannot fill {num_devices} devices: the fixed axes multiply to "
            f"{fixed}, which does not divide {num_devices}; choose fixed sizes whose product "
            f"divides {num_devices}")
      return tuple(num_devices // fixed if size == -1 else size for size in sizes)
    if fixed != num_devices:
      raise ValueError(
          f"mesh {requested} needs {fixed} devices but {num_devices} are available; make the "
          f"sizes multiply to {num_devices}, or set one axis to -1 to take the rest")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: every device of every host).

  `jax.make_mesh` orders devices by the physical topology (ICI rings on TPU, hosts on GPU), so
  the innermost axis, `tensor`, lands on the fastest links.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.shape(len(devices))
  # Auto axes: the model is written for GSPMD propagation (params and a few activations are
  # annotated, XLA fills in the rest). Explicit axes, the default in recent JAX, would instead
  # demand a sharding rule for every op.
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
