"""Ahead-of-time plan: will this run fit, and how fast could it go? Nothing is allocated.

    python -m jrlhf.run experiment=tiny/sft plan=v5p:2x2x1   # a TPU topology (needs libtpu)
    python -m jrlhf.run experiment=tiny/sft plan=cpu         # this machine's CPU devices
    python -m jrlhf.run experiment=tiny/sft plan=gpu:16GB    # one device with a memory budget

    report = make_plan(cfg, parse_target("v5p:2x2x1"))       # the same, from Python
    report.fits, report.programs[0].memory["total"]

Each program a run jits (the train step now; PPO adds its rollout) is built from abstract state
and batch (ShapeDtypeStructs carrying shardings), lowered and compiled for the target's devices:
a TPU topology through libtpu (compile-only devices, no TPU needed), or the local devices. XLA's
memory analysis gives the per-chip bytes; the cost analysis gives FLOPs and, on TPU, an
estimated step time. `gpu:<size>` compiles for the local GPU if there is one, else for the local
CPU as a stand-in judged against the budget (the report says so). Over budget exits 1.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sys
import time
from typing import Any, Callable, NamedTuple

import chz
import jax
import jax.numpy as jnp

from jrlhf.algorithms.dpo import DPOConfig
from jrlhf.algorithms.rm import RMConfig
from jrlhf.algorithms.sft import SFTConfig
from jrlhf.models import ModelConfig

GiB = 2**30


class PlanError(ValueError):
  """A target or config the plan cannot compile; the message says what to change. Exits 2."""


class Chip(NamedTuple):
  kind: str
  hbm_bytes: float
  peak_flops: float  # bf16 FLOP/s


# Per chip, from the Cloud TPU system architecture pages (bf16 peak; HBM as configs/meshes.py).
TPU_CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12),
}
_HOST_CHIPS = (2, 2, 1)  # libtpu's default chips per host; smaller topologies must say so


@dataclasses.dataclass(frozen=True)
class Target:
  spec: str
  devices: tuple  # what the programs compile for (TPU compile-only devices, or local ones)
  description: str
  budget_bytes: float | None  # per chip; None = report only
  peak_flops: float | None  # per chip, for MFU
  note: str = ""

  @property
  def chips(self) -> int:
    return len(self.devices)


def parse_size(text: str) -> float:
  """`16GB`, `16GiB`, `512MB` -> bytes. GPU makers' "GB" are GiB (an 80 GB card has 80 GiB)."""
  match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([GM])i?B", text.strip(), re.IGNORECASE)
  if not match:
    raise PlanError(f"memory budget {text!r} is not a size like 16GB or 512MB")
  return float(match[1]) * (GiB if match[2].upper() == "G" else 2**20)


def parse_target(spec: str) -> Target:
  """`v5p:2x2x1` | `cpu` | `cpu:32GB` | `gpu:16GB` -> the devices to compile for."""
  kind, _, rest = spec.partition(":")
  if kind in TPU_CHIPS:
    return _tpu_target(spec, kind, rest)
  if kind == "cpu":
    budget = parse_size(rest) if rest else None
    return Target(spec, tuple(jax.devices("cpu")), "this machine's CPU devices", budget, None)
  if kind == "gpu":
    if not rest:
      raise PlanError("plan=gpu needs the device's memory, e.g. plan=gpu:16GB")
    local = [d for d in jax.devices() if d.platform == "gpu"]
    if local:
      return Target(spec, (local[0],), local[0].device_kind, parse_size(rest), None)
    return Target(spec, (jax.devices("cpu")[0],), f"one {rest} device", parse_size(rest), None,
                  note="no GPU here: compiled for the local CPU as a stand-in, judged against "
                       "the budget. XLA:CPU runs bf16 matmuls in float32, so its temporaries "
                       "read high (7B bf16 full fine-tuning: 39 GiB vs 16 GiB on one TPU chip)")
  raise PlanError(f"plan={spec!r}: expected a TPU topology ({', '.join(TPU_CHIPS)}, e.g. "
                  f"v5p:2x2x1 or v5e:4x4), cpu, cpu:<size> or gpu:<size> (e.g. gpu:16GB)")


def _on_tpu_vm() -> bool:
  # Google's PCI vendor id: on a TPU VM jax has set up libtpu's environment itself.
  return any(open(p).read().strip() == "0x1ae0" for p in glob.glob("/sys/bus/pci/devices/*/vendor"))


def _tpu_target(spec: str, generation: str, layout: str) -> Target:
  dims = layout.split("x") if layout else []
  if not dims or not all(d.isdigit() and int(d) > 0 for d in dims):
    raise PlanError(f"plan={spec!r}: a TPU topology reads <generation>:<chips per dimension>, "
                    f"e.g. v5p:2x2x1 (4 chips), v5e:4x4 (16 chips)")
  try:
    import libtpu  # noqa: F401, PLC0415 - only TPU plans need it
  except ImportError:
    raise PlanError(
        f"plan={spec} compiles for a TPU topology with libtpu, which is not installed. Install "
        f"the libtpu that matches jax {jax.__version__}: pip install 'jax[tpu]=={jax.__version__}'"
        f" (or pip install -e '.[tpu]'); plan=cpu and plan=gpu:<size> need no libtpu") from None
  if not _on_tpu_vm():
    # Off a TPU VM libtpu cannot discover its slice and logs errors about it; compile-only
    # topologies need none of that, so give it a one-host answer. Its lockfile guards TPU chips,
    # which a compile does not touch: without this, any other JAX process on the machine that
    # loaded libtpu (a CPU run without JAX_PLATFORMS=cpu) makes the plan fail.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{generation}-8")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415

  sizes = [int(d) for d in dims] + [1] * (3 - len(dims))
  kwargs = {}
  if any(s < h for s, h in zip(sizes, _HOST_CHIPS)):  # less than one host: say how many
    kwargs["chips_per_host_bounds"] = tuple(min(s, h) for s, h in zip(sizes, _HOST_CHIPS))
  try:
    devices = topologies.get_topology_desc(topology_name=spec, platform="tpu", **kwargs).devices
  except Exception as e:  # noqa: BLE001 - libtpu's message names the problem
    raise PlanError(f"plan={spec!r}: libtpu cannot build this topology: {e}") from None
  chip = TPU_CHIPS[generation]
  return Target(spec, tuple(devices), f"{len(devices)} x {chip.kind} (compile only, libtpu)",
                chip.hbm_bytes, chip.peak_flops)


# ---------------------------------------------------------------------------------------------
# Programs: one builder per jitted program of a run, keyed by the algorithm's config type.


class Program(NamedTuple):
  """A jitted program of a run: `build(cfg, mesh) -> (jitted fn, abstract args)`, and the model
  FLOPs of one call (all chips). PPO's rollout (the sampler) joins as a second Program."""

  name: str
  build: Callable[[Any, Any], tuple[Any, tuple]]
  model_flops: Callable[[Any], float]
  # False for a program around a data-dependent loop (the sampler's decode): XLA counts the
  # body once, so only the model FLOPs are reported.
  compiler_costs: bool = True


def sft_batch(cfg, rows: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch `jrlhf.data.Batches.get` returns, padded to `data.max_length`."""
  shape = (rows, cfg.data.max_length)
  dtypes = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
            "loss_mask": jnp.bool_}
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding) for k, dt in dtypes.items()}


# Offline algorithms' batches. RM and DPO batches hold `[chosen; rejected]` rows with the same
# fields (jrlhf.data.preference), so data.batch_size pairs make 2 * batch_size rows.
def dpo_batch(cfg, rows: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """Pair rows; with `precompute_ref`, the cached reference logps ride along per row."""
  batch = sft_batch(cfg, rows, sharding)
  if cfg.algorithm.precompute_ref and cfg.algorithm.needs_reference:
    batch["ref_logps"] = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sharding)
  return batch


BATCHES: dict[type, Callable] = {SFTConfig: sft_batch, RMConfig: sft_batch, DPOConfig: dpo_batch}
PAIRS = (RMConfig, DPOConfig)


def rows_per_step(cfg) -> int:
  # Gradient accumulation packs grad_accum micro-batches into one batch of B*A rows.
  pairs = 2 if isinstance(cfg.algorithm, PAIRS) else 1
  return pairs * cfg.data.batch_size * cfg.optim.grad_accum


def _state_options(cfg) -> dict[str, Any]:
  """What the run's state holds beyond the params: a scalar head (RM), a frozen reference copy
  (DPO under full fine-tuning) — as the loop builds it."""
  from jrlhf.train import loop  # noqa: PLC0415

  if type(cfg.algorithm) not in loop.ALGORITHMS:
    return {"reference": True}  # online RL: the policy, with a frozen start for the KL
  algorithm = loop.algorithm_for(cfg.algorithm)
  return {"head": algorithm.head, "reference": algorithm.needs_reference(cfg.algorithm)}


def build_train_step(cfg, mesh) -> tuple[Any, tuple]:
  from jrlhf.sharding import batch_sharding, batch_ways  # noqa: PLC0415
  from jrlhf.train import loop  # noqa: PLC0415 - the training stack, only when planning
  from jrlhf.train.optimizer import make_optimizer  # noqa: PLC0415
  from jrlhf.train.state import abstract_state  # noqa: PLC0415

  make_batch = BATCHES.get(type(cfg.algorithm))
  if make_batch is None:
    raise PlanError(f"no plan yet for {type(cfg.algorithm).__name__}")
  rows, ways = rows_per_step(cfg), batch_ways(mesh)
  if rows % ways:
    raise PlanError(f"data.batch_size={cfg.data.batch_size} x optim.grad_accum="
                    f"{cfg.optim.grad_accum} = {rows} rows cannot split {ways} ways over the "
                    f"mesh's data*fsdp axes; use a multiple of {ways} rows per step, or set "
                    f"mesh.tensor to take some of the chips")
  opt = make_optimizer(cfg.optim, cfg.steps)
  model, state = abstract_state(cfg.model, opt, mesh, seed=cfg.seed, peft=cfg.peft,
                                **_state_options(cfg))
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  step = loop.jit_train_step(loop.algorithm_for(cfg.algorithm), model, cfg.algorithm, opt,
                             state_sh, mesh)
  return step, (state, make_batch(cfg, rows, batch_sharding(mesh)))


def matmul_params(m: ModelConfig) -> int:
  """Weights that take part in a matmul per token: every projection and the LM head (the input
  embedding is a lookup)."""
  attn = m.hidden_size * m.head_dim * 2 * (m.num_heads + m.num_kv_heads)
  mlp = (2 if m.is_gpt2 else 3) * m.hidden_size * m.mlp_dim
  return m.num_layers * (attn + mlp) + m.hidden_size * m.vocab_size


def train_step_flops(cfg) -> float:
  """Model FLOPs of one optimizer step (PaLM's MFU convention: no remat recompute, attention
  counted without the causal discount). Forward 2NT, backward 2NT for the activation gradients
  plus 2NT for weight gradients, which a frozen (PEFT) base does not compute."""
  m, tokens = cfg.model, rows_per_step(cfg) * cfg.data.max_length
  passes = 6 if cfg.peft.full else 4
  if (isinstance(cfg.algorithm, DPOConfig) and cfg.algorithm.needs_reference
      and not cfg.algorithm.precompute_ref):
    passes += 2  # the reference's forward over the same rows
  dense = passes * matmul_params(m) * tokens
  attention = 2 * passes * m.num_layers * m.num_heads * m.head_dim * cfg.data.max_length * tokens
  return float(dense + attention)


TRAIN_STEP = Program("train_step", build_train_step, train_step_flops)
PROGRAMS: dict[type, tuple[Program, ...]] = {SFTConfig: (TRAIN_STEP,), RMConfig: (TRAIN_STEP,),
                                             DPOConfig: (TRAIN_STEP,)}


# ---------------------------------------------------------------------------------------------
# Compiling and reading the compiler's analyses.


@dataclasses.dataclass
class ProgramPlan:
  name: str
  memory: dict[str, int]  # per chip: arguments, outputs, aliased, temporaries, code, total
  compiler_flops: float | None  # per chip, remat recompute included
  est_seconds: float | None  # the compiler's estimate of one call (TPU only)
  model_flops: float  # all chips
  compile_seconds: float
  error: str = ""  # the compiler refused (e.g. out of HBM)

  def mfu(self, target: Target) -> float | None:
    if not (self.est_seconds and target.peak_flops):
      return None
    return self.model_flops / (self.est_seconds * target.chips * target.peak_flops)


def _lower(program: Program, cfg, mesh):
  from jrlhf.sharding import sharding_context  # noqa: PLC0415

  fn, args = program.build(cfg, mesh)
  with sharding_context(mesh):  # activation constraints need the mesh while tracing
    return fn.lower(*args)


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(cost or {})


def _depth_cost(program: Program, cfg, mesh) -> tuple[float | None, float | None]:
  """(FLOPs, estimated seconds) per chip at the config's depth.

  XLA's cost analysis counts a while loop's body once, so a scanned stack of layers reads as one
  layer and the gradient-accumulation scan as one micro-batch. Compile 1 and 2 layers unrolled
  for one micro-batch (small programs), extrapolate linearly in depth and scale by grad_accum
  (which also counts the once-per-step optimizer update grad_accum times: a small excess).
  """
  accum = cfg.optim.grad_accum
  points = []
  for n in (1, 2):
    small = chz.replace(cfg, model=chz.replace(cfg.model, num_layers=n, scan_unroll=n),
                        optim=chz.replace(cfg.optim, grad_accum=1))
    points.append(_cost(_lower(program, small, mesh).compile()))
  depth = cfg.model.num_layers

  def extrapolate(key):
    a, b = (p.get(key) for p in points)
    if a is None or b is None or a < 0 or b < 0:
      return None
    return accum * (a + (depth - 1) * (b - a))
  return extrapolate("flops"), extrapolate("optimal_seconds") or None


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  # Donated state aliases the outputs: count those bytes once.
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                  + out["code"])
  return out


def plan_program(program: Program, cfg, mesh, *, costs: bool = True) -> ProgramPlan:
  start = time.perf_counter()
  try:
    compiled = _lower(program, cfg, mesh).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e).lower():
      raise
    # The TPU compiler refuses a program that cannot fit HBM: that is the answer.
    return ProgramPlan(program.name, {}, None, None, program.model_flops(cfg),
                       time.perf_counter() - start, error=str(e).strip().splitlines()[0][:600])
  seconds = time.perf_counter() - start
  flops, est = (_depth_cost(program, cfg, mesh) if costs and program.compiler_costs
                else (None, None))
  return ProgramPlan(program.name, _memory(compiled), flops, est, program.model_flops(cfg),
                     seconds)


@dataclasses.dataclass
class Plan:
  target: Target
  mesh_shape: dict[str, int]
  state_bytes: dict[str, int]  # whole state (all chips): trainable, frozen, opt_state
  trainable_params: int
  programs: list[ProgramPlan]

  @property
  def fits(self) -> bool:
    budget = self.target.budget_bytes
    return all(not p.error and (budget is None or p.memory["total"] <= budget)
               for p in self.programs)

  @property
  def peak_bytes(self) -> int | None:
    if any(p.error for p in self.programs):
      return None
    return max(p.memory["total"] for p in self.programs)


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def make_plan(cfg, target: Target, *, costs: bool = True) -> Plan:
  """Compile every program of `cfg`'s run for `target`. `costs=False` skips the two small
  compiles that give FLOPs and the step-time estimate (memory only)."""
  from jrlhf.sharding import make_mesh  # noqa: PLC0415
  from jrlhf.train.optimizer import make_optimizer  # noqa: PLC0415
  from jrlhf.train.state import abstract_state, checkpoint_model_config  # noqa: PLC0415

  from jrlhf import plan_online  # noqa: PLC0415 - online RL's programs build on this module

  if cfg.init_from:
    # The run builds the checkpoint's shapes (its config.json), whatever model.* says.
    try:
      cfg = chz.replace(cfg, model=checkpoint_model_config(cfg.model, cfg.init_from))
    except (OSError, ValueError) as e:
      raise PlanError(f"init_from={cfg.init_from}: {e}") from None

  programs = PROGRAMS.get(type(cfg.algorithm)) or plan_online.PROGRAMS.get(type(cfg.algorithm))
  programs = programs(cfg) if callable(programs) else programs
  if programs is None:
    raise PlanError(f"no plan yet for {type(cfg.algorithm).__name__}")
  try:
    mesh = make_mesh(cfg.mesh, target.devices)
  except ValueError as e:
    raise PlanError(f"plan={target.spec} ({target.chips} devices): {e}") from None
  _, state = abstract_state(cfg.model, make_optimizer(cfg.optim, cfg.steps), mesh, seed=cfg.seed,
                            peft=cfg.peft, **_state_options(cfg))
  state_bytes = {k: _tree_bytes(getattr(state, k)) for k in ("trainable", "frozen", "opt_state")}
  trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
  return Plan(target, dict(mesh.shape), state_bytes, trainable,
              [plan_program(p, cfg, mesh, costs=costs) for p in programs])


# ---------------------------------------------------------------------------------------------
# The report a user reads.


def _batch_line(cfg) -> str:
  alg = cfg.algorithm
  if hasattr(alg, "max_new_tokens"):  # online RL: rollouts of prompt width + response length
    rows = alg.prompts_per_step * alg.group_size
    return (f"{rows} rollouts x ({cfg.data.max_length} prompt + {alg.max_new_tokens} new) "
            f"tokens per step")
  return (f"batch {rows_per_step(cfg)} x {cfg.data.max_length} per step (grad_accum "
          f"{cfg.optim.grad_accum})")


def fmt_bytes(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _fmt_flops(n: float) -> str:
  return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3f} GFLOP"


def describe(plan: Plan, cfg) -> str:
  t = plan.target
  budget = fmt_bytes(t.budget_bytes) if t.budget_bytes else "no budget"
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
  m = cfg.model
  lines = [
      f"plan {cfg.experiment or '(defaults)'} for {t.spec}: {t.description}, {budget} per chip",
      f"  mesh {mesh}; {_batch_line(cfg)}; peft={type(cfg.peft).__name__}; params "
      f"{m.param_dtype}, compute {m.dtype}, remat={m.remat}",
      "  state (all chips): " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in
                                          plan.state_bytes.items())
      + f"; {plan.trainable_params / 1e6:,.1f}M trainable params",
  ]
  if t.note:
    lines.append(f"  note: {t.note}")
  for p in plan.programs:
    lines.append(f"  {p.name} (compiled in {p.compile_seconds:.1f} s)")
    if p.error:
      lines.append(f"    compiler: {p.error}")
      continue
    mem = p.memory
    lines.append("    per chip: " + ", ".join(
        f"{k} {fmt_bytes(mem[k])}" for k in ("arguments", "outputs", "aliased", "temporaries",
                                             "code")))
    share = f" = {mem['total'] / t.budget_bytes:.0%} of {budget}" if t.budget_bytes else ""
    lines.append(f"    per chip total {fmt_bytes(mem['total'])}{share}")
    flops = [f"model {_fmt_flops(p.model_flops)} per step (all chips)"]
    if p.compiler_flops is not None:
      flops.append(f"compiler {_fmt_flops(p.compiler_flops)} per chip (remat included)")
    lines.append("    FLOPs: " + "; ".join(flops))
    if p.est_seconds:
      mfu = p.mfu(t)
      lines.append(f"    compiler's estimated step time {p.est_seconds * 1e3:,.1f} ms"
                   + (f" -> estimated MFU {mfu:.1%}" if mfu is not None else ""))
  if plan.fits:
    verdict = (f"fits: {fmt_bytes(plan.peak_bytes)} of {budget} per chip" if t.budget_bytes
               else f"compiled: {fmt_bytes(plan.peak_bytes)} per device (no budget to judge)")
  else:
    over = [p for p in plan.programs
            if p.error or (t.budget_bytes and p.memory["total"] > t.budget_bytes)]
    needs = "; ".join(f"{p.name} " + ("refused by the compiler" if p.error else
                                      f"needs {fmt_bytes(p.memory['total'])}") for p in over)
    verdict = (f"DOES NOT FIT: {needs} per chip, over {budget}. Try peft=qlora or lora, "
               f"model.remat=full, model.param_dtype=bfloat16, a smaller data.batch_size with "
               f"optim.grad_accum, or more chips")
  lines.append(f"verdict: {verdict}")
  return "\n".join(lines)


def main(cfg) -> int:
  """`plan=...` on the CLI: print the plan; 0 if it fits, 1 if not, 2 if it cannot plan."""
  try:
    target = parse_target(cfg.plan)
    plan = make_plan(cfg, target)
  except PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(describe(plan, cfg), flush=True)
  return 0 if plan.fits else 1
