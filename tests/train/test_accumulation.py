"""Gradient accumulation: 4 micro-batches of 2 sequences are one step on 8, on a sharded mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.algorithms import sft
from jrlhf.algorithms.step import interleave_micro_batches
from jrlhf.models import ModelConfig
from jrlhf.sharding import MeshConfig, make_mesh, put_batch, sharding_context
from jrlhf.train.config import OptimConfig
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.state import create_state

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)


def batch(rows, length, seed):
  """Rows with uneven target counts (and a packed row), so per-micro-batch means would differ."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (rows, length)).astype(np.int32)
  segment_ids = np.ones((rows, length), np.int32)
  lengths = rng.integers(3, length + 1, rows)
  for r, n in enumerate(lengths):
    segment_ids[r, n:] = 0
  segment_ids[0, 5:lengths[0]] = 2
  positions = np.zeros_like(tokens)
  loss_mask = np.zeros((rows, length), bool)
  for r in range(rows):
    for t in range(1, length):
      same = segment_ids[r, t] == segment_ids[r, t - 1] != 0
      positions[r, t] = positions[r, t - 1] + 1 if same else 0
      loss_mask[r, t] = same and rng.random() < 0.3 + 0.7 * (r % 2)
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
          "loss_mask": loss_mask}


def one_step(host_batch, grad_accum, mesh, start):
  # eps=1e-3: Adam's first update is lr * g / (|g| + eps), which for |g| near a tiny eps turns
  # float-summation-order noise into visible differences; a larger eps compares the gradients.
  opt = make_optimizer(OptimConfig(lr=1e-2, eps=1e-3, weight_decay=0.1, grad_accum=grad_accum),
                       10)
  model, state, state_sh = start
  state = jax.tree.map(jnp.copy, state)  # the step donates its input
  step = jax.jit(functools.partial(sft.train_step, model=model, cfg=sft.SFTConfig(), opt=opt),
                 in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=0)
  with sharding_context(mesh):
    state, metrics = step(state, put_batch(host_batch, mesh))
  return jax.device_get(state.trainable), jax.device_get(metrics)


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
  mesh = make_mesh(MeshConfig(), devices=jax.devices()[:2])  # fsdp=2: micro-batches split too
  full = batch(8, 16, seed=0)
  micro = [{k: v[i:i + 2] for k, v in full.items()} for i in range(0, 8, 2)]
  start = create_state(CFG, make_optimizer(OptimConfig(), 10), mesh, seed=3)
  params_1x8, metrics_1x8 = one_step(full, 1, mesh, start)
  params_4x2, metrics_4x2 = one_step(interleave_micro_batches(micro), 4, mesh, start)
  assert metrics_1x8["tokens"] == metrics_4x2["tokens"] == full["loss_mask"][:, 1:].sum()
  for key in ("loss", "token_accuracy", "entropy", "grad_norm"):
    np.testing.assert_allclose(metrics_4x2[key], metrics_1x8[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params_4x2, params_1x8)


def test_interleave_pads_shorter_micro_batches():
  a, b = batch(2, 8, seed=1), batch(2, 12, seed=2)
  window = interleave_micro_batches([a, b])
  assert window["tokens"].shape == (4, 12)
  np.testing.assert_array_equal(window["tokens"][1, :12], b["tokens"][0])  # row b * A + a
  np.testing.assert_array_equal(window["tokens"][0, :8], a["tokens"][0])
  assert not window["loss_mask"][0, 8:].any() and not window["segment_ids"][0, 8:].any()
