"""The corpora: where they are found, how they are downloaded and verified, and how they are read.

A corpus is found, in order: an explicit path; ``$DEEPRNN_JAX_DATA/<name>``; ``data/<name>`` under
the working directory; else a known one (:data:`DATASETS`) is downloaded into ``data/`` and its
SHA-1 checked. Reading gives one clear :class:`~deeprnn_jax.base.errors.DataError` for a missing,
unreadable or non-UTF-8 file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import urllib.request
from pathlib import Path

from deeprnn_jax.base.errors import DataError
from deeprnn_jax.base.files import atomic_write_bytes

DATA_ENV = "DEEPRNN_JAX_DATA"


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A public corpus the project knows how to fetch and verify."""

  name: str
  url: str
  sha1: str
  size: int


DATASETS = {
    d.name: d
    for d in (
        Dataset(
            "timemachine.txt",
            "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
            "090b5e7e70c295757f55df93cb0a180b9691891a",
            178979,
        ),
        Dataset(
            "tinyshakespeare.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
            "tinyshakespeare/input.txt",
            "04486597058d11dcc2c556b1d0433891eb639d2e",
            1115394,
        ),
    )
}


def _sha1(path: Path) -> str:
  return hashlib.sha1(path.read_bytes()).hexdigest()


def _download(dataset: Dataset, dest: Path) -> None:
  dest.parent.mkdir(parents=True, exist_ok=True)
  with urllib.request.urlopen(dataset.url, timeout=30) as response:
    payload = response.read()
  digest = hashlib.sha1(payload).hexdigest()
  if digest != dataset.sha1:
    raise DataError(
        f"downloaded {dataset.name} has SHA-1 {digest}, expected {dataset.sha1}"
    )
  atomic_write_bytes(dest, payload)


def _kind(path: Path) -> str:
  """What a path that is neither a regular file nor a folder is."""
  mode = path.stat().st_mode
  kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
           (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
  return next((what for test, what in kinds if test(mode)), "a special file")


def resolve_corpus(name: str | os.PathLike, download: bool = True) -> Path:
  """Returns the path of a corpus file, downloading a known one if it is nowhere local.

  Args:
    name: a path to an existing file, or the name of a known dataset (``timemachine.txt``,
      ``tinyshakespeare.txt``).
    download: whether a known dataset that is found nowhere may be downloaded into ``data/``.
  """
  path = Path(name)
  if path.is_file():
    return path
  if path.is_dir():
    raise DataError(f"corpus path is a directory, not a file: {name}")
  if path.exists():  # a device, a pipe or a socket: its bytes may never end
    raise DataError(f"corpus path is {_kind(path)}, not a regular file: {name}")
  key = path.name
  if key not in DATASETS or path.parent != Path("."):
    raise DataError(f"corpus file not found: {name}")
  candidates = []
  if os.environ.get(DATA_ENV):
    candidates.append(Path(os.environ[DATA_ENV]) / key)
  candidates.append(Path("data") / key)
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  dataset = DATASETS[key]
  dest = Path("data") / key
  ways = (
      f"pass its path, put it in ${DATA_ENV}/{key}, or place it at data/{key} "
      f"(source: {dataset.url}, SHA-1 {dataset.sha1})"
  )
  if not download:
    raise DataError(f"{key} not found locally; {ways}")
  try:
    _download(dataset, dest)
  except DataError as e:
    raise DataError(f"{e}; {ways}") from None
  except OSError as e:
    raise DataError(f"could not download {key} ({e}); {ways}") from None
  return dest


def read_text(path: str | os.PathLike) -> str:
  """Reads a whole UTF-8 file, with a clear error for missing, unreadable or non-UTF-8 files."""
  path = Path(path)
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise DataError(f"corpus file not found: {path}") from None
  except IsADirectoryError:
    raise DataError(f"corpus path is a directory, not a file: {path}") from None
  except OSError as e:
    raise DataError(f"cannot read corpus file {path}: {e.strerror or e}") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}"
    ) from None
