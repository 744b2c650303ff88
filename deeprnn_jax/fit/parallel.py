"""Data parallelism: a minibatch's rows split over devices, on one machine or over several.

A mesh with one axis, :data:`BATCH_AXIS` (``data``), holds the devices; every minibatch's rows are
split across it, each device runs its rows' whole recurrence, and the gradients are averaged once
per minibatch (``training.make_train_epoch(..., devices=...)``). The mean loss and its gradient are
the same as on one device, up to the order of float32 sums; with dropout, each shard draws its own
masks, so those depend on the number of shards. The devices may be GPUs, CPU cores or, after
:func:`deeprnn_jax.run.distributed.join`, the devices of several processes: each process places only
its own devices' rows (:func:`epoch_inputs`) and reads local copies of the replicated parameters
(:func:`on_first`).

On a CPU the split is also the fast way to use the cores. At the chapter's size XLA:CPU spends a
time step on one ``[32, 256] x [256, 1024]`` product split over every core, and the hand-off
between threads costs about as much as the arithmetic. With one JAX CPU device per core
(:func:`use_cpu_cores`) the rows are split instead, each device on one core. That wins only where
the per-step product is small; where it is large, XLA's threads already keep the cores busy and
one device is as fast or faster. :func:`auto_shards` encodes that rule, the default on a CPU; the
measurements behind its thresholds (an epoch interleaved with and without the split, per
configuration) are in BENCHMARKS.md.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from deeprnn_jax.base import validate
from deeprnn_jax.base.cores import usable_cores
from deeprnn_jax.base.errors import UsageError

BATCH_AXIS = "data"  # the mesh axis a minibatch's rows are split over
# rows x hidden² of one shard's per-step product at or below which a split has won (the chapter's
# 16 rows x 256² per shard); the sizes above it measured no gain or a loss.
MAX_SHARD_WORK = 16 * 256 * 256
MIN_SHARD_ROWS = 8
MAX_AUTO_SHARDS = 2  # measured on 2 cores only; more shards are for the user to ask for


def use_cpu_cores(n: int | None = None) -> bool:
  """Gives JAX ``n`` CPU devices (default: one per usable core), so that a batch can be split
  across them. Returns whether it set the count now: not once JAX has computed anything (it keeps
  the devices it started with), nor where a count is already chosen (``JAX_NUM_CPU_DEVICES``,
  ``--xla_force_host_platform_device_count``, an earlier call), which it leaves alone."""
  if n is not None:
    validate.positive_int("the number of CPU devices", n)
  if (jax.config.jax_num_cpu_devices >= 0
      or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
    return False
  try:
    jax.config.update("jax_num_cpu_devices", usable_cores() if n is None else n)
  except RuntimeError:  # JAX has started
    return False
  return True


def auto_shards(batch_size: int, num_hiddens: int, num_devices: int) -> int:
  """How many devices to split ``batch_size`` rows over: the most (up to ``num_devices`` and
  :data:`MAX_AUTO_SHARDS`) that divide the batch into shards of at least :data:`MIN_SHARD_ROWS`
  rows whose per-step product (rows x hidden²) is at most :data:`MAX_SHARD_WORK`; 1 (no split)
  where none does."""
  best = 1
  for s in range(2, min(num_devices, MAX_AUTO_SHARDS) + 1):
    rows, rest = divmod(batch_size, s)
    if rest == 0 and rows >= MIN_SHARD_ROWS and rows * num_hiddens**2 <= MAX_SHARD_WORK:
      best = s
  return best


def parse_devices(value) -> int | str | None:
  """``--devices``' value: a positive integer (or its digits), ``all``, or ``None`` (the default
  rule)."""
  if value is None or value == "all":
    return value
  n = int(value) if isinstance(value, str) and value.strip().isdigit() else value
  try:
    return validate.positive_int("--devices", n)
  except UsageError:
    raise UsageError(f"--devices/--shards must be a positive integer or all, got {value}") from None


def batch_devices(batch_size: int, num_hiddens: int,
                  devices: int | str | None = None) -> Sequence[jax.Device]:
  """The devices a training minibatch is split over, from JAX's default backend.

  ``devices``: an integer asks for exactly that many (1: no split), ``"all"`` for every device.
  ``None`` chooses: on a CPU, by :func:`auto_shards`; elsewhere one device; over several
  processes, all of them (each process must take part). Over several processes the devices are
  the first ``devices / processes`` of each. Raises :class:`UsageError` where they cannot be
  had or the batch does not split into equal shards.
  """
  devices = parse_devices(devices)
  everywhere = jax.devices()  # every process's, after distributed.join
  platform, processes = everywhere[0].platform, jax.process_count()
  if devices == "all" or devices is None and processes > 1:
    n = len(everywhere)
  elif devices is None:
    n = auto_shards(batch_size, num_hiddens, len(everywhere)) if platform == "cpu" else 1
  else:
    n = devices
  if n > len(everywhere):
    where = (f" over {processes} processes" if processes > 1 else
             f" (this process may use {usable_cores()} cores)" if platform == "cpu" else "")
    raise UsageError(f"{n} devices asked for, but JAX has {len(everywhere)} "
                     f"{platform.upper()} devices{where}")
  if batch_size % n:
    raise UsageError(f"batch size {batch_size} does not split into {n} equal shards "
                     f"(one a device); choose --devices or --batch-size to fit")
  if processes == 1:
    return everywhere[:n]
  if n % processes:
    raise UsageError(f"{n} devices do not split evenly over {processes} processes")
  # Process-major: process p's rows are the p-th block of each minibatch.
  return [d for p in range(processes)
          for d in [d for d in everywhere if d.process_index == p][:n // processes]]


def batch_mesh(devices: Sequence[jax.Device]) -> Mesh:
  """The one-axis mesh (:data:`BATCH_AXIS`) a split epoch runs on."""
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """``tree`` with a copy of every array on each of ``devices``, as a split epoch takes and
  returns its train state (an epoch given the state placed otherwise compiles once more, for
  the placement it returns); unchanged for one device. Over several processes every process
  passes the same values and places its own devices' copies."""
  if len(devices) < 2:
    return tree
  sharding = NamedSharding(batch_mesh(devices), P())
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda a: _global(np.asarray(a), sharding), tree)


def rows_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
  """Where an epoch's ``<int32>[num_batches, batch, steps]`` minibatches go: rows split."""
  return NamedSharding(batch_mesh(devices), P(None, BATCH_AXIS))


def epoch_inputs(devices: Sequence[jax.Device], Xs, Ys, key) -> tuple:
  """A split epoch's inputs ``(Xs, Ys, key)`` placed on ``devices``: the rows of
  ``Xs``/``Ys`` ``<int32>[num_batches, batch, steps]`` split, the key replicated; unchanged for
  one device. Every process passes the same whole epoch (the same loader, the same seed) and
  places only its own devices' rows."""
  if len(devices) < 2:
    return Xs, Ys, key
  rows = rows_sharding(devices)
  return (_global(np.asarray(Xs), rows), _global(np.asarray(Ys), rows),
          replicate(key, devices))


def _global(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def on_first_shapes(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """The shapes of what :func:`on_first` makes of ``tree`` (an epoch's output, or its shapes),
  placement included, to compile ahead what will be called with it: with one device the epoch's
  own arrays, which JAX has not committed to a device; with several, copies committed to the
  first."""
  sharding = SingleDeviceSharding(devices[0]) if len(devices) > 1 else None
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def on_first(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """``tree`` on one device of this process alone, for work that is not split (evaluation,
  generation): a replicated tree would run it on every device at once; unchanged for one device.
  A copy, so that it outlives the replicated tree being donated to the next epoch."""
  if len(devices) < 2:
    return tree
  return jax.tree.map(lambda a: a.addressable_data(0).copy(), tree)
