"""Logit parity with transformers' PyTorch models, and checkpoint round trips."""

import json

import numpy as np
import pytest
import torch
import transformers

from jrlhf.models import from_pretrained, save_pretrained

torch.manual_seed(0)

LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             initializer_range=0.1)
CASES = {
    "llama_gqa_llama3_rope": ("llama", dict(LLAMA, rope_theta=5e5, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama_tied_bias": ("llama", dict(LLAMA, tie_word_embeddings=True, attention_bias=True,
                                      mlp_bias=True, head_dim=8)),
    "mistral_window": ("mistral", dict(LLAMA, sliding_window=5)),
    "qwen2_bias": ("qwen2", dict(LLAMA, rope_theta=1e6)),
    "qwen3_qknorm_tied": ("qwen3", dict(LLAMA, head_dim=32, tie_word_embeddings=True)),
    "gpt2": ("gpt2", dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                          initializer_range=0.1)),
}


def hf_model(family, kwargs, cls=transformers.AutoModelForCausalLM):
  cfg = transformers.CONFIG_MAPPING[family](**kwargs)
  cfg._attn_implementation = "eager"
  model = cls.from_config(cfg).eval()
  with torch.no_grad():  # norms start at 1 and biases at 0: randomise them so they are tested
    for name, p in model.named_parameters():
      if "norm" in name or "ln_" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens, mask=None, positions=None):
  kw = {}
  if mask is not None:
    kw = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
  with torch.no_grad():
    return model(torch.tensor(tokens), **kw).logits.numpy()


def tokens(batch=2, length=12, vocab=96, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
  family, kwargs = CASES[case]
  hf = hf_model(family, kwargs)
  hf.save_pretrained(tmp_path)
  # Query chunks of 4 over 12 tokens: the chunked path, with and without a sliding window.
  model, params = from_pretrained(tmp_path, attention_chunk=4)
  assert model.cfg.family == family
  x = tokens()
  ours = np.asarray(model.apply({"params": params}, x))
  np.testing.assert_allclose(ours, hf_logits(hf, x), atol=1e-4, rtol=0)

  # Left padding: real tokens' logits must not depend on the pads.
  mask = np.ones_like(x)
  mask[0, :4] = 0
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  ours = np.asarray(model.apply({"params": params}, x, attention_mask_BxL=mask))
  theirs = hf_logits(hf, x, mask, positions)
  np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["llama_gqa_llama3_rope", "qwen2_bias", "gpt2"])
def test_round_trip_through_transformers(case, tmp_path):
  family, kwargs = CASES[case]
  hf_model(family, kwargs).save_pretrained(tmp_path / "hf")
  model, params = from_pretrained(tmp_path / "hf")
  # A tiny shard limit forces the sharded layout with an index file.
  save_pretrained(tmp_path / "ours", model, params, max_shard_bytes=20_000)
  assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
  x = tokens(seed=1)
  np.testing.assert_allclose(hf_logits(reloaded, x),
                             np.asarray(model.apply({"params": params}, x)), atol=1e-4, rtol=0)
  model2, params2 = from_pretrained(tmp_path / "ours")
  assert model2.cfg == model.cfg
  for a, b in zip(*map(lambda p: __import__("jax").tree.leaves(p), (params, params2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reads_sharded_transformers_checkpoint_in_bfloat16(tmp_path):
  family, kwargs = CASES["qwen2_bias"]
  hf = hf_model(family, kwargs)
  hf.save_pretrained(tmp_path, max_shard_size="30KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  model, params = from_pretrained(tmp_path, dtype="bfloat16", compute_dtype="float32")
  assert params["layers"]["attn"]["q"]["kernel"].dtype.name == "bfloat16"
  x = tokens()
  ours = np.asarray(model.apply({"params": params}, x))
  np.testing.assert_allclose(ours, hf_logits(hf, x), atol=0.1, rtol=0)


def test_scalar_head_matches_sequence_classification(tmp_path):
  family, kwargs = CASES["llama_gqa_llama3_rope"]
  hf = hf_model(family, dict(kwargs, num_labels=1, pad_token_id=0),
                transformers.AutoModelForSequenceClassification)
  hf.save_pretrained(tmp_path / "hf")
  model, params = from_pretrained(tmp_path / "hf", head="scalar")
  x = tokens(vocab=95) + 1  # no pad ids: HF pools at the last non-pad token
  with torch.no_grad():
    theirs = hf(torch.tensor(x)).logits.numpy()[:, 0]
  values_BxL = np.asarray(model.apply({"params": params}, x))
  np.testing.assert_allclose(values_BxL[:, -1], theirs, atol=1e-4, rtol=0)
  save_pretrained(tmp_path / "ours", model, params)
  config = json.loads((tmp_path / "ours" / "config.json").read_text())
  assert config["architectures"] == ["LlamaForSequenceClassification"]
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours")
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(torch.tensor(x)).logits.numpy()[:, 0], theirs, atol=1e-4)


def _rewrite(directory, edit):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  edit(config)
  path.write_text(json.dumps(config))


def test_errors_name_the_tensor_and_shapes(tmp_path):
  import safetensors.numpy

  family, kwargs = CASES["llama_gqa_llama3_rope"]
  hf_model(family, kwargs).save_pretrained(tmp_path)

  _rewrite(tmp_path, lambda c: c.update(intermediate_size=100))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape "
                     r"\(112, 64\), expected \(100, 64\)"):
    from_pretrained(tmp_path)
  _rewrite(tmp_path, lambda c: c.update(intermediate_size=112))

  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight is missing "
                     r"\(expected shape \(32, 64\)\)"):
    from_pretrained(tmp_path)

  _rewrite(tmp_path, lambda c: c.update(model_type="bert", architectures=["BertModel"]))
  with pytest.raises(ValueError, match="'bert'.*not supported.*llama, mistral"):
    from_pretrained(tmp_path)


def test_refuses_pickle_checkpoints(tmp_path):
  family, kwargs = CASES["gpt2"]
  hf_model(family, kwargs).save_pretrained(tmp_path)
  (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="reads only safetensors"):
    from_pretrained(tmp_path)


def test_unreachable_hub_id_says_what_to_do(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match="not a local directory and could not be fetched"):
    from_pretrained("no-such-org/no-such-model")
