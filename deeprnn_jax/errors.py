"""The project's errors and the exit codes the command-line tools give them.

Library code raises these; only the command-line layer (:mod:`deeprnn_jax.cli`) turns them into
one line on stderr and an exit code, never a traceback.
"""

EXIT_USAGE = 2  # bad input: files, hyperparameters, checkpoints
EXIT_DIVERGED = 3  # a non-finite loss stopped training
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class UsageError(ValueError):
  """Bad input: a missing or unreadable file, impossible hyperparameters, a wrong checkpoint.

  Command-line entry points print ``str(error)`` on one line of stderr and exit with
  :data:`EXIT_USAGE`.
  """


class DataError(UsageError):
  """A corpus that cannot be found, read, decoded or used as asked."""


class Diverged(RuntimeError):
  """Training produced a non-finite loss; the command-line tools exit with :data:`EXIT_DIVERGED`."""
