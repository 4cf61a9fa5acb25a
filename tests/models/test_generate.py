"""The sampler: logprobs match a forward pass, greedy matches HF, stops, filters, compiles once."""

import functools

import chz
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf.models import ModelConfig, Transformer
from jrlhf.models.generate import Sampler, SamplingConfig, filter_logits, generate
from jrlhf.models.hf import params_from_state_dict
from jrlhf.models.hf_config import config_to_hf

CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, mlp_dim=128)
N = 12
PROMPT_LENGTHS = (8, 5, 2)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=N)
SAMPLE = SamplingConfig(temperature=1.0, max_new_tokens=N)
# Temperature with both filters and stop tokens: logprobs must still be the unfiltered ones.
MIXED = SamplingConfig(temperature=1.3, top_k=20, top_p=0.9, max_new_tokens=N, stop_tokens=(5, 9))


@pytest.fixture(scope="module")
def model_params():
  model = Transformer(CFG)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  # Scale the init up so logits are far from uniform and a wrong position or mask shows.
  return model, jax.tree.map(lambda p: p * 4 if p.ndim > 1 else p, params)


def left_padded(lengths=PROMPT_LENGTHS, seed=1):
  p = max(lengths)
  tokens_BxP = np.asarray(jax.random.randint(jax.random.key(seed), (len(lengths), p), 3, 128))
  mask_BxP = np.arange(p)[None] >= p - np.asarray(lengths)[:, None]
  return jnp.asarray(np.where(mask_BxP, tokens_BxP, 0), jnp.int32), jnp.asarray(mask_BxP)


@functools.cache
def sampler(cfg: SamplingConfig) -> Sampler:
  """One compiled sampler per config, shared by the tests (compiles dominate their time)."""
  return Sampler(Transformer(CFG), cfg)


def run(params, cfg, seed=0):
  prompt_BxP, mask_BxP = left_padded()
  return sampler(cfg)(params, prompt_BxP, mask_BxP, jax.random.key(seed))


@jax.jit
def forward(params, tokens_BxL, mask_BxL):
  return Transformer(CFG).apply({"params": params}, tokens_BxL, attention_mask_BxL=mask_BxL)


def forward_logprobs(params, out, temperature):
  """log_softmax(logits / T) of each generated token from one pass over [prompt; generated]."""
  prompt_BxP, mask_BxP = left_padded()
  p = prompt_BxP.shape[1]
  gen_mask_BxN = jnp.arange(out.tokens_BxN.shape[1])[None] < out.lengths_B[:, None]
  tokens = jnp.concatenate([prompt_BxP, out.tokens_BxN], axis=1)
  mask = jnp.concatenate([mask_BxP, gen_mask_BxN], axis=1)
  logits_BxLxV = forward(params, tokens, mask)
  logp_BxNxV = jax.nn.log_softmax(logits_BxLxV[:, p - 1:-1] / temperature, axis=-1)
  logp_BxN = jnp.take_along_axis(logp_BxNxV, out.tokens_BxN[..., None], axis=-1)[..., 0]
  return np.asarray(logp_BxN), np.asarray(gen_mask_BxN)


@pytest.mark.parametrize("cfg", [GREEDY, MIXED], ids=["greedy", "t1.3-topk-topp-stop"])
def test_logprobs_equal_a_forward_pass(model_params, cfg):
  _, params = model_params
  out = run(params, cfg)
  expected_BxN, real_BxN = forward_logprobs(params, out, cfg.temperature or 1.0)
  got_BxN = np.asarray(out.logprobs_BxN)
  np.testing.assert_allclose(got_BxN[real_BxN], expected_BxN[real_BxN], atol=1e-4)
  assert np.all(got_BxN[~real_BxN] == 0)


@pytest.mark.parametrize("kind", ["prompt", "gated-prefix"])
def test_prompt_or_prefix_tuned_greedy_equals_a_forward_pass(model_params, kind):
  # The sampler puts the prefix in cache slots 0..T-1; a forward pass recomputes it.
  from jrlhf.peft import prompt
  _, params = model_params
  if kind == "prompt":
    tuned = prompt.add_prompt(params, jax.random.key(5), CFG, 4, init="vocab")
  else:
    tuned = prompt.add_prefix(params, jax.random.key(5), CFG, 4, zero_init=True)
    tuned["prefix"]["gate"] += 0.8  # past the identity start, so the gated path counts
  out = run(tuned, GREEDY)
  expected_BxN, real_BxN = forward_logprobs(tuned, out, 1.0)
  np.testing.assert_allclose(np.asarray(out.logprobs_BxN)[real_BxN], expected_BxN[real_BxN],
                             atol=1e-4)
  # Greedy: each token is the argmax of the forward pass's logits at its position.
  prompt_BxP, mask_BxP = left_padded()
  p = prompt_BxP.shape[1]
  logits_BxLxV = forward(tuned, jnp.concatenate([prompt_BxP, out.tokens_BxN], axis=1),
                         jnp.concatenate([mask_BxP, jnp.asarray(real_BxN)], axis=1))
  np.testing.assert_array_equal(np.argmax(logits_BxLxV[:, p - 1:-1], -1), out.tokens_BxN)
  assert np.any(np.asarray(out.tokens_BxN) != np.asarray(run(params, GREEDY).tokens_BxN))


def test_greedy_matches_hf_generate():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_cfg = transformers.LlamaConfig(**{
      **config_to_hf(CFG), "initializer_range": 0.2, "pad_token_id": 0, "eos_token_id": None})
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  prompt_BxP, mask_BxP = left_padded()
  with torch.inference_mode():
    hf_out = hf.generate(
        input_ids=torch.from_numpy(np.asarray(prompt_BxP)).long(),
        attention_mask=torch.from_numpy(np.asarray(mask_BxP)).long(), do_sample=False,
        max_new_tokens=N, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
  ours = run(params_from_hf(hf), GREEDY)
  hf_tokens_BxN = hf_out.sequences[:, prompt_BxP.shape[1]:].numpy()
  np.testing.assert_array_equal(ours.tokens_BxN, hf_tokens_BxN)
  hf_logp_BxN = torch.stack(hf_out.logits, 1).log_softmax(-1).gather(
      -1, torch.from_numpy(hf_tokens_BxN)[..., None])[..., 0].numpy()
  np.testing.assert_allclose(ours.logprobs_BxN, hf_logp_BxN, atol=1e-4)


def params_from_hf(hf_model) -> dict:
  tensors = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
  return jax.tree.map(jnp.asarray, params_from_state_dict(tensors, Transformer(CFG)))


@pytest.mark.parametrize("free_cfg", [GREEDY, SAMPLE], ids=["greedy", "sample"])
def test_rows_stop_independently(model_params, free_cfg):
  _, params = model_params
  free = run(params, free_cfg)
  free_BxN = np.asarray(free.tokens_BxN)
  # Greedy: each row stops at the latest at a step of its own (3, 7, 5), so every row is done
  # and the loop ends early. Sampling: rows 0 and 1 stop; row 2 only if it meets those tokens.
  picks = ((0, 3), (1, 7), (2, 5)) if free_cfg is GREEDY else ((0, 3), (1, 7))
  stops = tuple(int(free_BxN[b, t]) for b, t in picks)
  out = run(params, chz.replace(free_cfg, stop_tokens=stops, pad_id=1))
  for b, row in enumerate(free_BxN):
    hits = np.flatnonzero(np.isin(row, stops))
    length = hits[0] + 1 if hits.size else N
    assert out.lengths_B[b] == length and bool(out.done_B[b]) == bool(hits.size)
    np.testing.assert_array_equal(out.tokens_BxN[b, :length], row[:length])
    np.testing.assert_array_equal(out.logprobs_BxN[b, :length], free.logprobs_BxN[b, :length])
    assert np.all(out.tokens_BxN[b, length:] == 1) and np.all(out.logprobs_BxN[b, length:] == 0)
  assert out.lengths_B[0] <= 4 and out.lengths_B[1] <= 8
  assert np.all(out.done_B) or free_cfg is not GREEDY


def test_top_k_1_and_tiny_top_p_are_greedy(model_params):
  _, params = model_params
  greedy = run(params, GREEDY)
  for cfg in (chz.replace(SAMPLE, top_k=1), chz.replace(SAMPLE, top_p=1e-6)):
    out = run(params, cfg, seed=3)
    np.testing.assert_array_equal(out.tokens_BxN, greedy.tokens_BxN)
    np.testing.assert_allclose(out.logprobs_BxN, greedy.logprobs_BxN, atol=1e-5)


def test_sampling_is_deterministic_per_rng(model_params):
  _, params = model_params
  a, b, c = (run(params, SAMPLE, seed) for seed in (0, 0, 1))
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  assert np.any(np.asarray(a.tokens_BxN) != np.asarray(c.tokens_BxN))


def test_compiles_once_for_new_params_and_prompts(model_params):
  model, params = model_params
  fresh = Sampler(model, SamplingConfig(temperature=0.7, top_k=10, max_new_tokens=4))
  prompt_BxP, mask_BxP = left_padded()
  fresh(params, prompt_BxP, mask_BxP, jax.random.key(0))
  other_prompt, other_mask = left_padded((3, 8, 1), seed=2)
  out = fresh(jax.tree.map(lambda p: p * 1.01, params), other_prompt, other_mask,
              jax.random.key(1))
  jax.block_until_ready(out)
  assert fresh.traces == 1


def test_filter_logits_keeps_top_k_and_nucleus():
  logits_1xV = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda k, p: np.isfinite(np.asarray(filter_logits(logits_1xV, k, p)))[0]  # noqa: E731
  np.testing.assert_array_equal(kept(2, 1.0), [False, True, False, True])
  np.testing.assert_array_equal(kept(0, 0.75), [False, True, False, True])
  np.testing.assert_array_equal(kept(0, 0.85), [False, True, True, True])
  np.testing.assert_array_equal(kept(0, 0.2), [False, True, False, False])
  np.testing.assert_array_equal(kept(3, 0.7), [False, True, False, True])


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop_tokens=(-1,)), "stop_tokens"),
])
def test_config_rejects_bad_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SamplingConfig(**kwargs)


def test_bad_inputs_are_reported_at_the_door(model_params):
  model, params = model_params
  prompt_BxP, mask_BxP = left_padded()
  rng = jax.random.key(0)
  with pytest.raises(ValueError, match="same shape"):
    generate(model, params, prompt_BxP, mask_BxP[:, 1:], rng, SamplingConfig())
  with pytest.raises(ValueError, match="vocab_size"):
    generate(model, params, prompt_BxP, mask_BxP, rng, SamplingConfig(stop_tokens=(500,)))
