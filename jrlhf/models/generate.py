"""KV-cache sampling: the rollout engine of PPO and the eval-time generator.

One prefill call writes the left-padded prompt into a cache, then a `lax.while_loop` decodes one
token per step and stops as soon as every row has emitted a stop token. Everything is one jitted
function of `(params, prompt, mask, rng)`, so a trainer can pass freshly updated params without
recompiling:

  sampler = Sampler(model, SamplingConfig(temperature=0.7, max_new_tokens=128, stop_tokens=(2,)))
  out = sampler(params, prompt_BxP, prompt_mask_BxP, jax.random.key(0))
  out.tokens_BxN, out.logprobs_BxN, out.lengths_B, out.done_B
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chz
import jax
import jax.numpy as jnp

from jrlhf.models.transformer import KVCache, Transformer, unstack_layers

Array = jax.Array


@chz.chz
class SamplingConfig:
  """How to pick each new token.

  temperature: 0 is greedy (argmax; top_k and top_p are then ignored).
  top_k: keep the k most likely tokens (0 = off). top_p: keep the smallest set of tokens whose
  probability mass is >= top_p, always including the most likely one (1.0 = off).
  max_new_tokens: tokens generated per row, stop token included.
  stop_tokens: ids that end a row (typically the EOS id); empty = always generate max_new_tokens.
  pad_id: written after a row has stopped.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 128
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0

  @chz.validate
  def _check(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns top-k filtering off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1.0 turns nucleus filtering off)")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.pad_id < 0 or any(t < 0 for t in self.stop_tokens):
      raise ValueError(
          f"pad_id={self.pad_id} and stop_tokens={self.stop_tokens} must be token ids (>= 0)")


class GenerateOutput(NamedTuple):
  """`tokens_BxN` holds pad_id after a row's stop token, where `logprobs_BxN` is 0.
  `lengths_B` counts real new tokens (the stop token included); `done_B` is True for rows that
  emitted a stop token, False for rows cut off by max_new_tokens."""

  tokens_BxN: Array
  logprobs_BxN: Array
  lengths_B: Array
  done_B: Array


def filter_logits(logits_BxV: Array, top_k: int, top_p: float) -> Array:
  """Sets logits outside the top-k / nucleus sets to -inf (ties at a threshold are kept)."""
  neg_inf = jnp.array(-jnp.inf, logits_BxV.dtype)
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg_inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token is kept when the mass strictly above it is < top_p: the smallest set reaching
    # top_p, and the most likely token always (mass above it is 0).
    keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, neg_inf, logits_BxV)
  return logits_BxV


def sample_token(logits_BxV: Array, rng: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
  """Picks one token per row; returns `(token_B, logprob_B)`.

  The logprob is log_softmax(logits / T) of the chosen token *before* top-k/top-p filtering
  (log_softmax(logits) when greedy). That is what PPO needs as the behaviour logprob: it equals
  what a forward pass over the generated sequence computes with logits / T, so the first PPO
  ratio is exactly 1. (The filtered distribution's logprob would not be reproducible there.)
  """
  if cfg.temperature == 0:
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    scaled_BxV = logits_BxV
  else:
    scaled_BxV = logits_BxV / cfg.temperature
    filtered_BxV = filter_logits(scaled_BxV, cfg.top_k, cfg.top_p)
    token_B = jax.random.categorical(rng, filtered_BxV, axis=-1).astype(jnp.int32)
  logp_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
  return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


class _Loop(NamedTuple):
  step: Array  # column of the token sampled last
  token_B: Array
  position_B: Array  # position of token_B: real tokens before it in its row
  cache: KVCache
  done_B: Array
  lengths_B: Array
  tokens_BxN: Array
  logprobs_BxN: Array


def _record(loop: _Loop, token_B, logp_B, cfg: SamplingConfig) -> _Loop:
  """Writes the token sampled at column `loop.step`, masking rows that had already stopped."""
  alive_B = ~loop.done_B
  token_B = jnp.where(alive_B, token_B, cfg.pad_id)
  col = (0, loop.step)
  stopped_B = jnp.isin(token_B, jnp.array(cfg.stop_tokens, jnp.int32)) & alive_B
  return loop._replace(
      token_B=token_B,
      done_B=loop.done_B | stopped_B,
      lengths_B=loop.lengths_B + alive_B,
      tokens_BxN=jax.lax.dynamic_update_slice(loop.tokens_BxN, token_B[:, None], col),
      logprobs_BxN=jax.lax.dynamic_update_slice(
          loop.logprobs_BxN, jnp.where(alive_B, logp_B, 0.0)[:, None], col))


def _check_inputs(model: Transformer, prompt_BxP, prompt_mask_BxP, cfg: SamplingConfig,
                  virtual_tokens: int):
  mcfg = model.cfg
  if prompt_BxP.ndim != 2 or prompt_mask_BxP.shape != prompt_BxP.shape:
    raise ValueError(
        f"prompt_BxP must be 2-D (batch, length) with a mask of the same shape; got prompt "
        f"{prompt_BxP.shape} and mask {prompt_mask_BxP.shape}")
  if model.head != "lm":
    raise ValueError(f"generate needs an LM head; this model has head={model.head!r}")
  bad = [t for t in (cfg.pad_id, *cfg.stop_tokens) if t >= mcfg.vocab_size]
  if bad:
    raise ValueError(f"token ids {bad} (pad_id / stop_tokens) are >= vocab_size={mcfg.vocab_size}")
  if cfg.temperature and cfg.top_k > mcfg.vocab_size:
    raise ValueError(f"top_k={cfg.top_k} exceeds vocab_size={mcfg.vocab_size}; use 0 for off")
  total = virtual_tokens + prompt_BxP.shape[1] + cfg.max_new_tokens
  if mcfg.is_gpt2 and total > mcfg.max_position_embeddings:
    raise ValueError(
        f"{virtual_tokens} virtual tokens + prompt length {prompt_BxP.shape[1]} + max_new_tokens "
        f"{cfg.max_new_tokens} = {total} exceeds max_position_embeddings="
        f"{mcfg.max_position_embeddings} of this GPT-2 model")


def generate(model: Transformer, params: Any, prompt_BxP: Array, prompt_mask_BxP: Array,
             rng: Array, cfg: SamplingConfig) -> GenerateOutput:
  """Samples `cfg.max_new_tokens` tokens after each prompt. Pure; jit it via `Sampler`.

  Prompts are left-padded (`prompt_mask_BxP` is 0 on the padding, 1 on real tokens) and each
  row needs at least one real token. Row b's new token n gets position
  `sum(prompt_mask_BxP[b]) + n`, exactly what a forward pass over [prompt; new tokens] with the
  concatenated mask assigns, so `logprobs_BxN` can be recomputed by such a pass (with logits / T).

  A prompt- or prefix-tuned tree's prefix is computed once and written to cache slots 0..T-1;
  the model then adds T to every position itself, as it does in a forward pass.
  """
  prefix = model.apply({"params": params}, method=Transformer.prefix_kv)
  t = 0 if prefix is None else prefix.k_KxTxDh.shape[-2]
  _check_inputs(model, prompt_BxP, prompt_mask_BxP, cfg, t)
  b, p = prompt_BxP.shape
  n = cfg.max_new_tokens
  prompt_mask_BxP = prompt_mask_BxP.astype(bool)
  # The last sampled token is never fed back, so T + P + N - 1 slots hold everything attended to.
  cache = KVCache.empty(model.cfg, b, t + p + n - 1, per_layer=True, prefix=prefix)
  # One copy of the weights per call, so no decode step copies a layer out of the stack.
  model, params = model.clone(unstacked=True), unstack_layers(params, model.cfg.num_layers)
  logits_BxV, cache = model.apply({"params": params}, prompt_BxP.astype(jnp.int32),
                                  attention_mask_BxL=prompt_mask_BxP, cache=cache)
  loop = _Loop(
      step=jnp.zeros((), jnp.int32),
      token_B=jnp.zeros((b,), jnp.int32),
      position_B=jnp.sum(prompt_mask_BxP, axis=1, dtype=jnp.int32),
      cache=cache,
      done_B=jnp.zeros((b,), bool),
      lengths_B=jnp.zeros((b,), jnp.int32),
      tokens_BxN=jnp.full((b, n), cfg.pad_id, jnp.int32),
      logprobs_BxN=jnp.zeros((b, n), jnp.float32))
  loop = _record(loop, *sample_token(logits_BxV, jax.random.fold_in(rng, 0), cfg), cfg)

  def not_finished(loop: _Loop):
    return (loop.step < n - 1) & ~jnp.all(loop.done_B)

  def decode_step(loop: _Loop) -> _Loop:
    logits_BxV, cache = model.apply(
        {"params": params}, loop.token_B[:, None], positions_BxL=loop.position_B[:, None],
        cache=loop.cache)
    loop = loop._replace(step=loop.step + 1, position_B=loop.position_B + 1, cache=cache)
    return _record(loop, *sample_token(logits_BxV, jax.random.fold_in(rng, loop.step), cfg), cfg)

  loop = jax.lax.while_loop(not_finished, decode_step, loop)
  return GenerateOutput(loop.tokens_BxN, loop.logprobs_BxN, loop.lengths_B, loop.done_B)


class Sampler:
  """`generate` jitted once for a model and a SamplingConfig.

  Params, prompt, mask and rng are arguments, so new params of the same structure (each PPO
  iteration) reuse the compiled program; a new prompt shape compiles once more. `traces`
  counts compilations, for tests and for logging unexpected retraces.
  """

  def __init__(self, model: Transformer, cfg: SamplingConfig):
    self.model, self.cfg, self.traces = model, cfg, 0
    self._generate = jax.jit(functools.partial(self._traced, model=model, cfg=cfg))

  def _traced(self, params, prompt_BxP, prompt_mask_BxP, rng, *, model, cfg) -> GenerateOutput:
    self.traces += 1  # runs only while tracing
    return generate(model, params, prompt_BxP, prompt_mask_BxP, rng, cfg)

  def __call__(self, params: Any, prompt_BxP: Array, prompt_mask_BxP: Array,
               rng: Array) -> GenerateOutput:
    return self._generate(params, prompt_BxP, prompt_mask_BxP, rng)
