"""One run over several processes (hosts): JAX's distributed runtime, and who writes the run.

Every process runs the same command with its own ``--process-id``: :func:`join` connects it to
the others through the coordinator (process 0's ``HOST:PORT``), after which ``jax.devices()``
lists every process's devices and the train CLI splits each minibatch's rows over all of them
(:func:`deeprnn_jax.fit.parallel.batch_devices`). Every process builds the same minibatches from the
same seed and places its own devices' rows; the gradients are averaged across processes in the
same collective that averages them across one machine's devices (on CPUs through gloo).

Only process 0 writes the run folder and prints; the others train the same epochs silently
(:func:`outputs`), so that they take every decision process 0 takes (to stop on a divergence, to
resume from a checkpoint) from the same numbers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, TextIO

import jax

from deeprnn_jax.base import validate
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.run.rundir import LOCK

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # JAX's own; the process count and id it detects


def requested(coordinator: str | None, num_processes: int | None,
              process_id: int | None) -> bool:
  """Whether the flags or JAX's environment ask for several processes."""
  return (coordinator is not None or num_processes is not None or process_id is not None
          or bool(os.environ.get(COORDINATOR_ENV)))


def join(coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, timeout: int = 300) -> None:
  """Connects this process to the others (``jax.distributed.initialize``), before JAX computes
  anything. What is not given comes from ``$JAX_COORDINATOR_ADDRESS`` and JAX's detection of a
  cluster (SLURM, Open MPI, ...). Raises :class:`UsageError` on bad values, or where the
  coordinator cannot be reached within ``timeout`` seconds."""
  if coordinator is not None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise UsageError(f"--coordinator must be HOST:PORT, got {coordinator}")
  if num_processes is not None:
    validate.positive_int("--num-processes", num_processes)
  if process_id is not None and (num_processes is None or not 0 <= process_id < num_processes):
    raise UsageError(f"--process-id must be in 0 .. --num-processes - 1, got {process_id}")
  # CPU devices of different processes reduce through gloo (JAX's default in 0.10; stated,
  # since without a CPU collectives implementation a cross-process reduction fails).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=timeout)
  except (ValueError, TypeError, RuntimeError) as e:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UsageError(f"cannot join the processes of a distributed run: {why}") from None


def is_writer() -> bool:
  """Whether this process writes the run folder and prints: process 0 (or the only one)."""
  return jax.process_index() == 0


@contextlib.contextmanager
def outputs(run_dir: str | os.PathLike, copy_from: str | os.PathLike | None = None
            ) -> Iterator[tuple[Path, TextIO | None, TextIO | None]]:
  """``(run folder, stdout, stderr)`` for this process's run: ``run_dir`` and the defaults
  (``None``) on process 0; elsewhere a private scratch folder and a sink for both, removed at the
  end. The scratch folder starts as a copy of ``copy_from``'s files (the run being resumed, where
  there is one), so that a follower restores the same checkpoint and refuses what process 0
  refuses; the folder itself is only read (a shared file system on a cluster)."""
  if is_writer():
    yield Path(run_dir), None, None
    return
  with tempfile.TemporaryDirectory(prefix="deeprnn_jax-follower-") as scratch, \
       open(os.devnull, "w") as sink:
    run = Path(scratch) / "run"
    source = Path(copy_from) if copy_from is not None else None
    if source is not None and source.is_dir():
      shutil.copytree(source, run, ignore=shutil.ignore_patterns(LOCK))  # the writer's alone
    yield run, sink, sink
