"""Reward model: the last real token (pad == eos safe), Bradley-Terry with margin and centering,
learning a separable toy set, and an RM trained with LoRA from an LM checkpoint that exports as
an HF SequenceClassification model giving the same rewards."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jrlhf.algorithms import rm
from jrlhf.models import ModelConfig, from_pretrained, save_pretrained
from jrlhf.peft.config import LoraConfig, merged_params
from jrlhf.sharding import MeshConfig, make_mesh, sharding_context
from jrlhf.train.config import OptimConfig
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.state import create_state

CFG = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_position_embeddings=64)
GOOD, EOS = 3, 2


def test_last_real_token_comes_from_segment_ids_not_the_pad_id():
  values = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
  # Row 0 ends in eos followed by eos-as-pad; row 1 is full; row 2 is all padding.
  segment_ids = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(rm.last_token_values(values, segment_ids), [1.0, 7.0, 0.0])


def test_bradley_terry_with_margin_and_centering():
  class Fixed:  # rewards = the token at each position, so the batch sets them directly
    def apply(self, variables, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
      return tokens_BxL.astype(jnp.float32)

  batch = {"tokens": jnp.array([[0, 3], [0, 1], [0, 2], [0, 2]]),
           "segment_ids": jnp.ones((4, 2), jnp.int32),
           "margin": jnp.array([0.5, 1.0, 0.5, 1.0])}
  loss, sums = rm.loss_fn({}, batch, Fixed(), rm.RMConfig(center_rewards_coefficient=0.1),
                          jnp.float32(2))
  rc, rr, m = np.array([3.0, 1.0]), np.array([2.0, 2.0]), np.array([0.5, 1.0])
  expected = np.mean(np.logaddexp(0, -(rc - rr - m)) + 0.1 * (rc + rr) ** 2)
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  metrics = rm._metrics(sums)
  assert float(metrics["accuracy"]) == 0.5 and float(metrics["margin"]) == 0.0
  assert float(metrics["min_reward"]) == 1.0 and float(metrics["max_reward"]) == 3.0


def toy_pairs(num_pairs, length=8, seed=0):
  """Separable: the chosen response contains the GOOD token, the rejected one does not; both
  end in EOS, which doubles as the pad, and lengths differ so the last token varies in place."""
  r = np.random.default_rng(seed)
  tokens = np.full((2 * num_pairs, length), EOS, np.int32)
  segment_ids = np.zeros((2 * num_pairs, length), np.int32)
  for p in range(num_pairs):
    prompt = r.integers(4, CFG.vocab_size, 2)
    for side, row in ((0, p), (1, num_pairs + p)):
      n = r.integers(2, length - 3)
      response = r.integers(4, CFG.vocab_size, n)
      if side == 0:
        response[r.integers(0, n)] = GOOD
      seq = np.concatenate([prompt, response, [EOS]])
      tokens[row, :len(seq)] = seq
      segment_ids[row, :len(seq)] = 1
  positions = np.where(segment_ids, np.cumsum(segment_ids, 1) - 1, 0).astype(np.int32)
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
          "loss_mask": segment_ids.astype(bool)}


def test_reward_model_learns_a_separable_toy_set():
  # One device: this is about learning. On 8 fake devices this test's eager eval and unpinned
  # jit deadlocked XLA:CPU's collectives now and then on the 2-core CI machine.
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  opt = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=5), 60)
  model, state, _ = create_state(CFG, opt, mesh, seed=0, head="scalar")
  assert "score" in state.trainable and "lm_head" not in state.trainable
  train_step = jax.jit(functools.partial(rm.train_step, model=model, cfg=rm.RMConfig(), opt=opt))
  held_out = toy_pairs(32, seed=99)
  with sharding_context(mesh):
    before = rm.eval_metrics(jax.device_get(rm.eval_step(state, held_out, model=model,
                                                         cfg=rm.RMConfig())))
    for i in range(60):
      state, metrics = train_step(state, toy_pairs(16, seed=i))
    after = rm.eval_metrics(jax.device_get(rm.eval_step(state, held_out, model=model,
                                                        cfg=rm.RMConfig())))
  assert after["accuracy"] >= 0.95, (before, after)
  assert after["loss"] < 0.3 < before["loss"]
  assert float(metrics["accuracy"]) >= 0.9


def test_lora_reward_model_from_an_lm_checkpoint_exports_for_hf(tmp_path):
  """The usual pipeline: SFT (a causal LM) -> RM with LoRA; the new score head trains, and the
  merged export is a *ForSequenceClassification checkpoint with the same rewards (for PPO)."""
  mesh = make_mesh(MeshConfig())
  opt = make_optimizer(OptimConfig(lr=1e-2), 10)
  lm, lm_state, _ = create_state(CFG, opt, mesh, seed=0)
  save_pretrained(tmp_path / "sft", lm, lm_state.trainable)
  model, state, _ = create_state(CFG, opt, mesh, init_from=str(tmp_path / "sft"),
                                 peft=LoraConfig(rank=4), head="scalar")
  assert model.head == "scalar"
  assert state.trainable["score"]["kernel"].shape == (32, 1)  # trainable under LoRA
  assert state.frozen["score"]["kernel"] is None
  batch = toy_pairs(4)
  with sharding_context(mesh):
    state, _ = jax.jit(functools.partial(rm.train_step, model=model, cfg=rm.RMConfig(),
                                         opt=opt))(state, batch)
  assert float(jnp.abs(state.trainable["score"]["kernel"]).sum()) > 0
  from jrlhf.algorithms.step import combine_params
  params = merged_params(combine_params(state.trainable, state.frozen))
  save_pretrained(tmp_path / "rm", model, params)
  ours = rm.rewards(params, batch, model)

  _, loaded = from_pretrained(tmp_path / "rm", head="scalar")
  np.testing.assert_allclose(rm.rewards(loaded, batch, model), ours, rtol=1e-5, atol=1e-6)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
  with torch.no_grad():
    # HF picks the last non-pad token by pad_token_id; give it a mask-true pad id-free view:
    # rows one at a time, unpadded, so its choice is the true last token.
    hf_rewards = [hf(torch.tensor(row[seg != 0][None].astype(np.int64))).logits[0, 0].item()
                  for row, seg in zip(batch["tokens"], batch["segment_ids"])]
  np.testing.assert_allclose(hf_rewards, ours, rtol=1e-4, atol=1e-5)
