"""The CPU cores this process may use (asked by the batch split and by oneDNN's calls)."""

from __future__ import annotations

import os


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity, not the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1
