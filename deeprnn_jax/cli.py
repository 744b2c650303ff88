"""What every command-line entry point shares: one-line errors and exit codes, no tracebacks."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from deeprnn_jax.errors import UsageError

EXIT_USAGE = 2  # bad input: files, hyperparameters, checkpoints
EXIT_DIVERGED = 3  # a non-finite loss stopped training


class Diverged(RuntimeError):
  """Training produced a non-finite loss."""


# XLA flags the command-line tools add to $XLA_FLAGS (unless it sets them already), replaced by
# $DEEPRNN_JAX_XLA_FLAGS when that is set (empty: none). Why: BENCHMARKS.md (cold-start compile
# time on a GPU; the flag is ignored by XLA:CPU).
XLA_FLAGS = "--xla_gpu_autotune_level=0"


def add_xla_flags() -> None:
  """Adds :data:`XLA_FLAGS` to ``$XLA_FLAGS``; effective only before JAX starts its backend."""
  extra = os.environ.get("DEEPRNN_JAX_XLA_FLAGS", XLA_FLAGS).split()
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in extra if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current] + extra).strip()


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
        prog: str = "deeprnn_jax") -> int:
  """Runs ``main(argv)``, turning the project's errors into one stderr line and an exit code."""
  add_xla_flags()
  try:
    return int(main(argv) or 0)
  except UsageError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except OSError as e:  # An unwritable --out, a full disk: the user's to fix, not a crash.
    where = f": {e.filename}" if e.filename else ""
    print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
    return EXIT_USAGE
  except Diverged as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_DIVERGED
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
