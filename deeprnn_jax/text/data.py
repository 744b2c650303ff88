"""d2l's input pipeline: cleaning, tokens, the corpus as indices, and minibatch iterators.

Everything here mirrors ``d2l/torch.py`` (classic edition) so that a corpus, a vocabulary and a
sequence of minibatches built here are the ones d2l builds, except that randomness comes from an
explicit ``numpy.random.Generator`` instead of Python's global ``random`` module. Finding and
reading the files is :mod:`deeprnn_jax.text.corpora`'s; the vocabulary is
:mod:`deeprnn_jax.text.vocab`'s.
"""

from __future__ import annotations

import io
import os
import re
from typing import Iterator, Sequence

import numpy as np

from deeprnn_jax.base import validate
from deeprnn_jax.base.errors import DataError
from deeprnn_jax.text.corpora import read_text, resolve_corpus
from deeprnn_jax.text.vocab import Vocab


def _readlines(text: str) -> list[str]:
  # Split exactly as open(...).readlines() does in text mode (universal newlines).
  return io.StringIO(text, newline=None).readlines()


def clean_line(line: str) -> str:
  """d2l's cleaning: letters only, runs of anything else become one space, lower case."""
  return re.sub("[^A-Za-z]+", " ", line).strip().lower()


def clean_lines(text: str, clean: str = "d2l") -> list[str]:
  """``text``'s lines: d2l-cleaned (``clean="d2l"``) or verbatim with newlines."""
  if clean == "d2l":
    return [clean_line(line) for line in _readlines(text)]
  validate.one_of("cleaning", clean, validate.CLEANINGS)
  return _readlines(text)


def read_lines(path: str | os.PathLike, clean: str = "d2l") -> list[str]:
  """Reads a corpus as lines: d2l-cleaned (``clean="d2l"``) or verbatim with newlines."""
  return clean_lines(read_text(path), clean)


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
  return first_tokens(corpus, max_tokens, path), vocab


def first_tokens(corpus: np.ndarray, max_tokens: int, path) -> np.ndarray:
  """The first ``max_tokens`` of ``corpus`` (all of it for ``max_tokens <= 0``); a
  :class:`DataError` naming ``path`` where none are left."""
  if max_tokens > 0:
    corpus = corpus[:max_tokens]
  if corpus.size == 0:
    what = "is empty" if path.stat().st_size == 0 else "has no tokens left after cleaning"
    raise DataError(f"corpus {path} {what}")
  return corpus


def load_corpus_time_machine(max_tokens: int = -1) -> tuple[np.ndarray, Vocab]:
  """The Time Machine as character indices: 28 tokens, 170,580 of them in full."""
  return load_corpus("timemachine.txt", token="char", clean="d2l", max_tokens=max_tokens)


def split_corpus(corpus: np.ndarray, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits off the contiguous tail ``valid_fraction`` of a corpus for validation."""
  validate.fraction("valid fraction", valid_fraction)
  num_valid = int(round(len(corpus) * valid_fraction))
  return corpus[: len(corpus) - num_valid], corpus[len(corpus) - num_valid :]


def min_corpus_tokens(batch_size: int, num_steps: int, use_random_iter: bool = False) -> int:
  """The fewest tokens that give at least one minibatch for every random offset."""
  if use_random_iter:  # offset <= num_steps - 1, batch_size subsequences plus one target.
    return batch_size * num_steps + num_steps
  return batch_size * num_steps + num_steps + 1  # offset <= num_steps


def check_corpus_size(
    corpus: np.ndarray, batch_size: int, num_steps: int, use_random_iter: bool = False
) -> None:
  validate.positive_int("batch size", batch_size)
  validate.positive_int("number of steps", num_steps)
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


class SeededLoader:
  """A loader that draws its epochs from its own generator, ``self.rng``, whose ``rng_state``
  is saved in a checkpoint and restored to resume the exact sequence of epochs."""

  rng: np.random.Generator

  @property
  def rng_state(self) -> dict:
    return self.rng.bit_generator.state

  @rng_state.setter
  def rng_state(self, state: dict) -> None:
    self.rng.bit_generator.state = state

  def epoch_shapes(self) -> list[tuple[int, int, int]]:
    raise NotImplementedError

  @property
  def max_batches(self) -> int:
    """The most minibatches an epoch can have (an epoch's random offset may leave one fewer)."""
    return max(shape[0] for shape in self.epoch_shapes())


class SeqDataLoader(SeededLoader):
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
