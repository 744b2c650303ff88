"""Corpora, vocabulary and minibatch iterators with d2l's semantics.

Everything here mirrors ``d2l/torch.py`` (classic edition) so that a corpus, a vocabulary and a
sequence of minibatches built here are the ones d2l builds, except that randomness comes from an
explicit ``numpy.random.Generator`` instead of Python's global ``random`` module.

Corpus files are found, in order: an explicit path; ``$DEEPRNN_JAX_DATA/<name>``;
``data/<name>`` under the working directory; else they are downloaded into ``data/`` and checked
against their SHA-1.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import re
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from deeprnn_jax.errors import UsageError
from deeprnn_jax.files import atomic_write_bytes

DATA_ENV = "DEEPRNN_JAX_DATA"
CLEANINGS = ("d2l", "none")


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


class DataError(UsageError):
  """A corpus that cannot be found, read, decoded or used as asked."""


# --------------------------------------------------------------------------------------------
# Finding and reading files.


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
  key = path.name
  if path.is_dir():
    raise DataError(f"corpus {name} is a directory; give a text file")
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


def _readlines(text: str) -> list[str]:
  # Split exactly as open(...).readlines() does in text mode (universal newlines).
  return io.StringIO(text, newline=None).readlines()


def clean_line(line: str) -> str:
  """d2l's cleaning: letters only, runs of anything else become one space, lower case."""
  return re.sub("[^A-Za-z]+", " ", line).strip().lower()


def read_lines(path: str | os.PathLike, clean: str = "d2l") -> list[str]:
  """Reads a corpus as lines: d2l-cleaned (``clean="d2l"``) or verbatim with newlines."""
  text = read_text(path)
  if clean == "d2l":
    return [clean_line(line) for line in _readlines(text)]
  if clean == "none":
    return _readlines(text)
  raise DataError(f"unknown cleaning {clean!r}; choose one of {CLEANINGS}")


def read_time_machine() -> list[str]:
  """The Time Machine, one d2l-cleaned string per line of the file."""
  return read_lines(resolve_corpus("timemachine.txt"), clean="d2l")


def tokenize(lines: Sequence[str], token: str = "char") -> list[list[str]]:
  """Splits each line into word or character tokens."""
  if token == "word":
    return [line.split() for line in lines]
  if token == "char":
    return [list(line) for line in lines]
  raise DataError(f"unknown token type {token!r}; choose 'char' or 'word'")


# --------------------------------------------------------------------------------------------
# Vocabulary.


def count_corpus(tokens) -> collections.Counter:
  """Counts tokens in a flat list or a list of token lists."""
  if len(tokens) == 0 or isinstance(tokens[0], list):
    tokens = [token for line in tokens for token in line]
  return collections.Counter(tokens)


class Vocab:
  """Token <-> index maps: ``<unk>`` at 0, reserved tokens, then tokens by descending count.

  Ties keep the order of first appearance, as d2l's stable sort of a ``Counter`` does.
  """

  def __init__(self, tokens=None, min_freq: int = 0, reserved_tokens=None):
    tokens = [] if tokens is None else tokens
    reserved_tokens = [] if reserved_tokens is None else list(reserved_tokens)
    counter = count_corpus(tokens)
    self._token_freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
    self.idx_to_token = ["<unk>"] + reserved_tokens
    self.token_to_idx = {token: idx for idx, token in enumerate(self.idx_to_token)}
    for token, freq in self._token_freqs:
      if freq < min_freq:
        break
      if token not in self.token_to_idx:
        self.idx_to_token.append(token)
        self.token_to_idx[token] = len(self.idx_to_token) - 1

  def __len__(self) -> int:
    return len(self.idx_to_token)

  def __getitem__(self, tokens):
    if not isinstance(tokens, (list, tuple)):
      return self.token_to_idx.get(tokens, self.unk)
    return [self.__getitem__(token) for token in tokens]

  def to_tokens(self, indices):
    if not isinstance(indices, (list, tuple)):
      return self.idx_to_token[int(indices)]
    return [self.idx_to_token[int(index)] for index in indices]

  @property
  def unk(self) -> int:
    return 0

  @property
  def token_freqs(self) -> list[tuple[str, int]]:
    return self._token_freqs

  def to_json(self) -> list[str]:
    return list(self.idx_to_token)

  @classmethod
  def from_tokens_list(cls, idx_to_token: Sequence[str]) -> "Vocab":
    """Rebuilds a vocabulary from its ``idx_to_token`` list (as saved in a checkpoint)."""
    if not idx_to_token or idx_to_token[0] != "<unk>":
      raise DataError("a saved vocabulary must start with '<unk>'")
    vocab = cls()
    vocab.idx_to_token = list(idx_to_token)
    vocab.token_to_idx = {t: i for i, t in enumerate(vocab.idx_to_token)}
    return vocab


# --------------------------------------------------------------------------------------------
# Corpora.


def load_corpus(
    path: str | os.PathLike,
    token: str = "char",
    clean: str = "d2l",
    max_tokens: int = -1,
) -> tuple[np.ndarray, Vocab]:
  """Reads a text file into ``(corpus <int32>[n], vocab)``.

  The vocabulary is built from the whole file; ``max_tokens > 0`` then keeps the first
  ``max_tokens`` indices, as d2l does.
  """
  path = resolve_corpus(path)
  lines = read_lines(path, clean=clean)
  tokens = tokenize(lines, token)
  vocab = Vocab(tokens)
  corpus = np.fromiter(
      (vocab.token_to_idx[t] for line in tokens for t in line), dtype=np.int32
  )
  if max_tokens > 0:
    corpus = corpus[:max_tokens]
  if corpus.size == 0:
    what = "is empty" if path.stat().st_size == 0 else "has no tokens left after cleaning"
    raise DataError(f"corpus {path} {what}")
  return corpus, vocab


def load_corpus_time_machine(max_tokens: int = -1) -> tuple[np.ndarray, Vocab]:
  """The Time Machine as character indices: 28 tokens, 170,580 of them in full."""
  return load_corpus("timemachine.txt", token="char", clean="d2l", max_tokens=max_tokens)


def check_valid_fraction(valid_fraction: float) -> None:
  if not 0.0 <= valid_fraction < 1.0:
    raise DataError(f"valid fraction must be in [0, 1), got {valid_fraction}")


def split_corpus(corpus: np.ndarray, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits off the contiguous tail ``valid_fraction`` of a corpus for validation."""
  check_valid_fraction(valid_fraction)
  num_valid = int(round(len(corpus) * valid_fraction))
  return corpus[: len(corpus) - num_valid], corpus[len(corpus) - num_valid :]


# --------------------------------------------------------------------------------------------
# Minibatches.


def min_corpus_tokens(batch_size: int, num_steps: int, use_random_iter: bool = False) -> int:
  """The fewest tokens that give at least one minibatch for every random offset."""
  if use_random_iter:  # offset <= num_steps - 1, batch_size subsequences plus one target.
    return batch_size * num_steps + num_steps
  return batch_size * num_steps + num_steps + 1  # offset <= num_steps


def check_corpus_size(
    corpus: np.ndarray, batch_size: int, num_steps: int, use_random_iter: bool = False
) -> None:
  if batch_size < 1 or num_steps < 1:
    raise DataError(f"batch size and steps must be >= 1, got {batch_size} and {num_steps}")
  need = min_corpus_tokens(batch_size, num_steps, use_random_iter)
  if len(corpus) < need:
    raise DataError(
        f"corpus has {len(corpus)} tokens, too few for one minibatch of batch size "
        f"{batch_size} and {num_steps} steps: at least {need} are needed"
    )


def _as_rng(seed) -> np.random.Generator:
  return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _num_offsets(num_steps: int, use_random_iter: bool) -> int:
  """An epoch starts at a random offset in ``[0, num_steps]`` (sequential, as d2l) or
  ``[0, num_steps - 1]`` (random)."""
  return num_steps if use_random_iter else num_steps + 1


def _num_batches(num_tokens: int, batch_size: int, num_steps: int, offset: int,
                 use_random_iter: bool) -> int:
  """Minibatches in an epoch of a ``num_tokens`` corpus starting at ``offset``."""
  if use_random_iter:  # whole subsequences of the text after the offset, batch_size at a time
    return (num_tokens - offset - 1) // num_steps // batch_size
  return (num_tokens - offset - 1) // batch_size // num_steps  # batch_size rows, cut in windows


def sequential_epoch(
    corpus: np.ndarray, batch_size: int, num_steps: int, seed=None
) -> tuple[np.ndarray, np.ndarray]:
  """One epoch of sequential partitioning.

  Row ``b`` of minibatch ``i + 1`` continues row ``b`` of minibatch ``i``, so a hidden state
  can be carried across minibatches.

  Returns:
    ``(Xs, Ys)``, each ``<int32>[num_batches, batch_size, num_steps]``, ``Ys`` = ``Xs`` shifted
    by one token.
  """
  check_corpus_size(corpus, batch_size, num_steps, use_random_iter=False)
  corpus = np.asarray(corpus, dtype=np.int32)
  offset = int(_as_rng(seed).integers(0, _num_offsets(num_steps, False)))
  num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
  xs = corpus[offset : offset + num_tokens].reshape(batch_size, -1)
  ys = corpus[offset + 1 : offset + 1 + num_tokens].reshape(batch_size, -1)
  num_batches = _num_batches(len(corpus), batch_size, num_steps, offset, False)
  shape = (batch_size, num_batches, num_steps)
  xs = xs[:, : num_batches * num_steps].reshape(shape).transpose(1, 0, 2)
  ys = ys[:, : num_batches * num_steps].reshape(shape).transpose(1, 0, 2)
  return np.ascontiguousarray(xs), np.ascontiguousarray(ys)


def random_epoch(
    corpus: np.ndarray, batch_size: int, num_steps: int, seed=None
) -> tuple[np.ndarray, np.ndarray]:
  """One epoch of random partitioning: shuffled, non-overlapping subsequences.

  Returns:
    ``(Xs, Ys)``, each ``<int32>[num_batches, batch_size, num_steps]``.
  """
  check_corpus_size(corpus, batch_size, num_steps, use_random_iter=True)
  rng = _as_rng(seed)
  offset = int(rng.integers(0, _num_offsets(num_steps, True)))
  num_batches = _num_batches(len(corpus), batch_size, num_steps, offset, True)
  corpus = np.asarray(corpus, dtype=np.int32)[offset:]
  num_subseqs = (len(corpus) - 1) // num_steps
  starts = np.arange(0, num_subseqs * num_steps, num_steps)
  rng.shuffle(starts)
  starts = starts[: num_batches * batch_size].reshape(num_batches, batch_size)
  window = starts[..., None] + np.arange(num_steps)
  return corpus[window], corpus[window + 1]


def seq_data_iter_sequential(
    corpus, batch_size: int, num_steps: int, seed=None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(X, Y)`` minibatches ``<int32>[batch, steps]`` by sequential partitioning."""
  yield from zip(*sequential_epoch(corpus, batch_size, num_steps, seed))


def seq_data_iter_random(
    corpus, batch_size: int, num_steps: int, seed=None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(X, Y)`` minibatches ``<int32>[batch, steps]`` by random partitioning."""
  yield from zip(*random_epoch(corpus, batch_size, num_steps, seed))


class SeqDataLoader:
  """Draws a new random offset (and order) every epoch from its own generator.

  Iterating yields ``(X, Y)`` minibatches; :meth:`epoch` returns the whole epoch as arrays
  ``<int32>[num_batches, batch, steps]`` for scanning on device. ``rng_state`` can be saved
  and restored to resume the exact sequence of epochs.
  """

  def __init__(
      self, corpus, batch_size: int, num_steps: int, use_random_iter: bool = False, seed=0
  ):
    self.corpus = np.asarray(corpus, dtype=np.int32)
    self.batch_size, self.num_steps = batch_size, num_steps
    self.use_random_iter = use_random_iter
    check_corpus_size(self.corpus, batch_size, num_steps, use_random_iter)
    self.rng = _as_rng(seed)

  def epoch(self) -> tuple[np.ndarray, np.ndarray]:
    fn = random_epoch if self.use_random_iter else sequential_epoch
    return fn(self.corpus, self.batch_size, self.num_steps, self.rng)

  def __iter__(self):
    return zip(*self.epoch())

  def epoch_shapes(self) -> list[tuple[int, int, int]]:
    """Every shape :meth:`epoch`'s arrays can have: ``num_batches`` depends on the epoch's
    random offset, so a corpus may give two. For compiling them all before training."""
    B, T, random_iter = self.batch_size, self.num_steps, self.use_random_iter
    return sorted({(_num_batches(len(self.corpus), B, T, offset, random_iter), B, T)
                   for offset in range(_num_offsets(T, random_iter))})

  @property
  def rng_state(self) -> dict:
    return self.rng.bit_generator.state

  @rng_state.setter
  def rng_state(self, state: dict) -> None:
    self.rng.bit_generator.state = state


def load_data_time_machine(
    batch_size: int,
    num_steps: int,
    use_random_iter: bool = False,
    max_tokens: int = 10000,
    seed=0,
) -> tuple[SeqDataLoader, Vocab]:
  """d2l's ``load_data_time_machine``: a minibatch loader over The Time Machine and its vocab."""
  corpus, vocab = load_corpus_time_machine(max_tokens)
  return SeqDataLoader(corpus, batch_size, num_steps, use_random_iter, seed), vocab
