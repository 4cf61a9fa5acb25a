"""DPO family: each loss against a direct transcription of TRL's formula (torch), log 2 at the
start, precomputed vs on-the-fly references, the SFT term, and the accumulation window."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from jrlhf.algorithms import dpo
from jrlhf.algorithms.step import REFERENCE, interleave_micro_batches
from jrlhf.train.optimizer import Optimizer
from jrlhf.train.state import TrainState

P = 6
rng = np.random.default_rng(0)
# Asymmetric on purpose (CONVENTIONS 11): chosen and rejected differ in value and length.
LOGP_C, LOGP_R = -rng.uniform(2, 30, P), -rng.uniform(2, 30, P)
REF_C, REF_R = -rng.uniform(2, 30, P), -rng.uniform(2, 30, P)
LEN_C, LEN_R = rng.integers(1, 12, P).astype(np.float64), rng.integers(1, 12, P).astype(
    np.float64)
BETA, EPS, GAMMA = 0.2, 0.15, 0.5


def trl_loss(name):
  """TRL 1.16 (dpo_trainer.py `_compute_loss`; orpo/cpo trainers for ORPO, SimPO), in torch."""
  t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
  pc, pr, rc, rr, nc, nr = map(t, (LOGP_C, LOGP_R, REF_C, REF_R, LEN_C, LEN_R))
  chosen_logratios, rejected_logratios = pc - rc, pr - rr
  delta = chosen_logratios - rejected_logratios
  b, e = BETA, EPS
  if name == "sigmoid":  # cDPO form (TRL <= 0.2x, CPOTrainer): e = 0 is TRL 1.16's sigmoid
    return -F.logsigmoid(b * delta) * (1 - e) - F.logsigmoid(-b * delta) * e
  if name == "robust":
    return (-(1 - e) * F.logsigmoid(b * delta) - (-e * F.logsigmoid(-b * delta))) / (1 - 2 * e)
  if name == "hinge":
    return torch.relu(1 - b * delta)
  if name == "ipo":
    return ((chosen_logratios / nc - rejected_logratios / nr) - 1 / (2 * b)) ** 2
  if name == "sigmoid_norm":
    return -F.logsigmoid(b * (chosen_logratios / nc - rejected_logratios / nr))
  if name == "nca_pair":
    cr, rj = b * chosen_logratios, b * rejected_logratios
    return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rj)
  if name == "bco_pair":
    return -F.logsigmoid(b * chosen_logratios) - F.logsigmoid(-b * rejected_logratios)
  if name == "sppo_hard":
    return (chosen_logratios - 0.5 / b) ** 2 + (rejected_logratios + 0.5 / b) ** 2
  if name == "apo_zero":
    return 1 - torch.sigmoid(b * chosen_logratios) + torch.sigmoid(b * rejected_logratios)
  if name == "apo_down":
    return torch.sigmoid(b * chosen_logratios) + 1 - torch.sigmoid(b * delta)
  if name == "exo_pair":
    eps = torch.tensor(e, dtype=torch.float64)
    return (torch.sigmoid(b * delta) * (F.logsigmoid(b * delta) - torch.log1p(-eps))
            + torch.sigmoid(-b * delta) * (F.logsigmoid(-b * delta) - torch.log(eps)))
  ac, ar = pc / nc, pr / nr  # length-averaged (average_log_prob=True)
  if name == "simpo":
    logits = (ac - ar) - GAMMA / b
    return -F.logsigmoid(b * logits) * (1 - e) - F.logsigmoid(-b * logits) * e
  if name == "orpo":
    log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
    return -b * F.logsigmoid(log_odds)
  if name == "sft":
    return torch.zeros_like(pc)
  raise KeyError(name)


@pytest.mark.parametrize("name", list(dpo.LOSSES))
def test_each_variant_equals_trls_formula(name):
  cfg = dpo.DPOConfig(beta=BETA, loss=(name,), label_smoothing=EPS, simpo_gamma=GAMMA)
  pair = dpo.Pair(*(jnp.asarray(x, jnp.float32)
                    for x in (LOGP_C, LOGP_R, REF_C, REF_R, LEN_C, LEN_R)))
  ours = np.asarray(dpo.LOSSES[name].fn(pair, cfg))
  np.testing.assert_allclose(ours, trl_loss(name).numpy(), rtol=2e-5, atol=1e-6)


def test_reference_needs_follow_the_variants():
  assert dpo.DPOConfig().needs_reference
  assert not dpo.DPOConfig(loss=("simpo",)).needs_reference
  assert not dpo.DPOConfig(loss=("orpo",)).needs_reference
  assert not dpo.DPOConfig(reference_free=True).needs_reference
  with pytest.raises(ValueError, match="one or more of"):
    dpo.DPOConfig(loss=("sigmoidd",))
  with pytest.raises(ValueError, match="one per loss"):
    dpo.DPOConfig(loss=("sigmoid", "sft"), loss_weights=(1.0,))


# ---------------------------------------------------------------------------------------------
# Through a model: a bigram table keeps the hand computations and the compiles small.

V = 7


class Bigram:
  def apply(self, variables, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    return variables["params"]["table"][tokens_BxL]


def pair_batch(num_pairs=3, length=6, seed=1):
  """[chosen; rejected] rows: a 2-token prompt shared by each pair, responses of various lengths
  (right-padded), so chosen and rejected differ in content and length."""
  r = np.random.default_rng(seed)
  rows, masks = [], []
  prompts = r.integers(1, V, (num_pairs, 2))
  for side in range(2):
    for p in range(num_pairs):
      n = 1 + (p + side) % (length - 2)
      row = np.zeros(length, np.int32)
      row[:2] = prompts[p]
      row[2:2 + n] = r.integers(1, V, n)
      mask = np.zeros(length, bool)
      mask[2:2 + n] = True
      rows.append(row)
      masks.append(mask)
  tokens, loss_mask = np.stack(rows), np.stack(masks)
  real = np.zeros_like(loss_mask)
  for i, m in enumerate(loss_mask):
    real[i, :np.flatnonzero(m)[-1] + 1] = True
  return {"tokens": tokens, "positions": np.where(real, np.cumsum(real, 1) - 1, 0).astype(np.int32),
          "segment_ids": real.astype(np.int32), "loss_mask": loss_mask}


TABLE = jax.random.normal(jax.random.key(0), (V, V))
REF_TABLE = jax.random.normal(jax.random.key(1), (V, V))


def hand_logps(table, batch):
  logp = jax.nn.log_softmax(jnp.asarray(table, jnp.float32), axis=-1)
  out = []
  for row, mask in zip(batch["tokens"], batch["loss_mask"]):
    out.append(sum(float(logp[row[t - 1], row[t]]) for t in np.flatnonzero(mask)))
  return np.array(out)


def state_for(params, frozen, grad_accum=1):
  tx = optax.sgd(0.1)
  opt = Optimizer(tx, optax.constant_schedule(0.1), grad_accum=grad_accum)
  return TrainState(trainable=params, frozen=frozen, opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0)), opt


def test_loss_is_log2_when_policy_is_reference():
  batch = pair_batch()
  state, opt = state_for({"table": TABLE}, {REFERENCE: {"table": TABLE}})
  _, metrics = dpo.train_step(state, batch, model=Bigram(), cfg=dpo.DPOConfig(), opt=opt)
  assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-6)
  assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics["grad_norm"]) > 0  # log 2 is the start, not a fixed point


def test_metrics_and_loss_by_hand():
  batch, cfg = pair_batch(), dpo.DPOConfig(beta=0.3)
  logp, ref = hand_logps(TABLE, batch), hand_logps(REF_TABLE, batch)
  (pc, pr), (rc, rr) = np.split(logp, 2), np.split(ref, 2)
  state, opt = state_for({"table": TABLE}, {REFERENCE: {"table": REF_TABLE}})
  _, m = dpo.train_step(state, batch, model=Bigram(), cfg=cfg, opt=opt)
  margin = (pc - rc) - (pr - rr)
  assert float(m["loss"]) == pytest.approx(np.mean(np.logaddexp(0, -0.3 * margin)), rel=1e-5)
  assert float(m["rewards/chosen"]) == pytest.approx(np.mean(0.3 * (pc - rc)), rel=1e-5)
  assert float(m["rewards/rejected"]) == pytest.approx(np.mean(0.3 * (pr - rr)), rel=1e-5)
  assert float(m["rewards/margins"]) == pytest.approx(np.mean(0.3 * margin), rel=1e-5)
  assert float(m["rewards/accuracies"]) == pytest.approx(np.mean(margin > 0))
  assert float(m["logps/chosen"]) == pytest.approx(pc.mean(), rel=1e-5)
  assert float(m["logps/rejected"]) == pytest.approx(pr.mean(), rel=1e-5)


def test_precomputed_and_on_the_fly_references_give_the_same_loss_and_gradient():
  batch, cfg, model = pair_batch(), dpo.DPOConfig(loss=("sigmoid", "ipo")), Bigram()
  counts = dpo.pair_counts(batch)
  ref_logps = dpo.sequence_logps({"table": REF_TABLE}, batch, model)
  np.testing.assert_allclose(ref_logps, hand_logps(REF_TABLE, batch), rtol=1e-5)
  on_the_fly = lambda t: dpo.loss_fn({"table": t}, {"table": REF_TABLE}, batch, model, cfg,  # noqa: E731
                                     counts)[0]
  cached = dict(batch, ref_logps=np.asarray(ref_logps))
  precomputed = lambda t: dpo.loss_fn({"table": t}, None, cached, model, cfg, counts)[0]  # noqa: E731
  assert float(on_the_fly(TABLE)) == pytest.approx(float(precomputed(TABLE)), rel=1e-6)
  np.testing.assert_allclose(jax.grad(on_the_fly)(TABLE), jax.grad(precomputed)(TABLE),
                             rtol=1e-5, atol=1e-7)


def test_sft_term_is_the_mean_nll_of_the_chosen_tokens():
  batch, model = pair_batch(), Bigram()
  counts = dpo.pair_counts(batch)
  ref = {"table": REF_TABLE}
  plain = dpo.loss_fn({"table": TABLE}, ref, batch, model, dpo.DPOConfig(), counts)[0]
  rpo = dpo.loss_fn({"table": TABLE}, ref, batch, model,
                    dpo.DPOConfig(loss=("sigmoid", "sft"), loss_weights=(1.0, 0.5)), counts)[0]
  chosen_tokens = batch["loss_mask"][:3].sum()
  nll = -hand_logps(TABLE, batch)[:3].sum() / chosen_tokens
  assert float(rpo) == pytest.approx(float(plain) + 0.5 * nll, rel=1e-5)


def test_accumulated_window_equals_one_batch():
  """Two micro-batches of pairs (each [chosen; rejected]) make the same step as one batch."""
  model, cfg = Bigram(), dpo.DPOConfig(loss=("sigmoid", "sft"))
  whole = pair_batch(num_pairs=4, seed=3)
  halves = [{k: np.concatenate([v[i * 2:(i + 1) * 2], v[4 + i * 2:4 + (i + 1) * 2]])
             for k, v in whole.items()} for i in range(2)]
  frozen = {REFERENCE: {"table": REF_TABLE}}
  state1, opt1 = state_for({"table": TABLE}, frozen)
  state2, opt2 = state_for({"table": TABLE}, frozen, grad_accum=2)
  new1, m1 = dpo.train_step(state1, whole, model=model, cfg=cfg, opt=opt1)
  new2, m2 = dpo.train_step(state2, interleave_micro_batches(halves), model=model, cfg=cfg,
                            opt=opt2)
  for key in ("loss", "rewards/margins", "logps/chosen", "nll_loss", "pairs"):
    assert float(m1[key]) == pytest.approx(float(m2[key]), rel=1e-5), key
  np.testing.assert_allclose(new1.trainable["table"], new2.trainable["table"], rtol=1e-5,
                             atol=1e-7)


def test_eval_ignores_empty_filler_pairs():
  batch, model, cfg = pair_batch(), Bigram(), dpo.DPOConfig()
  filler = {k: np.zeros_like(v[:1]) for k, v in batch.items()}
  padded = {k: np.concatenate([v[:3], filler[k], v[3:], filler[k]]) for k, v in batch.items()}
  state, _ = state_for({"table": TABLE}, {REFERENCE: {"table": REF_TABLE}})
  plain = dpo.eval_metrics(dpo.eval_step(state, batch, model=model, cfg=cfg))
  filled = dpo.eval_metrics(dpo.eval_step(state, padded, model=model, cfg=cfg))
  assert filled["pairs"] == 3
  for key in ("loss", "rewards/accuracies", "logps/chosen", "entropy"):
    assert filled[key] == pytest.approx(plain[key], rel=1e-5), key


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_log2_at_step_0_through_the_train_state(peft):
  """Full fine-tuning: the frozen copy is the reference; LoRA (B = 0): the base under it."""
  from jrlhf.models import ModelConfig
  from jrlhf.peft.config import LoraConfig
  from jrlhf.sharding import MeshConfig, make_mesh, sharding_context
  from jrlhf.train.config import OptimConfig
  from jrlhf.train.optimizer import make_optimizer
  from jrlhf.train.state import create_state

  cfg = ModelConfig(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, mlp_dim=32, max_position_embeddings=16)
  mesh = make_mesh(MeshConfig())
  opt = make_optimizer(OptimConfig(lr=1e-2), 2)
  model, state, _ = create_state(cfg, opt, mesh, reference=True,
                                 peft=LoraConfig(rank=2) if peft == "lora" else None)
  if peft == "full":
    assert set(state.frozen) == {REFERENCE}
  step = jax.jit(lambda s, b: dpo.train_step(s, b, model=model, cfg=dpo.DPOConfig(), opt=opt))
  with sharding_context(mesh):
    state, m0 = step(state, pair_batch(num_pairs=4))
    _, m1 = step(state, pair_batch(num_pairs=4))
  assert float(m0["loss"]) == pytest.approx(math.log(2), abs=1e-6)
  assert float(m1["loss"]) < math.log(2)  # the policy moved, the reference did not
