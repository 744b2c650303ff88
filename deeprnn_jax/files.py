"""Writing files so that an interruption never leaves a half-written one behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
  """Writes ``payload`` to ``path`` via a temporary file in the same folder and a rename.

  The file gets the permissions a plain ``open(path, "wb")`` would give it (``mkstemp`` alone
  would leave it readable by its owner only).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  umask = os.umask(0)
  os.umask(umask)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), 0o666 & ~umask)
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
