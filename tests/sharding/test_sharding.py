"""Sharded params are the same params, give the same logits, and sit where the rules say."""

import functools
import os
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jrlhf.models import ModelConfig, Transformer
from jrlhf.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    batch_sharding,
    init_sharded,
    logical_to_sharding,
    make_mesh,
    param_shardings,
    put_batch,
    sharding_context,
)

# Every sharded dim divides 8, so each mesh below really splits it.
TINY = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                   head_dim=8, mlp_dim=128)
# The default config has mlp_dim=172, which 8 does not divide: exercises the replicate fallback.
ODD = ModelConfig()
TOKENS_BxL = np.random.default_rng(0).integers(0, 256, (8, 16), dtype=np.int32)
RNG = jax.random.key(0)


@functools.cache
def unsharded(cfg: ModelConfig):
  """Params and logits computed on one device, the reference for every mesh."""
  model = Transformer(cfg)
  params = jax.jit(lambda rng: nn.unbox(model.init(rng, TOKENS_BxL)["params"]))(RNG)
  return params, jax.jit(model.apply)({"params": params}, TOKENS_BxL)


def sharded(cfg: ModelConfig, head: str, mesh_cfg: MeshConfig):
  model = Transformer(cfg, head=head)
  mesh = make_mesh(mesh_cfg)
  params, shardings = init_sharded(model, RNG, TOKENS_BxL, mesh=mesh)
  with sharding_context(mesh):
    out = jax.jit(model.apply)({"params": params}, put_batch(TOKENS_BxL, mesh))
  return mesh, params, shardings, out


def assert_same_params_and_logits(cfg, params, out):
  ref_params, ref_out = unsharded(cfg)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, ref_params)
  assert all(jax.tree.leaves(same)), same
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0)


def assert_sharded_as(array, mesh, spec):
  expected = NamedSharding(mesh, spec)
  assert array.sharding.is_equivalent_to(expected, array.ndim), (array.sharding, expected)


# mesh, then the expected layout of the embedding table (vocab, embed) and of an MLP
# up-projection (layers, embed, mlp).
MESHES = {
    "2x4": (MeshConfig(data=2), P(None, "fsdp"), P(None, "fsdp", None)),
    "fsdp8": (MeshConfig(), P(None, "fsdp"), P(None, "fsdp", None)),
    "tensor8": (MeshConfig(fsdp=1, tensor=8), P("tensor", None), P(None, None, "tensor")),
    "data2_tensor4": (MeshConfig(data=2, fsdp=1, tensor=4), P("tensor", None),
                      P(None, None, "tensor")),
}


@pytest.mark.parametrize("name", MESHES)
def test_sharded_init_matches_unsharded(name):
  mesh_cfg, embed_spec, up_spec = MESHES[name]
  mesh, params, shardings, logits_BxLxV = sharded(TINY, "lm", mesh_cfg)
  assert_same_params_and_logits(TINY, params, logits_BxLxV)
  for array, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert array.sharding.is_equivalent_to(sharding, array.ndim)
  assert_sharded_as(params["embed"], mesh, embed_spec)
  assert_sharded_as(params["layers"]["mlp"]["up"]["kernel"], mesh, up_spec)
  if name == "fsdp8":
    shard_shapes = {s.data.shape for s in params["embed"].addressable_shards}
    assert shard_shapes == {(TINY.vocab_size, TINY.hidden_size // 8)}


def test_indivisible_dim_falls_back_to_replicated():
  mesh, params, shardings, logits_BxLxV = sharded(ODD, "lm", MeshConfig(fsdp=1, tensor=8))
  assert_same_params_and_logits(ODD, params, logits_BxLxV)
  up = params["layers"]["mlp"]["up"]["kernel"]
  assert up.shape[-1] == 172
  assert_sharded_as(up, mesh, P())
  assert_sharded_as(params["embed"], mesh, P("tensor", None))  # 256 still splits
  # The loader's path (shapes only, nothing allocated) agrees with what init produced.
  model = Transformer(ODD)
  assert param_shardings(model, TOKENS_BxL, mesh=mesh, rules=DEFAULT_RULES) == shardings


def test_without_shapes_rules_apply_as_written():
  mesh = make_mesh(MeshConfig(fsdp=1, tensor=8))
  logical = {"up": P("layers", "embed", "mlp"), "bias": None}
  sh = logical_to_sharding(logical, mesh)
  assert sh["up"].spec == P(None, "fsdp", "tensor")
  assert sh["bias"].spec == P()


def test_unknown_logical_name_is_an_error():
  mesh = make_mesh(MeshConfig())
  with pytest.raises(ValueError, match=r"\['experts'\].*add them to the rules table"):
    logical_to_sharding({"w": P("experts", "embed")}, mesh)


def test_scalar_head_sharded():
  mesh, params, _, values_BxL = sharded(TINY, "scalar", MeshConfig(data=2))
  assert values_BxL.shape == TOKENS_BxL.shape
  # Reference: the same params gathered onto one device (init equality is covered above).
  one_device = jax.device_put(params, jax.devices()[0])
  ref_BxL = jax.jit(Transformer(TINY, head="scalar").apply)({"params": one_device}, TOKENS_BxL)
  np.testing.assert_allclose(np.asarray(values_BxL), np.asarray(ref_BxL), atol=1e-5, rtol=0)
  assert_sharded_as(params["score"]["kernel"], mesh, P("fsdp", None))


def test_mesh_shape_fills_the_rest():
  assert MeshConfig(data=2).shape(8) == (2, 4, 1)
  assert MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
  mesh = make_mesh(MeshConfig(tensor=2))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="at most one mesh axis may be -1.*fsdp and tensor"):
    MeshConfig(fsdp=-1, tensor=-1)
  with pytest.raises(ValueError, match="positive or -1.*data=0"):
    MeshConfig(data=0)
  with pytest.raises(ValueError, match=r"data=2, fsdp=2, tensor=1 needs 4 devices but 8 are"):
    make_mesh(MeshConfig(data=2, fsdp=2))
  with pytest.raises(ValueError, match=r"data=3, fsdp=-1, tensor=1 cannot fill 8 devices"):
    make_mesh(MeshConfig(data=3))


def test_put_batch():
  mesh = make_mesh(MeshConfig(data=2))
  batch = {"tokens": TOKENS_BxL, "mask": np.ones((8, 16), bool)}
  placed = put_batch(batch, mesh)
  for key, array in placed.items():
    assert array.sharding.is_equivalent_to(batch_sharding(mesh), array.ndim)
    assert {s.data.shape for s in array.addressable_shards} == {(1, 16)}
    np.testing.assert_array_equal(np.asarray(array), batch[key])
  with pytest.raises(ValueError, match=r"global batch size 6 .*multiple of 8"):
    put_batch({"tokens": TOKENS_BxL[:6]}, mesh)


WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    pid = int(sys.argv[1])
    jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=pid)
    from jrlhf.sharding import MeshConfig, make_mesh, put_batch
    local = np.arange(12).reshape(4, 3) + 100 * pid
    out = put_batch({"x": local}, make_mesh(MeshConfig(data=2)))["x"]
    assert out.shape == (8, 3), out.shape
    rows = {s.index[0].start: np.asarray(s.data) for s in out.addressable_shards}
    # This process's rows, in order, are exactly what its own devices hold.
    np.testing.assert_array_equal(np.concatenate([rows[k] for k in sorted(rows)]), local)
    print("ok", pid)
""")


def test_put_batch_two_processes(tmp_path):
  """Each process passes its own 4 rows; together they form one (8, 3) global batch."""
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"ok {i}" in out, out
