"""Writing files so that an interruption never leaves a half-written one behind, and JSON that
any reader accepts."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def _named(error: OSError, path: Path) -> OSError:
  """``error`` about ``path`` rather than about the temporary file it happened on."""
  if error.errno is None:
    return error
  return OSError(error.errno, error.strerror, str(path))  # PermissionError etc. by errno


def fsync_dir(path: str | os.PathLike) -> None:
  """Makes a rename in the folder ``path`` durable (where the system allows it)."""
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
  """Writes ``payload`` to ``path`` via a temporary file in the same folder and a rename.

  The file gets the permissions a plain ``open(path, "wb")`` would give it (``mkstemp`` alone
  would leave it readable by its owner only). An error (a full disk, a read-only folder) leaves
  the old file as it was, removes the temporary one and names ``path``.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  umask = os.umask(0)
  os.umask(umask)
  try:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  except OSError as e:
    raise _named(e, path) from None
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), 0o666 & ~umask)
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise _named(e, path) from None
    raise
  fsync_dir(path.parent)


def strict(obj):
  """``obj`` with no NaN or infinity left for JSON: each becomes ``null``, and the object holding
  it gets ``"nonfinite": {key: "nan" | "inf" | "-inf"}`` naming what it was (a list's are named
  by index). Strict parsers (``jq``, browsers, ``json.loads(…, parse_constant=…)``) read the
  result; Python's own ``json`` would otherwise write bare ``NaN`` and ``Infinity``."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    out, flags = {}, {}
    for key, value in obj.items():
      if isinstance(value, float) and not math.isfinite(value):
        flags[str(key)] = str(value)  # "nan", "inf", "-inf"
      out[key] = strict(value)
    if flags:
      out["nonfinite"] = {**out.get("nonfinite", {}), **flags}
    return out
  if isinstance(obj, (list, tuple)):
    return [strict(v) for v in obj]
  return obj


def dumps(obj, **kwargs) -> str:
  """``json.dumps`` of :func:`strict` ``(obj)``: valid JSON, never ``NaN`` or ``Infinity``."""
  return json.dumps(strict(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
  atomic_write_bytes(path, (dumps(obj, indent=2) + "\n").encode())
