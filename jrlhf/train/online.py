"""The online-RL loop (GRPO / RLOO): sample groups of responses with the jitted sampler, score
them, update on them; repeat.

  final = train(cfg, pathlib.Path("runs/grpo"))   # cfg.algorithm: jrlhf.algorithms.grpo.GRPOConfig

Per step: `prompts_per_step` training prompts (a fixed function of the step, so a resumed run
sees the same ones) are each repeated `group_size` times, left-padded and sampled with the
current policy (any PEFT method: the sampler reads the combined tree). Responses end at the first
EOS (the sampler pads after it); the task's scorer judges the decoded text against the prompt's
reference; a response that never stopped loses `missing_eos_penalty`. Advantages come from the
group baseline; the update is `grpo.train_step`, `epochs` times, on the whole batch.

Rewards: the embedded task's scorer (`data.source=tiny`), or PPO's reward model.

Two layouts. The update runs on `mesh`; the sampler may run on `rollout_mesh` (same devices,
other axis sizes: e.g. updates FSDP-sharded (1, 8, 1), decoding tensor-parallel (1, 1, 8), where
each new token all-reduces activations instead of all-gathering every weight). Every copy
between the two is explicit and runs under a transfer guard: the trainable params go to the
rollout layout each step (a PEFT base, frozen, once at start: a second copy of it while the
meshes differ), the sampled tokens and log-probs come back to the update's batch sharding, where
the reference and the reward model (whose weights live there) score them.

Each step logs where its time went, waiting on the device at every boundary:
`perf/reshard_s` (prompts onto the device, copies between the layouts, the update batch's
assembly), `perf/rollout_s` (sampling), `perf/reference_s`, `perf/score_s` (decoding + the
task's scorer or the reward model), `perf/update_s`.
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time
from typing import Any

import chz
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jrlhf import data as data_lib
from jrlhf.algorithms import grpo, ppo
from jrlhf.algorithms.step import REFERENCE, combine_params
from jrlhf.distributed import storage_path
from jrlhf.models.generate import Sampler, SamplingConfig
from jrlhf.sample import left_pad
from jrlhf.sharding import batch_sharding, batch_ways, make_mesh, sharding_context
from jrlhf.train import checkpoint, evaluate, metrics as metrics_lib
from jrlhf.train.loop import export_params
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.state import abstract_state, create_state

# data.source -> fn(decoded response, reference answer) -> score. The embedded task's scorer is
# exact match; register other verifiable tasks here.
REWARD_FNS = {"tiny": data_lib.tiny_task.score}


def prompt_indices(step: int, per_step: int, total: int, seed: int) -> np.ndarray:
  """The training prompts of `step`: consecutive slices of a seeded permutation, reshuffled
  every epoch over the prompts."""
  start = step * per_step
  epoch, offset = divmod(start, total)
  out = []
  while len(out) < per_step:
    order = np.random.default_rng([seed, epoch]).permutation(total)
    out.extend(order[offset:offset + per_step - len(out)])
    epoch, offset = epoch + 1, 0
  return np.asarray(out)


def make_rollout_mesh(cfg, mesh: Mesh) -> Mesh:
  """The sampler's mesh: `cfg.rollout_mesh` over `mesh`'s devices, or `mesh` itself when that is
  unset or of the same shape. Checks that a step's rollouts split over its batch ways."""
  if cfg.rollout_mesh is None:
    return mesh
  devices = mesh.devices.flatten().tolist()
  try:
    shape = cfg.rollout_mesh.shape(len(devices))
  except ValueError as e:
    raise ValueError(f"rollout_mesh: {e}") from None
  if shape == tuple(mesh.shape.values()):
    return mesh
  out = make_mesh(cfg.rollout_mesh, devices)
  rows = cfg.algorithm.prompts_per_step * cfg.algorithm.group_size
  if rows % batch_ways(out):
    sizes = ", ".join(f"rollout_mesh.{k}={v}" for k, v in out.shape.items())
    raise ValueError(
        f"{rows} rollouts per step (prompts_per_step x group_size) do not split over the "
        f"rollout mesh's {batch_ways(out)} batch ways ({sizes}; data x fsdp split the batch); "
        f"choose rollout_mesh.data x rollout_mesh.fsdp dividing {rows}, or change "
        f"algorithm.prompts_per_step")
  return out


class PhaseTimer:
  """Seconds per phase of a step whose phases run back to back.

  `lap(name, out)` waits for `out` (JAX dispatches asynchronously: without the wait the clock
  would see the dispatch, and the work would be charged to whichever phase waits next) and
  charges the time since the previous lap to `name`; returns `out`.
  """

  def __init__(self):
    self.start()

  def start(self) -> None:
    self.seconds: dict[str, float] = {}
    self.started = self._last = time.perf_counter()

  def lap(self, name: str, out: Any = None) -> Any:
    jax.block_until_ready(out)
    now = time.perf_counter()
    self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
    self._last = now
    return out

  def total(self) -> float:
    return self._last - self.started

  def metrics(self) -> dict[str, float]:
    return {f"perf/{name}_s": s for name, s in self.seconds.items()}


class _Online:
  """One run's setup (data, state, jitted programs) and its per-step work."""

  def __init__(self, cfg, run_dir: pathlib.Path):
    self.cfg, self.alg, self.run_dir = cfg, cfg.algorithm, storage_path(run_dir)
    self.score_fn = REWARD_FNS.get(cfg.data.source)
    if self.score_fn is None and not getattr(self.alg, "reward_model", ""):
      raise ValueError(f"algorithm={type(cfg.algorithm).__name__} needs a reward: data.source="
                       f"{cfg.data.source!r} has no scorer (known: {', '.join(REWARD_FNS)}); "
                       f"give a reward model (algorithm.reward_model=<an RM run's export>)")
    self.tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
    train_ds, self.eval_ds, _ = data_lib.load_dataset(cfg.data, self.tokenizer)
    self.prompts, self.references = train_ds.prompts_and_references(self.tokenizer)
    self.pad_id = train_ds.pad_id
    self.prompt_len = max(len(p) for p in self.prompts)
    self.mesh = make_mesh(cfg.mesh)
    rows = self.alg.prompts_per_step * self.alg.group_size
    if rows % batch_ways(self.mesh):
      raise ValueError(f"{rows} rollouts per step (prompts_per_step x group_size) must divide "
                       f"over the mesh's {batch_ways(self.mesh)} batch ways")
    self.rollout_mesh = make_rollout_mesh(cfg, self.mesh)
    # The optimizer counts updates, several per rollout step: its schedule (warmup included)
    # spans all of them, while state.step counts rollout steps (the loop resumes from it).
    self.updates_per_step = self.updates_per_rollout()
    self.opt = make_optimizer(
        chz.replace(cfg.optim, warmup_steps=cfg.optim.warmup_steps * self.updates_per_step),
        cfg.steps * self.updates_per_step)
    self.model, state, state_sh = create_state(
        cfg.model, self.opt, self.mesh, seed=cfg.seed, init_from=cfg.init_from, peft=cfg.peft,
        encode=lambda text: self.tokenizer.encode(text, add_special_tokens=False),
        reference=True)
    eos = self.tokenizer.eos_token_id
    self.sampler = Sampler(self.model, SamplingConfig(
        max_new_tokens=self.alg.max_new_tokens, temperature=self.alg.temperature,
        stop_tokens=() if eos is None else (eos,), pad_id=self.pad_id))
    self.state_sh = state_sh
    self.reference = jax.jit(functools.partial(ppo.reference_logprobs, model=self.model,
                                               temperature=self.alg.temperature))
    self.fingerprint = checkpoint.fingerprint(
        data=chz.asdict(cfg.data), seed=cfg.seed, algorithm=chz.asdict(self.alg))
    ckpt_dir = self.run_dir / "checkpoints"
    if not cfg.train.resume:
      checkpoint.clear(ckpt_dir)
    self.ckpt = checkpoint.Checkpointer(ckpt_dir, every=cfg.train.checkpoint_every,
                                        keep=cfg.train.keep_checkpoints,
                                        async_save=cfg.train.async_checkpoints)
    self.state = self.ckpt.restore_or(state, self.fingerprint)
    self.setup_rollout_layout()
    self.rm = None
    self.setup_algorithm()
    self.start = int(jax.device_get(self.state.step))
    self.writer = metrics_lib.MetricsWriter(self.run_dir, resume_step=self.start,
                                            tensorboard=cfg.train.tensorboard,
                                            wandb=cfg.train.wandb,
                                            wandb_project=cfg.train.wandb_project)
    self.timer = PhaseTimer()
    self.generations = None
    if cfg.train.num_samples and len(self.eval_ds) and self.score_fn is not None:
      prompts, refs = self.eval_ds.prompts_and_references(self.tokenizer, cfg.train.num_samples)
      self.generations = evaluate.Generations(
          self.model, prompts, refs, self.score_fn, self.decode,
          max_new_tokens=cfg.train.max_new_tokens, stop_tokens=self.sampler.cfg.stop_tokens,
          pad_id=self.pad_id, mesh=self.mesh)

  def setup_rollout_layout(self) -> None:
    """Shardings of the sampler's inputs on the rollout mesh, from shapes (as the state's), and
    the policy's frozen part (a PEFT base; nothing under full fine-tuning) copied there once."""
    mesh, rmesh = self.mesh, self.rollout_mesh
    self.batch_sh, self.rollout_batch_sh = batch_sharding(mesh), batch_sharding(rmesh)
    self.rollout_rng_sh = NamedSharding(rmesh, PartitionSpec())
    _, shapes = abstract_state(self.model.cfg, self.opt, rmesh, seed=self.cfg.seed,
                               peft=self.cfg.peft)
    self.rollout_trainable_sh = jax.tree.map(lambda x: x.sharding, shapes.trainable)
    frozen = self.state.frozen
    if isinstance(frozen, dict) and REFERENCE in frozen:  # the KL's start, not the policy
      frozen = {k: v for k, v in frozen.items() if k != REFERENCE}
    with jax.transfer_guard("disallow"):
      self.rollout_frozen = jax.device_put(
          frozen, jax.tree.map(lambda x: x.sharding, shapes.frozen))
    self.rollout_batch = jax.jit(ppo.rollout_batch, out_shardings=self.batch_sh)

  def rollout_params(self) -> Any:
    """The policy's params in the rollout layout (the same arrays when the meshes agree)."""
    trainable = jax.device_put(self.state.trainable, self.rollout_trainable_sh)
    return combine_params(trainable, self.rollout_frozen)

  def setup_algorithm(self) -> None:
    self.update = jax.jit(functools.partial(grpo.train_step, model=self.model, cfg=self.alg,
                                            opt=self.opt),
                          in_shardings=(self.state_sh, None),
                          out_shardings=(self.state_sh, None), donate_argnums=0)

  def save(self, n: int, final: bool) -> None:
    if final:
      self.ckpt.save(n, self.state, self.fingerprint)
      self.ckpt.wait()
    else:
      self.ckpt.maybe_save(n, self.state, self.fingerprint)

  def close(self) -> None:
    self.ckpt.close()
    self.writer.close()

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def rollout(self, step: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Samples and scores one step's groups; returns the update batch and rollout metrics."""
    alg = self.alg
    idx = prompt_indices(step, alg.prompts_per_step, len(self.prompts), self.cfg.seed)
    idx = np.repeat(idx, alg.group_size)  # G consecutive rows per prompt
    # One prompt width for the whole run (the longest prompt), so the sampler and the update
    # compile once instead of once per step's longest prompt.
    prompt_BxP, mask_BxP = left_pad([list(self.prompts[i]) for i in idx], self.pad_id, 1,
                                    length=self.prompt_len)
    rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed + 3), step)
    lap = self.timer.lap
    # Every copy between host, update layout and rollout layout is spelled out below.
    with jax.transfer_guard("disallow"):
      prompt_in = jax.device_put((prompt_BxP, mask_BxP), self.batch_sh)
      sampler_in = (self.rollout_params(),
                    *jax.device_put(prompt_in, self.rollout_batch_sh),
                    jax.device_put(rng, self.rollout_rng_sh))
      lap("reshard", sampler_in)
      with sharding_context(self.rollout_mesh):
        gen = lap("rollout", self.sampler(*sampler_in))
      gen = jax.device_put(gen, self.batch_sh)
      batch = self.rollout_batch(*prompt_in, gen.tokens_BxN, gen.lengths_B)
      batch["old_logprobs"] = gen.logprobs_BxN
      lap("reshard", batch)
      # Always measured (objective/kl is the run's main health signal).
      batch["ref_logprobs"] = lap("reference", self.reference(self.state, batch))
    tokens_BxN, lengths_B, done_B = jax.device_get((gen.tokens_BxN, gen.lengths_B, gen.done_B))
    row = {"rollout/eos_fraction": float(done_B.mean()),
           "rollout/length": float(lengths_B.mean())}
    if self.score_fn is not None:
      texts = [self.decode(r[:n]) for r, n in zip(tokens_BxN, lengths_B)]
      task_B = np.array([self.score_fn(t, self.references[i]) for t, i in zip(texts, idx)],
                        np.float32)
      row["rollout/accuracy"] = float(task_B.mean())
    scores_B = self.reward_scores(batch) if self.rm is not None else task_B
    scores_B = lap("score", np.asarray(scores_B) - alg.missing_eos_penalty * (~done_B))
    return batch, scores_B, row

  def reward_scores(self, batch) -> np.ndarray:
    raise NotImplementedError  # PPO's reward model (_PPO); GRPO scores with the task

  def updates_per_rollout(self) -> int:
    return self.alg.epochs  # GRPO / RLOO: `epochs` updates on the whole batch

  @staticmethod
  def set_step(state, n: int):
    """`state` with step n: after a rollout step's updates, state.step counts rollout steps."""
    return state.replace(step=jax.device_put(np.int32(n), state.step.sharding))

  def learn(self, step: int, batch: dict[str, Any], scores_B: np.ndarray) -> dict[str, Any]:
    """GRPO / RLOO: group advantages, `epochs` updates on the whole batch."""
    batch["advantages"] = ppo.group_advantages(jnp.asarray(scores_B), self.alg.group_size,
                                               self.alg.baseline)
    for _ in range(self.alg.epochs):
      self.state, metrics = self.update(self.state, batch)
    self.state = self.set_step(self.state, step + 1)
    return {"objective/scores": float(scores_B.mean()), **jax.device_get(metrics)}

  def loop(self) -> dict[str, Any]:
    cfg, tcfg = self.cfg, self.cfg.train
    last: dict[str, Any] = {}
    stop = checkpoint.StopSignal()
    try:
      with sharding_context(self.mesh), stop.installed():
        for i in range(self.start, cfg.steps):
          self.timer.start()
          batch, scores_B, row = self.rollout(i)
          row.update({k: float(v) for k, v in self.learn(i, batch, scores_B).items()})
          self.timer.lap("update", self.state)
          row.update(self.timer.metrics())
          row["perf/episodes_per_sec"] = len(batch["tokens"]) / self.timer.total()
          n = i + 1
          if tcfg.eval_every and (n % tcfg.eval_every == 0 or n == cfg.steps) and (
              self.generations is not None):
            rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), n)
            gen_metrics, rows = self.generations(
                combine_params(self.state.trainable, self.state.frozen), rng)
            row.update({f"eval/{k}": v for k, v in gen_metrics.items()})
            metrics_lib.write_samples(self.run_dir / "samples.jsonl", n, rows)
          if n == cfg.steps or (tcfg.log_every and n % tcfg.log_every == 0) or "eval/accuracy" in row:
            self.writer.write(n, row)
          last = row
          self.save(n, final=bool(stop))
          if stop:
            print(f"[jrlhf] stopped by signal after step {n}; run the same command again to "
                  f"continue.", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop.signum)
        self.save(cfg.steps, final=True)
        if tcfg.export:
          export_params(cfg, self.model, combine_params(self.state.trainable, self.state.frozen),
                        self.run_dir / "export")
    finally:
      self.close()
    if jax.process_index() == 0:
      print(f"[jrlhf] metrics:    {self.writer.path}")
      print(f"[jrlhf] checkpoint: {self.run_dir / 'checkpoints'}/{cfg.steps}")
      if tcfg.export:
        print(f"[jrlhf] export:     {self.run_dir / 'export'} (the policy; Hugging Face / PEFT "
              f"format)")
    return {"step": cfg.steps, **last}


def train(cfg, run_dir: pathlib.Path) -> dict[str, Any]:
  """Runs (or resumes) the online-RL config `cfg` in `run_dir`; returns the last step's row."""
  from jrlhf.train.ppo_critic import PPORun  # noqa: PLC0415 - PPO's critic builds on _Online

  cls = PPORun if isinstance(cfg.algorithm, ppo.PPOConfig) else _Online
  return cls(cfg, run_dir).loop()
