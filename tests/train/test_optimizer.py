"""Schedules match their formulas (and HF's), the decay mask spares biases and norms, configs
reject bad values with a message that says what to change."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf.models import ModelConfig, Transformer
from jrlhf.train.config import OptimConfig, TrainConfig
from jrlhf.train.optimizer import decay_mask, make_optimizer, make_schedule


def lrs(cfg, total):
  schedule = make_schedule(cfg, total)
  return np.array([float(schedule(s)) for s in range(total + 1)])


def test_warmup_then_cosine():
  cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine")
  got = lrs(cfg, 14)
  np.testing.assert_allclose(got[:5], [0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
  for step in range(4, 15):  # HF get_cosine_schedule_with_warmup
    progress = (step - 4) / 10
    assert got[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)), abs=1e-6)


def test_linear_decay_to_min_ratio_and_constant():
  got = lrs(OptimConfig(lr=2.0, schedule="linear", min_lr_ratio=0.1), 10)
  np.testing.assert_allclose(got, np.linspace(2.0, 0.2, 11), atol=1e-6)
  got = lrs(OptimConfig(lr=3.0, warmup_steps=2, schedule="constant"), 6)
  np.testing.assert_allclose(got, [0, 1.5, 3, 3, 3, 3, 3], atol=1e-6)


def test_cosine_floor():
  got = lrs(OptimConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.2), 8)
  assert got[0] == pytest.approx(1.0) and got[-1] == pytest.approx(0.2)


def test_decay_mask_spares_biases_and_norm_scales_even_when_scanned():
  cfg = ModelConfig(family="gpt2", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                    num_kv_heads=2, head_dim=8, mlp_dim=32, max_position_embeddings=16,
                    attention_bias=True, mlp_bias=True)
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  mask = decay_mask(nn.unbox(shapes["params"]))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  no_decay = sorted(k for k, v in flat.items() if not v)
  assert no_decay and all(k.endswith(("['bias']", "['scale']")) for k in no_decay), no_decay
  assert any("attn_norm" in k for k in no_decay)  # stacked (layers, D): shape alone would miss it
  decayed = [k for k, v in flat.items() if v]
  assert any("embed" in k for k in decayed) and any("kernel" in k for k in decayed)


def test_weight_decay_skips_masked_leaves():
  opt = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, max_grad_norm=0), 10)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
            "norm": {"scale": jnp.ones(2)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.tx.update(zeros, opt.tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0)
  np.testing.assert_array_equal(updates["norm"]["scale"], 0)


def test_clipping_scales_by_the_global_norm():
  # With b1 = b2 = 0 and eps = 1, Adam's update is -lr * g / (|g| + 1): it sees the clipping.
  opt = make_optimizer(OptimConfig(lr=1.0, max_grad_norm=1.0, b1=0.0, b2=0.0, eps=1.0,
                                   schedule="constant"), 10)
  params = {"w": jnp.zeros(4)}
  updates, _ = opt.tx.update({"w": jnp.full((4,), 10.0)}, opt.tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5 / 1.5, rtol=1e-5)  # norm 20 clipped to 1


@pytest.mark.parametrize("kwargs, needle", [
    ({"schedule": "cosin"}, "cosine"),
    ({"lr": 0.0}, "optim.lr"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"b2": 1.0}, "optim.b2"),
])
def test_optim_config_errors_say_what_to_change(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    OptimConfig(**kwargs)


def test_train_config_errors():
  with pytest.raises(ValueError, match="keep_checkpoints"):
    TrainConfig(keep_checkpoints=0)
  with pytest.raises(ValueError, match="eval_every"):
    TrainConfig(eval_every=-1)
