"""The one training loop for offline algorithms (SFT, RM, DPO: the `ALGORITHMS` table).

  final = train(cfg, pathlib.Path("runs/my-run"))   # cfg: jrlhf.config.Config

Per step: build the host batch, place it, dispatch the jitted step, *then* read the previous
step's metrics, so the host never waits on the step it just queued. Only eval, checkpoints, a
stop signal and the last step sync on the current step. NaN/Inf in the loss saves a checkpoint and
raises `NonFiniteLoss`; SIGTERM/SIGINT save and exit with status 128 + signal, and running the
same command again resumes from the checkpoint (same data position: batch N is a function of N).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, NamedTuple

import chz
import jax
import numpy as np
import tqdm

from jrlhf import data as data_lib
from jrlhf.algorithms import dpo, rm, sft
from jrlhf.algorithms.step import combine_params, interleave_micro_batches
from jrlhf.peft import config as peft_config, quant, trainable as peft_trainable
from jrlhf.distributed import storage_path
from jrlhf.sharding import batch_sharding, make_mesh, put_batch, sharding_context
from jrlhf.train import checkpoint, evaluate, metrics as metrics_lib, ref_cache
from jrlhf.train.optimizer import make_optimizer
from jrlhf.train.state import create_state


class Algorithm(NamedTuple):
  """The pure functions the loop needs from an offline algorithm's module."""

  train_step: Callable  # (state, batch, *, model, cfg, opt) -> (state, metrics)
  eval_step: Callable  # (state, batch, *, model, cfg) -> dict of sums
  eval_metrics: Callable  # dict of summed floats -> dict of eval metrics
  pairs: bool = False  # trains on preference pairs (`jrlhf.data.preference`), not examples
  head: str = "lm"  # "scalar" for a reward model
  needs_reference: Callable[[Any], bool] = lambda cfg: False  # a frozen reference model?
  precompute_reference: Callable[[Any], bool] = lambda cfg: False  # reference logps cached?


def _dpo_reference(cfg: dpo.DPOConfig) -> bool:
  # Precomputed logps replace the reference in every step: no frozen copy to hold.
  return cfg.needs_reference and not cfg.precompute_ref


def _dpo_precompute(cfg: dpo.DPOConfig) -> bool:
  return cfg.needs_reference and cfg.precompute_ref


# Keyed by config type: grep finds every algorithm the loop can run.
ALGORITHMS: dict[type, Algorithm] = {
    sft.SFTConfig: Algorithm(sft.train_step, sft.eval_step, sft.eval_metrics),
    rm.RMConfig: Algorithm(rm.train_step, rm.eval_step, rm.eval_metrics, pairs=True,
                           head="scalar"),
    dpo.DPOConfig: Algorithm(dpo.train_step, dpo.eval_step, dpo.eval_metrics, pairs=True,
                             needs_reference=_dpo_reference,
                             precompute_reference=_dpo_precompute),
}


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or Inf; a checkpoint was saved first."""


@dataclasses.dataclass
class RunData:
  """The data a run consumes, as plain callables (built from `jrlhf.data` by `load_run_data`).

  micro_batch(i): the i-th micro-batch (host numpy, this process's rows); optimizer step s uses
    micro-batches s * grad_accum ... s * grad_accum + grad_accum - 1.
  eval_batches(): the held-out batches for eval loss, every call from the start.
  fingerprint: what decides the batch stream; a checkpoint refuses to resume under another.
  generations(model, mesh): an `evaluate.Generations` or None (no sampled eval).
  """

  micro_batch: Callable[[int], dict[str, np.ndarray]]
  eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]]
  fingerprint: str
  generations: Callable[[Any, Any], evaluate.Generations | None]
  vocab_size: int
  encode: Callable[[str], list[int]] | None = None  # text -> ids, for PEFT init from text
  pairs: dict[str, Any] | None = None  # {"train", "eval"} PreferenceDatasets (reference cache)


def load_run_data(cfg) -> RunData:
  """Tokenizer, datasets, batches and held-out prompts per `cfg.data` (preference pairs for an
  algorithm that trains on pairs; the chosen sides' prompts for sampled eval)."""
  tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
  algorithm = algorithm_for(cfg.algorithm)
  if algorithm.pairs:
    train_ds, eval_pairs, stats = data_lib.load_preference_data(cfg.data, tokenizer)
    train_batches = data_lib.PreferenceBatches(train_ds, cfg.data, seed=cfg.seed)
    eval_batches = data_lib.PreferenceBatches(eval_pairs, cfg.data, seed=cfg.seed, shuffle=False)
    # Sampling needs an LM head: a reward model is judged by its held-out accuracy instead.
    eval_ds = eval_pairs.chosen if algorithm.head == "lm" else data_lib.TokenizedDataset(
        [], [], eval_pairs.chosen.pad_id)
    eval_len = len(eval_pairs)
  else:
    train_ds, eval_ds, stats = data_lib.load_dataset(cfg.data, tokenizer)
    train_batches = data_lib.Batches(train_ds, cfg.data, seed=cfg.seed)
    eval_batches = data_lib.Batches(eval_ds, cfg.data, seed=cfg.seed, shuffle=False)
    eval_len = len(eval_ds)
  if jax.process_index() == 0:
    print(stats.summary(), flush=True)
  rank, ranks = jax.process_index(), jax.process_count()

  def generations(model, mesh):
    if not cfg.train.num_samples or not len(eval_ds):
      return None
    prompts, references = eval_ds.prompts_and_references(tokenizer, cfg.train.num_samples)
    stop = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    return evaluate.Generations(
        model, prompts, references, data_lib.tiny_task.score,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        max_new_tokens=cfg.train.max_new_tokens, stop_tokens=stop, pad_id=eval_ds.pad_id,
        mesh=mesh)

  def local_eval_batches():
    # Each process feeds its own rows of the global batch (as `get` does for training).
    for batch in (eval_batches.eval_batches() if eval_len else ()):
      per = len(batch["tokens"]) // ranks
      yield {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}

  return RunData(
      micro_batch=lambda i: train_batches.get(i, rank, ranks),
      eval_batches=local_eval_batches,
      fingerprint=checkpoint.fingerprint(
          data=chz.asdict(cfg.data), seed=cfg.seed, grad_accum=cfg.optim.grad_accum,
          examples=len(train_ds)),
      generations=generations,
      vocab_size=len(tokenizer),
      encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
      pairs={"train": train_ds, "eval": eval_pairs} if algorithm.pairs else None)


def train(cfg, run_dir: pathlib.Path) -> dict[str, Any]:
  """Runs (or resumes) `cfg` in `run_dir`; returns the final metrics (train and `eval/`)."""
  return run(cfg, storage_path(run_dir), load_run_data(cfg))


def run(cfg, run_dir: pathlib.Path, data: RunData) -> dict[str, Any]:
  """The loop itself, on any `RunData` (tests pass synthetic batches)."""
  return _Run(cfg, storage_path(run_dir), data).loop()


def algorithm_for(algorithm_cfg) -> Algorithm:
  algorithm = ALGORITHMS.get(type(algorithm_cfg))
  if algorithm is None:
    names = ", ".join(t.__name__ for t in ALGORITHMS)
    raise ValueError(f"{type(algorithm_cfg).__name__} is not an offline algorithm this loop "
                     f"runs (known: {names}); online ones (PPO) have their own loop")
  return algorithm


def jit_train_step(algorithm: Algorithm, model, algorithm_cfg, opt, state_sh, mesh,
                   on_trace: Callable[[], None] | None = None):
  """The loop's train step: jitted with pinned state shardings, the state donated. Also what
  an ahead-of-time plan compiles (`.lower(abstract state, abstract batch)`)."""

  def traced_step(state, batch):
    if on_trace is not None:
      on_trace()  # runs only while tracing: counts compilations
    # PEFT dropout (LoRA's) draws fresh masks each step from keys that exist only inside the
    # step: the state keeps none, so eval, sampling and export run without dropout.
    keyed = peft_trainable.with_dropout_keys(state.frozen, jax.random.fold_in(state.rng, 1))
    new_state, metrics = algorithm.train_step(
        state.replace(frozen=keyed), batch, model=model, cfg=algorithm_cfg, opt=opt)
    return new_state.replace(frozen=state.frozen), metrics

  return jax.jit(traced_step, in_shardings=(state_sh, batch_sharding(mesh)),
                 out_shardings=(state_sh, None), donate_argnums=0)


def export_params(cfg, model, params: Any, directory: pathlib.Path) -> None:
  """A run's final params as its PEFT method allows: an HF checkpoint (merged) and/or a PEFT
  adapter under `directory` (every trainer's `train.export=true`)."""
  kinds = cfg.peft.export_kinds
  if "adapter" in kinds:
    cfg.peft.save_adapter(directory / "adapter", params, model, cfg.init_from or "")
  if "merged" in kinds:
    if any(isinstance(x, quant.QuantizedWeight) for x in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight))) and (
            jax.process_index() == 0):
      print("[jrlhf] warning: the merged export dequantizes the 4-bit base: its weights are "
            "the rounded ones the adapter was trained on, not the original 16-bit model; "
            "export the adapter (peft.export=adapter) to apply it to the original",
            file=sys.stderr, flush=True)
    checkpoint.export_hf(directory, model, jax.jit(peft_config.merged_params)(params))


def _full_params(state) -> Any:
  """The whole param tree (trainable merged with frozen), for sampling and export."""
  return combine_params(state.trainable, state.frozen)


class _Run:
  """One run's setup and the per-step bookkeeping of `loop`."""

  def __init__(self, cfg, run_dir: pathlib.Path, data: RunData):
    self.algorithm = algorithm_for(cfg.algorithm)
    if data.vocab_size > cfg.model.vocab_size and cfg.init_from is None:
      raise ValueError(f"the tokenizer has {data.vocab_size} tokens but model.vocab_size="
                       f"{cfg.model.vocab_size}; set model.vocab_size={data.vocab_size} or more")
    self.cfg, self.tcfg, self.data, self.run_dir = cfg, cfg.train, data, run_dir
    self.mesh = make_mesh(cfg.mesh)
    self.opt = make_optimizer(cfg.optim, cfg.steps)
    self.model, state, state_sh = create_state(
        cfg.model, self.opt, self.mesh, seed=cfg.seed, init_from=cfg.init_from, peft=cfg.peft,
        encode=data.encode, head=self.algorithm.head,
        reference=self.algorithm.needs_reference(cfg.algorithm))
    if self.algorithm.precompute_reference(cfg.algorithm):
      # From the state as created, before a restore: the reference is the starting model.
      path, computed = ref_cache.fill(cfg, data, run_dir, self.model, state, self.mesh)
      if jax.process_index() == 0:
        print(f"[jrlhf] reference logps {'computed into' if computed else 'read from'} {path}",
              flush=True)
    self.ckpt_dir = run_dir / "checkpoints"
    if not self.tcfg.resume:
      checkpoint.clear(self.ckpt_dir)
    self.ckpt = checkpoint.Checkpointer(
        self.ckpt_dir, every=self.tcfg.checkpoint_every, keep=self.tcfg.keep_checkpoints,
        async_save=self.tcfg.async_checkpoints)
    self.state = self.ckpt.restore_or(state, data.fingerprint)
    self.start = self.step = int(jax.device_get(self.state.step))
    if self.start and jax.process_index() == 0:
      print(f"[jrlhf] resuming from {self.ckpt_dir}/{self.start} (step {self.start} of "
            f"{cfg.steps})", flush=True)
    self.writer = metrics_lib.MetricsWriter(
        run_dir, resume_step=self.start, tensorboard=self.tcfg.tensorboard,
        wandb=self.tcfg.wandb, wandb_project=self.tcfg.wandb_project)
    self.samples_path = run_dir / "samples.jsonl"
    if jax.process_index() == 0:
      if self.start:
        metrics_lib.truncate_after(self.samples_path, self.start)
      else:
        self.samples_path.unlink(missing_ok=True)
    self.traces = 0

    self.train_step = jit_train_step(self.algorithm, self.model, cfg.algorithm, self.opt,
                                     state_sh, self.mesh, on_trace=self._count_trace)
    batch_sh = batch_sharding(self.mesh)
    self.eval_step = jax.jit(
        functools.partial(self.algorithm.eval_step, model=self.model, cfg=cfg.algorithm),
        in_shardings=(state_sh, batch_sh))
    self.generations = data.generations(self.model, self.mesh) if self.tcfg.num_samples else None
    self.last_train: dict[str, Any] = {}
    self.last_eval: dict[str, Any] = {}
    # Throughput since the last logged row (the first window includes compilation).
    self.window_start, self.window_tokens, self.window_steps = time.perf_counter(), 0, 0

  def _count_trace(self):
    self.traces += 1

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    accum = self.opt.grad_accum
    micro = [self.data.micro_batch(step * accum + a) for a in range(accum)]
    return micro[0] if accum == 1 else interleave_micro_batches(micro)

  def due(self, n: int, every: int) -> bool:
    return n == self.cfg.steps or bool(every and n % every == 0)

  def finish(self, n: int, device_metrics, tokens_in: int) -> dict[str, Any]:
    """Reads step n's metrics (waits for step n only); returns the row to log, if due."""
    m = {k: v.item() for k, v in jax.device_get(device_metrics).items()}
    if not math.isfinite(m["loss"]):
      self.stop_non_finite(n, m["loss"])
    self.window_tokens += tokens_in
    self.window_steps += 1
    now = time.perf_counter()
    rate = self.window_tokens / max(now - self.window_start, 1e-9)
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
    self.last_train = m
    if not self.due(n, self.tcfg.log_every):
      return {}
    step_time = (now - self.window_start) / max(self.window_steps, 1)
    self.window_start, self.window_tokens, self.window_steps = now, 0, 0
    return {**m, "perf/tokens_per_sec": rate, "perf/step_time_s": step_time}

  def stop_non_finite(self, n: int, loss: float):
    earlier = self.ckpt.all_steps()
    self.ckpt.save(self.step, self.state, self.data.fingerprint)
    self.ckpt.wait()
    msg = (f"[jrlhf] loss is {loss} at step {n}; stopped. The state after step {self.step} is "
           f"saved in {self.ckpt_dir}/{self.step} for inspection (likely non-finite too; earlier "
           f"checkpoints: {earlier or 'none'}). Lower optim.lr, tighten optim.max_grad_norm or "
           f"check the data, then rerun with train.resume=false (or a new run_dir)")
    print(msg, file=sys.stderr, flush=True)
    raise NonFiniteLoss(msg)

  def evaluate(self, n: int) -> dict[str, Any]:
    out = evaluate.eval_loss(self.eval_step, self.state, self.data.eval_batches(), self.mesh,
                             self.algorithm.eval_metrics, self.tcfg.eval_batches)
    if self.generations is not None:
      rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), n)
      gen_metrics, rows = self.generations(_full_params(self.state), rng)
      out.update(gen_metrics)
      metrics_lib.write_samples(self.samples_path, n, rows)
    self.last_eval = {f"eval/{k}": v for k, v in out.items()}
    return self.last_eval

  def export(self, directory: pathlib.Path) -> None:
    export_params(self.cfg, self.model, _full_params(self.state), directory)

  def loop(self) -> dict[str, Any]:
    steps, tcfg = self.cfg.steps, self.tcfg
    # In a log file (no terminal) every redraw would be a line: redraw every 30 s there.
    self.bar = tqdm.tqdm(total=steps, initial=self.start, unit="step", dynamic_ncols=True,
                         mininterval=0.1 if sys.stderr.isatty() else 30,
                         disable=not tcfg.progress or jax.process_index() != 0)
    pending = None  # (step number, device metrics, input tokens) of the step in flight
    stop = checkpoint.StopSignal()
    try:
      with sharding_context(self.mesh), stop.installed():
        for i in range(self.start, steps):
          batch = self.host_batch(i)
          tokens_in = int(np.count_nonzero(batch["segment_ids"]))
          with jax.transfer_guard("disallow"):  # an implicit host<->device copy here is a bug
            self.state, device_metrics = self.train_step(self.state, put_batch(batch, self.mesh))
          self.step = n = i + 1
          if pending:  # step n is queued; now wait for step n - 1 only
            row = self.finish(*pending)
            if row:
              self.writer.write(pending[0], row)
          pending = (n, device_metrics, tokens_in)
          eval_due = bool(tcfg.eval_every) and self.due(n, tcfg.eval_every)
          # Eval, checkpoints, a stop and the last step need step n itself: sync on it only then.
          if stop or eval_due or self.due(n, tcfg.checkpoint_every):
            row = self.finish(*pending)
            pending = None
            if eval_due:
              row.update(self.evaluate(n))
            if row:
              self.writer.write(n, row)
            self.ckpt.maybe_save(n, self.state, self.data.fingerprint)
            # Eval and saving are not training throughput.
            self.window_start, self.window_tokens, self.window_steps = time.perf_counter(), 0, 0
          if stop:
            self.ckpt.save(n, self.state, self.data.fingerprint)
            self.ckpt.wait()
            print(f"[jrlhf] stopped by signal after step {n}; checkpoint in {self.ckpt_dir}/{n}. "
                  f"Run the same command again to continue.", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop.signum)
        self.ckpt.save(self.step, self.state, self.data.fingerprint)
        if tcfg.export:
          self.export(self.run_dir / "export")
    finally:
      self.bar.close()
      self.ckpt.close()
      self.writer.close()
    return self.report()

  def report(self) -> dict[str, Any]:
    if jax.process_index() == 0:
      print(f"[jrlhf] metrics:    {self.writer.path}")
      if self.samples_path.exists():
        print(f"[jrlhf] samples:    {self.samples_path}")
      print(f"[jrlhf] checkpoint: {self.ckpt_dir}/{self.step}")
      if self.tcfg.export:
        kinds = " + ".join(self.cfg.peft.export_kinds)
        print(f"[jrlhf] export:     {self.run_dir / 'export'} ({kinds}, Hugging Face / PEFT "
              f"format)")
    return {"step": self.step, **self.last_train, **self.last_eval, "compiles": self.traces}
