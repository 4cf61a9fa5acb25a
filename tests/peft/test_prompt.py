"""Prompt and prefix tuning: parity with the `peft` library, identity start, gradients, packing,
sharding."""

import functools

import chex
import chz
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf.models import ModelConfig, Transformer, from_pretrained
from jrlhf.peft import combine, prompt, split_trainable

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

T = 5
HF = {
    "llama": dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=0.1),
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 initializer_range=0.1),
}
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 9)).astype(np.int32)
# Ours, without HF: a tiny GQA Llama for the invariants below.
CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=48)


@functools.cache
def base_dir(family, tmp_root):
  torch.manual_seed(0)
  cfg = transformers.CONFIG_MAPPING[family](**HF[family])
  cfg._attn_implementation = "eager"
  directory = tmp_root / family
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
  return directory


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return tmp_path_factory.mktemp("bases")


def peft_logits(directory, config):
  torch.manual_seed(1)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager").float().eval()
  model = peft.get_peft_model(hf, config).eval()
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  return model, logits


def ours(model, params):
  return np.asarray(jax.jit(model.apply)({"params": params}, TOKENS))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_tuning_matches_peft(family, tmp_root):
  directory = base_dir(family, tmp_root)
  pm, expected = peft_logits(directory, peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=T))
  model, params = from_pretrained(directory)
  params = prompt.add_prompt(params, jax.random.key(0), model.cfg, T)
  params["prompt"]["embeddings"] = jnp.asarray(
      pm.prompt_encoder["default"].embedding.weight.detach().numpy())
  got = ours(model, params)
  assert expected.shape[1] == T + TOKENS.shape[1]  # PEFT returns the virtual positions too
  np.testing.assert_allclose(got, expected[:, T:], atol=1e-4)
  base = ours(model, {k: v for k, v in params.items() if k != "prompt"})
  assert np.abs(got - base).max() > 1e-2


@pytest.mark.parametrize("family, projection", [("llama", False), ("llama", True),
                                                ("gpt2", False)])
def test_prefix_tuning_matches_peft(family, projection, tmp_root):
  directory = base_dir(family, tmp_root)
  pm, expected = peft_logits(directory, peft.PrefixTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=T, prefix_projection=projection,
      encoder_hidden_size=24 if projection else None))
  model, params = from_pretrained(directory)
  params = prompt.add_prefix(params, jax.random.key(0), model.cfg, T, projection=projection,
                             encoder_hidden_size=24)
  enc = pm.prompt_encoder["default"]
  weight = lambda m: jnp.asarray(m.weight.detach().numpy())  # noqa: E731
  if projection:
    lin1, lin2 = enc.transform[0], enc.transform[2]
    loaded = {"embedding": weight(enc.embedding), "w1": weight(lin1).T,
              "b1": jnp.asarray(lin1.bias.detach().numpy()), "w2": weight(lin2).T,
              "b2": jnp.asarray(lin2.bias.detach().numpy())}
  else:
    loaded = prompt.prefix_from_peft_rows(weight(enc.embedding), model.cfg)
  chex.assert_trees_all_equal_shapes(loaded, params["prefix"])
  params["prefix"] = loaded
  np.testing.assert_allclose(ours(model, params), expected, atol=1e-4)
  # The flat PEFT rows round-trip through our layout (what PEFT saves for PREFIX_TUNING).
  rows = prompt.peft_prefix_rows(params, model.cfg)
  if not projection:
    np.testing.assert_array_equal(rows, weight(enc.embedding))


def init_ours(seed=0):
  model = Transformer(CFG)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  return model, jax.tree.map(lambda p: p * 4 if p.ndim > 1 else p, params)


def tokens(batch=2, length=10, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)


@jax.jit
def apply(params, tokens_BxL):
  return Transformer(CFG).apply({"params": params}, tokens_BxL)


def tuned(params, kind):
  rng = jax.random.key(3)
  if kind == "prompt":
    return prompt.add_prompt(params, rng, CFG, T, init="vocab")
  if kind == "prefix":
    return prompt.add_prefix(params, rng, CFG, T)
  return prompt.add_prefix(params, rng, CFG, T, projection=True, zero_init=True)


def test_zero_init_prefix_starts_as_the_base_model():
  _, params = init_ours()
  zero = prompt.add_prefix(params, jax.random.key(1), CFG, T, projection=True, zero_init=True)
  assert zero["prefix"]["gate"].shape == (CFG.num_layers, CFG.num_heads)
  base = apply(params, tokens())
  # Exact in math; float32 rounding differs only because XLA fuses the two softmaxes anew.
  np.testing.assert_allclose(apply(zero, tokens()), base, atol=1e-5, rtol=0)


def test_zero_gate_removes_a_prefix_where_zero_keys_and_values_do_not():
  # Why zero_init gates instead of zeroing the prefix (PEFT's init_weights="zero").
  from jrlhf.models import layers
  rng = np.random.default_rng(0)
  q_BxLxKxGxDh = jnp.asarray(rng.normal(size=(1, 3, 2, 2, 8)), jnp.float32)
  k_BxKxLxDh, v_BxKxLxDh = (jnp.asarray(rng.normal(size=(1, 2, 3, 8)), jnp.float32)
                            for _ in range(2))
  mask_BxLxL = jnp.tril(jnp.ones((3, 3), bool))[None]
  zeros_KxTxDh = jnp.zeros((2, T, 8))
  attend = lambda prefix, gate: layers.attend(  # noqa: E731
      q_BxLxKxGxDh, [k_BxKxLxDh] if prefix is None else [prefix, k_BxKxLxDh],
      [v_BxKxLxDh] if prefix is None else [prefix, v_BxKxLxDh],
      [mask_BxLxL] if prefix is None else [jnp.ones((1, 3, T), bool), mask_BxLxL], gate)
  base = attend(None, None)
  assert np.abs(np.asarray(attend(zeros_KxTxDh, None) - base)).max() > 0.1
  np.testing.assert_array_equal(attend(zeros_KxTxDh + 1, jnp.zeros((2, 2, T))), base)


@pytest.mark.parametrize("kind", ["prompt", "gated-projection"])
def test_gradients_reach_only_the_prompt_or_prefix(kind):
  _, params = init_ours()
  params = tuned(params, kind)
  trainable, frozen = split_trainable(params, train_regex=prompt.TRAIN_REGEX)
  name = "prompt" if kind == "prompt" else "prefix"
  assert set(jax.tree.leaves(jax.tree.map(lambda _: name, trainable[name]))) == {name}
  others = {k: v for k, v in trainable.items() if k != name}
  assert jax.tree.leaves(others) == [] and jax.tree.leaves(frozen[name]) == []
  x = tokens()

  def loss(t):
    logits_BxLxV = apply(combine(t, frozen), x)
    return -jnp.mean(jax.nn.log_softmax(logits_BxLxV)[..., 0])

  if kind == "prompt":  # the frozen half alone is the base model: the DPO/PPO reference
    np.testing.assert_array_equal(apply(frozen, x), apply(init_ours()[1], x))
  grads = jax.grad(loss)(trainable)
  norms = {jax.tree_util.keystr(path): float(jnp.abs(g).max()) for path, g in
           jax.tree_util.tree_leaves_with_path(grads[name])}
  if kind == "gated-projection":
    # At a zero gate only the gate moves first; the prefix's gradient is gate * (...) = 0.
    assert norms["['gate']"] > 0
    assert all(v == 0 for p, v in norms.items() if p != "['gate']"), norms
  else:
    assert all(v > 0 for v in norms.values()), norms


def test_packed_rows_equal_unpacked_rows():
  _, params = init_ours()
  p = tuned(params, "prompt")
  rows = tokens()  # the shape the other tests compile `apply` for
  segments = jnp.array([[1] * 10 + [2] * 10])
  positions = jnp.array([list(range(10)) * 2])
  packed = jax.jit(Transformer(CFG).apply)(
      {"params": p}, rows.reshape(1, 20), positions_BxL=positions, segment_ids_BxL=segments)
  np.testing.assert_allclose(packed.reshape(2, 10, -1), apply(p, rows), atol=1e-5)


def test_sharded_2x4_forward_equals_unsharded():
  from jrlhf.sharding import MeshConfig, make_mesh, param_shardings, sharding_context
  model, params = init_ours()
  mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
  plain_sh = param_shardings(model, tokens(), mesh=mesh)
  p = tuned(params, "prompt")
  sh = prompt.shardings_like(p, plain_sh, mesh)
  assert sh["layers"] is plain_sh["layers"] and sh["prompt"]["embeddings"].is_fully_replicated
  with sharding_context(mesh):
    got = jax.jit(model.apply)({"params": jax.device_put(p, sh)}, tokens())
  np.testing.assert_allclose(got, apply(p, tokens()), atol=1e-5)


def test_prompt_inits_and_errors():
  _, params = init_ours()
  embed = params["embed"]
  text = prompt.add_prompt(params, jax.random.key(0), CFG, T, init="text",
                           init_token_ids=[7, 3])
  np.testing.assert_array_equal(text["prompt"]["embeddings"], embed[jnp.array([7, 3, 7, 3, 7])])
  vocab = prompt.add_prompt(params, jax.random.key(0), CFG, T, init="vocab")["prompt"]
  rows = np.asarray(vocab["embeddings"])
  assert all(np.any(np.all(np.asarray(embed) == r, axis=1)) for r in rows)
  assert prompt.add_prompt(params, jax.random.key(0), CFG, T)["prompt"]["embeddings"].shape == (
      T, CFG.hidden_size)
  with pytest.raises(ValueError, match="init_token_ids"):
    prompt.add_prompt(params, jax.random.key(0), CFG, T, init="text")
  with pytest.raises(ValueError, match="already hold"):
    prompt.add_prefix(text, jax.random.key(0), CFG, T)
  both = {**text, "prefix": tuned(params, "prefix")["prefix"]}
  with pytest.raises(ValueError, match="both a `prompt` and a `prefix`"):
    Transformer(CFG).apply({"params": both}, tokens())


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peft_format_round_trip(kind, tmp_root, tmp_path):
  # Saved by us, loaded by peft (same logits); saved by peft, loaded by us (same tree).
  directory = base_dir("llama", tmp_root)
  model, params = from_pretrained(directory)
  add = prompt.add_prompt if kind == "prompt" else prompt.add_prefix
  params = add(params, jax.random.key(2), model.cfg, T)
  prompt.save_peft_prompt(tmp_path / "ours", params, model.cfg)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager").float().eval()
  pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
  with torch.no_grad():
    expected = pm(input_ids=torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours(model, params), expected[:, -TOKENS.shape[1]:], atol=1e-4)
  pm.save_pretrained(tmp_path / "theirs")
  loaded = prompt.load_peft_prompt(tmp_path / "theirs", params, model.cfg)
  chex.assert_trees_all_close(loaded[kind], params[kind], atol=1e-6)
  with pytest.raises(ValueError, match="another base model"):
    other = chz.replace(model.cfg, hidden_size=32, num_layers=3)
    prompt.load_peft_prompt(tmp_path / "ours", params, other)
