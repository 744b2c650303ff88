"""Data parallelism over CPU cores: a minibatch's rows split across JAX's CPU devices.

At the chapter's size XLA:CPU spends a time step on one ``[32, 256] x [256, 1024]`` product split
over every core, and the hand-off between threads costs about as much as the arithmetic. With one
JAX CPU device per core (:func:`use_cpu_cores`) the rows can be split instead
(:func:`batch_devices`): each device runs its rows' whole recurrence on one core, and the
gradients are averaged once per minibatch (``training.make_train_epoch(..., devices=...)``). The
mean loss and its gradient are the same as on one device, up to the order of float32 sums; with
dropout, each shard draws its own masks, so those depend on the number of shards.

Splitting wins only where the per-step product is small; where it is large, XLA's threads already
keep the cores busy and one device is as fast or faster. :func:`auto_shards` encodes that rule;
the measurements behind its thresholds (an epoch interleaved with and without the split, per
configuration) are in BENCHMARKS.md.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deeprnn_jax import validate
from deeprnn_jax.errors import UsageError

BATCH_AXIS = "batch"  # the mesh axis a minibatch's rows are split over
# rows x hidden² of one shard's per-step product at or below which a split has won (the chapter's
# 16 rows x 256² per shard); the sizes above it measured no gain or a loss.
MAX_SHARD_WORK = 16 * 256 * 256
MIN_SHARD_ROWS = 8
MAX_AUTO_SHARDS = 2  # measured on 2 cores only; more shards are for the user to ask for


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity, not the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


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


def batch_devices(batch_size: int, num_hiddens: int,
                  shards: int | None = None) -> Sequence[jax.Device]:
  """The devices a training minibatch is split over: one device (no split) unless JAX computes
  on its CPU devices and there are several. ``shards=None`` chooses by :func:`auto_shards`; an
  integer asks for exactly that many (1: never split)."""
  if shards is not None:
    shards = validate.positive_int("shards", shards)
  default = jax.devices()
  if default[0].platform != "cpu":
    if shards not in (None, 1):
      raise UsageError(f"{shards} shards: splitting the batch is for CPU cores; JAX computes "
                       f"on {default[0].platform}")
    return default[:1]
  if shards is None:
    shards = auto_shards(batch_size, num_hiddens, len(default))
  if shards > len(default):
    raise UsageError(f"{shards} shards, but JAX has {len(default)} CPU devices "
                     f"(this process may use {usable_cores()} cores)")
  if batch_size % shards:
    raise UsageError(f"batch size {batch_size} does not split into {shards} equal shards")
  return default[:shards]


def batch_mesh(devices: Sequence[jax.Device]) -> Mesh:
  """The one-axis mesh (:data:`BATCH_AXIS`) a split epoch runs on."""
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """``tree`` with a copy of every array on each of ``devices``, as a split epoch takes and
  returns its train state (an epoch given the state placed otherwise compiles once more, for
  the placement it returns); unchanged for one device."""
  if len(devices) < 2:
    return tree
  return jax.device_put(tree, NamedSharding(batch_mesh(devices), P()))


def on_first(tree: Any, devices: Sequence[jax.Device]) -> Any:
  """``tree`` on ``devices[0]`` alone, for work that is not split (evaluation, generation): a
  replicated tree would run it on every device at once; unchanged for one device. A copy, so that
  it outlives the replicated tree being donated to the next epoch."""
  if len(devices) < 2:
    return tree
  # device_put alone may hand back device 0's own buffer of the replicated array.
  return jax.tree.map(lambda a: a.copy(), jax.device_put(tree, devices[0]))
