"""d2l's own code, the second reference the tests hold the library to.

Copied from ``d2l/torch.py`` (classic edition) verbatim up to formatting, except where a function
says otherwise: where d2l draws from Python's global ``random`` the draw is passed in, a corpus is
read from a given path instead of ``d2l.download``, and the minibatch iterators yield NumPy arrays
instead of ``torch.tensor``. ``numpy_model.py`` beside it is the other reference: the model's
equations in NumPy.

* Data: ``read_time_machine``, ``tokenize``, ``count_corpus``, ``Vocab``,
  ``load_corpus_time_machine``, ``seq_data_iter_random``, ``seq_data_iter_sequential``.
* Training and prediction (PyTorch): ``RNNModel``, ``grad_clipping``, ``train_epoch_ch8``,
  ``train_ch8``, ``predict_ch8``; ``predict_ch8_flax`` is ``predict_ch8``'s loop calling a Flax
  model.
"""

from __future__ import annotations

import collections
import math
import re

import jax.numpy as jnp
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# --------------------------------------------------------------------------------------------
# Text, vocabulary, corpus.


def clean(line: str) -> str:
  """The cleaning ``read_time_machine`` applies to each line."""
  return re.sub("[^A-Za-z]+", " ", line).strip().lower()


def read_time_machine(path) -> list[str]:
  """d2l's ``read_time_machine``, from a given file."""
  with open(path, "r", encoding="utf-8") as f:
    lines = f.readlines()
  return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def tokenize(lines, token="word"):
  if token == "word":
    return [line.split() for line in lines]
  elif token == "char":
    return [list(line) for line in lines]
  else:
    print("ERROR: unknown token type: " + token)


def count_corpus(tokens):
  if len(tokens) == 0 or isinstance(tokens[0], list):
    tokens = [token for line in tokens for token in line]
  return collections.Counter(tokens)


class Vocab:
  """d2l's ``Vocab``."""

  def __init__(self, tokens=None, min_freq=0, reserved_tokens=None):
    if tokens is None:
      tokens = []
    if reserved_tokens is None:
      reserved_tokens = []
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

  def __len__(self):
    return len(self.idx_to_token)

  def __getitem__(self, tokens):
    if not isinstance(tokens, (list, tuple)):
      return self.token_to_idx.get(tokens, self.unk)
    return [self.__getitem__(token) for token in tokens]

  def to_tokens(self, indices):
    if not isinstance(indices, (list, tuple)):
      return self.idx_to_token[indices]
    return [self.idx_to_token[index] for index in indices]

  @property
  def unk(self):
    return 0

  @property
  def token_freqs(self):
    return self._token_freqs


def load_corpus_time_machine(path, max_tokens=-1):
  """d2l's ``load_corpus_time_machine``, from a given file."""
  lines = read_time_machine(path)
  tokens = tokenize(lines, "char")
  vocab = Vocab(tokens)
  corpus = [vocab[token] for line in tokens for token in line]
  if max_tokens > 0:
    corpus = corpus[:max_tokens]
  return corpus, vocab


# --------------------------------------------------------------------------------------------
# Minibatch iterators: the random draws passed in, NumPy arrays for torch.tensor.


def seq_data_iter_random(corpus, batch_size, num_steps, offset, shuffle):
  """``offset`` is d2l's ``random.randint(0, num_steps - 1)``, ``shuffle`` its
  ``random.shuffle``."""
  corpus = corpus[offset:]
  num_subseqs = (len(corpus) - 1) // num_steps
  initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
  shuffle(initial_indices)

  def data(pos):
    return corpus[pos: pos + num_steps]

  num_batches = num_subseqs // batch_size
  for i in range(0, batch_size * num_batches, batch_size):
    initial_indices_per_batch = initial_indices[i: i + batch_size]
    X = [data(j) for j in initial_indices_per_batch]
    Y = [data(j + 1) for j in initial_indices_per_batch]
    yield np.array(X), np.array(Y)


def seq_data_iter_sequential(corpus, batch_size, num_steps, offset):
  """``offset`` is d2l's ``random.randint(0, num_steps)``."""
  num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
  Xs = np.array(corpus[offset: offset + num_tokens])
  Ys = np.array(corpus[offset + 1: offset + 1 + num_tokens])
  Xs, Ys = Xs.reshape(batch_size, -1), Ys.reshape(batch_size, -1)
  num_batches = Xs.shape[1] // num_steps
  for i in range(0, num_steps * num_batches, num_steps):
    X = Xs[:, i: i + num_steps]
    Y = Ys[:, i: i + num_steps]
    yield X, Y


def num_batches(n, batch_size, num_steps, offset, use_random_iter):
  """How many minibatches the two iterators above yield for ``n`` tokens and an offset (their
  ``num_batches``, written out)."""
  if use_random_iter:
    return ((n - offset - 1) // num_steps) // batch_size
  return (n - offset - 1) // batch_size // num_steps  # batch_size rows, cut in num_steps windows


# --------------------------------------------------------------------------------------------
# The model, training and prediction, in PyTorch.


class RNNModel(nn.Module):
  """d2l's ``RNNModel``: one-hot inputs, an ``nn.RNN/GRU/LSTM``, an ``nn.Linear`` head."""

  def __init__(self, rnn_layer, vocab_size, **kwargs):
    super(RNNModel, self).__init__(**kwargs)
    self.rnn = rnn_layer
    self.vocab_size = vocab_size
    self.num_hiddens = self.rnn.hidden_size
    if not self.rnn.bidirectional:
      self.num_directions = 1
      self.linear = nn.Linear(self.num_hiddens, self.vocab_size)
    else:
      self.num_directions = 2
      self.linear = nn.Linear(self.num_hiddens * 2, self.vocab_size)

  def forward(self, inputs, state):
    X = F.one_hot(inputs.T.long(), self.vocab_size)
    X = X.to(torch.float32)
    Y, state = self.rnn(X, state)
    # Time-major: row t * batch + b is step t of sequence b.
    output = self.linear(Y.reshape((-1, Y.shape[-1])))
    return output, state

  def begin_state(self, device, batch_size=1):
    if not isinstance(self.rnn, nn.LSTM):
      return torch.zeros((self.num_directions * self.rnn.num_layers, batch_size,
                          self.num_hiddens), device=device)
    else:
      return (torch.zeros((self.num_directions * self.rnn.num_layers, batch_size,
                           self.num_hiddens), device=device),
              torch.zeros((self.num_directions * self.rnn.num_layers, batch_size,
                           self.num_hiddens), device=device))


def grad_clipping(net, theta):
  """Clips the gradients' global norm to ``theta``: of an ``nn.Module``'s parameters, or of
  ``net.params`` (d2l's from-scratch model, a list of tensors)."""
  if isinstance(net, nn.Module):
    params = [p for p in net.parameters() if p.requires_grad]
  else:
    params = net.params
  norm = torch.sqrt(sum(torch.sum((p.grad ** 2)) for p in params))
  if norm > theta:
    for param in params:
      param.grad[:] *= theta / norm


def train_epoch_ch8(net, train_iter, loss, updater, device, use_random_iter):
  """d2l's epoch over ``train_iter``'s ``(X, Y)`` minibatches (an ``nn.Module`` and a
  ``torch.optim`` updater); returns the epoch's perplexity (d2l also returns a speed)."""
  state = None
  total, count = 0.0, 0  # d2l's Accumulator(2)
  for X, Y in train_iter:
    if state is None or use_random_iter:
      state = net.begin_state(batch_size=X.shape[0], device=device)
    else:
      if isinstance(net, nn.Module) and not isinstance(state, tuple):
        state.detach_()
      else:
        for s in state:
          s.detach_()
    y = Y.T.reshape(-1)
    X, y = X.to(device), y.to(device)
    y_hat, state = net(X, state)
    l = loss(y_hat, y.long()).mean()
    updater.zero_grad()
    l.backward()
    grad_clipping(net, 1)
    updater.step()
    total, count = total + l.item() * y.numel(), count + y.numel()
  return math.exp(total / count)


def train_ch8(net, epochs, lr, device, use_random_iter=False):
  """d2l's ``train_ch8`` without its plots and prints: SGD with learning rate ``lr``, one
  ``train_epoch_ch8`` per item of ``epochs`` (each an epoch's minibatches, as d2l's
  ``train_iter`` gives them anew every epoch). Returns the perplexity of every epoch."""
  loss = nn.CrossEntropyLoss()
  updater = torch.optim.SGD(net.parameters(), lr)
  return [train_epoch_ch8(net, train_iter, loss, updater, device, use_random_iter)
          for train_iter in epochs]


def predict_ch8(prefix, num_preds, net, vocab, device):
  state = net.begin_state(batch_size=1, device=device)
  outputs = [vocab[prefix[0]]]
  get_input = lambda: torch.tensor([outputs[-1]], device=device).reshape((1, 1))
  for y in prefix[1:]:  # Warm-up period
    _, state = net(get_input(), state)
    outputs.append(vocab[y])
  for _ in range(num_preds):  # Predict num_preds steps
    y, state = net(get_input(), state)
    outputs.append(int(y.argmax(dim=1).reshape(1)))
  return "".join([vocab.idx_to_token[i] for i in outputs])


def predict_ch8_flax(prefix, num_preds, model, params, vocab):
  """``predict_ch8``'s loop with a Flax ``RNNLM``: one model call per character."""
  state = model.begin_state(1)
  outputs = [vocab[prefix[0]]]
  get_input = lambda: jnp.array([[outputs[-1]]], jnp.int32)
  for y in prefix[1:]:
    _, state = model.apply({"params": params}, get_input(), state)
    outputs.append(vocab[y])
  for _ in range(num_preds):
    y, state = model.apply({"params": params}, get_input(), state)
    outputs.append(int(y[0, -1].argmax()))
  return "".join(vocab.idx_to_token[i] for i in outputs)
