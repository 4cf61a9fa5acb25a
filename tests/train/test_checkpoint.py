"""Checkpointer: keep-last-N, restore into the live sharding, refusal to resume on other data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jrlhf.sharding import MeshConfig, make_mesh
from jrlhf.train import checkpoint
from jrlhf.train.state import TrainState
from tests.fake_bucket import fake_bucket


def state(mesh, value):
  sharded = NamedSharding(mesh, P("fsdp"))
  return TrainState(trainable={"w": jax.device_put(jnp.full((8, 2), value), sharded)}, frozen={},
                    opt_state={"mu": jax.device_put(jnp.full((8, 2), -value), sharded)},
                    step=jnp.asarray(int(value), jnp.int32), rng=jax.random.PRNGKey(int(value)))


def test_keeps_last_n_and_restores_sharded(tmp_path):
  mesh = make_mesh(MeshConfig())
  ckpt = checkpoint.Checkpointer(tmp_path, every=2, keep=2)
  for step in range(1, 7):
    ckpt.maybe_save(step, state(mesh, step), "fp")
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path, every=2, keep=2)
  assert ckpt.all_steps() == [4, 6]
  restored = ckpt.restore_or(state(mesh, 0.0), "fp")
  np.testing.assert_array_equal(restored.trainable["w"], 6.0)
  np.testing.assert_array_equal(restored.opt_state["mu"], -6.0)
  assert int(restored.step) == 6
  np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(6))
  assert restored.trainable["w"].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp")), 2)
  ckpt.close()


def test_refuses_to_resume_with_other_data(tmp_path):
  mesh = make_mesh(MeshConfig())
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=1)
  ckpt.save(3, state(mesh, 3.0), checkpoint.fingerprint(data={"source": "tiny"}, seed=0))
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=1)
  other = checkpoint.fingerprint(data={"source": "tiny"}, seed=1)
  with pytest.raises(checkpoint.ResumeMismatch, match="train.resume=false"):
    ckpt.restore_or(state(mesh, 0.0), other)
  ckpt.close()


def test_empty_directory_keeps_the_fresh_state(tmp_path):
  mesh = make_mesh(MeshConfig())
  ckpt = checkpoint.Checkpointer(tmp_path / "none", every=0, keep=1)
  fresh = state(mesh, 1.0)
  assert ckpt.restore_or(fresh, "fp") is fresh
  ckpt.close()


def test_bucket_checkpoint_dir_stays_a_url(tmp_path):
  assert str(checkpoint.checkpoint_dir("gs://bkt/runs/a") / "7") == "gs://bkt/runs/a/7"
  assert checkpoint.checkpoint_dir("rel/ckpt").is_absolute()
  (tmp_path / "bkt/runs/a/checkpoints/3").mkdir(parents=True)
  with fake_bucket(tmp_path):
    checkpoint.clear("gs://bkt/runs/a/checkpoints")
  assert not (tmp_path / "bkt/runs/a/checkpoints").exists()
  assert (tmp_path / "bkt/runs/a").exists()


def test_export_to_a_bucket_writes_a_loadable_checkpoint(tmp_path):
  import flax.linen as nn

  from jrlhf.models import ModelConfig, Transformer, from_pretrained
  cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, mlp_dim=32, max_position_embeddings=32)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
  with fake_bucket(tmp_path):
    out = checkpoint.export_hf("gs://bkt/run/export", model, params)
  assert str(out) == "gs://bkt/run/export"
  _, loaded = from_pretrained(tmp_path / "bkt/run/export")
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
