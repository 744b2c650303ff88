"""What every command-line entry point shares: one-line errors and exit codes, no tracebacks."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from deeprnn_jax.base.errors import (
  EXIT_DIVERGED,
  EXIT_INTERRUPTED,
  EXIT_USAGE,
  Diverged,
  Interrupted,
  UsageError,
)
from deeprnn_jax.run import stopping

CACHE_ENV = "DEEPRNN_JAX_CACHE"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """The commands' ``--help``: each flag's default shown once, as ``(default: X)`` after its help,
  unless the help says its default itself or there is none to show (``None``, an off switch)."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if action.default in (None, False) or re.search(r"\bdefault\b", text):
      return text
    return super()._get_help_string(action)


def add_best_flag(p: argparse.ArgumentParser) -> None:
  """``--best``: the commands that read a run's model read its best one (docs/training.md)."""
  p.add_argument("--best", action="store_true",
                 help="the run's best model by validation (its best.msgpack) instead of its "
                      "newest checkpoint")


def compile_cache_dir() -> Path | None:
  """Where the command-line tools keep compiled programs: ``$DEEPRNN_JAX_CACHE``, by default
  ``$XDG_CACHE_HOME/deeprnn_jax/xla`` (``~/.cache/…``); ``none`` (or empty) turns it off."""
  value = os.environ.get(CACHE_ENV)
  if value is None:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deeprnn_jax" / "xla"
  return None if value.strip().lower() in ("", "none", "off") else Path(value)


def enable_compile_cache() -> None:
  """JAX's persistent compilation cache, so that a second run skips compiling (on a GPU the
  chapter's model takes seconds to compile). Takes effect if JAX has not compiled yet."""
  path = compile_cache_dir()
  if path is None:
    return
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:  # a read-only home: run uncached rather than fail
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@contextlib.contextmanager
def printable_stdout():
  """Text the terminal cannot encode (an ASCII-only ``PYTHONIOENCODING``) printed as ``\\xe9``
  escapes rather than failing with a traceback."""
  errors = getattr(sys.stdout, "errors", None)
  try:
    sys.stdout.reconfigure(errors="backslashreplace")
  except (AttributeError, ValueError, OSError):
    errors = None
  try:
    yield
  finally:
    if errors is not None:
      with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stdout.reconfigure(errors=errors)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
        prog: str = "deeprnn_jax", stop_signals: bool = False, cpu_cores: bool = True) -> int:
  """Runs ``main(argv)``, turning the project's errors into one stderr line and an exit code.

  With ``stop_signals`` (the train command), Ctrl-C, SIGTERM and SIGHUP are requests to stop from
  the start (:func:`deeprnn_jax.run.stopping.watch`): a run saves its newest epoch and exits with
  128 + the signal's number; a second signal ends the process at once. ``cpu_cores``: give JAX
  one CPU device per core first (``parallel.use_cpu_cores``), for the commands that train or
  predict; a command that only converts files leaves JAX as it is.
  """
  signals = stopping.watch(prog, second="exit") if stop_signals else contextlib.nullcontext()
  with signals, printable_stdout():
    enable_compile_cache()
    if cpu_cores:
      from deeprnn_jax.fit import parallel
      parallel.use_cpu_cores()  # before JAX starts: a CPU run may split its batches over the cores
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
    except Interrupted as e:
      with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
        print(f"{prog}: {e}", file=sys.stderr)
      return e.exit_code
    except KeyboardInterrupt:
      print(f"{prog}: interrupted", file=sys.stderr)
      return EXIT_INTERRUPTED
