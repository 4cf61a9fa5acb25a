"""Invariants of the decoder itself: causality, masks, packing, heads, remat, dtypes, cache."""

import chex
import chz
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf.models import KVCache, ModelConfig, Transformer
from jrlhf.models.transformer import unstack_layers

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=48)
GPT2 = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=4, head_dim=8, mlp_dim=128, max_position_embeddings=32,
                   norm_eps=1e-5, attention_bias=True, attention_out_bias=True, mlp_bias=True,
                   tie_embeddings=True)


def init(cfg, head="lm", seed=0):
  model = Transformer(cfg, head=head)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(seed), tokens)["params"])
  # Scale the init up so that attention is far from uniform and mistakes show.
  return model, jax.tree.map(lambda p: p * 4 if p.ndim > 1 else p, params)


def tokens(batch=2, length=10, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 64)


@pytest.mark.parametrize("cfg", [CFG, GPT2], ids=["llama", "gpt2"])
def test_causal_no_gradient_from_later_tokens(cfg):
  model, params = init(cfg)
  emb_BxLxD = params["embed"][tokens()]
  grad_fn = jax.jit(jax.grad(lambda e, t: apply_from_embeddings(model, params, e)[:, t].sum()),
                    static_argnums=1)
  for t in (0, 4, 9):
    grad_BxLxD = grad_fn(emb_BxLxD, t)
    per_position = np.abs(np.asarray(grad_BxLxD)).sum(axis=(0, 2))
    assert np.all(per_position[t + 1:] == 0), (t, per_position)
    assert np.all(per_position[: t + 1] > 0), (t, per_position)


def apply_from_embeddings(model, params, emb_BxLxD):
  """Scalar-head outputs for given input embeddings, so gradients reach each input position.

  Every (row, position) gets a token id of its own in a vocabulary made of the embeddings.
  """
  b, length, d = emb_BxLxD.shape
  cfg = chz.replace(model.cfg, vocab_size=b * length)
  readout = jax.random.normal(jax.random.key(1), (d, 1))
  p = {k: v for k, v in params.items() if k != "lm_head"}
  p.update(embed=emb_BxLxD.reshape(b * length, d), score={"kernel": readout})
  ids = jnp.arange(b * length).reshape(b, length)
  return Transformer(cfg, head="scalar").apply({"params": p}, ids)


def test_padding_does_not_change_real_tokens():
  model, params = init(CFG)
  x = tokens(batch=1, length=6)
  plain = model.apply({"params": params}, x)
  pads = jnp.full((1, 3), 7)
  padded = jnp.concatenate([pads, x], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, 3), int), jnp.ones((1, 6), int)], axis=1)
  out = model.apply({"params": params}, padded, attention_mask_BxL=mask)
  np.testing.assert_allclose(out[:, 3:], plain, atol=1e-5)
  # ... and the pad ids themselves do not matter.
  out2 = model.apply({"params": params}, padded.at[:, :3].set(11), attention_mask_BxL=mask)
  np.testing.assert_allclose(out2[:, 3:], plain, atol=1e-5)


@pytest.mark.parametrize("cfg", [CFG, GPT2], ids=["llama", "gpt2"])
def test_packed_documents_do_not_attend_to_each_other(cfg):
  model, params = init(cfg)
  a, b = tokens(1, 4, seed=1), tokens(1, 6, seed=2)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 4 + [2] * 6])
  positions = jnp.array([list(range(4)) + list(range(6))])
  out = model.apply({"params": params}, packed, positions_BxL=positions, segment_ids_BxL=segments)
  np.testing.assert_allclose(out[:, :4], model.apply({"params": params}, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 4:], model.apply({"params": params}, b), atol=1e-5)
  # Without segment ids the second document does see the first: the test can fail.
  leaky = model.apply({"params": params}, packed, positions_BxL=positions)
  assert np.abs(leaky[:, 4:] - out[:, 4:]).max() > 1e-3


def test_scalar_head_on_any_backbone():
  for cfg in (CFG, GPT2):
    model, params = init(cfg, head="scalar")
    assert params["score"]["kernel"].shape == (cfg.hidden_size, 1)
    assert "lm_head" not in params
    values_BxL = model.apply({"params": params}, tokens())
    assert values_BxL.shape == (2, 10) and values_BxL.dtype == jnp.float32


@pytest.mark.parametrize("unstacked", [False, True])
def test_hidden_states_are_what_the_head_reads(unstacked):
  model, params = init(CFG)
  if unstacked:
    model, params = model.clone(unstacked=True), unstack_layers(params, CFG.num_layers)
  logits_BxLxV = model.apply({"params": params}, tokens())
  same_BxLxV, hidden_BxLxD = model.apply({"params": params}, tokens(), return_hidden=True)
  np.testing.assert_array_equal(same_BxLxV, logits_BxLxV)
  assert hidden_BxLxD.shape == (2, 10, CFG.hidden_size)
  np.testing.assert_allclose(hidden_BxLxD @ params["lm_head"]["kernel"], logits_BxLxV,
                             rtol=1e-5, atol=1e-5)
  cache = KVCache.empty(CFG, 2, 12)
  with pytest.raises(ValueError, match="full forward"):
    model.apply({"params": params}, tokens(), cache=cache, return_hidden=True)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_and_unroll_change_nothing_numerically(remat):
  model, params = init(CFG)
  x = tokens()
  loss = lambda m: lambda p: m.apply({"params": p}, x).mean()  # noqa: E731
  ref_val, ref_grad = jax.jit(jax.value_and_grad(loss(model)))(params)
  other = Transformer(chz.replace(CFG, remat=remat, scan_unroll=2))
  val, grad = jax.jit(jax.value_and_grad(loss(other)))(params)
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  chex.assert_trees_all_close(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize("chunk,window", [(3, None), (4, None), (4, 3), (16, 5)])
def test_chunked_attention_equals_unchunked(chunk, window):
  base = chz.replace(CFG, sliding_window=window, attention_chunk=0)
  chunked = chz.replace(base, attention_chunk=chunk)
  _, params = init(base)
  x = tokens()
  segments = jnp.array([[1] * 6 + [2] * 4, [1] * 10])
  f = lambda cfg: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p: Transformer(cfg).apply({"params": p}, x, segment_ids_BxL=segments).mean()))
  (val, grad), (ref_val, ref_grad) = f(chunked)(params), f(base)(params)
  np.testing.assert_allclose(val, ref_val, atol=1e-6)
  chex.assert_trees_all_close(grad, ref_grad, atol=1e-6)


def test_param_and_compute_dtypes_are_separate():
  cfg = chz.replace(CFG, param_dtype="float32", dtype="bfloat16")
  model, params = init(cfg)
  assert params["layers"]["attn"]["q"]["kernel"].dtype == jnp.float32
  logits = model.apply({"params": params}, tokens())
  assert logits.dtype == jnp.float32  # logits are upcast whatever the compute dtype
  ref = init(CFG)[0].apply({"params": params}, tokens())
  assert 0 < np.abs(np.asarray(logits - ref)).max() < 0.5


@pytest.mark.parametrize("unstacked", [False, True], ids=["scanned", "unstacked"])
@pytest.mark.parametrize("cfg", [CFG, GPT2], ids=["llama", "gpt2"])
def test_cache_decode_equals_full_forward(cfg, unstacked):
  model, params = init(cfg)
  x = tokens(length=9)
  full = model.apply({"params": params}, x)
  cache = KVCache.empty(cfg, batch=2, slots=12, per_layer=unstacked)
  if unstacked:  # the decode layout: one module and one cache array per layer
    model, params = model.clone(unstacked=True), unstack_layers(params, cfg.num_layers)
  apply = jax.jit(model.apply)
  last, cache = apply({"params": params}, x[:, :6], cache=cache)
  np.testing.assert_allclose(last, full[:, 5], atol=1e-5)
  for t in range(6, 9):
    pos = jnp.full((2, 1), t)
    last, cache = apply({"params": params}, x[:, t:t + 1], positions_BxL=pos, cache=cache)
    np.testing.assert_allclose(last, full[:, t], atol=1e-5)
  assert int(cache.index) == 9 and bool(cache.valid_BxS[:, :9].all())


def test_config_errors_are_actionable():
  with pytest.raises(ValueError, match="family 'bert' is not supported"):
    ModelConfig(family="bert")
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="remat 'some'"):
    ModelConfig(remat="some")


# Prompt / prefix tuning (jrlhf.peft.prompt builds the sub-trees; the model consumes them).
VIRTUAL = 3


@pytest.mark.parametrize("cfg", [
    chz.replace(CFG, qk_norm=True, attention_bias=True, attention_out_bias=True, remat="full"),
    GPT2], ids=["llama-qknorm-bias-remat", "gpt2"])
def test_prompt_tuning_equals_virtual_tokens_in_the_input(cfg):
  # PEFT's definition: the virtual embeddings concatenated before the input, positions 0..T+L-1.
  from jrlhf.peft import prompt
  model, params = init(cfg)
  tuned = prompt.add_prompt(params, jax.random.key(1), cfg, VIRTUAL)
  tuned["prompt"]["embeddings"] *= 40  # as large as the (scaled) token embeddings
  x = tokens()
  got = jax.jit(model.apply)({"params": tuned}, x)
  wide = chz.replace(cfg, vocab_size=cfg.vocab_size + VIRTUAL)
  ref_params = dict(params, embed=jnp.concatenate([params["embed"],
                                                   tuned["prompt"]["embeddings"]]))
  if "lm_head" in params:
    ref_params["lm_head"] = {"kernel": jnp.pad(params["lm_head"]["kernel"], ((0, 0), (0, VIRTUAL)))}
  virtual_ids = jnp.broadcast_to(cfg.vocab_size + jnp.arange(VIRTUAL), (x.shape[0], VIRTUAL))
  ref = jax.jit(Transformer(wide).apply)({"params": ref_params},
                                         jnp.concatenate([virtual_ids, x], axis=1))
  np.testing.assert_allclose(got, ref[:, VIRTUAL:, :cfg.vocab_size], atol=1e-4)
  if cfg.is_gpt2:  # learned positions run out at max_position_embeddings, prefix included
    with pytest.raises(ValueError, match="max_position_embeddings"):
      model.apply({"params": tuned}, jnp.zeros((1, cfg.max_position_embeddings), jnp.int32))


def test_cache_decode_with_a_gated_prefix_equals_full_forward():
  # A sliding window shorter than the prefix: the window must never hide the prefix, in the
  # full pass (prefix keys) as in decoding (prefix in cache slots 0..T-1, gated there too).
  # The sampler's tests cover the unstacked layout and prompt tuning.
  from jrlhf.peft import prompt
  cfg = chz.replace(CFG, sliding_window=3, attention_chunk=4)
  model, params = init(cfg)
  params = prompt.add_prefix(params, jax.random.key(1), cfg, VIRTUAL, zero_init=True)
  params["prefix"]["gate"] = jnp.linspace(-1, 1, cfg.num_layers * cfg.num_heads).reshape(
      cfg.num_layers, cfg.num_heads)
  x = tokens(length=9)
  full = model.apply({"params": params}, x)
  prefix = model.apply({"params": params}, method=Transformer.prefix_kv)
  cache = KVCache.empty(cfg, batch=2, slots=VIRTUAL + 9, prefix=prefix)
  apply = jax.jit(model.apply)
  last, cache = apply({"params": params}, x[:, :6], cache=cache)
  np.testing.assert_allclose(last, full[:, 5], atol=1e-5)
  for t in range(6, 9):
    pos = jnp.full((2, 1), t)
    last, cache = apply({"params": params}, x[:, t:t + 1], positions_BxL=pos, cache=cache)
    np.testing.assert_allclose(last, full[:, t], atol=1e-5)
  assert int(cache.index) == VIRTUAL + 9
