"""d2l 1.0's code (the English edition, ``d2l/torch.py``, package 1.0.3), as the tests' reference.

Copied in substance from d2l 1.0, cut to what the deep-RNN section runs: ``Vocab``,
``TimeMachine``, ``GRU``, ``RNNLM`` (with ``RNNLMScratch``'s ``predict``), ``Classifier.loss``,
``Trainer.fit_epoch`` with ``clip_gradients``, and ``ProgressBoard.draw``'s averaging. Two changes
let a test drive it: ``TimeMachine`` takes the raw text instead of downloading it, and ``fit`` takes
each epoch's order of the training windows instead of drawing it from torch's global generator.
"""

from __future__ import annotations

import collections
import re

import torch
from torch import nn
from torch.nn import functional as F


class Vocab:
  """Vocabulary for text (d2l 1.0: ``<unk>`` and the tokens sorted together)."""

  def __init__(self, tokens=(), min_freq=0, reserved_tokens=()):
    tokens, reserved_tokens = list(tokens), list(reserved_tokens)
    if tokens and isinstance(tokens[0], list):
      tokens = [token for line in tokens for token in line]
    counter = collections.Counter(tokens)
    self.token_freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
    self.idx_to_token = list(sorted(set(["<unk>"] + reserved_tokens + [
        token for token, freq in self.token_freqs if freq >= min_freq])))
    self.token_to_idx = {token: idx for idx, token in enumerate(self.idx_to_token)}

  def __len__(self):
    return len(self.idx_to_token)

  def __getitem__(self, tokens):
    if not isinstance(tokens, (list, tuple)):
      return self.token_to_idx.get(tokens, self.unk)
    return [self.__getitem__(token) for token in tokens]

  @property
  def unk(self):
    return self.token_to_idx["<unk>"]


class TimeMachine:
  """The Time Machine dataset: every window of ``num_steps + 1`` characters."""

  def _preprocess(self, text):
    return re.sub("[^A-Za-z]+", " ", text).lower()

  def _tokenize(self, text):
    return list(text)

  def build(self, raw_text, vocab=None):
    tokens = self._tokenize(self._preprocess(raw_text))
    if vocab is None:
      vocab = Vocab(tokens)
    corpus = [vocab[token] for token in tokens]
    return corpus, vocab

  def __init__(self, raw_text, batch_size, num_steps, num_train=10000, num_val=5000):
    self.batch_size, self.num_steps = batch_size, num_steps
    self.num_train, self.num_val = num_train, num_val
    self.corpus, self.vocab = self.build(raw_text)
    array = torch.tensor([self.corpus[i:i + num_steps + 1]
                          for i in range(len(self.corpus) - num_steps)])
    self.X, self.Y = array[:, :-1], array[:, 1:]

  def tensors(self, train):
    """What ``get_dataloader(train)`` slices before its ``DataLoader``."""
    idx = (slice(0, self.num_train) if train else
           slice(self.num_train, self.num_train + self.num_val))
    return self.X[idx], self.Y[idx]


class GRU(nn.Module):
  """d2l 1.0's ``GRU``: an ``nn.GRU`` held as ``rnn``."""

  def __init__(self, num_inputs, num_hiddens, num_layers, dropout=0):
    super().__init__()
    self.num_hiddens = num_hiddens
    self.rnn = nn.GRU(num_inputs, num_hiddens, num_layers, dropout=dropout)

  def forward(self, inputs, H=None):
    return self.rnn(inputs, H)


class RNNLM(nn.Module):
  """d2l 1.0's ``RNNLM``: one-hot inputs, the recurrent layer, a ``LazyLinear`` head."""

  def __init__(self, rnn, vocab_size):
    super().__init__()
    self.rnn, self.vocab_size = rnn, vocab_size
    self.linear = nn.LazyLinear(vocab_size)

  def one_hot(self, X):
    return F.one_hot(X.T, self.vocab_size).type(torch.float32)

  def output_layer(self, hiddens):
    return torch.swapaxes(self.linear(hiddens), 0, 1)

  def forward(self, X, state=None):
    embs = self.one_hot(X)
    rnn_outputs, _ = self.rnn(embs, state)
    return self.output_layer(rnn_outputs)

  def loss(self, Y_hat, Y, averaged=True):
    Y_hat = Y_hat.reshape((-1, Y_hat.shape[-1]))
    Y = Y.reshape((-1,))
    return F.cross_entropy(Y_hat, Y, reduction="mean" if averaged else "none")

  def predict(self, prefix, num_preds, vocab):
    state, outputs = None, [vocab[prefix[0]]]
    for i in range(len(prefix) + num_preds - 1):
      X = torch.tensor([[outputs[-1]]])
      embs = self.one_hot(X)
      rnn_outputs, state = self.rnn(embs, state)
      if i < len(prefix) - 1:  # Warm-up period
        outputs.append(vocab[prefix[i + 1]])
      else:  # Predict num_preds steps
        Y = self.output_layer(rnn_outputs)
        outputs.append(int(Y.argmax(axis=2).reshape(1)))
    return "".join([vocab.idx_to_token[i] for i in outputs])


def clip_gradients(grad_clip_val, model):
  params = [p for p in model.parameters() if p.requires_grad]
  norm = torch.sqrt(sum(torch.sum((p.grad ** 2)) for p in params))
  if norm > grad_clip_val:
    for param in params:
      param.grad[:] *= grad_clip_val / norm


def draw(points: list, every_n: int) -> list:
  """``ProgressBoard.draw``'s line: the mean of every ``every_n`` consecutive points."""
  return [sum(points[i:i + every_n]) / every_n
          for i in range(0, len(points) - every_n + 1, every_n)]


def fit(model, data, lr, gradient_clip_val, orders, plot_train_per_epoch=2,
        plot_valid_per_epoch=1):
  """``Trainer.fit`` for ``len(orders)`` epochs, epoch ``e`` reading the training windows in the
  order ``orders[e]``; returns the board's lines ``(train_ppl, val_ppl)``, each point a mean of
  ``exp(loss)`` over minibatches (``RNNLMScratch.training_step``/``validation_step``)."""
  optim = torch.optim.SGD(model.parameters(), lr=lr)
  X_train, Y_train = data.tensors(train=True)
  X_val, Y_val = data.tensors(train=False)
  train_points, val_points = [], []
  num_train_batches = len(torch.arange(len(X_train)).split(data.batch_size))
  num_val_batches = len(torch.arange(len(X_val)).split(data.batch_size))
  for order in orders:
    model.train()
    for idx in torch.as_tensor(order).split(data.batch_size):
      loss = model.loss(model(X_train[idx]), Y_train[idx])
      train_points.append(float(torch.exp(loss.detach())))
      optim.zero_grad()
      with torch.no_grad():
        loss.backward()
        if gradient_clip_val > 0:
          clip_gradients(gradient_clip_val, model)
        optim.step()
    model.eval()
    for idx in torch.arange(len(X_val)).split(data.batch_size):
      with torch.no_grad():
        val_points.append(float(torch.exp(model.loss(model(X_val[idx]), Y_val[idx]))))
  return (draw(train_points, int(num_train_batches / plot_train_per_epoch)),
          draw(val_points, int(num_val_batches / plot_valid_per_epoch)))
