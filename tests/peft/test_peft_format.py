"""LoRA adapters move both ways between jrlhf and the real `peft` library: same logits."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy

from jrlhf.models import from_pretrained
from jrlhf.peft import LoraSpec, LoraWeight, lora
from jrlhf.peft.peft_format import load_peft_adapter, save_peft_adapter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             initializer_range=0.1)
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**LLAMA)
  cfg._attn_implementation = "eager"
  directory = tmp_path_factory.mktemp("base")
  transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
  return directory


def hf_base(base_dir):
  return transformers.LlamaForCausalLM.from_pretrained(
      base_dir, attn_implementation="eager").float().eval()


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


def ours_logits(model, params):
  return np.asarray(jax.jit(model.apply)({"params": params}, TOKENS))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_with_same_logits(base_dir, tmp_path, use_rslora):
  torch.manual_seed(1)
  config = peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
      rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=use_rslora,
      init_lora_weights=False, task_type="CAUSAL_LM")  # random B: a non-trivial adapter
  peft_model = peft.get_peft_model(hf_base(base_dir), config).eval()
  expected = torch_logits(peft_model)
  peft_model.save_pretrained(tmp_path)

  model, params = from_pretrained(base_dir)
  adapted = load_peft_adapter(tmp_path, params)
  q = adapted["layers"]["attn"]["q"]["kernel"]
  assert isinstance(q, LoraWeight) and q.a.shape == (2, 64, 4)
  assert adapted["layers"]["mlp"]["down"]["kernel"].a.shape == (2, 112, 2)
  assert not isinstance(adapted["layers"]["attn"]["k"]["kernel"], LoraWeight)
  got = ours_logits(model, adapted)
  assert np.abs(got - ours_logits(model, params)).max() > 1e-2
  np.testing.assert_allclose(got, expected, atol=1e-4)
  # With the model given, the same mapping comes from its config rather than the tree.
  again = load_peft_adapter(tmp_path, params, model)
  np.testing.assert_array_equal(ours_logits(model, again), got)


def test_our_adapter_loads_in_peft_with_same_logits(base_dir, tmp_path):
  model, params = from_pretrained(base_dir)
  spec = LoraSpec(targets=("attn/(k|o)/", "mlp/(gate|up)/", "lm_head"), rank=4, alpha=16,
                  rank_pattern={"mlp/up": 8}, alpha_pattern={"lm_head": 2})
  wrapped = lora.wrap(params, spec, jax.random.key(0))
  wrapped = jax.tree.map(
      lambda w: LoraWeight(w.base, w.a, 0.2 * jax.random.normal(jax.random.key(w.b.size),
                                                                w.b.shape), w.scale)
      if isinstance(w, LoraWeight) else w, wrapped, is_leaf=lambda x: isinstance(x, LoraWeight))
  expected = ours_logits(model, wrapped)
  save_peft_adapter(tmp_path, wrapped, base_model_name_or_path=str(base_dir))

  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["target_modules"] == ["lm_head", "mlp.gate_proj", "mlp.up_proj",
                                      "self_attn.k_proj", "self_attn.o_proj"]
  tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
  assert tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"].shape == (8, 64)
  assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (112, 8)

  peft_model = peft.PeftModel.from_pretrained(hf_base(base_dir), tmp_path).eval()
  np.testing.assert_allclose(torch_logits(peft_model), expected, atol=1e-4)
  # And back: our own file reads back to the same leaves.
  reread = load_peft_adapter(tmp_path, params)
  np.testing.assert_allclose(ours_logits(model, reread), expected, atol=1e-5)


def test_partial_layers_and_errors(base_dir, tmp_path):
  torch.manual_seed(2)
  config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["o_proj"], layers_to_transform=[1],
                           init_lora_weights=False, task_type="CAUSAL_LM")
  peft_model = peft.get_peft_model(hf_base(base_dir), config).eval()
  expected = torch_logits(peft_model)
  peft_model.save_pretrained(tmp_path)
  model, params = from_pretrained(base_dir)
  adapted = load_peft_adapter(tmp_path, params)
  o = adapted["layers"]["attn"]["o"]["kernel"]
  assert not np.any(o.a[0]) and np.any(o.a[1])  # layer 0 untouched: A = B = 0 there
  np.testing.assert_allclose(ours_logits(model, adapted), expected, atol=1e-4)

  with pytest.raises(ValueError, match="does not have"):
    # A one-layer tree: the adapter's layer-1 weights have nowhere to go.
    load_peft_adapter(tmp_path, dict(params, layers=jax.tree.map(lambda x: x[:1],
                                                                  params["layers"])))
  with pytest.raises(ValueError, match="no LoraWeight"):
    save_peft_adapter(tmp_path / "x", params, "base", model=model)

