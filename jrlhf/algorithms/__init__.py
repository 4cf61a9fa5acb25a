"""Algorithms as pure functions: per-token math (`common`), the shared step parts (`step`), and
one module per algorithm with `loss_fn`, `train_step` and `eval_step` (`sft`; RM, DPO, PPO next).
"""

from jrlhf.algorithms import common, sft, step
from jrlhf.algorithms.sft import SFTConfig

__all__ = ["SFTConfig", "common", "sft", "step"]
