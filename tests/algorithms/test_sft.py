"""SFT loss against hand computations: the shift, the masks, label smoothing, eval metrics, and
normalisation by the token count of the whole accumulation window."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jrlhf.algorithms import common, sft
from jrlhf.train.optimizer import Optimizer
from jrlhf.train.state import TrainState

V = 5


class Bigram:
  """A model whose logits at t are a row of a table picked by tokens[t]: easy to do by hand."""

  def apply(self, variables, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    return variables["params"]["table"][tokens_BxL]


def hand_nll(table, tokens, pairs):
  """-log softmax(table[tokens[b, t-1]])[tokens[b, t]] for each target (b, t), in numpy."""
  out = []
  for b, t in pairs:
    row = np.asarray(table, np.float64)[tokens[b, t - 1]]
    out.append(-(row[tokens[b, t]] - np.log(np.exp(row).sum())))
  return np.array(out)


# Row 0 packs two documents [1 1 1 | 2 2]; row 1 is one document and two padding tokens.
BATCH = {
    "tokens": np.array([[0, 1, 2, 3, 4], [2, 4, 1, 0, 0]], np.int32),
    "positions": np.array([[0, 1, 2, 0, 1], [0, 1, 2, 0, 0]], np.int32),
    "segment_ids": np.array([[1, 1, 1, 2, 2], [1, 1, 1, 0, 0]], np.int32),
    "loss_mask": np.array([[0, 1, 1, 0, 1], [0, 0, 1, 0, 0]], bool),
}
TARGETS = [(0, 1), (0, 2), (0, 4), (1, 2)]
TABLE = jax.random.normal(jax.random.key(0), (V, V)) * 2


def test_loss_is_mean_nll_over_targets():
  loss_sum, sums = sft.loss_fn({"table": TABLE}, BATCH, Bigram(), sft.SFTConfig())
  expected = hand_nll(TABLE, BATCH["tokens"], TARGETS)
  assert float(sums["tokens"]) == 4
  assert float(loss_sum) == pytest.approx(expected.sum(), rel=1e-5)
  assert float(sums["nll"]) == pytest.approx(expected.sum(), rel=1e-5)


def test_document_starts_and_padding_never_count_even_if_the_mask_says_so():
  broken = dict(BATCH, loss_mask=np.ones((2, 5), bool))  # violates the data contract
  _, sums = sft.loss_fn({"table": TABLE}, broken, Bigram(), sft.SFTConfig())
  # Row 0: targets at 1, 2, 4 (3 starts document 2); row 1: targets at 1, 2 (3, 4 are padding).
  expected = hand_nll(TABLE, BATCH["tokens"], [(0, 1), (0, 2), (0, 4), (1, 1), (1, 2)])
  assert float(sums["tokens"]) == 5
  assert float(sums["nll"]) == pytest.approx(expected.sum(), rel=1e-5)


def test_masked_positions_have_no_gradient_influence():
  other = dict(BATCH, tokens=BATCH["tokens"].copy())
  other["tokens"][1, 4] = 3  # padding token changed
  loss = lambda b: sft.loss_fn({"table": TABLE}, b, Bigram(), sft.SFTConfig())[0]  # noqa: E731
  assert float(loss(BATCH)) == float(loss(other))


def test_label_smoothing_formula():
  e = 0.1
  loss_sum, sums = sft.loss_fn({"table": TABLE}, BATCH, Bigram(), sft.SFTConfig(label_smoothing=e))
  rows = np.asarray(TABLE, np.float64)[[BATCH["tokens"][b, t - 1] for b, t in TARGETS]]
  logp = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
  nll = hand_nll(TABLE, BATCH["tokens"], TARGETS)
  expected = ((1 - e) * nll - e * logp.mean(-1)).sum()
  assert float(loss_sum) == pytest.approx(expected, rel=1e-5)
  assert float(sums["nll"]) == pytest.approx(nll.sum(), rel=1e-5)  # eval loss stays plain NLL


def test_accuracy_entropy_and_eval_metrics():
  _, sums = sft.loss_fn({"table": TABLE}, BATCH, Bigram(), sft.SFTConfig())
  rows = np.asarray(TABLE, np.float64)[[BATCH["tokens"][b, t - 1] for b, t in TARGETS]]
  targets = [BATCH["tokens"][b, t] for b, t in TARGETS]
  assert float(sums["correct"]) == sum(rows.argmax(-1) == targets)
  p = np.exp(rows) / np.exp(rows).sum(-1, keepdims=True)
  assert float(sums["entropy"]) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-5)
  m = sft.eval_metrics({k: float(v) for k, v in sums.items()})
  assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))


def test_common_helpers_on_edge_cases():
  assert float(common.masked_mean(jnp.ones(3), jnp.zeros(3, bool))) == 0.0
  logits = jnp.zeros((1, 1, 8))
  assert float(common.entropy(logits)[0, 0]) == pytest.approx(math.log(8))
  assert float(common.token_logprobs(logits, jnp.zeros((1, 1), jnp.int32))[0, 0]) == pytest.approx(
      -math.log(8))


def sgd_state(params):
  tx = optax.sgd(1.0)
  opt = Optimizer(tx, optax.constant_schedule(1.0), grad_accum=2)
  state = TrainState(trainable=params, frozen={}, opt_state=tx.init(params),
                     step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
  return state, opt


def test_window_is_normalised_by_its_total_token_count():
  """Micro-batch 0 has 1 target, micro-batch 1 has 3: the loss is the sum of 4 NLLs over 4,
  not the mean of the two micro-batch means."""
  mb0 = {k: v[:1] for k, v in BATCH.items()}
  mb0["loss_mask"] = np.array([[0, 0, 0, 0, 1]], bool)  # one target: (0, 4)
  mb1 = {k: v[:1] for k, v in BATCH.items()}
  mb1["loss_mask"] = np.array([[0, 1, 1, 0, 1]], bool)  # three: (0, 1), (0, 2), (0, 4)
  from jrlhf.algorithms.step import interleave_micro_batches
  window = interleave_micro_batches([mb0, mb1])
  state, opt = sgd_state({"table": TABLE})
  new_state, metrics = sft.train_step(state, window, model=Bigram(), cfg=sft.SFTConfig(), opt=opt)

  def hand_loss(table):
    rows = table[BATCH["tokens"][0, [3, 0, 1, 3]]]
    logp = jax.nn.log_softmax(rows, axis=-1)
    return -logp[jnp.arange(4), BATCH["tokens"][0, [4, 1, 2, 4]]].sum() / 4

  assert float(metrics["tokens"]) == 4
  assert float(metrics["loss"]) == pytest.approx(float(hand_loss(TABLE)), rel=1e-5)
  nll = hand_nll(TABLE, BATCH["tokens"], [(0, 4), (0, 1), (0, 2), (0, 4)])
  assert float(metrics["loss"]) != pytest.approx((nll[0] + nll[1:].mean()) / 2, rel=1e-3)
  expected = TABLE - jax.grad(hand_loss)(TABLE)  # SGD, lr 1
  np.testing.assert_allclose(new_state.trainable["table"], expected, rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 1
