"""A run's text: the corpus read and split as its d2l edition does, and the prefixes its lines
continue.

The classic edition partitions the text (:mod:`deeprnn_jax.data`); d2l 1.0 reads every window of
it (``pipeline="windows"``, :mod:`deeprnn_jax.windows`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from deeprnn_jax import data, windows
from deeprnn_jax.config import TrainConfig
from deeprnn_jax.errors import UsageError


class Text(NamedTuple):
  """A run's corpus ``<int32>[n]`` and vocabulary, and its training and validation tokens (or,
  d2l 1.0's, windows ``<int32>[n, num_steps + 1]``)."""

  corpus: np.ndarray
  vocab: data.Vocab
  train: np.ndarray
  valid: np.ndarray


def load_text(config: TrainConfig) -> Text:
  if config.pipeline == "windows":  # train and valid: windows <int32>[n, num_steps + 1]
    corpus, vocab = windows.load_corpus(config.corpus, config.clean, config.max_tokens)
    return Text(corpus, vocab, *windows.split(corpus, config.num_steps, config.num_train,
                                              config.num_val))
  corpus, vocab = data.load_corpus(config.corpus, clean=config.clean, max_tokens=config.max_tokens)
  train, valid = data.split_corpus(corpus, config.valid_fraction)
  if config.valid_fraction > 0 and len(valid) < 2:
    raise UsageError(f"valid fraction {config.valid_fraction} leaves fewer than 2 tokens "
                     f"of {len(corpus)} for validation")
  return Text(corpus, vocab, train, valid)


def default_prefixes(config: TrainConfig, corpus: np.ndarray | Callable[[], np.ndarray],
                     vocab: data.Vocab) -> tuple[str, str]:
  """d2l's ``time traveller`` and ``traveller``; the first two words of any other corpus
  (``corpus``: its tokens, or a function loading them, called only for such a corpus)."""
  if Path(config.corpus).name == "timemachine.txt" and config.clean == "d2l":
    if config.pipeline == "windows":
      return "it has", "it has"  # d2l 1.0's model.predict('it has', 20, data.vocab)
    return "time traveller", "traveller"
  corpus = corpus() if callable(corpus) else corpus
  words = "".join(vocab.to_tokens([int(i) for i in corpus[:200]])).split()
  if not words:
    return (vocab.to_tokens(int(corpus[0])),) * 2
  first = " ".join(words[:2])
  return first, words[1] if len(words) > 1 else words[0]


def prediction_length(config: TrainConfig) -> int:
  """The characters a logged epoch predicts: d2l's 50, d2l 1.0's 20."""
  return 20 if config.pipeline == "windows" else 50


def evaluation_rows(text: Text) -> int:
  """Rows of >= 10k validation tokens, read in parallel."""
  return max(1, len(text.valid) // 10_000)
