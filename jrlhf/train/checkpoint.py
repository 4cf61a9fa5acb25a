"""Orbax checkpoints of the training state, resume checks, preemption signals, HF export.

A checkpoint at step N holds the state after N optimizer steps: trainable params, optimizer
state, step and RNG, plus a small JSON `meta` item with the data fingerprint. The data position
needs no saving: batch N is a pure function of (data seed, N) (`jrlhf.data.Batches.get`), so
resuming at step N continues the data stream exactly where it stopped.

  ckpt = Checkpointer(run_dir / "checkpoints", every=500, keep=2)
  state = ckpt.restore_or(state, fingerprint)   # the latest checkpoint, if any
  ckpt.maybe_save(step, state, fingerprint)     # at the cadence (async)
  ckpt.save(step, state, fingerprint)           # now (final, SIGTERM, NaN)
  ckpt.close()                                  # waits for async writes

On several hosts every process writes its own shards, so `directory` must be storage they all
see: a bucket (`gs://bucket/runs/x/checkpoints`, kept a URL by `checkpoint_dir`) or a shared
filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from jrlhf.distributed import barrier, is_url, is_writer, storage_path
from jrlhf.models import save_pretrained
from jrlhf.train.state import TrainState, abstract

FORMAT_VERSION = 1


def fingerprint(**parts: Any) -> str:
  """Short hash of whatever decides which rows batch N holds (data config, seed, batch shape)."""
  text = json.dumps(parts, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResumeMismatch(ValueError):
  pass


def checkpoint_dir(directory: str | os.PathLike) -> Any:
  """Where orbax writes: an absolute local path (orbax requires one) or the bucket URL as is."""
  path = storage_path(directory)
  return path if is_url(path) else path.absolute()


class Checkpointer:
  """CheckpointManager for one run: cadence `every` steps (0 = only explicit saves), last `keep`."""

  def __init__(self, directory: pathlib.Path, *, every: int, keep: int, async_save: bool = True):
    self.directory = checkpoint_dir(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_fingerprint: str) -> None:
    """Starts writing now; the device->host copy finishes before this returns, so the state may
    be donated to the next step while the files are written in the background."""
    if self._manager.latest_step() == step:
      return
    meta = {"step": step, "data_fingerprint": data_fingerprint, "version": FORMAT_VERSION}
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state.checkpointed()), meta=ocp.args.JsonSave(meta)))

  def maybe_save(self, step: int, state: TrainState, data_fingerprint: str) -> bool:
    if self.every and step % self.every == 0:
      self.save(step, state, data_fingerprint)
      return True
    return False

  def restore_or(self, state: TrainState, data_fingerprint: str) -> TrainState:
    """`state` with its checkpointed part replaced by the latest checkpoint's, if there is one.

    The restore target is the live state's shapes, dtypes and shardings, so each device reads
    only its own shards. Raises `ResumeMismatch` when the checkpoint was made with other data.
    """
    step = self._manager.latest_step()
    if step is None:
      return state
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("data_fingerprint") != data_fingerprint:
      raise ResumeMismatch(
          f"the checkpoint at step {step} in {self.directory} was written with different data "
          f"settings (data fingerprint {meta.get('data_fingerprint')}, now {data_fingerprint}: "
          f"data config, seed, batch size or grad_accum changed), so resuming would not continue "
          f"the same data stream. Use the original settings, pass train.resume=false to start "
          f"over (old checkpoints are replaced), or choose another run_dir")
    target = abstract(state.checkpointed())
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))["state"]
    except (ValueError, KeyError) as e:
      raise ResumeMismatch(
          f"the checkpoint at step {step} in {self.directory} does not fit this run's state "
          f"(model shape, optimizer or trainable set changed?): {e}. Restore with the original "
          f"model/optim settings, or pass train.resume=false to start over") from e
    return state.replace(**restored)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def clear(directory: pathlib.Path) -> None:
  """Removes a run's old checkpoints (train.resume=false): a fresh run must not mix with them.

  Process 0 deletes; the others wait for it, or they could find (and restore) the old ones."""
  path = checkpoint_dir(directory)
  if is_writer() and path.exists():
    if is_url(path):
      path.rmtree()
    else:
      shutil.rmtree(path)
  barrier("jrlhf:checkpoints-cleared")


class StopSignal:
  """Set by SIGTERM (preemption) or SIGINT; the loop saves at the next step and exits.

  A second SIGINT restores the default behaviour (KeyboardInterrupt), for a user who really
  wants out without waiting for the save.
  """

  def __init__(self):
    self.signum: int | None = None

  def __bool__(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self.signum = signum
    print(f"\n[jrlhf] received {signal.Signals(signum).name}: saving a checkpoint after the "
          f"current step, then exiting (Ctrl-C again to quit without saving)",
          file=sys.stderr, flush=True)

  @contextlib.contextmanager
  def installed(self) -> Iterator["StopSignal"]:
    """Installs the handlers for the duration (main thread only; elsewhere they stay off)."""
    previous = {}
    try:
      for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, self._handle)
    except ValueError:  # not the main thread: signals cannot be caught here
      pass
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def export_hf(directory: pathlib.Path, model, params: Any) -> pathlib.Path:
  """The final params in Hugging Face format (config.json + safetensors). Call on every process:
  each contributes its shards; process 0 writes. A bucket directory (`gs://...`) is written
  locally first and copied file by file (safetensors writes to local paths only)."""
  if not is_url(directory):
    return save_pretrained(directory, model, params)
  with tempfile.TemporaryDirectory(prefix="jrlhf-export-") as local:
    save_pretrained(local, model, params)
    if jax.process_index() == 0:
      remote = storage_path(directory)
      remote.mkdir(parents=True, exist_ok=True)
      for file in sorted(pathlib.Path(local).iterdir()):
        (remote / file.name).write_bytes(file.read_bytes())
  return storage_path(directory)
