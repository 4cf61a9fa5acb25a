"""Optimizer and loop settings. Both are composed into the top-level `jrlhf.config.Config`.

CLI keys: `optim.lr=3e-4 optim.schedule=linear optim.grad_accum=4`,
`train.eval_every=50 train.checkpoint_every=100 train.resume=false`.
"""

from __future__ import annotations

import chz

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)


@chz.chz
class OptimConfig:
  """AdamW with warmup and a decay schedule, global-norm clipping and gradient accumulation.

  lr: peak learning rate, reached after `warmup_steps` (linear from 0).
  schedule: after warmup, `cosine` / `linear` decay to `lr * min_lr_ratio` at the last step, or
    `constant`.
  weight_decay: decoupled (AdamW) decay; never applied to biases or norm scales (as TRL/HF).
  max_grad_norm: clip the global gradient norm to this (0 = no clipping).
  grad_accum: micro-batches of `data.batch_size` sequences per optimizer step; the loss is
    normalised by the target tokens of the whole window, so 4 x 2 sequences == 1 x 8.
  """

  name: str = "adamw"
  lr: float = 2e-5
  warmup_steps: int = 0
  schedule: str = "cosine"
  min_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float = 1.0
  grad_accum: int = 1

  @chz.validate
  def _check(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optim.name={self.name!r} is not supported; choose one of {OPTIMIZERS}")
    if self.schedule not in SCHEDULES:
      raise ValueError(
          f"optim.schedule={self.schedule!r} is not supported; choose one of {SCHEDULES}")
    if not self.lr > 0:
      raise ValueError(f"optim.lr={self.lr} must be > 0 (typical: 2e-5 full SFT, 1e-4 LoRA)")
    if self.warmup_steps < 0:
      raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
    if self.weight_decay < 0:
      raise ValueError(f"optim.weight_decay={self.weight_decay} must be >= 0")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
    if not self.eps > 0:
      raise ValueError(f"optim.eps={self.eps} must be > 0")
    if self.max_grad_norm < 0:
      raise ValueError(f"optim.max_grad_norm={self.max_grad_norm} must be >= 0 (0 = off)")
    if self.grad_accum < 1:
      raise ValueError(
          f"optim.grad_accum={self.grad_accum} must be >= 1 (micro-batches per optimizer step)")


@chz.chz
class TrainConfig:
  """Cadences (in optimizer steps; 0 = never) and outputs of the training loop.

  log_every: write metrics.jsonl / TensorBoard / W&B every N steps (the last step always).
  eval_every: eval loss, perplexity and sampled generations every N steps (and at the end).
  checkpoint_every: orbax save every N steps (and at the end, on SIGTERM/SIGINT and on NaN).
  keep_checkpoints: how many recent checkpoints to keep.
  resume: continue from the run dir's latest checkpoint if there is one.
  num_samples: held-out prompts generated and scored at each eval (0 = no generation).
  max_new_tokens: generation length cap at eval.
  eval_batches: batches of eval loss per eval (0 = the whole eval split).
  export: save the final params in Hugging Face format under run_dir/export/.
  progress: show the tqdm progress bar.
  """

  log_every: int = 10
  eval_every: int = 100
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  async_checkpoints: bool = True
  resume: bool = True
  tensorboard: bool = False
  wandb: bool = False
  wandb_project: str = "jrlhf"
  num_samples: int = 32
  max_new_tokens: int = 64
  eval_batches: int = 0
  export: bool = False
  progress: bool = True

  @chz.validate
  def _check(self):
    for name in ("log_every", "eval_every", "checkpoint_every", "num_samples", "eval_batches"):
      if getattr(self, name) < 0:
        raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0 (0 = never / off)")
    if self.keep_checkpoints < 1:
      raise ValueError(f"train.keep_checkpoints={self.keep_checkpoints} must be >= 1")
    if self.max_new_tokens < 1:
      raise ValueError(f"train.max_new_tokens={self.max_new_tokens} must be >= 1")
