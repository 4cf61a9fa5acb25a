"""GRPO's rollout batch: the sampler's logprobs are what a forward pass computes, so the first
ratio is 1; responses end at the first EOS."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.algorithms import ppo
from jrlhf.models import ModelConfig, Transformer
from jrlhf.models.generate import Sampler, SamplingConfig
from jrlhf.sample import left_pad

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_position_embeddings=64)


@functools.lru_cache(maxsize=None)
def setup():
  model = Transformer(CFG)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


def test_rollout_logprobs_equal_a_forward_pass_and_stop_at_eos():
  model, params = setup()
  rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
  prompt_BxP, mask_BxP = left_pad(rows, 0, 1, length=5)
  cfg = SamplingConfig(max_new_tokens=12, temperature=0.7, stop_tokens=(3,), pad_id=0)
  gen = Sampler(model, cfg)(params, jnp.asarray(prompt_BxP), jnp.asarray(mask_BxP),
                            jax.random.PRNGKey(1))
  batch = ppo.rollout_batch(jnp.asarray(prompt_BxP), jnp.asarray(mask_BxP), gen.tokens_BxN,
                             gen.lengths_B)
  logp_BxN = ppo.response_logprobs(model, params, batch, cfg.temperature)
  mask_BxN = np.asarray(batch["response_mask"])
  np.testing.assert_allclose(np.asarray(logp_BxN)[mask_BxN],
                             np.asarray(gen.logprobs_BxN)[mask_BxN], atol=1e-4)
  tokens_BxN = np.asarray(gen.tokens_BxN)
  for row, n, done in zip(tokens_BxN, np.asarray(gen.lengths_B), np.asarray(gen.done_B)):
    assert (row[n:] == 0).all()  # nothing after the stop token is a response token
    assert done == (3 in row[:n]) and (not done or row[n - 1] == 3)
