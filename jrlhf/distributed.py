"""Multi-host runs: starting `jax.distributed`, which process writes, shared paths, log prefixes.

A run spans several processes (one per host, each driving its local accelerators) when:

  * it runs on a Cloud TPU VM slice: `jax.distributed.initialize()` finds the workers itself
    (as in MaxText), so the same command on every worker is all it takes;
  * SLURM or Open MPI started it with several tasks (JAX reads their variables);
  * a coordinator is given, on the command line or in the environment (JAX's own variable names):

      python -m jrlhf.run experiment=tiny/sft dist.coordinator=10.0.0.1:8476 \\
          dist.num_processes=2 dist.process_id=0          # on host 0; process_id=1 on host 1
      JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \\
          python -m jrlhf.run experiment=tiny/sft         # the same, by environment

`dist.enable=false` forces a single process; `dist.enable=true` insists (and fails loudly when
the processes cannot be found). `initialize` must run before anything touches a device: after
that, `jax.devices()` lists every host's devices and `jax.process_index()` is this host's rank.

Every process computes; only process 0 writes the run's files (config.json, metrics, samples,
reports); orbax checkpoints are written by all of them together, so on several hosts the run
dir must be shared storage: a `gs://` bucket or a network filesystem. Lines that processes other
than 0 print start with `[jrlhf p<index>/<count>]`.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from typing import Any, Mapping, TextIO

import chz
import jax

# Variables that mean "several tasks were started and JAX can read who is who" (its own
# SLURM / Open MPI detection); a count of 1 means a single process.
TASK_COUNT_VARS = {"SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI"}


@chz.chz
class DistConfig:
  """How the processes of one run find each other. Never part of a run's name (host-specific)."""

  enable: bool | None = chz.field(
      default=None, doc="None = auto: on a Cloud TPU VM, under SLURM/Open MPI with several "
                        "tasks, or when a coordinator is given")
  coordinator: str | None = chz.field(
      default=None, doc="host:port of process 0 (else env JAX_COORDINATOR_ADDRESS)")
  num_processes: int | None = chz.field(
      default=None, doc="processes in the run (else env JAX_NUM_PROCESSES, or auto-detected)")
  process_id: int | None = chz.field(
      default=None, doc="this process's rank, 0 .. num_processes-1 (else env JAX_PROCESS_ID)")

  @chz.validate
  def _check(self):
    if self.coordinator is not None:
      host, sep, port = self.coordinator.rpartition(":")
      if not sep or not host or not port.isdigit():
        raise ValueError(f"dist.coordinator={self.coordinator!r} is not host:port "
                         f"(e.g. dist.coordinator=10.0.0.1:8476)")
    if self.num_processes is not None and self.num_processes < 1:
      raise ValueError(f"dist.num_processes={self.num_processes} must be >= 1")
    if self.process_id is not None and self.process_id < 0:
      raise ValueError(f"dist.process_id={self.process_id} must be >= 0")
    if None not in (self.process_id, self.num_processes) and (
        self.process_id >= self.num_processes):
      raise ValueError(f"dist.process_id={self.process_id} must be below "
                       f"dist.num_processes={self.num_processes} (ranks count from 0)")


class DistributedError(RuntimeError):
  """The processes of a multi-host run could not be started; the message says what to set."""


def on_cloud_tpu_vm() -> bool:
  """Whether JAX found TPU chips and libtpu on this machine (decided when jax was imported)."""
  try:
    from jax._src import cloud_tpu_init  # noqa: PLC0415 - JAX keeps this flag private
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value is None or value == "":
    return None
  if not value.strip().isdigit():
    raise DistributedError(f"environment variable {name}={value!r} is not a non-negative integer")
  return int(value)


def launcher(env: Mapping[str, str]) -> str | None:
  """The name of a multi-task launcher JAX can query for ranks, if this process has one."""
  if on_cloud_tpu_vm():
    return "Cloud TPU VM"
  for var, name in TASK_COUNT_VARS.items():
    count = _env_int(env, var)
    if count is not None and count > 1:
      return name
  return None


def init_args(cfg: DistConfig, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """The arguments for `jax.distributed.initialize`, or None when this run is one process.

  The command line wins over the environment; what neither gives, JAX detects (TPU VM metadata,
  SLURM, Open MPI).
  """
  env = os.environ if env is None else env
  coordinator = cfg.coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
  num = cfg.num_processes if cfg.num_processes is not None else _env_int(env, "JAX_NUM_PROCESSES")
  rank = cfg.process_id if cfg.process_id is not None else _env_int(env, "JAX_PROCESS_ID")
  enable = cfg.enable
  if enable is None:
    enable = coordinator is not None or (num or 1) > 1 or launcher(env) is not None
  if not enable:
    return None
  return {"coordinator_address": coordinator, "num_processes": num, "process_id": rank}


def initialize(cfg: DistConfig, env: Mapping[str, str] | None = None) -> None:
  """Joins the run's other processes, if it has any. Call before anything touches a device."""
  args = init_args(cfg, env)
  if args is None or jax.distributed.is_initialized():
    return
  given = ", ".join(f"{k}={v}" for k, v in args.items() if v is not None) or "nothing"
  try:
    jax.distributed.initialize(**args)
  except (ValueError, TypeError) as e:  # JAX could not fill in what was not given
    raise DistributedError(
        f"a multi-process run needs a coordinator, the process count and this process's rank "
        f"(given: {given}; {e}). Set dist.coordinator=HOST:PORT dist.num_processes=N "
        f"dist.process_id=I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), "
        f"or dist.enable=false for a single process") from e
  except RuntimeError as e:  # e.g. the coordinator never answered
    raise DistributedError(
        f"jax.distributed.initialize ({given}) failed: {e}. Check that process 0 is running "
        f"and that every process got the same coordinator and process count") from e
  prefix_output(jax.process_index(), jax.process_count())


def is_writer() -> bool:
  """Only process 0 writes the run's own files; all processes take part in checkpoints."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the same named point (no-op on a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# Paths that may be buckets. `pathlib.Path("gs://b/x")` is `gs:/b/x`: a local path by accident.


def is_url(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def storage_path(path: str | os.PathLike) -> Any:
  """A run or checkpoint directory: `pathlib.Path` when local, `etils.epath.Path` for a bucket
  URL (`gs://bucket/dir`), which keeps the scheme and reads/writes through the bucket's client.
  Both support `/`, `.name`, `.exists()`, `.mkdir()`, `.read_text()` and `.write_text()`."""
  if is_url(path):
    from etils import epath  # noqa: PLC0415 - only bucket runs need it

    return epath.Path(os.fspath(path))
  return pathlib.Path(path)


# ---------------------------------------------------------------------------------------------
# Log lines of processes other than 0 say which process wrote them.


class PrefixedStream:
  """A text stream that starts every line with `prefix`; everything else passes through."""

  def __init__(self, stream: TextIO, prefix: str):
    self._stream, self._prefix, self._at_line_start = stream, prefix, True

  def write(self, text: str) -> int:
    out = []
    for line in text.splitlines(keepends=True):
      if self._at_line_start:
        out.append(self._prefix)
      out.append(line)
      self._at_line_start = line.endswith(("\n", "\r"))
    self._stream.write("".join(out))
    return len(text)

  def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
    return getattr(self._stream, name)


def prefix_output(index: int, count: int) -> None:
  """On process `index` > 0 of `count`, prefixes stdout/stderr lines with `[jrlhf pI/N] `.

  Process 0 prints unprefixed (its lines are the run's own report). Output written by native
  code straight to the file descriptors (XLA, gRPC) bypasses Python and stays unprefixed.
  """
  if count <= 1 or index == 0 or isinstance(sys.stderr, PrefixedStream):
    return
  prefix = f"[jrlhf p{index}/{count}] "
  old_err = sys.stderr
  sys.stdout = PrefixedStream(sys.stdout, prefix)
  sys.stderr = PrefixedStream(sys.stderr, prefix)
  # Log handlers made earlier hold the old stream; point them at the prefixed one.
  loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                    if isinstance(logger, logging.Logger))]
  for logger in loggers:
    for handler in logger.handlers:
      if isinstance(handler, logging.StreamHandler) and handler.stream is old_err:
        handler.setStream(sys.stderr)
