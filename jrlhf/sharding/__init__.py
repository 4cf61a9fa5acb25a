"""Device mesh, the logical-axis rules table, sharded param creation and batch placement."""

from jrlhf.sharding.batch import batch_sharding, batch_ways, put_batch
from jrlhf.sharding.mesh import AXES, BATCH_AXES, MeshConfig, make_mesh
from jrlhf.sharding.rules import (
    DEFAULT_RULES,
    init_sharded,
    logical_to_sharding,
    param_shardings,
    sharding_context,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MeshConfig",
    "batch_sharding",
    "batch_ways",
    "init_sharded",
    "logical_to_sharding",
    "make_mesh",
    "param_shardings",
    "put_batch",
    "sharding_context",
]
