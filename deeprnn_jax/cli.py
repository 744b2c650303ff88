"""What every command-line entry point shares: one-line errors and exit codes, no tracebacks."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from deeprnn_jax.errors import UsageError

EXIT_USAGE = 2  # bad input: files, hyperparameters, checkpoints
EXIT_DIVERGED = 3  # a non-finite loss stopped training


class Diverged(RuntimeError):
  """Training produced a non-finite loss."""


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
        prog: str = "deeprnn_jax") -> int:
  """Runs ``main(argv)``, turning the project's errors into one stderr line and an exit code."""
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
