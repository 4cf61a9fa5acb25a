"""policy_eval: the sequence-level KL estimate is right (against the exact KL of one-token
responses), zero against itself, and a run directory gets its policy_eval.json."""

import json

import chz
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jrlhf import config as config_lib, policy_eval
from jrlhf.models import ModelConfig, Transformer, save_pretrained
from jrlhf.models.transformer import default_positions
from jrlhf.sample import left_pad
from tests.train.test_loop import config as run_config

MODEL = ModelConfig(vocab_size=24, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=16, mlp_dim=64, max_position_embeddings=64)
PROMPTS = [[1, 5, 7], [1, 3], [1, 9, 9, 4], [1, 2, 6]]


def export(tmp_path, name, seed, cfg=MODEL):
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  # Sharper logits than the init's near-uniform ones: the two models differ measurably.
  params = jax.tree.map(lambda x: x * 3.0, params)
  return save_pretrained(tmp_path / name, model, params), model, params


def exact_first_token_kl(model, params, ref_params) -> float:
  """Mean over PROMPTS of KL(p || q) of the next-token distributions, summed over the vocab."""
  tokens_BxP, mask_BxP = left_pad(PROMPTS, 0, 1)
  pos = default_positions(jnp.asarray(tokens_BxP), jnp.asarray(mask_BxP))
  logp, logq = (jax.nn.log_softmax(model.apply({"params": p}, tokens_BxP, attention_mask_BxL=mask_BxP,
                                               positions_BxL=pos)[:, -1], -1)
                for p in (params, ref_params))
  return float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1)))


def test_sequence_kl_sums_the_response_tokens_only():
  logp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
  ref = jnp.array([[-1.5, -1.0, -9.0], [-1.0, -2.0, -4.0]])
  mask = jnp.array([[True, True, False], [True, False, False]])
  np.testing.assert_allclose(policy_eval.sequence_kl(logp, ref, mask), [0.5 - 1.0, 0.5])


@pytest.mark.parametrize("same", [True, False])
def test_kl_estimate_matches_the_exact_kl_of_one_token_responses(tmp_path, same):
  policy_dir, model, params = export(tmp_path, "policy", 0)
  ref_dir, _, ref_params = (policy_dir, model, params) if same else export(tmp_path, "ref", 1)
  settings = policy_eval.EvalSettings(prompts=4, samples=256, max_new_tokens=1, batch_size=128)
  metrics = policy_eval.evaluate_policy(
      policy_dir, ref_dir, PROMPTS, ["a"] * 4, lambda text, ref: float(text == ref),
      lambda ids: "a" if ids and ids[0] % 2 else "b", stop_tokens=(), pad_id=0,
      settings=settings)
  assert metrics["policy/responses"] == 4 * 256
  assert metrics["policy/length"] == 1.0
  if same:
    assert metrics["policy/kl"] == 0.0
    return
  exact = exact_first_token_kl(model, params, ref_params)
  assert exact > 0.05  # the two models really differ
  assert abs(metrics["policy/kl"] - exact) < 4 * metrics["policy/kl_stderr"]
  # The reward is the share of odd tokens sampled: strictly between 0 and 1 for these models.
  assert 0.0 < metrics["policy/reward"] < 1.0


def test_evaluate_run_writes_policy_eval_json(tmp_path):
  cfg = run_config()
  export(tmp_path / "run", "export", 0, cfg=cfg.model)
  ref_dir, _, _ = export(tmp_path, "start", 1, cfg=cfg.model)
  cfg = chz.replace(cfg, init_from=str(ref_dir))
  config_lib.write_config(cfg, tmp_path / "run" / "config.json")
  (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
  settings = policy_eval.EvalSettings(prompts=8, samples=2, max_new_tokens=4, batch_size=16)
  out = policy_eval.evaluate_run(tmp_path / "run", settings=settings)
  written = json.loads((tmp_path / "run" / policy_eval.EVAL_FILE).read_text())
  assert written["step"] == 3 and written["metrics"] == out["metrics"]
  assert set(out["metrics"]) >= {"policy/reward", "policy/kl", "policy/kl_stderr",
                                 "policy/accuracy"}
  assert out["metrics"]["policy/kl"] != 0.0
  assert out["settings"]["reference"] == str(ref_dir)


def test_evaluate_run_says_to_export(tmp_path):
  config_lib.write_config(run_config(), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="train.export=true"):
    policy_eval.evaluate_run(tmp_path)

