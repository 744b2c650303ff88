"""The vocabulary: tokens to indices and back, built as d2l's ``Vocab``.

The classic edition orders tokens by descending count after ``<unk>`` (:class:`Vocab`); d2l 1.0
sorts ``<unk>`` and the tokens together (:meth:`Vocab.alphabetical`), so there ``<unk>`` comes
after the space.
"""

from __future__ import annotations

import collections
from typing import Sequence

from deeprnn_jax.base.errors import DataError


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
    return self.token_to_idx["<unk>"]

  @property
  def token_freqs(self) -> list[tuple[str, int]]:
    return self._token_freqs

  def to_json(self) -> list[str]:
    return list(self.idx_to_token)

  @classmethod
  def alphabetical(cls, tokens) -> "Vocab":
    """d2l 1.0's ``Vocab``: ``sorted(set(['<unk>'] + tokens))``, so characters by code point,
    ``' '`` before ``'<unk>'`` before ``'a'``."""
    vocab = cls(tokens)
    return cls.from_tokens_list(sorted(set(vocab.idx_to_token)), vocab.token_freqs)

  @classmethod
  def from_tokens_list(cls, idx_to_token: Sequence[str],
                       token_freqs: list[tuple[str, int]] | None = None) -> "Vocab":
    """Rebuilds a vocabulary from its ``idx_to_token`` list (as saved in a checkpoint)."""
    if "<unk>" not in idx_to_token:
      raise DataError("a saved vocabulary must hold '<unk>'")
    if len(set(idx_to_token)) != len(idx_to_token):
      raise DataError("a saved vocabulary must not repeat a token")
    vocab = cls()
    vocab._token_freqs = list(token_freqs or [])
    vocab.idx_to_token = list(idx_to_token)
    vocab.token_to_idx = {t: i for i, t in enumerate(vocab.idx_to_token)}
    return vocab
