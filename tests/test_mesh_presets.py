"""TPU mesh presets: the mesh fills the slice exactly and agrees with its topology."""

import math

import pytest

from configs import meshes
from jrlhf import config


@pytest.mark.parametrize("name", sorted(meshes.PRESETS))
def test_mesh_axes_multiply_to_the_chip_count(name):
  preset = meshes.PRESETS[name]
  assert math.prod(preset.mesh.sizes()) == preset.chips
  assert preset.mesh.shape(preset.chips) == preset.mesh.sizes()
  assert preset.topology_chips() == preset.chips
  assert preset.chips % preset.hosts == 0
  assert preset.topology.split(":")[0] == name.split("-")[0]


def test_overrides_are_valid_command_line_keys():
  cfg = config.resolve("tiny/sft", meshes.V5P_64.overrides())
  assert cfg.mesh == meshes.V5P_64.mesh
