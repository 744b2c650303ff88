"""The project's errors and the exit codes the command-line tools give them.

Library code raises these; only the command-line layer (:mod:`deeprnn_jax.cli`) turns them into
one line on stderr and an exit code, never a traceback.
"""

EXIT_USAGE = 2  # bad input: files, hyperparameters, checkpoints, a run folder in use
EXIT_DIVERGED = 3  # a non-finite loss, perplexity or parameter stopped training
EXIT_PEER_LOST = 4  # several processes: another process of the run was lost (killed, hung)
EXIT_HANGUP = 129  # SIGHUP (128 + 1): the terminal went away
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + 15): timeout, docker stop, SLURM, Kubernetes


class UsageError(ValueError):
  """Bad input: a missing or unreadable file, impossible hyperparameters, a wrong checkpoint.

  Command-line entry points print ``str(error)`` on one line of stderr and exit with
  :data:`EXIT_USAGE`.
  """


class DataError(UsageError):
  """A corpus that cannot be found, read, decoded or used as asked."""


class Diverged(RuntimeError):
  """Training produced a non-finite loss, perplexity or parameter; the command-line tools exit
  with :data:`EXIT_DIVERGED`."""


class Interrupted(KeyboardInterrupt):
  """A run stopped by Ctrl-C, SIGTERM or SIGHUP, after saving what it could.

  ``str(error)`` says what was kept and how to resume; the command-line tools print it and exit
  with :attr:`exit_code` (128 + the signal's number: 130, 143, 129). A ``KeyboardInterrupt``, so
  that code catching ``Exception`` lets it through, as it would Ctrl-C.
  """

  def __init__(self, message: str, signum: int = 2):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum
