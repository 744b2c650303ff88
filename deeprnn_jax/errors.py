"""Errors that mean "the user asked for something impossible", reported without a traceback."""


class UsageError(ValueError):
  """Bad input: a missing or unreadable file, impossible hyperparameters, a wrong checkpoint.

  Command-line entry points print ``str(error)`` on one line of stderr and exit with code 2.
  """
