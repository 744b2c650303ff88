"""d2l 1.0's input pipeline (the English edition's ``TimeMachine``): every overlapping window.

d2l 1.0 (``d2l/torch.py``, package 1.0.3) cleans the whole text at once,
``re.sub('[^A-Za-z]+', ' ', text).lower()`` (a newline becomes a space, where the classic edition
strips each line and joins the lines with nothing), reads it as characters, sorts its vocabulary
(:meth:`~deeprnn_jax.text.vocab.Vocab.alphabetical`), and makes every window
``corpus[i : i + num_steps + 1]`` an example: the first ``num_train`` windows train, shuffled every
epoch by a ``DataLoader`` that keeps the last, smaller batch, and the next ``num_val`` validate, in
order. Every minibatch starts from a zero state.

Here every batch has ``batch_size`` rows, so that one compiled program runs the whole epoch: the
rows past the end of the last batch are padding, every label :data:`PAD`, which the loss leaves out
(:func:`deeprnn_jax.fit.training.masked_cross_entropy`). Randomness comes from an explicit
``numpy.random.Generator``, as in :mod:`deeprnn_jax.text.data`.
"""

from __future__ import annotations

import os
import re

import numpy as np

from deeprnn_jax.base import validate
from deeprnn_jax.base.errors import DataError
from deeprnn_jax.text.corpora import read_text, resolve_corpus
from deeprnn_jax.text.data import SeededLoader, first_tokens
from deeprnn_jax.text.vocab import Vocab

PAD = -1  # the label of a padding row's tokens


def clean_text(text: str) -> str:
  """d2l 1.0's cleaning of a whole text: runs of non-letters become one space, lower case."""
  return re.sub("[^A-Za-z]+", " ", text).lower()


def cleaned(text: str, clean: str = "d2l") -> str:
  """``text`` as d2l 1.0 reads it: :func:`clean_text` (``clean="d2l"``) or verbatim."""
  if clean == "d2l":
    return clean_text(text)
  validate.one_of("cleaning", clean, validate.CLEANINGS)
  return text


def load_corpus(path: str | os.PathLike, clean: str = "d2l",
                max_tokens: int = -1) -> tuple[np.ndarray, Vocab]:
  """d2l 1.0's ``TimeMachine.build``: ``(corpus <int32>[n], vocab)``, character tokens.

  The vocabulary is built from the whole text; ``max_tokens > 0`` then keeps the first
  ``max_tokens`` indices (d2l 1.0 keeps them all).
  """
  path = resolve_corpus(path)
  tokens = list(cleaned(read_text(path), clean))
  vocab = Vocab.alphabetical(tokens)
  corpus = np.asarray(vocab[tokens], dtype=np.int32).reshape(-1)
  return first_tokens(corpus, max_tokens, path), vocab


def windows(corpus: np.ndarray, num_steps: int) -> np.ndarray:
  """Every window ``corpus[i : i + num_steps + 1]``: ``<int32>[len(corpus) - num_steps,
  num_steps + 1]``, inputs ``[:, :-1]`` and labels ``[:, 1:]``."""
  validate.positive_int("number of steps", num_steps)
  corpus = np.asarray(corpus, dtype=np.int32)
  if len(corpus) <= num_steps:
    return np.zeros((0, num_steps + 1), np.int32)
  return np.lib.stride_tricks.sliding_window_view(corpus, num_steps + 1).copy()


def split(corpus: np.ndarray, num_steps: int, num_train: int,
          num_val: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``num_train`` windows and the next ``num_val``, each ``<int32>[n, steps + 1]``."""
  all_windows = windows(corpus, num_steps)
  if len(all_windows) < num_train + num_val:
    raise DataError(f"corpus has {len(corpus)} tokens, {len(all_windows)} windows of "
                    f"{num_steps + 1}: too few for {num_train} training and {num_val} validation "
                    "windows (lower the number of training or validation windows)")
  return all_windows[:num_train], all_windows[num_train:num_train + num_val]


def num_batches(num_windows: int, batch_size: int) -> int:
  """Minibatches of a ``DataLoader`` that keeps the last, smaller one."""
  return -(-num_windows // batch_size)


def batches(rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """``rows <int32>[n, steps + 1]`` cut into minibatches in order, the last one padded.

  Returns:
    ``(Xs, Ys)``, each ``<int32>[num_batches, batch_size, steps]``; the padding rows' labels are
    :data:`PAD` (their inputs 0).
  """
  validate.positive_int("batch size", batch_size)
  n, width = rows.shape
  size = num_batches(n, batch_size) * batch_size
  Xs = np.zeros((size, width - 1), np.int32)
  Ys = np.full((size, width - 1), PAD, np.int32)
  Xs[:n], Ys[:n] = rows[:, :-1], rows[:, 1:]
  shape = (-1, batch_size, width - 1)
  return Xs.reshape(shape), Ys.reshape(shape)


class WindowLoader(SeededLoader):
  """The training windows, reshuffled every epoch from its own generator (d2l 1.0's
  ``DataLoader(shuffle=True)``, ``drop_last=False``).

  The same interface as :class:`deeprnn_jax.text.data.SeqDataLoader`: :meth:`epoch` returns the
  whole epoch as ``(Xs, Ys)``, each ``<int32>[num_batches, batch, steps]``; ``rng_state`` can be
  saved and restored to resume the exact sequence of epochs.
  """

  def __init__(self, rows: np.ndarray, batch_size: int, seed=0):
    self.rows = np.asarray(rows, dtype=np.int32)
    self.batch_size = validate.positive_int("batch size", batch_size)
    if len(self.rows) == 0:
      raise DataError("no training windows")
    self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

  def epoch(self) -> tuple[np.ndarray, np.ndarray]:
    return batches(self.rows[self.rng.permutation(len(self.rows))], self.batch_size)

  def __iter__(self):
    return zip(*self.epoch())

  def epoch_shapes(self) -> list[tuple[int, int, int]]:
    """The one shape of :meth:`epoch`'s arrays, for compiling before training."""
    return [(num_batches(len(self.rows), self.batch_size), self.batch_size,
             self.rows.shape[1] - 1)]

  @property
  def num_tokens(self) -> int:
    """Tokens an epoch trains on (the padding left out)."""
    return self.rows.shape[0] * (self.rows.shape[1] - 1)
