"""One run over several processes (hosts): JAX's distributed runtime, and who writes the run.

Every process runs the same command with its own ``--process-id``: :func:`join` connects it to
the others through the coordinator (process 0's ``HOST:PORT``), after which ``jax.devices()``
lists every process's devices and the train CLI splits each minibatch's rows over all of them
(:func:`deeprnn_jax.fit.parallel.batch_devices`). Every process builds the same minibatches from the
same seed and places its own devices' rows; the gradients are averaged across processes in the
same collective that averages them across one machine's devices (on CPUs through gloo).

Only process 0 writes the run folder and prints; the others train the same epochs silently
(:func:`outputs`), so that they take every decision process 0 takes (to stop on a divergence, to
resume from a checkpoint) from the same numbers.

A process that is lost must not take the others down by JAX's own means: its coordination service
ends every process it finds in error with a C++ abort (``LOG(FATAL)``, exit 134 and a stack trace),
and a Python callback cannot intercept it in jaxlib 0.10 (its argument, an ``absl::Status``, has no
Python type). So the service runs in a helper process of process 0's (:class:`_Service`), which
outlives process 0 for a while, and every process watches the others itself (:class:`_Watch`):
each bumps a counter in the service's key-value store every second, and a peer whose counter
stands still for ``$DEEPRNN_JAX_PEER_TIMEOUT`` seconds (10) is lost. Then the process prints one
line naming it, removes its scratch folder and ends with :data:`EXIT_PEER_LOST`, well before the
service's own heartbeat timeout (three times as long) would abort it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, TextIO

import jax

from deeprnn_jax.base import validate
from deeprnn_jax.base.errors import EXIT_PEER_LOST, EXIT_USAGE, UsageError
from deeprnn_jax.run.rundir import LOCK

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # JAX's own; the process count and id it detects
PEER_TIMEOUT_ENV = "DEEPRNN_JAX_PEER_TIMEOUT"
JOIN_TIMEOUT = 60  # seconds every process waits for all of them to join (--join-timeout)
PEER_TIMEOUT = 10.0  # seconds without a sign of a peer before it counts as lost
WAITING_AFTER = 2.0  # seconds of waiting for the others before saying so


def requested(coordinator: str | None, num_processes: int | None,
              process_id: int | None) -> bool:
  """Whether the flags or JAX's environment ask for several processes."""
  return (coordinator is not None or num_processes is not None or process_id is not None
          or bool(os.environ.get(COORDINATOR_ENV)))


def peer_timeout() -> float:
  """Seconds without a sign of a peer before it counts as lost: ``$DEEPRNN_JAX_PEER_TIMEOUT``,
  else :data:`PEER_TIMEOUT`."""
  text = os.environ.get(PEER_TIMEOUT_ENV, "").strip()
  try:
    value = float(text) if text else PEER_TIMEOUT
  except ValueError:
    value = -1.0
  if not value > 0:
    raise UsageError(f"${PEER_TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
  return value


def join(coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, timeout: float = JOIN_TIMEOUT,
         prog: str = "deeprnn_jax") -> None:
  """Connects this process to the others (``jax.distributed.initialize``), before JAX computes
  anything. What is not given comes from ``$JAX_COORDINATOR_ADDRESS`` and JAX's detection of a
  cluster (SLURM, Open MPI, ...). Raises :class:`UsageError` on bad values.

  Waiting for the others is said on stderr after two seconds; where they have not all joined within
  ``timeout`` seconds, the process prints one line and ends with exit code 2 (JAX's own timeout
  would abort it). Once joined, every process watches the others (see the module's docstring).
  """
  if coordinator is not None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise UsageError(f"--coordinator must be HOST:PORT, got {coordinator}")
  if num_processes is not None:
    validate.positive_int("--num-processes", num_processes)
  if process_id is not None and (num_processes is None or not 0 <= process_id < num_processes):
    raise UsageError(f"--process-id must be in 0 .. --num-processes - 1, got {process_id}")
  if not timeout > 0:
    raise UsageError(f"--join-timeout must be a number of seconds > 0, got {timeout}")
  lost_after = peer_timeout()
  # CPU devices of different processes reduce through gloo (JAX's default in 0.10; stated,
  # since without a CPU collectives implementation a cross-process reduction fails).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = coordinator or os.environ.get(COORDINATOR_ENV) or "the coordinator"
  processes = f"all {num_processes} processes" if num_processes else "all the processes"

  def waiting():
    _say(f"{prog}: waiting for {processes} to join at {where} (--join-timeout {timeout:g} s)")

  def give_up():
    _say(f"{prog}: error: not {processes} joined at {where} within --join-timeout {timeout:g} s; "
         "start every process with the same --coordinator and --num-processes")
    _Service.stop_all()
    os._exit(EXIT_USAGE)

  timers = [threading.Timer(WAITING_AFTER, waiting), threading.Timer(timeout, give_up)]
  for timer in timers:
    timer.daemon = True
    timer.start()
  try:
    with _Service.in_helper(grace=2 * lost_after + 5):
      # JAX's own deadlines never come first: each ends the process by a C++ abort.
      jax.distributed.initialize(coordinator, num_processes, process_id,
                                 initialization_timeout=int(timeout) + 30,
                                 heartbeat_timeout_seconds=max(30, int(3 * lost_after)))
  except (ValueError, TypeError, RuntimeError) as e:
    _Service.stop_all()
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UsageError(f"cannot join the processes of a distributed run: {why}") from None
  finally:
    for timer in timers:
      timer.cancel()
  _Watch(prog, lost_after).start()


def _say(line: str) -> None:
  """One line on stderr, from any thread (``os.write``: no lock another thread may hold)."""
  with contextlib.suppress(OSError):
    os.write(2, f"{line}\n".encode())


class _Service:
  """JAX's coordination service in a helper process, in place of process 0's own.

  Started by JAX's ``initialize`` on process 0 (:meth:`in_helper` hands it this class in place
  of jaxlib's), with JAX's arguments. The helper ignores the terminal's signals (a Ctrl-C is for
  the run to honour) and ends when JAX shuts the service down at the end of the run; where
  process 0 ends otherwise, ``grace`` seconds later, so that the others find process 0 lost and
  end cleanly before their connections to the service fail (which aborts them).
  """

  running: list["_Service"] = []

  def __init__(self, address: str, num_nodes: int, grace: float, **options):
    spec = json.dumps({"address": address, "num_nodes": num_nodes, "grace": grace,
                       "options": options})
    self.proc = subprocess.Popen(
        [sys.executable, "-c", "from deeprnn_jax.run.distributed import _serve; _serve()", spec],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True)
    _Service.running.append(self)
    answer = self.proc.stdout.readline().strip()
    if answer != "ready":
      self.stop()
      raise RuntimeError(answer or "the coordination service did not start")

  @classmethod
  @contextlib.contextmanager
  def in_helper(cls, grace: float) -> Iterator[None]:
    from jax._src import distributed as jax_distributed  # where JAX makes its service
    jaxlib = jax_distributed._jax
    make = jaxlib.get_distributed_runtime_service
    jaxlib.get_distributed_runtime_service = (
        lambda address, num_nodes, **options: cls(address, num_nodes, grace, **options))
    try:
      yield
    finally:
      jaxlib.get_distributed_runtime_service = make

  def shutdown(self) -> None:
    """JAX's end of the service (after every process has passed its shutdown barrier)."""
    with contextlib.suppress(OSError, ValueError):
      self.proc.stdin.write("stop\n")
      self.proc.stdin.close()
    try:
      self.proc.wait(60)
    except subprocess.TimeoutExpired:
      self.stop()

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()

  @classmethod
  def stop_all(cls) -> None:
    for service in cls.running:
      service.stop()


def _serve() -> None:
  """The helper process of :class:`_Service`: its specification is ``sys.argv[1]``."""
  for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
    if s is not None:
      signal.signal(s, signal.SIG_IGN)
  spec = json.loads(sys.argv[1])
  from jaxlib import _jax
  try:
    service = _jax.get_distributed_runtime_service(spec["address"], spec["num_nodes"],
                                                   **spec["options"])
  except Exception as e:  # a port in use: the line process 0 reports
    print(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, flush=True)
    os._exit(1)
  print("ready", flush=True)
  if sys.stdin.readline().strip() == "stop":
    service.shutdown()
  else:  # process 0 ended without shutting down: the others find it lost meanwhile
    time.sleep(spec["grace"])
  os._exit(0)


class _Watch(threading.Thread):
  """Every second, bumps this process's counter in the service's key-value store and reads the
  others'; a peer whose counter stands still for ``lost_after`` seconds is lost (:meth:`lost`).
  A process that ends normally says so first (its counter reads ``done``)."""

  PREFIX = "deeprnn_jax/alive/"
  active: "_Watch | None" = None

  def __init__(self, prog: str, lost_after: float):
    super().__init__(name="deeprnn_jax-peers", daemon=True)
    from jax._src import distributed as jax_distributed
    state = jax_distributed.global_state
    self.client, self.me, self.n = state.client, state.process_id, state.num_processes
    self.prog, self.lost_after = prog, lost_after
    self.ending = threading.Event()
    self.failing = False
    _Watch.active = self
    atexit.register(self.end)  # after JAX's: it runs first, before JAX shuts the client down

  def run(self) -> None:
    seen, count = {}, 0
    start = time.monotonic()
    while not self.ending.wait(1.0 if count else 0.0):
      count += 1
      try:
        self.client.key_value_set(f"{self.PREFIX}{self.me}", str(count), allow_overwrite=True)
        values = dict(self.client.key_value_dir_get(self.PREFIX))
      except Exception:  # the service is out of reach: process 0's helper has gone
        if self.ending.is_set():
          return
        values = {}
      now = time.monotonic()
      for peer in range(self.n):
        value = values.get(f"{self.PREFIX}{peer}")
        if peer == self.me:
          continue
        if value == "done":
          if self.failing:
            self.lost(peer, ended=True)
          continue
        if value is not None and seen.get(peer, (None,))[0] != value:
          seen[peer] = (value, now)
        elif now - seen.get(peer, (None, start))[1] > self.lost_after:
          self.lost(peer)

  def end(self) -> None:
    """A normal end: the others are not to wait for this process's counter."""
    if not self.ending.is_set():
      self.ending.set()
      with contextlib.suppress(Exception):
        self.client.key_value_set(f"{self.PREFIX}{self.me}", "done", allow_overwrite=True)

  def lost(self, peer: int, ended: bool = False) -> None:
    """Says so, removes this process's scratch folder and ends the process at once: JAX's
    shutdown at exit would wait for the lost process and abort."""
    what = _lost_message(peer, self.n, None if ended else self.lost_after)
    _say(f"{self.prog}: error: {what}")
    for path in _scratch:
      shutil.rmtree(path, ignore_errors=True)
    os._exit(EXIT_PEER_LOST)


_scratch: list[Path] = []  # this process's scratch folders, removed where a peer is lost
_run_dir: list[Path] = []  # process 0's run folder, for what is kept of it


def _lost_message(peer: int, n: int, seconds: float | None) -> str:
  lost = (f"process {peer} of {n} was lost (no sign of it for {seconds:g} s)" if seconds
          else f"process {peer} of {n} ended before the run did")
  if not _run_dir:
    return f"{lost}; this process stops too (process 0 keeps the run's checkpoints)"
  from deeprnn_jax.run import checkpoint
  from deeprnn_jax.run.runs import resume_command
  folder = _run_dir[-1]
  files = checkpoint.checkpoint_files(folder)
  epoch = checkpoint._epoch_of(files[0]) if files else None
  kept = (f"the checkpoint of epoch {epoch} is kept in {folder}" if epoch is not None
          else "no checkpoint had been saved")
  return (f"{lost}; {kept}; resume with every process: {resume_command(folder)} and the same "
          "--coordinator, --num-processes and --process-id")


def wait_if_lost(seconds: float | None = None) -> None:
  """In a run over several processes, after an error: waits until the watch finds a peer lost
  (it ends the process), at most ``seconds`` (by default a little longer than it takes). A
  collective with a process that has died fails at once; the watch names the process."""
  watch = _Watch.active
  if watch is None or not watch.is_alive():
    return
  watch.failing = True  # a peer that has ended counts as lost too: this process cannot go on
  deadline = time.monotonic() + (seconds if seconds is not None else watch.lost_after + 3)
  while time.monotonic() < deadline and watch.is_alive():
    time.sleep(0.1)


def is_writer() -> bool:
  """Whether this process writes the run folder and prints: process 0 (or the only one)."""
  return jax.process_index() == 0


@contextlib.contextmanager
def outputs(run_dir: str | os.PathLike, copy_from: str | os.PathLike | None = None
            ) -> Iterator[tuple[Path, TextIO | None, TextIO | None]]:
  """``(run folder, stdout, stderr)`` for this process's run: ``run_dir`` and the defaults
  (``None``) on process 0; elsewhere a private scratch folder and a sink for both, removed at the
  end. The scratch folder starts as a copy of ``copy_from``'s files (the run being resumed, where
  there is one), so that a follower restores the same checkpoint and refuses what process 0
  refuses; the folder itself is only read (a shared file system on a cluster)."""
  if is_writer():
    _run_dir.append(Path(run_dir))
    with _naming_a_lost_peer():
      yield Path(run_dir), None, None
    return
  with tempfile.TemporaryDirectory(prefix="deeprnn_jax-follower-") as scratch, \
       open(os.devnull, "w") as sink, _naming_a_lost_peer():
    _scratch.append(Path(scratch))
    run = Path(scratch) / "run"
    source = Path(copy_from) if copy_from is not None else None
    if source is not None and source.is_dir():
      shutil.copytree(source, run, ignore=shutil.ignore_patterns(LOCK))  # the writer's alone
    yield run, sink, sink


@contextlib.contextmanager
def _naming_a_lost_peer() -> Iterator[None]:
  """An error in a run over several processes may be a collective failing with a lost peer
  (at once where the peer's connection closes): the watch is given the time to name it."""
  try:
    yield
  except Exception:
    wait_if_lost()
    raise
