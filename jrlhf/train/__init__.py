"""The training loop and what it needs: optimizer, sharded state, orbax checkpoints, metrics.

Public: `train(cfg, run_dir)` (jrlhf.train.loop), `OptimConfig`, `TrainConfig`,
`make_optimizer`, `TrainState`, `create_state`. Import `jrlhf.train.loop` for `train` itself:
it pulls in the data package, which the config classes here must not depend on.
"""

from jrlhf.train.config import OptimConfig, TrainConfig
from jrlhf.train.optimizer import Optimizer, make_optimizer, make_schedule
from jrlhf.train.state import TrainState, create_state

__all__ = [
    "OptimConfig", "Optimizer", "TrainConfig", "TrainState", "create_state", "make_optimizer",
    "make_schedule",
]
