"""Bottleneck adapters and IA3: exact handler math, identity at init, gradients, training, scan."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jrlhf.models import ModelConfig, Transformer, layers
from jrlhf.models.transformer import unstack_layers
from jrlhf.peft import adapters

LLAMA = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=48)
# Qwen2-style biases on q/k/v and GPT-2's biases everywhere exercise the frozen bias copy.
QWEN = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=48, attention_bias=True)
GPT2 = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=4, head_dim=8, mlp_dim=128, max_position_embeddings=32,
                   norm_eps=1e-5, attention_bias=True, attention_out_bias=True, mlp_bias=True,
                   tie_embeddings=True)


@functools.lru_cache(maxsize=None)
def init(cfg, seed=0):
  """Model, params and jitted apply (cached: compiles dominate this file's time on CPU)."""
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  # Non-zero biases, so a wrapper that dropped or double-counted one would show.
  params = jax.tree.map(lambda p: p + 0.1 if p.ndim == 2 and p.shape[0] == cfg.num_layers else p,
                        params)
  return model, params, jax.jit(lambda p, t: model.apply({"params": p}, t))


def wrap(method, params, seed=1):
  if method == "ia3":
    return adapters.add_ia3(params)
  return adapters.add_adapters(params, jax.random.key(seed), method)


def perturb(params, seed=2):
  """Random values on the trainable arrays, so the adapters are not the identity."""
  mask = adapters.trainable_mask(params)
  leaves, treedef = jax.tree.flatten(params)
  flags = jax.tree.leaves(mask)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) if f else x
         for x, f, k in zip(leaves, flags, keys)]
  return jax.tree.unflatten(treedef, new)


def tokens(batch=2, length=8, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 64)


def test_adapter_handler_is_the_serial_adapter():
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
  x_BxLxI = jax.random.normal(k1, (2, 3, 6))
  w_IxO, b_O = jax.random.normal(k2, (6, 8)), jnp.arange(8.0) / 8
  down_OxR, up_RxO = jax.random.normal(k3, (8, 2)), jax.random.normal(k4, (2, 8))
  d_R, u_O = jax.random.normal(k5, (2,)), jnp.ones((8,))
  w = adapters.AdapterWeight(w_IxO, b_O, down_OxR, d_R, up_RxO, u_O, scale=0.5,
                             activation="relu")
  h = np.asarray(x_BxLxI) @ np.asarray(w_IxO) + np.asarray(b_O)
  want = h + 0.5 * (np.maximum(h @ np.asarray(down_OxR) + np.asarray(d_R), 0)
                    @ np.asarray(up_RxO) + np.asarray(u_O))
  # `Dense` adds the bias after the handler.
  got = jax.jit(lambda x, w: layers.matmul(x, w, jnp.float32) + b_O)(x_BxLxI, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on", ["in", "out"])
def test_ia3_handler_scales_input_or_whole_output(on):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x_BxLxI, w_IxO, b_O = jax.random.normal(k1, (2, 3, 6)), jax.random.normal(k2, (6, 8)), jnp.ones(8)
  vec = jax.random.normal(k3, (6,) if on == "in" else (8,))
  w = adapters.Ia3Weight(w_IxO, b_O, vec, on=on)
  x, wn, b, v = map(np.asarray, (x_BxLxI, w_IxO, b_O, vec))
  want = (x * v) @ wn + b if on == "in" else (x @ wn + b) * v
  got = jax.jit(lambda x, w: layers.matmul(x, w, jnp.float32) + b_O)(x_BxLxI, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_targets_and_shapes():
  _, params, _ = init(LLAMA)
  h = adapters.add_adapters(params, jax.random.key(0), "houlsby")["layers"]
  assert isinstance(h["attn"]["o"]["kernel"], adapters.AdapterWeight)
  assert isinstance(h["mlp"]["down"]["kernel"], adapters.AdapterWeight)
  assert not isinstance(h["attn"]["q"]["kernel"], adapters.AdapterWeight)
  w = h["mlp"]["down"]["kernel"]
  # Every array carries the leading layer axis; R = D // 16; activation swish.
  assert w.down.shape == (2, 32, 2) and w.up.shape == (2, 2, 32) and w.down_bias.shape == (2, 2)
  assert w.activation == "swish" and not np.any(w.up)
  p = adapters.add_adapters(params, jax.random.key(0), "pfeiffer", reduction_factor=4,
                            activation="gelu", scale=2.0)["layers"]
  assert not isinstance(p["attn"]["o"]["kernel"], adapters.AdapterWeight)
  w = p["mlp"]["down"]["kernel"]
  assert w.down.shape == (2, 32, 8) and w.activation == "gelu" and w.scale == 2.0
  i = adapters.add_ia3(params)["layers"]
  k = i["attn"]["k"]["kernel"]
  assert k.on == "out" and k.scale_vector.shape == (2, 16)
  assert i["mlp"]["down"]["kernel"].on == "in"
  assert i["mlp"]["down"]["kernel"].scale_vector.shape == (2, 48)
  assert not isinstance(i["attn"]["q"]["kernel"], adapters.Ia3Weight)


def test_unmatched_target_lists_the_kernels():
  _, params, _ = init(LLAMA)
  with pytest.raises(ValueError, match="matches no kernel.*layers/attn/q/kernel"):
    adapters.add_adapters(params, jax.random.key(0), "houlsby", targets=[r"attn/out/kernel$"])
  with pytest.raises(ValueError, match="matches no kernel"):
    adapters.add_ia3(params, {r"mlp/fc/kernel$": "in"})
  with pytest.raises(ValueError, match="activation"):
    adapters.add_adapters(params, jax.random.key(0), "pfeiffer", activation="softsign")


def loss_fn(model, params, tokens_BxL):
  logits_BxLxV = model.apply({"params": params}, tokens_BxL[:, :-1])
  logp = jax.nn.log_softmax(logits_BxLxV)
  return -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1).mean()


# Every method on Llama; GPT-2 (biases everywhere, GELU MLP) and Qwen2 (q/k/v bias) where a
# bias meets the wrapper.
# (Pfeiffer is Houlsby's handler on a subset of its targets: see test_targets_and_shapes.)
COMBOS = [(LLAMA, "houlsby"), (LLAMA, "ia3"), (GPT2, "houlsby"),
          (GPT2, "ia3"), (QWEN, "ia3")]


@pytest.mark.parametrize("cfg,method", COMBOS, ids=[f"{m}-{c.family}{'-bias' * c.attention_bias}"
                                                    for c, m in COMBOS])
def test_identity_at_init_and_gradients_reach_every_adapter(cfg, method):
  model, params, apply = init(cfg)
  wrapped = wrap(method, params)
  batch = tokens()

  def loss_and_logits(p):
    logits_BxLxV = model.apply({"params": p}, batch)
    logp = jax.nn.log_softmax(logits_BxLxV[:, :-1])
    return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean(), logits_BxLxV

  (_, logits), grads = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))(wrapped)
  np.testing.assert_allclose(logits, apply(params, batch), atol=1e-6)
  wrappers = [w for w in jax.tree.leaves(grads, is_leaf=adapters._is_wrapper)
              if adapters._is_wrapper(w)]
  assert len(wrappers) == {"houlsby": 2, "ia3": 3}[method]
  for leaf in wrappers:
    # Nonzero in every layer of the stack (which also shows the forward goes through the
    # wrapper). At init U = 0, so the gradient reaches U and u; D and d follow after a step.
    if isinstance(leaf, adapters.AdapterWeight):
      assert np.all(np.abs(np.asarray(leaf.up)).sum(axis=(1, 2)) > 0)
      assert np.all(np.abs(np.asarray(leaf.up_bias)).sum(axis=1) > 0)
    else:
      assert np.all(np.abs(np.asarray(leaf.scale_vector)).sum(axis=1) > 0)


@pytest.mark.parametrize("method", ["houlsby", "ia3"])
def test_sgd_on_adapters_only_reduces_loss_and_keeps_base(method):
  model, params, _ = init(LLAMA)
  # Weights scaled up so the logits depend on the residual stream the adapters write into
  # (at the 0.02 init the model is near-uniform and every loss moves slowly).
  params = jax.tree.map(lambda p: p * 4 if p.ndim > 1 else p, params)
  wrapped = wrap(method, params)
  mask = adapters.trainable_mask(wrapped)
  tx = optax.masked(optax.adam(3e-2), mask)
  batch = tokens(batch=4, length=12, seed=3)

  @jax.jit
  def step(p, opt_state):
    loss, g = jax.value_and_grad(lambda p: loss_fn(model, p, batch))(p)
    # A masked optimizer passes frozen gradients through unchanged; zero them instead.
    g = jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), g, mask)
    updates, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  p, opt_state = wrapped, tx.init(wrapped)
  losses = []
  for _ in range(30):
    p, opt_state, loss = step(p, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.3, losses  # measured: 4.13 -> 3.05 (Houlsby), 3.58 (IA3)
  frozen = jax.tree.leaves(jax.tree.map(lambda a, b, m: m or bool(np.array_equal(a, b)),
                                        p, wrapped, mask))
  assert all(frozen)


def test_composed_wrappers_stacked_equals_unstacked():
  # IA3 on top of a Houlsby adapter on mlp/down: wrappers compose through `layers.matmul`, and
  # nn.scan slices every array of a wrapper on the layer axis, as unstack_layers does.
  model, params, apply = init(GPT2)
  wrapped = adapters.add_adapters(params, jax.random.key(1), "houlsby")
  wrapped = perturb(adapters.add_ia3(wrapped))
  down = wrapped["layers"]["mlp"]["down"]["kernel"]
  assert isinstance(down, adapters.Ia3Weight) and isinstance(down.base, adapters.AdapterWeight)
  mask = adapters.trainable_mask(wrapped)["layers"]["mlp"]["down"]["kernel"]
  assert mask.scale_vector and mask.base.up and mask.base.down
  assert not (mask.base.base or mask.base.base_bias or mask.base_bias)
  stacked = apply(wrapped, tokens())
  assert np.abs(np.asarray(stacked - apply(params, tokens()))).max() > 1e-2
  unstacked_model = Transformer(GPT2, unstacked=True)
  got = jax.jit(lambda p, t: unstacked_model.apply({"params": p}, t))(
      unstack_layers(wrapped, GPT2.num_layers), tokens())
  np.testing.assert_allclose(got, stacked, atol=1e-5)


def test_merge_ia3_is_exact():
  # GPT-2: biases on k, v (scaled with the output) and on mlp/down (left alone with "in").
  model, params, apply = init(GPT2)
  wrapped = perturb(adapters.add_ia3(params))
  merged = adapters.merge_ia3(wrapped)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(apply(merged, tokens()), apply(wrapped, tokens()), atol=1e-5)


def test_sharded_2x4_forward_equals_unsharded():
  from jrlhf.sharding import MeshConfig, make_mesh, param_shardings, sharding_context
  model, params, apply = init(LLAMA)
  wrapped = perturb(adapters.add_ia3(adapters.add_adapters(params, jax.random.key(1), "houlsby",
                                                           reduction_factor=4)))
  mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
  sh = adapters.shardings_like(wrapped, param_shardings(model, tokens(), mesh=mesh))
  down = sh["layers"]["mlp"]["down"]["kernel"]
  o = sh["layers"]["attn"]["o"]["kernel"]
  # attn/o is (layers, heads, embed): its adapter follows the kernel's output (embed) axis.
  assert o.down.spec[1] == o.base.spec[2] and o.up.spec[2] == o.base.spec[2]
  # IA3 "in" on mlp/down follows the `mlp` axis, which the 2x4 mesh splits over `tensor`.
  assert down.scale_vector.spec[1] == down.base.base.spec[1] == "tensor"
  sharded = jax.device_put(wrapped, sh)
  with sharding_context(mesh):
    got = jax.jit(lambda p, t: model.apply({"params": p}, t))(sharded, tokens())
  np.testing.assert_allclose(got, apply(wrapped, tokens()), atol=1e-5)


def test_adapters_on_a_4bit_base_and_split_trainable():
  # A wrapper's base may be any kernel leaf: Houlsby/IA3 over NF4 weights (QLoRA-style).
  from jrlhf.peft import quant
  from jrlhf.peft.trainable import combine, split_trainable
  model, params, apply = init(LLAMA)
  q = quant.quantize(params, (r"attn/(k|v|o)/kernel$", r"mlp/down/kernel$"))
  wrapped = adapters.add_ia3(adapters.add_adapters(q, jax.random.key(1), "houlsby"))
  assert isinstance(wrapped["layers"]["attn"]["o"]["kernel"].base, quant.QuantizedWeight)
  np.testing.assert_allclose(apply(wrapped, tokens()), apply(quant.dequantize(q), tokens()),
                             atol=1e-5)
  # split_trainable reads `trainable_fields`: the 4-bit base and the bias copies are frozen.
  trainable, frozen = split_trainable(wrapped)
  t = trainable["layers"]["attn"]["o"]["kernel"]
  assert t.base is None and t.base_bias is None and t.up is not None
  f = frozen["layers"]["attn"]["k"]["kernel"]
  assert f.scale_vector is None and isinstance(f.base, quant.QuantizedWeight)
  moved = perturb(wrapped)
  t, f = split_trainable(moved)
  np.testing.assert_allclose(apply(combine(t, f), tokens()), apply(moved, tokens()))
