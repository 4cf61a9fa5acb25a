"""Every PEFT method through the train state and the SFT step: identity start, trainable-only
gradients and optimizer state, a 2x4-sharded step equal to the unsharded one, loss going down,
and exact resume + export through the loop."""

import functools
import math

import chz
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrlhf import data as data_lib
from jrlhf.algorithms import sft
from jrlhf.algorithms.step import combine_params
from jrlhf.models import ModelConfig, from_pretrained
from jrlhf.peft import config as peft_config, quant
from jrlhf.peft.peft_format import load_peft_adapter, save_peft_adapter
from jrlhf.peft.trainable import base_params, count, with_dropout_keys
from jrlhf.sharding import MeshConfig, make_mesh, put_batch, sharding_context
from jrlhf.train import loop
from jrlhf.train.config import OptimConfig
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.state import abstract_state, create_state
from tests.train.test_loop import config, deterministic, read, stop_at

MODEL = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=128, max_position_embeddings=128)
METHODS = {
    "lora": peft_config.LoraConfig(rank=4, alpha=8.0),
    "lora-dropout": peft_config.LoraConfig(rank=4, alpha=8.0, dropout=0.1),
    "qlora": peft_config.QLoraConfig(rank=4, alpha=8.0),
    "houlsby": peft_config.AdapterConfig(kind="houlsby"),
    "parallel": peft_config.AdapterConfig(kind="parallel"),
    "ia3": peft_config.IA3Config(),
    "prompt": peft_config.PromptConfig(num_virtual_tokens=4, init="vocab"),
    "prefix": peft_config.PrefixConfig(num_virtual_tokens=4, projection=True, zero_init=True),
}
# Virtual tokens change the model from the first step (PEFT's prompt init is not a no-op).
NOT_IDENTITY = ("prompt",)
OPT = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)


@functools.lru_cache(maxsize=None)
def batch():
  cfg = data_lib.DataConfig(num_train_examples=64, num_eval_examples=0, batch_size=8,
                            max_length=64, min_bucket=64)
  tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
  train, _, _ = data_lib.load_dataset(cfg, tokenizer)
  return data_lib.Batches(train, cfg, seed=0).get(0, 0, 1)


def logits(model, params):
  b = batch()
  return model.apply({"params": params}, jnp.asarray(b["tokens"]),
                     positions_BxL=jnp.asarray(b["positions"]),
                     segment_ids_BxL=jnp.asarray(b["segment_ids"]))


def make(method, mesh_cfg=MeshConfig(data=1, fsdp=1, tensor=1)):
  opt = make_optimizer(OPT, 100)
  devices = jax.devices()[:math.prod(mesh_cfg.sizes())]
  mesh = make_mesh(mesh_cfg, devices)
  model, state, state_sh = create_state(MODEL, opt, mesh, seed=0, peft=METHODS[method])
  step = jax.jit(functools.partial(sft.train_step, model=model, cfg=sft.SFTConfig(), opt=opt),
                 in_shardings=(state_sh, None), out_shardings=(state_sh, None))
  return model, state, mesh, step


def run_steps(state, mesh, step, n):
  """n SFT steps on one batch, with the loop's per-step dropout keys."""
  out = []
  with sharding_context(mesh):
    for _ in range(n):
      keyed = with_dropout_keys(state.frozen, jax.random.fold_in(state.rng, 1))
      new, metrics = step(state.replace(frozen=keyed), put_batch(batch(), mesh))
      state = new.replace(frozen=state.frozen)
      out.append(metrics)
  return state, out


@pytest.mark.parametrize("method", list(METHODS))
def test_method_starts_as_base_trains_only_its_weights_and_shards(method):
  model, state, mesh, step = make(method)
  _, base_state, _, _ = make_base()
  base = base_state.trainable
  if method == "qlora":  # the start is the rounded base
    base = quant.dequantize(quant.quantize(base))
  params = combine_params(state.trainable, state.frozen)
  if method not in NOT_IDENTITY:
    np.testing.assert_allclose(logits(model, params), logits(model, base), atol=2e-5)
  # Stripping the method leaves the base model (the DPO/PPO reference), whatever was trained.
  moved = jax.tree.map(lambda x: x + 0.1, state.trainable)
  np.testing.assert_allclose(logits(model, base_params(combine_params(moved, state.frozen))),
                             logits(model, base), atol=2e-5)

  # Trainable = the method's own small weights; optimizer moments sized by them.
  assert 0 < count(state.trainable) < 0.2 * count(base)
  # mu and nu, plus two step counters (adam, schedule).
  assert count(state.opt_state) == 2 * count(state.trainable) + 2
  kernels = [x for x in jax.tree.leaves(state.trainable) if x.shape == (2, 64, 128)]
  assert not kernels, "a base kernel landed in the trainable half"

  # The gradient tree is the trainable tree (no frozen leaf), nonzero where it matters.
  grads = jax.grad(lambda t: sft.loss_fn(combine_params(t, state.frozen), batch(), model,
                                         sft.SFTConfig())[0])(state.trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(state.trainable)
  assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads))) > 0

  # Loss goes down; a 2x4-sharded step is the same computation.
  trained, metrics = run_steps(state, mesh, step, 5)
  losses = [float(m["loss"]) for m in metrics]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses

  if method == "lora-dropout":
    return  # shards like lora
  _, state8, mesh8, step8 = make(method, MeshConfig(data=1, fsdp=2, tensor=4))
  trained8, metrics8 = run_steps(state8, mesh8, step8, 2)
  np.testing.assert_allclose([float(m["loss"]) for m in metrics8], losses[:2], rtol=2e-5)
  once, _ = run_steps(state, mesh, step, 2)
  # Adam's early steps are ~lr * sign(g): a gradient near zero may flip on reduction-order noise,
  # so params agree to a small fraction of one step (lr = 1e-2), and the losses above to 2e-5.
  for a, b in zip(jax.tree.leaves(once.trainable), jax.tree.leaves(trained8.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-4)


@functools.lru_cache(maxsize=None)
def make_base():
  opt = make_optimizer(OPT, 100)
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  return (*create_state(MODEL, opt, mesh, seed=0), mesh)


def test_abstract_state_matches_created_state():
  opt = make_optimizer(OPT, 100)
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  _, shapes = abstract_state(MODEL, opt, mesh, peft=METHODS["qlora"])
  _, state, _ = create_state(MODEL, opt, mesh, peft=METHODS["qlora"])
  assert jax.tree.structure(shapes) == jax.tree.structure(state)
  for s, x in zip(jax.tree.leaves(shapes), jax.tree.leaves(state)):
    assert (s.shape, s.dtype, s.sharding) == (x.shape, x.dtype, x.sharding)


def test_lora_run_resumes_exactly_and_exports_adapter_and_merged_model(tmp_path):
  cfg = chz.replace(config(export=True, steps=4, eval_every=4),
                    peft=peft_config.LoraConfig(rank=4, dropout=0.1))
  whole = loop.train(cfg, tmp_path / "whole")
  assert whole["compiles"] == 1
  with pytest.raises(SystemExit):
    loop.run(cfg, tmp_path / "split", stop_at(loop.load_run_data(cfg), 1))
  loop.train(cfg, tmp_path / "split")
  rows = deterministic(read(tmp_path / "whole" / "metrics.jsonl"))
  assert deterministic(read(tmp_path / "split" / "metrics.jsonl")) == rows

  # The exported adapter over the run's base model computes what the merged export does.
  export = tmp_path / "whole" / "export"
  model, merged = from_pretrained(export)
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  _, base_state, _ = create_state(cfg.model, make_optimizer(cfg.optim, 4), mesh, seed=cfg.seed)
  adapted = load_peft_adapter(export / "adapter", base_state.trainable)
  tokens = jnp.asarray(batch()["tokens"][:2, :32]) % cfg.model.vocab_size
  np.testing.assert_allclose(model.apply({"params": adapted}, tokens),
                             model.apply({"params": merged}, tokens), atol=1e-4)
  assert not np.allclose(model.apply({"params": base_state.trainable}, tokens),
                         model.apply({"params": merged}, tokens), atol=1e-4)


def test_lora_starts_from_a_saved_adapter_and_rejects_a_mismatched_one(tmp_path):
  model, state, mesh, _ = make("lora")
  trained = jax.tree.map(lambda x: x + 0.05, state.trainable)
  params = combine_params(trained, state.frozen)
  save_peft_adapter(tmp_path / "adapter", params, "base")
  opt = make_optimizer(OPT, 100)
  resumed = chz.replace(METHODS["lora"], adapter=str(tmp_path / "adapter"))
  _, again, _ = create_state(MODEL, opt, mesh, seed=1, peft=resumed)
  # Same base (seed 0 vs 1 differ in init, so compare against the adapter on this run's base).
  base = base_params(combine_params(again.trainable, again.frozen))
  expected = load_peft_adapter(tmp_path / "adapter", base)
  np.testing.assert_allclose(logits(model, combine_params(again.trainable, again.frozen)),
                             logits(model, expected), atol=1e-5)
  assert not np.allclose(logits(model, combine_params(again.trainable, again.frozen)),
                         logits(model, base), atol=1e-4)
  with pytest.raises(ValueError, match="peft.rank"):
    create_state(MODEL, opt, mesh, peft=chz.replace(resumed, rank=8))
  with pytest.raises(ValueError, match="peft.targets"):
    create_state(MODEL, opt, mesh, peft=chz.replace(resumed, targets=("attn/q/",)))
