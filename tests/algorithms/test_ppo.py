"""PPO / GRPO / RLOO math against plain-Python transcriptions of the formulas."""

import numpy as np
import pytest

from jrlhf.algorithms import ppo

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
