"""Data parallelism over CPU cores: a minibatch's rows split across JAX's CPU devices.

At the chapter's size XLA:CPU spends a time step on one ``[32, 256] x [256, 1024]`` product split
over every core, and the hand-off between threads costs about as much as the arithmetic. With one
JAX CPU device per core (:func:`use_cpu_cores`) the rows can be split instead
(:func:`batch_devices`): each device runs its rows' whole recurrence on one core, and the
gradients are averaged once per minibatch (``training.make_train_epoch(..., devices=...)``). The
mean loss and its gradient are the same as on one device, up to the order of float32 sums.

Splitting wins only where the per-step product is small; where it is large, XLA's threads already
keep the cores busy and one device is as fast or faster (``BENCHMARKS.md``, 2-core AMD EPYC:
seed config 1.18x; 4 layers 1.10x; batch 64, hidden 512, batch 512: no gain; hidden 1024 at batch
128: 0.91x). :func:`auto_shards` encodes that rule.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax

from deeprnn_jax.errors import UsageError

# rows x hidden² of one shard's per-step product at or below which a split has won (the seed
# config's 16 rows x 256²); the sizes above it measured no gain or a loss.
MAX_SHARD_WORK = 16 * 256 * 256
MIN_SHARD_ROWS = 8


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity, not the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def use_cpu_cores(n: int | None = None) -> int:
  """Gives JAX one CPU device per core (``n``, default :func:`usable_cores`), so that a batch can
  be split across them. Takes effect only before JAX's first computation, and leaves a count the
  user chose (``JAX_NUM_CPU_DEVICES``, ``--xla_force_host_platform_device_count``) as it is;
  returns how many CPU devices JAX has or will have."""
  from jax._src import xla_bridge  # no public way to ask whether the backends have started

  chosen = (jax.config.jax_num_cpu_devices >= 0
            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""))
  if xla_bridge.backends_are_initialized() or chosen:
    return len(jax.devices("cpu"))
  n = n or usable_cores()
  jax.config.update("jax_num_cpu_devices", n)
  return n


def auto_shards(batch_size: int, num_hiddens: int, num_devices: int) -> int:
  """How many devices to split ``batch_size`` rows over: the most (up to ``num_devices``) that
  divide the batch into shards of at least :data:`MIN_SHARD_ROWS` rows whose per-step product
  (rows x hidden²) is at most :data:`MAX_SHARD_WORK`; 1 (no split) where none does."""
  best = 1
  for s in range(2, num_devices + 1):
    rows, rest = divmod(batch_size, s)
    if rest == 0 and rows >= MIN_SHARD_ROWS and rows * num_hiddens**2 <= MAX_SHARD_WORK:
      best = s
  return best


def batch_devices(batch_size: int, num_hiddens: int,
                  shards: int | None = None) -> Sequence[jax.Device]:
  """The devices a training minibatch is split over: one device (no split) unless JAX computes
  on its CPU devices and there are several. ``shards=None`` chooses by :func:`auto_shards`; an
  integer asks for exactly that many (1: never split)."""
  if shards is not None and (int(shards) != shards or shards < 1):
    raise UsageError(f"shards must be a positive integer, got {shards}")
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
