"""Mesh presets for TPU slices: the `mesh.*` keys plus what the slice is (for plans and docs).

    python -m jrlhf.run experiment=... mesh.data=1 mesh.fsdp=32 mesh.tensor=1   # = V5P_64.mesh

Each preset spreads params, gradients and optimizer state over every chip (`fsdp`), the default
that fits the most model per chip; `tensor` > 1 pays off only once the per-chip batch gets too
small for fsdp alone. Chip counts follow gcloud's accelerator names: v5e and v6e count chips,
v5p counts TensorCores (two per chip), so v5p-8 is 4 chips. HBM per chip from the Cloud TPU
docs: v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
"""

import dataclasses
import math

from jrlhf.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class MeshPreset:
  accelerator: str  # gcloud's --accelerator-type (tpu_scripts/create.sh --type)
  topology: str  # "<generation>:<chips per dimension>", the form an ahead-of-time plan takes
  chips: int
  hosts: int  # processes of a run on it (one per TPU VM worker)
  hbm_gib_per_chip: float
  mesh: MeshConfig

  def overrides(self) -> dict[str, str]:
    """The command-line keys that select this mesh."""
    return {f"mesh.{axis}": str(size) for axis, size in
            zip(("data", "fsdp", "tensor"), self.mesh.sizes())}

  def topology_chips(self) -> int:
    return math.prod(int(n) for n in self.topology.split(":")[1].split("x"))


def _fsdp(accelerator, topology, chips, hosts, hbm):
  return MeshPreset(accelerator, topology, chips, hosts, hbm,
                    MeshConfig(data=1, fsdp=chips, tensor=1))


V5E_16 = _fsdp("v5litepod-16", "v5e:4x4", 16, 4, 16.0)
V5P_8 = _fsdp("v5p-8", "v5p:2x2x1", 4, 1, 95.0)
V5P_64 = _fsdp("v5p-64", "v5p:2x4x4", 32, 8, 95.0)
V5P_128 = _fsdp("v5p-128", "v5p:4x4x4", 64, 16, 95.0)
V6E_8 = _fsdp("v6e-8", "v6e:2x4", 8, 1, 32.0)
V6E_64 = _fsdp("v6e-64", "v6e:8x8", 64, 16, 32.0)

PRESETS = {
    "v5e-16": V5E_16, "v5p-8": V5P_8, "v5p-64": V5P_64, "v5p-128": V5P_128,
    "v6e-8": V6E_8, "v6e-64": V6E_64,
}
