"""Eval helpers: sampled generations equal a greedy loop of forward passes; eval loss sums."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.models import ModelConfig, Transformer
from jrlhf.sharding import MeshConfig, make_mesh, sharding_context
from jrlhf.train import evaluate

CFG = ModelConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)


def greedy(model, params, prompt, n):
  """n argmax steps of full forward passes. One fixed width (causality makes the right padding
  invisible to earlier positions), so the forward compiles once."""
  forward = jax.jit(lambda t: model.apply({"params": params}, t))
  tokens = np.zeros((1, 16), np.int32)
  tokens[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    tokens[0, t] = int(jnp.argmax(forward(tokens)[0, t - 1]))
  return tokens[0, len(prompt):len(prompt) + n].tolist()


def test_generations_match_a_greedy_forward_loop_on_the_mesh():
  model = Transformer(CFG)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  params = jax.tree.map(lambda p: p * 8 if p.ndim > 1 else p, params)  # a peaked distribution
  prompts = [np.array([5, 6, 7]), np.array([9]), np.array([3, 4, 5, 6, 7, 8])]
  expected = [greedy(model, params, p, 5) for p in prompts]
  references = ["".join(map(chr, 65 + np.array(e))) for e in expected]
  references[1] = "wrong"
  mesh = make_mesh(MeshConfig())
  gen = evaluate.Generations(
      model, prompts, references, lambda a, b: float(a == b),
      lambda ids: "".join(chr(65 + i) for i in ids), max_new_tokens=5, stop_tokens=(),
      pad_id=0, mesh=mesh)
  assert gen.prompt_BxP.shape == (8, 6)  # rows padded to the mesh's 8 batch ways
  with sharding_context(mesh):
    metrics, rows = gen(params, jax.random.PRNGKey(0))
  assert [r["completion"] for r in rows] == [references[0], rows[1]["completion"], references[2]]
  assert rows[1]["completion"] == "".join(chr(65 + i) for i in expected[1])
  assert metrics["accuracy"] == 2 / 3
  assert [r["score"] for r in rows] == [1.0, 0.0, 1.0]


def test_pad_rows_adds_empty_rows():
  batch = {"tokens": np.ones((3, 4), np.int32), "loss_mask": np.ones((3, 4), bool)}
  padded = evaluate.pad_rows(batch, 8)
  assert padded["tokens"].shape == (8, 4) and not padded["loss_mask"][3:].any()
  assert evaluate.pad_rows(padded, 8) is padded
