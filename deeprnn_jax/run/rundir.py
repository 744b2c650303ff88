"""A run folder: its files, its lock, its metrics rows and its summary.

``config.json``, ``metrics.jsonl`` (one row per epoch, and model where a run trains several),
``summary.json``,
``perplexity.png``/``.svg``, the checkpoints (:mod:`deeprnn_jax.run.checkpoint`) and the best model
(``best.msgpack``, :mod:`deeprnn_jax.run.best`) live in it, and
``run.lock``, which one process at a time holds (an advisory ``flock``, released by the system when
the process ends, however it ends) while it writes anything there. Every file but ``metrics.jsonl``
is replaced atomically; ``metrics.jsonl`` is appended to, a row at a time, and made to agree with
the checkpoint when a run resumes (:meth:`RunDir.read_metrics`). All JSON is strict (no ``NaN``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from deeprnn_jax.base import files
from deeprnn_jax.base.config import MODEL_FIELDS, TrainConfig
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.run import checkpoint as ckpt

try:
  import fcntl
except ImportError:  # not POSIX: runs go unlocked
  fcntl = None

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCK = "run.lock"
SWEEP = "sweep.json"  # the models of a run that trains several (deeprnn_jax.run.sweeps)
# The files a run writes over (besides its checkpoints): where a folder holds one of them and no
# run, a run there would destroy someone else's file.
RUN_FILES = (CONFIG, METRICS, SUMMARY, SWEEP, "perplexity.png", "perplexity.svg", ckpt.BEST)
# files.atomic_write_bytes' and checkpoint's temporary files for the files a run writes
_TEMPORARY = re.compile(r"\.(config\.json|metrics\.jsonl|summary\.json|perplexity\.(png|svg)|"
                        r"checkpoint(-\d+)?\.msgpack|best\.msgpack)\..*tmp")


class RunInUse(UsageError):
  """Another process holds the run folder's lock."""


class RunDir:
  """The folder of one run: where its files are, and the only way the run writes them."""

  def __init__(self, path: str | os.PathLike):
    if not str(path).strip():  # Path("") is the working directory
      raise UsageError("--out is empty: give the run folder")
    path = Path(path)
    if path.suffix == ".msgpack":
      raise UsageError(f"--out {path}: give the run folder, not its checkpoint file")
    if path.exists() and not path.is_dir():
      raise UsageError(f"--out {path} is a file, not a run folder")
    self.path = path
    self.rows: list[dict] = []  # the metrics rows, as written
    self._lock = None
    self._metrics = None
    self._began = False

  config_path = property(lambda self: self.path / CONFIG)
  metrics_path = property(lambda self: self.path / METRICS)
  summary_path = property(lambda self: self.path / SUMMARY)
  lock_path = property(lambda self: self.path / LOCK)

  def is_run(self) -> bool:
    """Whether the folder's files say it holds a run: a checkpoint, or a ``config.json`` of a
    run's settings (a run stopped before its first checkpoint)."""
    if ckpt.checkpoint_files(self.path):
      return True
    try:
      config = json.loads(self.config_path.read_text(encoding="utf-8"))
      return (isinstance(config, dict) and all(f in config for f in MODEL_FIELDS)
              and TrainConfig.from_json(config) is not None)
    except (OSError, ValueError, TypeError, UsageError):
      return False

  def others_files(self) -> list[str]:
    """The files, named as a run's, of a folder that holds no run: what a run would write over."""
    return [name for name in RUN_FILES if (self.path / name).exists()]

  def check_fresh(self) -> None:
    """Refuses (:class:`UsageError`) a new run in a folder that holds a run, or files of a run's
    names that are not one's."""
    if self.is_run():
      hint = ("" if ckpt.checkpoint_files(self.path) else
              " (it has no checkpoint yet: --resume starts it again from epoch 0)")
      raise UsageError(f"{self.path} already holds a run; pass --resume to continue it{hint}, "
                       "or choose another --out")
    self._refuse_others_files()

  def check_resumable(self) -> None:
    """Refuses (:class:`UsageError`) ``--resume`` of a folder that holds no run: it would write
    over files it did not write."""
    if not self.is_run():
      self._refuse_others_files()
      raise ckpt.CheckpointError(f"no checkpoint at {ckpt.checkpoint_path(self.path)}, and no "
                                 "other trace of a run to resume")

  def _refuse_others_files(self) -> None:
    names = self.others_files()
    if names:
      raise UsageError(f"{self.path} already holds a run's file names ({', '.join(names)}) but no "
                       "run (no checkpoint, no config.json of a run's settings); a run there "
                       "would write over them: move them away, or choose another --out")

  # ------------------------------------------------------------------------------------------
  # One writer at a time.

  @contextlib.contextmanager
  def locked(self) -> Iterator["RunDir"]:
    """Holds the folder's lock (creating the folder) for the block; raises :class:`RunInUse`,
    naming the holder's PID, where another process holds it."""
    made_folder = not self.path.exists()
    self.path.mkdir(parents=True, exist_ok=True)
    while True:
      lock, made_lock = self._open_lock()
      if fcntl is None:
        break
      try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        who = f"PID {holder}" if holder.isdigit() else "another process"
        raise RunInUse(f"{self.path} is in use by another run ({who}); wait for it to end or "
                       "stop it, or choose another --out") from None
      # A refused run removes the lock file it made (below): one locked after that removal holds
      # a file no longer in the folder, and opens it anew.
      try:
        if os.stat(self.lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
          break
      except FileNotFoundError:
        pass
      lock.close()
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    self._lock = lock
    try:
      yield self
    finally:
      if self._metrics is not None:
        with contextlib.suppress(OSError):  # a write that failed has been reported already
          self._metrics.close()
        self._metrics = None
      self._lock = None
      if not self._began:  # refused, or stopped before writing: the folder as it was found
        with contextlib.suppress(OSError):
          if made_lock:
            self.lock_path.unlink()
          if made_folder:
            self.path.rmdir()
      lock.close()  # releases the flock

  def _open_lock(self):
    """The lock file, opened for reading and writing, and whether this call made it."""
    try:
      fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
      made = True
    except FileExistsError:
      made = False
      try:
        fd = os.open(self.lock_path, os.O_RDWR)
      except OSError as e:
        raise OSError(e.errno, e.strerror, str(self.lock_path)) from None
    except OSError as e:
      raise OSError(e.errno, e.strerror, str(self.lock_path)) from None
    return os.fdopen(fd, "r+"), made

  def _remove_temporary_files(self) -> None:
    """Temporary files left by a process killed while it saved (they are never read)."""
    for path in self.path.glob(".*.tmp"):
      if _TEMPORARY.fullmatch(path.name):
        with contextlib.suppress(OSError):
          path.unlink()

  # ------------------------------------------------------------------------------------------
  # Reading what a run left, writing nothing.

  def read_config(self) -> dict | None:
    """``config.json`` as a dict, ``None`` where there is none."""
    if not self.config_path.is_file():
      return None
    try:
      config = json.loads(self.config_path.read_text(encoding="utf-8"))
      if not isinstance(config, dict):
        raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
      raise UsageError(f"{self.config_path} is unreadable ({e}); move it away and --resume "
                       "again to continue with the checkpoint's settings") from None
    return config

  def read_metrics(self, up_to_epoch: int) -> tuple[list[dict], list[str]]:
    """The metrics rows of epochs ``1 .. up_to_epoch`` (the checkpoint's), and notes on what was
    dropped or is missing.

    Rows after ``up_to_epoch`` are dropped (those epochs are trained again), and so is a last row
    cut short (a process killed while writing it). A row that cannot be read otherwise (not
    UTF-8, not JSON, not an object with an integer ``epoch``, an epoch twice) raises one
    :class:`UsageError` naming its line, and nothing is changed.
    """
    path = self.metrics_path
    if not path.is_file():
      notes = ([f"{path} is missing: the curve starts at epoch {up_to_epoch + 1}"]
               if up_to_epoch else [])
      return [], notes
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""  # the last row lacks its newline
    if not torn:
      lines.pop()
    rows, notes, seen, after = [], [], {}, []
    for number, line in enumerate(lines, 1):
      last = number == len(lines)
      try:
        row = json.loads(line.decode("utf-8"))
      except (UnicodeDecodeError, ValueError) as e:
        if last and torn:
          notes.append(f"dropped the last row of {path}, cut short (its process was killed "
                       "while writing it)")
          break
        reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not JSON"
        raise UsageError(f"{path} line {number} is unreadable ({reason}); repair or delete that "
                         "line, then --resume again") from None
      epoch = row.get("epoch") if isinstance(row, dict) else None
      if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise UsageError(f"{path} line {number} is not a metrics row (an object with a positive "
                         "integer epoch); repair or delete that line, then --resume again")
      key = (epoch, row.get("model"))  # several models trained together: a row per model
      if key in seen:
        which = "" if key[1] is None else f" of model {key[1]}"
        raise UsageError(f"{path} has epoch {epoch}{which} twice (lines {seen[key]} and "
                         f"{number}); delete the rows that are not this run's, then --resume "
                         "again")
      seen[key] = number
      if epoch > up_to_epoch:
        after.append(epoch)
      else:
        rows.append(files.strict(row))
    rows.sort(key=lambda r: (r["epoch"], r.get("model", 0)))
    if after:
      notes.append(f"dropped the rows of epochs {min(after)}-{max(after)} from {path}: they come "
                   f"after the checkpoint (epoch {up_to_epoch}) and are trained again")
    missing = sorted(set(range(1, up_to_epoch + 1)) - {r["epoch"] for r in rows})
    if missing:
      shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
      notes.append(f"{path} has no rows for epochs {shown} ({len(missing)} of {up_to_epoch}): "
                   "the curve has a gap there")
    return rows, notes

  # ------------------------------------------------------------------------------------------
  # Writing, once every check has passed.

  def begin(self, config_json: dict | None, rows: list[dict]) -> None:
    """The run's first writes: away with temporary files a killed process left, ``config.json``
    (where given: a new run's; a resumed run's settings are written with its checkpoints,
    :meth:`write_config`), and ``metrics.jsonl`` holding ``rows`` (the rows kept from before),
    opened for the rows to come."""
    assert self._lock is not None, "write a run folder only while holding its lock"
    self._began = True
    self._remove_temporary_files()
    if config_json is not None:
      self.write_config(config_json)
    files.atomic_write_bytes(self.metrics_path,
                             "".join(files.dumps(r) + "\n" for r in rows).encode())
    self.rows = list(rows)
    try:
      self._metrics = open(self.metrics_path, "a", encoding="utf-8")
    except OSError as e:
      raise OSError(e.errno, e.strerror, str(self.metrics_path)) from None

  def append_row(self, row: dict) -> None:
    """Appends one epoch's row (strict JSON, one line)."""
    row = files.strict(row)
    try:
      self._metrics.write(files.dumps(row) + "\n")
      self._metrics.flush()
    except OSError as e:  # a full disk: say which file
      raise OSError(e.errno, e.strerror, str(self.metrics_path)) from None
    self.rows.append(row)

  def write_config(self, config_json: dict) -> None:
    files.atomic_write_json(self.config_path, config_json)

  def write_summary(self, summary: dict) -> None:
    files.atomic_write_json(self.summary_path, summary)
