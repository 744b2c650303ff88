"""Ctrl-C, SIGTERM and SIGHUP as a request to stop, which a run honours between epochs.

A run must not be stopped wherever the main thread happens to be: a ``KeyboardInterrupt`` raised
inside one of JAX's callbacks is printed and swallowed (``Exception ignored in …
_xla_gc_callback``), one raised while an epoch's state is being handed on loses it. So while a run
watches (:func:`watch`), these signals only set a flag, :class:`StopRequest`, which the run reads
between epochs: it lets the epoch on the device finish, saves it, and stops.

The first signal also gives the signals back their previous handling, so that a second one acts at
once: the command line (``second="exit"``) ends the process as the signal's default does, so the
files already saved (each written atomically) stay as they are; a library caller
(``second="previous"``) gets the handlers it had, Python's ``KeyboardInterrupt`` for Ctrl-C.

Nothing here runs on import: handlers are installed by :func:`watch` and removed when it ends.
Signals only reach the main thread's handlers; elsewhere :func:`watch` installs nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
                if s is not None)


class StopRequest:
  """Whether (and by which signal, since when) the run was asked to stop."""

  def __init__(self):
    self.signum: int | None = None
    self.since: float | None = None  # time.monotonic() of the first request

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else ""

  def request(self, signum: int = signal.SIGINT) -> None:
    """Asks the run to stop, as the signal ``signum`` does (the first request counts)."""
    if self.signum is None:
      self.signum, self.since = int(signum), time.monotonic()

  def waited_more_than(self, seconds: float) -> bool:
    """Whether the stop was asked for more than ``seconds`` ago."""
    return self.since is not None and time.monotonic() - self.since > seconds


_active: StopRequest | None = None


@contextlib.contextmanager
def watch(prog: str = "deeprnn_jax", second: str = "previous",
          notice: bool = True) -> Iterator[StopRequest]:
  """Turns Ctrl-C, SIGTERM and SIGHUP into a :class:`StopRequest` while the block runs.

  Nested uses share the outermost one (the command line's, when there is one). A signal the process
  ignores (SIGHUP under ``nohup``) stays ignored.

  Args:
    prog: the name the first signal's message on stderr starts with.
    second: what a second signal does: ``"exit"``, the signal's default action (the process ends
      at once, with the shell's 128 + signal status), or ``"previous"``, whatever handled it before
      the block (Python's ``KeyboardInterrupt`` for Ctrl-C).
    notice: whether the first signal prints that the run finishes its epoch and saves it (a
      command that has nothing to save says what it stopped after itself).
  """
  global _active
  if second not in ("exit", "previous"):
    raise ValueError(f"second must be 'exit' or 'previous', got {second!r}")
  if _active is not None:
    yield _active
    return
  stop = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return
  previous = {}

  def on_signal(signum, frame):
    first = not stop.requested
    stop.request(signum)
    for s, handler in previous.items():
      signal.signal(s, signal.SIG_DFL if second == "exit" else handler)
    if first and notice:
      name = signal.Signals(signum).name
      again = "Ctrl-C again" if signum == signal.SIGINT else f"{name} again"
      # os.write, not print: a handler may run in the middle of a print to stderr. After SIGHUP
      # the terminal may be gone: the run goes on saving, unheard.
      with contextlib.suppress(OSError):
        os.write(2, f"{prog}: {name}: finishing the epoch in progress, then saving and stopping "
                    f"({again} stops at once, keeping the last saved checkpoint)\n".encode())

  for s in SIGNALS:
    handler = signal.getsignal(s)
    if handler is signal.SIG_IGN or handler is None:  # ignored, or set outside Python: leave it
      continue
    previous[s] = handler
    signal.signal(s, on_signal)
  _active = stop
  try:
    yield stop
  finally:
    _active = None
    for s, handler in previous.items():
      signal.signal(s, handler)


class Background:
  """``fn()`` started now in a helper thread; :meth:`result` waits for it in short slices.

  A signal's Python handler only runs when the main thread is back in Python: a long call into C
  (XLA compiling a program) would hold it, and a second Ctrl-C with it, until the call returns.
  XLA releases the GIL while it compiles, so the main thread goes on meanwhile.
  """

  def __init__(self, fn: Callable[[], T]):
    self._result: dict = {}

    def target():
      try:
        self._result["value"] = fn()
      except BaseException as e:  # handed to the caller by result()
        self._result["error"] = e

    self._thread = threading.Thread(target=target, name="deeprnn_jax-background", daemon=True)
    self._thread.start()

  def result(self) -> T:
    while self._thread.is_alive():
      self._thread.join(0.05)
    if "error" in self._result:
      raise self._result["error"]
    return self._result["value"]


def responsive(fn: Callable[[], T]) -> T:
  """``fn()`` run in a helper thread while this one waits in short slices (:class:`Background`)."""
  return Background(fn).result()
