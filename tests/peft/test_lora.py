"""LoRA leaves: identity at init, merge parity, targeting, trainable split, training moves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jrlhf.models import ModelConfig, Transformer, layers
from jrlhf.models.transformer import unstack_layers
from jrlhf.peft import LoraSpec, LoraWeight, combine, lora, merge, spec, split_trainable

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=48)
MODEL = Transformer(CFG)


@pytest.fixture(scope="module")
def params():
  p = nn.unbox(MODEL.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  return jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, p)


def tokens(batch=2, length=10, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)


def randomize_b(params, seed=1):
  """LoRA with B != 0, so the adapter actually changes the output."""
  def one(leaf):
    if not isinstance(leaf, LoraWeight):
      return leaf
    b = 0.3 * jax.random.normal(jax.random.key(seed + leaf.b.size), leaf.b.shape)
    return LoraWeight(leaf.base, leaf.a, b, leaf.scale)
  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, LoraWeight))


def logits(params, unstacked=False):
  model = Transformer(CFG, unstacked=unstacked)
  return jax.jit(model.apply)({"params": params}, tokens())


def test_identity_at_init_and_merge_is_base(params):
  wrapped = lora.wrap(params, LoraSpec(rank=4, alpha=8), jax.random.key(0))
  np.testing.assert_array_equal(logits(wrapped), logits(params))
  merged = merge(wrapped)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, merged, params)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_equals_merged(params, use_rslora):
  spec_ = LoraSpec(targets=("attn/(q|v)/", "mlp/down/", "lm_head"), rank=4, alpha=8,
                   rank_pattern={"mlp/": 2}, use_rslora=use_rslora)
  wrapped = randomize_b(lora.wrap(params, spec_, jax.random.key(0)))
  got, merged = logits(wrapped), logits(merge(wrapped))
  assert np.abs(got - logits(params)).max() > 1e-2  # the adapter is not a no-op
  np.testing.assert_allclose(got, merged, atol=1e-4, rtol=1e-4)
  # The sampler's per-layer copy slices every leaf of a LoraWeight too.
  np.testing.assert_allclose(logits(unstack_layers(wrapped, CFG.num_layers), unstacked=True),
                             got, atol=1e-4, rtol=1e-4)
  q = wrapped["layers"]["attn"]["q"]["kernel"]
  assert q.scale == (8 / 2 if use_rslora else 8 / 4)
  assert wrapped["layers"]["mlp"]["down"]["kernel"].a.shape == (2, 48, 2)
  assert q.a.shape == (2, 32, 4) and q.b.shape == (2, 4, 32)


def test_handler_never_forms_the_full_update():
  x = jnp.ones((2, 3, 32))
  w = LoraWeight(jnp.ones((32, 48)), jnp.ones((32, 4)), jnp.ones((4, 48)), 2.0)
  jaxpr = jax.make_jaxpr(lambda x, w: layers.matmul(x, w, jnp.float32))(x, w)
  shapes = [tuple(v.aval.shape) for e in jaxpr.eqns for v in e.outvars]
  assert (32, 48) not in shapes
  np.testing.assert_allclose(layers.matmul(x, w, jnp.float32),
                             x @ (w.base + 2.0 * w.a @ w.b), rtol=1e-6)


def test_targets_all_linear_and_errors(params):
  chosen = spec.select(params, spec.ALL_LINEAR)
  assert "lm_head/kernel" not in chosen and len(chosen) == 7
  assert spec.select(params, "attn/(q|v)/") == ["layers/attn/q/kernel", "layers/attn/v/kernel"]
  with pytest.raises(ValueError, match="layers/mlp/gate/kernel") as e:
    spec.select(params, "q_proj")
  assert "lm_head/kernel" in str(e.value)
  with pytest.raises(ValueError, match="rank_pattern regex 'mlp/'"):
    spec.resolve(params, LoraSpec(targets="attn/", rank_pattern={"mlp/": 2}))
  got = spec.resolve(params, LoraSpec(targets="attn/o|mlp/up", rank=8, alpha=16,
                                      alpha_pattern={"mlp": 4}))
  assert got == {"layers/attn/o/kernel": (8, 16.0), "layers/mlp/up/kernel": (8, 4.0)}


def test_init_distributions(params):
  big = {"layers": {"mlp": {"down": {"kernel": jnp.zeros((2, 400, 32))}}}}
  for init, check in (("kaiming", lambda a: np.abs(a).max() <= 1 / np.sqrt(400)
                       and np.abs(a).max() > 0.9 / np.sqrt(400)),
                      ("gaussian", lambda a: abs(a.std() - 1 / 16) < 0.005)):
    w = lora.wrap(big, LoraSpec(targets="down", rank=16, init=init),
                  jax.random.key(0))["layers"]["mlp"]["down"]["kernel"]
    assert check(np.asarray(w.a)), init
    assert not np.any(w.b)


def test_split_combine_and_training_moves_only_adapters(params):
  wrapped = lora.wrap(params, LoraSpec(targets="attn/|mlp/", rank=4), jax.random.key(0))
  trainable, frozen = split_trainable(wrapped)
  assert {t.shape for t in jax.tree.leaves(trainable)} == {
      (2, 32, 4), (2, 4, 32), (2, 4, 16), (2, 48, 4), (2, 4, 48)}
  assert len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(params))
  rebuilt = combine(trainable, frozen)
  assert jax.tree.structure(rebuilt) == jax.tree.structure(wrapped)
  jax.tree.map(np.testing.assert_array_equal, rebuilt, wrapped)
  t_emb, f_emb = split_trainable(wrapped, train_regex="^embed$")
  assert t_emb["embed"] is not None and f_emb["embed"] is None

  toks = tokens(4, 12, seed=3)

  def loss_fn(trainable):
    out = MODEL.apply({"params": combine(trainable, frozen)}, toks[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(out, toks[:, 1:]).mean()

  tx = optax.adam(1e-2)

  @jax.jit
  def step(trainable, opt):
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt = tx.update(grads, opt, trainable)
    return optax.apply_updates(trainable, updates), opt, loss

  opt = tx.init(trainable)
  losses = []
  for _ in range(8):
    trainable, opt, loss = step(trainable, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.05, losses
  b = trainable["layers"]["attn"]["q"]["kernel"].b
  assert np.abs(b).max() > 0  # B left zero would mean no gradient reached the adapter


def test_split_covers_adapters_and_qlora(params):
  from jrlhf.peft import adapters, quant  # noqa: PLC0415

  for tree in (adapters.add_adapters(params, jax.random.key(0), "houlsby"),
               adapters.add_ia3(params)):
    trainable, _ = split_trainable(tree)
    flags = jax.tree.leaves(adapters.trainable_mask(tree))
    assert len(jax.tree.leaves(trainable)) == sum(flags) > 0
  # QLoRA: the base is 4-bit and frozen; only A and B train; merge dequantizes.
  qlora = randomize_b(lora.wrap(quant.quantize(params), LoraSpec(rank=4), jax.random.key(0)))
  trainable, frozen = split_trainable(qlora)
  assert len(jax.tree.leaves(trainable)) == 2 * 7  # A and B of the 7 projections
  assert any(isinstance(x, quant.QuantizedWeight) for x in jax.tree.leaves(
      frozen, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight)))
  np.testing.assert_allclose(logits(combine(trainable, frozen)), logits(merge(qlora)),
                             atol=1e-4, rtol=1e-4)


def test_sharded_2x4_forward_equals_unsharded(params):
  from jrlhf.peft import quant  # noqa: PLC0415
  from jrlhf.sharding import MeshConfig, make_mesh, param_shardings, sharding_context  # noqa

  mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
  params_sh = param_shardings(MODEL, jnp.zeros((1, 4), jnp.int32), mesh=mesh)
  spec_ = LoraSpec(rank=4, alpha=8)
  for tree in (params, quant.quantize(params)):
    wrapped = randomize_b(lora.wrap(tree, spec_, jax.random.key(0)))
    shardings = lora.shardings_like(wrapped, params_sh)
    sharded = jax.device_put(wrapped, shardings)
    up, up_sh = sharded["layers"]["mlp"]["up"]["kernel"], params_sh["layers"]["mlp"]["up"]["kernel"]
    assert up.b.sharding.spec[-1] == up_sh.spec[-1] == "tensor"
    assert up.a.sharding.spec[-1] is None
    with sharding_context(mesh):
      got = jax.jit(MODEL.apply)({"params": sharded}, tokens())
    np.testing.assert_allclose(got, logits(wrapped), atol=1e-4, rtol=1e-4)
