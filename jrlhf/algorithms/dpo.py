"""Direct preference optimisation and its relatives, with TRL's formulas and metric names.

  cfg = DPOConfig(beta=0.1, loss=("sigmoid", "sft"), loss_weights=(1.0, 1.0))   # DPO + RPO
  step = functools.partial(dpo.train_step, model=model, cfg=cfg, opt=opt)
  state, metrics = step(state, batch)   # loss, rewards/chosen, rewards/margins, logps/chosen, ...

A batch of 2P rows is laid out `[chosen; rejected]`: row p and row P + p are the two responses
to one prompt (the contract fields of `jrlhf.data`, `loss_mask` on the response tokens). With
`A` micro-batches interleaved by the loop, each micro-batch is `[chosen; rejected]` again.

The reference log-probs come, in this order, from a `ref_logps` column of the batch (one per
row, precomputed once), from nothing (`reference_free`, or only variants that need none), or
from a forward pass of the reference params: the base model under PEFT (`base_params`, no second
copy), a frozen copy under full fine-tuning (`state.frozen["reference"]`). See `step.reference_params`.

Notation (REFERENCE.md): logp = summed log-probs of the response tokens; l_c = logp_c - ref_c,
l_r likewise, D = l_c - l_r; a_c = logp_c / |y_c| (length-averaged).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import chz
import jax
import jax.numpy as jnp

from jrlhf.algorithms import common, step

Array = jax.Array
ls = jax.nn.log_sigmoid


class Pair(NamedTuple):
  """Per-pair quantities, each (P,): policy and reference summed logps and response lengths."""

  logp_c: Array
  logp_r: Array
  ref_c: Array
  ref_r: Array
  len_c: Array
  len_r: Array

  @property
  def margin(self) -> Array:  # D
    return (self.logp_c - self.ref_c) - (self.logp_r - self.ref_r)


@chz.chz
class DPOConfig:
  """loss: one or more of `LOSSES` (combined as sum_k w_k * loss_k, like TRL's `loss_type` list
  with `loss_weights`; empty weights = 1 each). beta: the KL strength (ORPO's lambda, as in TRL).
  label_smoothing: e of cDPO (`sigmoid`, `simpo`), `robust` and `exo_pair`.
  simpo_gamma: SimPO's target margin. reference_free: reference logps = 0 (DPO without a
  reference model). precompute_ref: the loop runs the reference over the data once, caches the
  logps in the run dir (`jrlhf.train.ref_cache`) and trains without a reference model. The
  `sft` term (RPO) and ORPO's NLL are the mean NLL over all chosen tokens.
  """

  beta: float = 0.1
  loss: tuple[str, ...] = ("sigmoid",)
  loss_weights: tuple[float, ...] = ()
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  reference_free: bool = False
  precompute_ref: bool = False

  @chz.validate
  def _check(self):
    unknown = [name for name in self.loss if name not in LOSSES]
    if unknown or not self.loss:
      raise ValueError(f"algorithm.loss={','.join(self.loss)} must be one or more of: "
                       f"{', '.join(LOSSES)}")
    if self.loss_weights and len(self.loss_weights) != len(self.loss):
      raise ValueError(f"algorithm.loss_weights has {len(self.loss_weights)} entries for "
                       f"{len(self.loss)} losses ({','.join(self.loss)}); give one per loss")
    if self.beta <= 0:
      raise ValueError(f"algorithm.beta={self.beta} must be > 0")
    if not 0 <= self.label_smoothing < 0.5:
      raise ValueError(f"algorithm.label_smoothing={self.label_smoothing} must be in [0, 0.5)")

  @property
  def weights(self) -> tuple[float, ...]:
    return tuple(self.loss_weights) or (1.0,) * len(self.loss)

  @property
  def needs_reference(self) -> bool:
    """Whether some loss reads reference log-probs (SimPO, ORPO and the SFT term do not)."""
    return not self.reference_free and any(LOSSES[name].reference for name in self.loss)


# ---------------------------------------------------------------------------------------------
# Per-pair losses, (P,) each. Formulas as TRL 1.16's DPOTrainer (ORPO and SimPO as its ORPO and
# CPO trainers); `sigmoid` keeps cDPO's label smoothing, which TRL 1.x dropped from that loss.


def sigmoid(p: Pair, cfg: DPOConfig) -> Array:
  """-(1 - e) log s(beta D) - e log s(-beta D); e = 0 is DPO, e > 0 is cDPO."""
  z = cfg.beta * p.margin
  return -(1 - cfg.label_smoothing) * ls(z) - cfg.label_smoothing * ls(-z)


def robust(p: Pair, cfg: DPOConfig) -> Array:
  """[-(1 - e) log s(beta D) + e log s(-beta D)] / (1 - 2e): unbiased under label noise e."""
  e, z = cfg.label_smoothing, cfg.beta * p.margin
  return (-(1 - e) * ls(z) + e * ls(-z)) / (1 - 2 * e)


def hinge(p: Pair, cfg: DPOConfig) -> Array:
  """relu(1 - beta D) (SLiC)."""
  return jax.nn.relu(1 - cfg.beta * p.margin)


def ipo(p: Pair, cfg: DPOConfig) -> Array:
  """(l_c / |y_c| - l_r / |y_r| - 1 / (2 beta))^2: length-normalised as TRL (and the authors)."""
  d = ((p.logp_c - p.ref_c) / jnp.maximum(p.len_c, 1)
       - (p.logp_r - p.ref_r) / jnp.maximum(p.len_r, 1))
  return (d - 1 / (2 * cfg.beta)) ** 2


def sigmoid_norm(p: Pair, cfg: DPOConfig) -> Array:
  """-log s(beta (l_c / |y_c| - l_r / |y_r|)): DPO on length-averaged log-ratios."""
  d = ((p.logp_c - p.ref_c) / jnp.maximum(p.len_c, 1)
       - (p.logp_r - p.ref_r) / jnp.maximum(p.len_r, 1))
  return -ls(cfg.beta * d)


def simpo(p: Pair, cfg: DPOConfig) -> Array:
  """-(1 - e) log s(z) - e log s(-z), z = beta (a_c - a_r) - gamma (reference-free)."""
  z = cfg.beta * (p.logp_c / jnp.maximum(p.len_c, 1) - p.logp_r / jnp.maximum(p.len_r, 1))
  z = z - cfg.simpo_gamma
  return -(1 - cfg.label_smoothing) * ls(z) - cfg.label_smoothing * ls(-z)


def _log1mexp(a: Array) -> Array:
  """log(1 - e^a) for a < 0, stable at both ends."""
  return jnp.where(a > -math.log(2), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def orpo(p: Pair, cfg: DPOConfig) -> Array:
  """-beta log s(log_odds), log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)); the
  chosen NLL that completes ORPO is added by the table (`nll=True`)."""
  a_c = p.logp_c / jnp.maximum(p.len_c, 1)
  a_r = p.logp_r / jnp.maximum(p.len_r, 1)
  log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
  return -cfg.beta * ls(log_odds)


def nca_pair(p: Pair, cfg: DPOConfig) -> Array:
  """-log s(beta l_c) - log s(-beta l_c) / 2 - log s(-beta l_r) / 2."""
  c, r = cfg.beta * (p.logp_c - p.ref_c), cfg.beta * (p.logp_r - p.ref_r)
  return -ls(c) - 0.5 * ls(-c) - 0.5 * ls(-r)


def bco_pair(p: Pair, cfg: DPOConfig) -> Array:
  """-log s(beta l_c) - log s(-beta l_r)."""
  return -ls(cfg.beta * (p.logp_c - p.ref_c)) - ls(-cfg.beta * (p.logp_r - p.ref_r))


def sppo_hard(p: Pair, cfg: DPOConfig) -> Array:
  """(l_c - 1 / (2 beta))^2 + (l_r + 1 / (2 beta))^2."""
  return ((p.logp_c - p.ref_c) - 0.5 / cfg.beta) ** 2 + ((p.logp_r - p.ref_r) + 0.5 / cfg.beta) ** 2


def apo_zero(p: Pair, cfg: DPOConfig) -> Array:
  """1 - s(beta l_c) + s(beta l_r): raise the chosen, lower the rejected."""
  return (1 - jax.nn.sigmoid(cfg.beta * (p.logp_c - p.ref_c))
          + jax.nn.sigmoid(cfg.beta * (p.logp_r - p.ref_r)))


def apo_down(p: Pair, cfg: DPOConfig) -> Array:
  """s(beta l_c) + 1 - s(beta D): lower both, the rejected more."""
  return jax.nn.sigmoid(cfg.beta * (p.logp_c - p.ref_c)) + 1 - jax.nn.sigmoid(cfg.beta * p.margin)


def exo_pair(p: Pair, cfg: DPOConfig) -> Array:
  """KL(softmax over {c, r} of beta D || [1 - e, e]) (EXO); e must be > 0."""
  z, e = cfg.beta * p.margin, cfg.label_smoothing
  return (jax.nn.sigmoid(z) * (ls(z) - math.log1p(-e))
          + jax.nn.sigmoid(-z) * (ls(-z) - math.log(e)))


def sft(p: Pair, cfg: DPOConfig) -> Array:
  """Nothing per pair: the term is the chosen NLL (`nll=True`); with `sigmoid`, this is RPO."""
  return jnp.zeros_like(p.logp_c)


class Variant(NamedTuple):
  fn: Callable[[Pair, DPOConfig], Array]
  reference: bool  # reads the reference logps
  nll: bool = False  # adds the mean NLL of the chosen tokens


# Explicit table (CONVENTIONS 2 and 7): `algorithm.loss=NAME[,NAME...]`.
LOSSES: dict[str, Variant] = {
    "sigmoid": Variant(sigmoid, True), "robust": Variant(robust, True),
    "hinge": Variant(hinge, True), "ipo": Variant(ipo, True),
    "sigmoid_norm": Variant(sigmoid_norm, True), "nca_pair": Variant(nca_pair, True),
    "bco_pair": Variant(bco_pair, True), "sppo_hard": Variant(sppo_hard, True),
    "apo_zero": Variant(apo_zero, True), "apo_down": Variant(apo_down, True),
    "exo_pair": Variant(exo_pair, True),
    "simpo": Variant(simpo, False), "orpo": Variant(orpo, False, nll=True),
    "sft": Variant(sft, False, nll=True),
}


# ---------------------------------------------------------------------------------------------
# From a batch to pairs.


def halves(x: Array) -> tuple[Array, Array]:
  """(chosen, rejected) rows of a `[chosen; rejected]` array."""
  n = x.shape[0] // 2
  return x[:n], x[n:]


def pair_counts(batch: dict[str, Array]) -> dict[str, Array]:
  """{pairs, chosen_tokens}: what the losses are averaged over. A pair counts when both rows
  have response tokens (the empty rows that fill a last eval batch do not)."""
  _, mask_BxL = common.next_token_targets(batch)
  len_c, len_r = halves(jnp.sum(mask_BxL, axis=1))
  valid = (len_c > 0) & (len_r > 0)
  return {"pairs": jnp.sum(valid, dtype=jnp.float32),
          "chosen_tokens": jnp.sum(jnp.where(valid, len_c, 0), dtype=jnp.float32)}


def sequence_logps(params: Any, batch: dict[str, Array], model) -> Array:
  """Summed response log-probs per row (2P,), float32."""
  logits_BxLxV = model.apply({"params": params}, batch["tokens"], **common.model_inputs(batch))
  targets_BxL, mask_BxL = common.next_token_targets(batch)
  logp_BxL = common.token_logprobs(logits_BxLxV, targets_BxL)
  return jnp.sum(jnp.where(mask_BxL, logp_BxL, 0.0), axis=1)


def reference_logps(ref_params: Any, batch: dict[str, Array], model, cfg: DPOConfig) -> Array:
  """(2P,) reference logps: the precomputed column, zeros, or a forward of `ref_params`."""
  if "ref_logps" in batch:
    return batch["ref_logps"].astype(jnp.float32)
  if not cfg.needs_reference or ref_params is None:
    return jnp.zeros(batch["tokens"].shape[:1], jnp.float32)
  # The reference is a constant of the loss: no gradient may flow into it, even where (full
  # fine-tuning at step 0) its arrays equal the policy's.
  return jax.lax.stop_gradient(sequence_logps(ref_params, batch, model))


def loss_fn(params: Any, ref_params: Any, batch: dict[str, Array], model, cfg: DPOConfig,
            counts: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
  """(loss, metric sums) of one (micro-)batch, already divided by the window's `counts`
  (`pair_counts` of the whole window), so that summing over micro-batches gives the window's
  loss exactly: pair terms are means over pairs, NLL terms means over chosen tokens (TRL)."""
  logits_BxLxV = model.apply({"params": params}, batch["tokens"], **common.model_inputs(batch))
  targets_BxL, mask_BxL = common.next_token_targets(batch)
  logp_BxL = common.token_logprobs(logits_BxLxV, targets_BxL)
  logp_B = jnp.sum(jnp.where(mask_BxL, logp_BxL, 0.0), axis=1)
  len_B = jnp.sum(mask_BxL, axis=1).astype(jnp.float32)
  ref_B = reference_logps(ref_params, batch, model, cfg)
  if cfg.reference_free:
    ref_B = jnp.zeros_like(ref_B)
  pair = Pair(*halves(logp_B), *halves(ref_B), *halves(len_B))
  valid_P = (pair.len_c > 0) & (pair.len_r > 0)
  mask_c, mask_r = halves(mask_BxL)
  mask_c = mask_c & valid_P[:, None]
  nll_c = -common.masked_sum(halves(logp_BxL)[0], mask_c)

  pairs, tokens = jnp.maximum(counts["pairs"], 1.0), jnp.maximum(counts["chosen_tokens"], 1.0)
  pair_sum = nll_weight = 0.0
  for name, weight in zip(cfg.loss, cfg.weights):
    variant = LOSSES[name]
    pair_sum += weight * common.masked_sum(variant.fn(pair, cfg), valid_P)
    nll_weight += weight * variant.nll
  loss = pair_sum / pairs + nll_weight * nll_c / tokens

  reward_c = cfg.beta * (pair.logp_c - pair.ref_c)
  reward_r = cfg.beta * (pair.logp_r - pair.ref_r)
  mean_logit_BxL = jnp.mean(logits_BxLxV.astype(jnp.float32), axis=-1)
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  both_BxL = mask_BxL & jnp.concatenate([valid_P, valid_P])[:, None]
  sums = {
      "pairs": jnp.sum(valid_P, dtype=jnp.float32),
      "chosen_tokens": jnp.sum(mask_c, dtype=jnp.float32),
      "rejected_tokens": jnp.sum(halves(mask_BxL)[1] & valid_P[:, None], dtype=jnp.float32),
      "pair_loss": pair_sum, "nll_loss": nll_c, "weighted_nll": nll_weight * nll_c,
      "rewards/chosen": common.masked_sum(reward_c, valid_P),
      "rewards/rejected": common.masked_sum(reward_r, valid_P),
      "rewards/accuracies": common.masked_sum(reward_c > reward_r, valid_P),
      "rewards/margins": common.masked_sum(reward_c - reward_r, valid_P),
      "logps/chosen": common.masked_sum(pair.logp_c, valid_P),
      "logps/rejected": common.masked_sum(pair.logp_r, valid_P),
      "logits/chosen": common.masked_sum(halves(mean_logit_BxL)[0], mask_c),
      "logits/rejected": common.masked_sum(halves(mean_logit_BxL)[1], halves(both_BxL)[1]),
      "correct": common.masked_sum(halves(correct_BxL)[0], mask_c),
      "entropy": common.masked_sum(common.entropy(logits_BxLxV), both_BxL),
  }
  return loss, sums


def _means(sums: dict[str, Any], loss: Any) -> dict[str, Any]:
  """TRL's metrics from sums: pair means, token means (NLL, accuracy over chosen tokens)."""
  mx = max if isinstance(sums["pairs"], float) else jnp.maximum
  pairs = mx(sums["pairs"], 1.0)
  chosen = mx(sums["chosen_tokens"], 1.0)
  rejected = mx(sums["rejected_tokens"], 1.0)
  out = {"loss": loss}
  for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected"):
    out[key] = sums[key] / pairs
  out.update({
      "logits/chosen": sums["logits/chosen"] / chosen,
      "logits/rejected": sums["logits/rejected"] / rejected,
      "nll_loss": sums["nll_loss"] / chosen,
      "mean_token_accuracy": sums["correct"] / chosen,
      "entropy": sums["entropy"] / (mx(sums["chosen_tokens"] + sums["rejected_tokens"], 1.0)),
      "pairs": sums["pairs"],
  })
  return out


def train_step(state, batch: dict[str, Array], *, model, cfg: DPOConfig, opt
               ) -> tuple[Any, dict[str, Array]]:
  """One optimizer step over `opt.grad_accum` micro-batches of pairs."""
  counts = pair_counts(batch)  # of the whole window: data only, known before any forward
  ref_params = step.reference_params(state.trainable, state.frozen) if (
      cfg.needs_reference and "ref_logps" not in batch) else None

  def window_loss(trainable, micro_batch):
    params = step.combine_params(trainable, state.frozen)
    return loss_fn(params, ref_params, micro_batch, model, cfg, counts)

  grads, loss, sums = step.accumulate_gradients(window_loss, state.trainable, batch,
                                                opt.grad_accum)
  state, update_metrics = step.apply_gradients(state, grads, opt)
  tokens = sums["chosen_tokens"] + sums["rejected_tokens"]
  return state, {**_means(sums, loss), "tokens": tokens, **update_metrics}


def eval_step(state, batch: dict[str, Array], *, model, cfg: DPOConfig) -> dict[str, Array]:
  """Sums over one eval batch; `eval_metrics` turns the sums of all batches into means."""
  ref_params = step.reference_params(state.trainable, state.frozen) if (
      cfg.needs_reference and "ref_logps" not in batch) else None
  params = step.combine_params(state.trainable, state.frozen)
  ones = {"pairs": jnp.ones(()), "chosen_tokens": jnp.ones(())}  # sums, not means
  return loss_fn(params, ref_params, batch, model, cfg, ones)[1]


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
  """The train metrics, over the whole held-out set."""
  sums = {k: float(v) for k, v in sums.items()}
  loss = (sums["pair_loss"] / max(sums["pairs"], 1.0)
          + sums["weighted_nll"] / max(sums["chosen_tokens"], 1.0))
  return _means(sums, loss)
