"""PPO / GRPO / RLOO math against plain-Python transcriptions of the formulas; score
normalisation against numpy; the shared-trunk step (policy + value head) on a fixed batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf.algorithms import ppo
from jrlhf.models import ModelConfig
from jrlhf.peft import config as peft_config
from jrlhf.sharding import MeshConfig, make_mesh
from jrlhf.train.config import OptimConfig
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.ppo_critic import value_head_state
from jrlhf.train.state import create_state

RNG = np.random.default_rng(0)
B, N = 4, 7
LENGTHS = np.array([7, 3, 1, 5])


def test_response_mask_and_last_token():
  mask = np.asarray(ppo.response_mask(LENGTHS, N))
  assert mask.sum(axis=1).tolist() == LENGTHS.tolist()
  assert np.asarray(ppo.last_token_index(mask)).tolist() == (LENGTHS - 1).tolist()


def test_score_sits_on_the_last_real_token_and_padding_has_no_reward():
  mask = ppo.response_mask(LENGTHS, N)
  kl = RNG.normal(size=(B, N)).astype(np.float32)
  score = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  rewards = np.asarray(ppo.token_rewards(score, kl, mask, 0.1))
  for b, n in enumerate(LENGTHS):
    expected = -0.1 * kl[b, :n]
    expected[n - 1] += score[b]
    np.testing.assert_allclose(rewards[b, :n], expected, rtol=1e-6)
    assert not rewards[b, n:].any()


def python_gae(rewards, values, lengths, gamma, lam):
  adv = np.zeros_like(rewards)
  for b, n in enumerate(lengths):
    last = 0.0
    for t in reversed(range(n)):
      next_value = values[b, t + 1] if t + 1 < n else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  returns = np.where(np.arange(rewards.shape[1]) < lengths[:, None], adv + values, 0.0)
  return adv, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_equals_a_plain_loop(gamma, lam):
  rewards = RNG.normal(size=(B, N)).astype(np.float32)
  values = RNG.normal(size=(B, N)).astype(np.float32)
  adv, returns = ppo.gae(rewards, values, ppo.response_mask(LENGTHS, N), gamma, lam)
  want_adv, want_returns = python_gae(rewards, values, LENGTHS, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(returns, want_returns, rtol=1e-5, atol=1e-6)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_clips():
  mask = np.asarray(ppo.response_mask(LENGTHS, N))
  adv = RNG.normal(size=(B, N)).astype(np.float32)
  logp = RNG.normal(size=(B, N)).astype(np.float32)
  loss, stats = ppo.policy_loss(logp, logp, adv, mask, clip=0.2)
  np.testing.assert_allclose(loss, -adv[mask].mean(), rtol=1e-6)
  assert float(stats["val/ratio"]) == pytest.approx(1.0)
  assert float(stats["policy/clipfrac"]) == 0.0

  new = logp + RNG.normal(scale=0.5, size=(B, N)).astype(np.float32)
  loss, stats = ppo.policy_loss(new, logp, adv, mask, clip=0.2)
  r = np.exp(new - logp)
  want = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.2))[mask].mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  clipped = (-adv * np.clip(r, 0.8, 1.2) > -adv * r)[mask].mean()
  np.testing.assert_allclose(stats["policy/clipfrac"], clipped, rtol=1e-6)
  np.testing.assert_allclose(stats["policy/approxkl"], 0.5 * ((new - logp)[mask] ** 2).mean(),
                             rtol=1e-5)


def test_value_loss_is_clipped_around_the_old_values():
  mask = np.asarray(ppo.response_mask(LENGTHS, N))
  v, old, ret = (RNG.normal(size=(B, N)).astype(np.float32) for _ in range(3))
  loss, _ = ppo.value_loss(v, old, ret, mask, clip=0.2)
  vc = np.clip(v, old - 0.2, old + 0.2)
  want = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)[mask].mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_whiten_over_valid_tokens_only():
  mask = np.asarray(ppo.response_mask(LENGTHS, N))
  x = RNG.normal(loc=3.0, size=(B, N)).astype(np.float32)
  out = np.asarray(ppo.whiten(x, mask))
  valid = x[mask]
  np.testing.assert_allclose(out[mask], (valid - valid.mean()) / valid.std(ddof=1), rtol=1e-4)
  assert not out[~mask].any()
  kept = np.asarray(ppo.whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask].mean(), valid.mean(), rtol=1e-4)


def test_kl_estimators():
  logp, ref = RNG.normal(size=(2, B, N)).astype(np.float32)
  np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k1"), logp - ref, rtol=1e-6)
  k3 = np.asarray(ppo.kl_penalty(logp, ref, "k3"))
  np.testing.assert_allclose(k3, np.exp(ref - logp) - 1 - (ref - logp), rtol=1e-5, atol=1e-6)
  assert (k3 >= 0).all()
  with pytest.raises(ValueError, match="k2"):
    ppo.kl_penalty(logp, ref, "k2")


def test_group_advantages():
  scores = RNG.normal(size=12).astype(np.float32)
  groups = scores.reshape(3, 4)
  grpo = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(ppo.group_advantages(scores, 4, "grpo"), grpo.reshape(-1), rtol=1e-5)
  rloo = np.stack([[g[i] - np.delete(g, i).mean() for i in range(4)] for g in groups])
  np.testing.assert_allclose(ppo.group_advantages(scores, 4, "rloo"), rloo.reshape(-1),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="groups of 5"):
    ppo.group_advantages(scores, 5)


def test_adaptive_kl_controller():
  # KL twice the target: the error clips at +0.2, so beta grows by 0.2 * n / horizon.
  assert float(ppo.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 100)) == pytest.approx(0.1 * 1.002)
  assert float(ppo.adaptive_kl_coef(0.1, 5.4, 6.0, 10000, 100)) == pytest.approx(0.1 * 0.999)


# ---------------------------------------------------------------------------------------------
# Score normalisation against plain numpy.

SCORE_BATCHES = [RNG.normal(loc=2.0, scale=3.0, size=16).astype(np.float32) for _ in range(3)]


def test_batch_score_norm_whitens_each_batch_and_clips():
  x = SCORE_BATCHES[0]
  out, moments = ppo.normalize_scores(x, "batch")
  np.testing.assert_allclose(out, (x - x.mean()) / x.std(ddof=1), rtol=1e-5, atol=1e-6)
  assert moments is None
  clipped, _ = ppo.normalize_scores(x, "batch", clip=0.5)
  np.testing.assert_allclose(clipped, np.clip((x - x.mean()) / x.std(ddof=1), -0.5, 0.5),
                             rtol=1e-5, atol=1e-6)
  assert np.abs(clipped).max() == pytest.approx(0.5)
  same, _ = ppo.normalize_scores(np.ones(8), "batch")  # all equal: no signal, not NaN
  assert not same.any()
  raw, _ = ppo.normalize_scores(x, "none", clip=1.0)
  np.testing.assert_array_equal(raw, np.clip(x, -1.0, 1.0))


def test_running_score_norm_uses_every_score_so_far():
  moments = None
  for i, x in enumerate(SCORE_BATCHES):
    out, moments = ppo.normalize_scores(x, "running", moments=moments)
    seen = np.concatenate(SCORE_BATCHES[:i + 1]).astype(np.float64)
    assert moments.count == seen.size
    np.testing.assert_allclose([moments.mean, moments.var, moments.std],
                               [seen.mean(), seen.var(), seen.std(ddof=1)], rtol=1e-6)
    np.testing.assert_allclose(out, (x - seen.mean()) / seen.std(ddof=1), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="none, batch, running"):
    ppo.normalize_scores(SCORE_BATCHES[0], "whiten")


def test_config_rejects_unknown_options_with_the_choices():
  with pytest.raises(ValueError, match="none, batch, running"):
    ppo.PPOConfig(score_norm="whiten")
  with pytest.raises(ValueError, match="separate"):
    ppo.PPOConfig(value_model="critic")
  with pytest.raises(ValueError, match="score_clip"):
    ppo.PPOConfig(score_clip=-1.0)


def test_objective_metrics_report_the_raw_scores():
  mask = ppo.response_mask(LENGTHS, N)
  logp, ref = RNG.normal(size=(2, B, N)).astype(np.float32)
  batch = {"response_mask": mask, "old_logprobs": logp, "ref_logprobs": ref}
  raw = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
  normed, _ = ppo.normalize_scores(raw, "batch")
  values = np.zeros((B, N), np.float32)
  adv, _, stats = ppo.advantages(batch, normed, values, 0.1, ppo.PPOConfig(), raw_score_B=raw)
  want, _, _ = ppo.advantages(batch, normed, values, 0.1, ppo.PPOConfig())
  np.testing.assert_allclose(adv, want)  # the rewards use the normalised scores
  assert float(stats["objective/scores"]) == pytest.approx(0.75)
  kl = np.where(np.asarray(mask), logp - ref, 0.0).sum(1)
  assert float(stats["objective/rlhf_reward"]) == pytest.approx((raw - 0.1 * kl).mean(), rel=1e-5)
  entropy = np.where(np.asarray(mask), -logp, 0.0).sum(1).mean()
  assert float(stats["objective/entropy"]) == pytest.approx(entropy, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Shared trunk: the value head on the policy's last hidden state, one step for both losses.

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, max_position_embeddings=64)


def fixed_batch(rows=8, p=6, n=5):
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, n + 1, size=rows)
  tokens = rng.integers(4, 64, size=(rows, p + n)).astype(np.int32)
  prompt_mask = np.ones((rows, p), bool)
  prompt_mask[::2, :2] = False  # left padding on every other row
  batch = ppo.rollout_batch(jnp.asarray(tokens[:, :p]), jnp.asarray(prompt_mask),
                            jnp.asarray(tokens[:, p:]), jnp.asarray(lengths))
  mask = np.asarray(batch["response_mask"])
  # Returns that depend on the response, so the head has something to fit.
  returns = np.where(mask, (tokens[:, p:] % 3) / 2.0, 0.0).astype(np.float32)
  adv = np.where(mask, rng.normal(size=mask.shape), 0.0).astype(np.float32)
  return batch, returns, adv


@pytest.mark.parametrize("method", ["full", "lora"])
def test_shared_trunk_step_updates_the_head_and_its_value_loss_falls(method):
  peft = None if method == "full" else peft_config.LoraConfig(rank=4, alpha=8.0)
  opt = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant",
                                   weight_decay=0.0), 100)
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  model, state, state_sh = create_state(MODEL, opt, mesh, seed=0, peft=peft)
  head, head_sh = value_head_state(MODEL.hidden_size, opt, mesh, seed=1)
  cfg = ppo.PPOConfig(temperature=0.7, clip_value=10.0, vf_coef=0.5)
  batch, returns, adv = fixed_batch()
  params = ppo.step.combine_params(state.trainable, state.frozen)
  old_logp, old_values = ppo.logprobs_and_values(model, params, head.trainable, batch, 0.7)
  # The log-probs are exactly the plain forward's; a zero head gives zero values.
  np.testing.assert_allclose(old_logp, ppo.response_logprobs(model, params, batch, 0.7),
                             rtol=1e-6, atol=1e-6)
  assert not np.asarray(old_values).any()
  batch = {**batch, "old_logprobs": old_logp, "advantages": adv, "returns": returns,
           "old_values": old_values}
  step = jax.jit(functools.partial(ppo.shared_step, model=model, cfg=cfg, opt=opt),
                 in_shardings=((state_sh, head_sh), None),
                 out_shardings=((state_sh, head_sh), None))
  trainable_before = jax.tree.map(np.asarray, state.trainable)
  losses = []
  for _ in range(15):
    (state, head), metrics = step((state, head), batch)
    losses.append(float(metrics["loss/value"]))
  assert losses[0] == pytest.approx(0.5 * float(np.mean(returns[np.asarray(batch[
      "response_mask"])] ** 2)), rel=1e-5)  # zero values: 0.5 mean(R^2)
  assert losses[-1] < 0.5 * losses[0], losses
  assert np.abs(np.asarray(head.trainable["kernel"])).max() > 0
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.trainable,
                       trainable_before)
  assert max(jax.tree.leaves(moved)) > 0  # the trunk (or its adapters) moved too
  assert {"loss/policy", "loss/value", "loss/total", "policy/clipfrac", "value/clipfrac",
          "value/grad_norm"} <= set(metrics)
