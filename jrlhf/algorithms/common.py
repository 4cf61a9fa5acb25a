"""Token-level pieces every algorithm's loss uses: next-token targets, logprobs, entropy, masks.

Batches follow the data contract (`jrlhf.data`): `tokens`, `positions`, `segment_ids`,
`loss_mask`, all (B, L), where `loss_mask[b, t]` marks `tokens[b, t]` as a target predicted by
the logits at t - 1. Here targets are shifted left instead of shifting the logits, so nothing
copies the (B, L, V) logits:

  targets_BxL[:, t] = tokens_BxL[:, t + 1]      predicted by logits_BxLxV[:, t]
  mask_BxL[:, t]    = loss_mask_BxL[:, t + 1]   (last column never a target)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def next_token_targets(batch: dict[str, Array]) -> tuple[Array, Array]:
  """(targets_BxL, mask_BxL) aligned with the logits that predict them.

  A target is also dropped when it is in another document (or padding) than the position that
  predicts it. The data contract already keeps `loss_mask` off document starts; checking the
  segment ids as well means a packing bug cannot leak a cross-document loss.
  """
  tokens_BxL = batch["tokens"]
  pad_Bx1 = jnp.zeros_like(tokens_BxL[:, :1])
  targets_BxL = jnp.concatenate([tokens_BxL[:, 1:], pad_Bx1], axis=1)
  loss_mask_BxL = batch["loss_mask"].astype(bool)
  mask_BxL = jnp.concatenate([loss_mask_BxL[:, 1:], jnp.zeros_like(loss_mask_BxL[:, :1])], axis=1)
  segment_ids_BxL = batch.get("segment_ids")
  if segment_ids_BxL is not None:
    next_seg_BxL = jnp.concatenate([segment_ids_BxL[:, 1:], pad_Bx1], axis=1)
    mask_BxL &= (next_seg_BxL == segment_ids_BxL) & (next_seg_BxL != 0)
  return targets_BxL, mask_BxL


def token_logprobs(logits_BxLxV: Array, targets_BxL: Array) -> Array:
  """log softmax(logits)[target] in float32 (bf16 logsumexp loses the small differences)."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return target_logit_BxL - lse_BxL


def entropy(logits_BxLxV: Array) -> Array:
  """H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, per position."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  probs_BxLxV = jax.nn.softmax(logits_BxLxV, axis=-1)
  return jax.nn.logsumexp(logits_BxLxV, axis=-1) - jnp.sum(probs_BxLxV * logits_BxLxV, axis=-1)


def masked_sum(x: Array, mask: Array) -> Array:
  return jnp.sum(jnp.where(mask, x, 0).astype(jnp.float32))


def masked_mean(x: Array, mask: Array) -> Array:
  """Mean over the True entries of `mask`; 0 when there are none (not NaN)."""
  return masked_sum(x, mask) / jnp.maximum(jnp.sum(mask), 1)


def model_inputs(batch: dict[str, Array]) -> dict[str, Any]:
  """Keyword arguments of `Transformer.__call__` taken from a contract batch."""
  return {"positions_BxL": batch.get("positions"), "segment_ids_BxL": batch.get("segment_ids")}
