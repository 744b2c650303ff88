"""The two editions of d2l's chapter, each as its book reads, batches, scores and predicts.

A run asks its edition (:func:`edition`, from ``TrainConfig.pipeline``) and nothing else for what
the two books do differently:

* :class:`Classic` (``pipeline="classic"``, d2l's classic edition, ``d2l/torch.py``): the text
  cleaned line by line and partitioned (:mod:`deeprnn_jax.text.data`), minibatches that carry their
  state (sequential partitioning), the perplexity of the epoch's mean loss, validation where an
  epoch is logged, 50 characters after ``time traveller`` and ``traveller``, and PyTorch's
  ``RNNModel`` (``rnn.*`` keys).
* :class:`D2L10` (``pipeline="windows"``, d2l 1.0, the English edition): every overlapping window
  (:mod:`deeprnn_jax.text.windows`), each minibatch from a zero state with padding labels left out,
  the perplexities its ``ProgressBoard`` plots, validation every epoch, 20 characters after
  ``it has``, and ``RNNLM`` (``rnn.rnn.*`` keys).

d2l 1.0's ``RNNLMScratch.training_step`` and ``validation_step`` plot ``exp(loss)`` of each
minibatch, its mean cross-entropy per token; the board draws the mean of every
``num_batches / 2`` training points (two an epoch) and of all the validation points (one an
epoch). Every minibatch counts once, however many rows it holds (the last is smaller). An epoch's
training perplexity here is the mean over all its minibatches: the mean of its two points.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import jax
import numpy as np

from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import scoring, training
from deeprnn_jax.model import interop
from deeprnn_jax.model.models import RNNLM
from deeprnn_jax.text import data, windows


class Text(NamedTuple):
  """A run's corpus ``<int32>[n]`` and vocabulary, and its training and validation tokens (or,
  d2l 1.0's, windows ``<int32>[n, num_steps + 1]``)."""

  corpus: np.ndarray
  vocab: data.Vocab
  train: np.ndarray
  valid: np.ndarray


def _first_words(config: TrainConfig, corpus, vocab) -> tuple[str, str] | None:
  """The first two words of a corpus other than d2l's, and the second alone (``None`` for The
  Time Machine as d2l cleans it, whose prefixes are the edition's)."""
  if Path(config.corpus).name == "timemachine.txt" and config.clean == "d2l":
    return None
  corpus = corpus() if callable(corpus) else corpus
  words = "".join(vocab.to_tokens([int(i) for i in corpus[:200]])).split()
  if not words:
    return (vocab.to_tokens(int(corpus[0])),) * 2
  return " ".join(words[:2]), words[1] if len(words) > 1 else words[0]


@dataclasses.dataclass(frozen=True)
class Classic:
  """d2l's classic edition (``d2l/torch.py``)."""

  name: str = "classic"
  masked: bool = False  # minibatches carry their state; no padding labels
  prediction_length: int = 50  # train_ch8's predict('time traveller')
  final_predictions: int = 2  # train_ch8 ends with 'time traveller' and 'traveller'
  validates_every_epoch: bool = False

  def load_text(self, config: TrainConfig) -> Text:
    corpus, vocab = data.load_corpus(config.corpus, clean=config.clean,
                                     max_tokens=config.max_tokens)
    train, valid = data.split_corpus(corpus, config.valid_fraction)
    if config.valid_fraction > 0 and len(valid) < 2:
      raise UsageError(f"valid fraction {config.valid_fraction} leaves fewer than 2 tokens "
                       f"of {len(corpus)} for validation")
    return Text(corpus, vocab, train, valid)

  def clean(self, text: str, clean: str) -> str:
    """``text`` cleaned as this edition cleans its corpus (``--clean``): each line d2l-cleaned
    (:func:`~deeprnn_jax.text.data.clean_line`), the lines joined, as the corpus's are."""
    return "".join(data.clean_lines(text, clean))

  def characters(self, path, config: TrainConfig) -> list[str]:
    """A text file's tokens as this edition cleans and reads a corpus (:meth:`clean`)."""
    return list(self.clean(data.read_text(path), config.clean))

  def encode_file(self, path, vocab: data.Vocab, config: TrainConfig) -> np.ndarray:
    """A text file as a stream ``<int32>[n]`` of ``vocab``'s tokens, cleaned as the run's corpus
    was. Raises :class:`UsageError` for characters the vocabulary lacks, naming them: they
    would be scored as ``<unk>``."""
    tokens = self.characters(path, config)
    if not tokens:
      raise UsageError(f"{path} has no characters left after cleaning ({config.clean!r})")
    missing = sorted(set(tokens) - set(vocab.token_to_idx))
    if missing:
      shown = "".join(missing[:20]) + ("…" if len(missing) > 20 else "")
      raise UsageError(f"{path} holds {len(missing)} characters the run's vocabulary lacks: "
                       f"{shown!r}")
    return np.asarray(vocab[tokens], np.int32).reshape(-1)

  def held_out(self, text: Text) -> np.ndarray:
    """The held-out split as one stream ``<int32>[n]``."""
    if len(text.valid) < 2:
      raise UsageError("the run holds no text out (--valid-fraction 0): pass --text FILE")
    return text.valid

  def loader(self, text: Text, config: TrainConfig, seed: int | None = None):
    return data.SeqDataLoader(text.train, config.batch_size, config.num_steps,
                              config.use_random_iter, seed=config.seed if seed is None else seed)

  def prefixes(self, config: TrainConfig, corpus, vocab) -> tuple[str, str]:
    """The prefixes a run's lines continue: ``time traveller`` and ``traveller``; the first two
    words of any other corpus (``corpus``: its tokens, or a function loading them)."""
    return _first_words(config, corpus, vocab) or ("time traveller", "traveller")

  def perplexity(self, losses: np.ndarray) -> float:
    """An epoch's training perplexity: ``exp`` of its mean minibatch loss."""
    return training.perplexity(losses.mean())

  def tokens(self, losses: np.ndarray, text: Text, config: TrainConfig) -> int:
    """The tokens an epoch of ``losses <float32>[num_batches]`` read."""
    return losses.size * config.batch_size * config.num_steps

  def evaluation_rows(self, text: Text) -> int:
    """Rows of >= 10k validation tokens, read in parallel."""
    return scoring.default_rows(len(text.valid))

  def evaluate(self, model: RNNLM, params, text: Text, config: TrainConfig) -> float:
    """The validation perplexity (:func:`deeprnn_jax.fit.training.evaluate`)."""
    return training.evaluate(model, params, text.valid, self.evaluation_rows(text))

  def compile_evaluate(self, model: RNNLM, params, text: Text, config: TrainConfig) -> None:
    """Compiles :meth:`evaluate` without running it (``params``: arrays or their shapes)."""
    training.compile_evaluate(model, params, len(text.valid), self.evaluation_rows(text))

  def from_torch(self, state_dict: Mapping, path) -> dict:
    """A PyTorch state dict of this edition's model as ``RNNModel``'s keys (``rnn.*``)."""
    if interop.is_d2l_en(state_dict):
      raise UsageError(f"{path} is d2l 1.0's RNNLM (rnn.rnn.* keys), whose vocabulary is sorted: "
                       "pass --preset d2l-en")
    return dict(state_dict)

  def to_torch(self, state_dict: dict) -> dict:
    return state_dict

  def torch_model(self, layer: str, vocab_size: int, config: TrainConfig) -> str:
    """What the PyTorch weights load into."""
    return f"RNNModel({layer}, vocab_size={vocab_size})"


@dataclasses.dataclass(frozen=True)
class D2L10(Classic):
  """d2l 1.0, the English edition (``pipeline="windows"``, ``--preset d2l-en``)."""

  name: str = "windows"
  masked: bool = True  # every minibatch from zeros, the last one padded
  prediction_length: int = 20  # model.predict('it has', 20, data.vocab)
  final_predictions: int = 1
  validates_every_epoch: bool = True

  def load_text(self, config: TrainConfig) -> Text:
    corpus, vocab = windows.load_corpus(config.corpus, config.clean, config.max_tokens)
    return Text(corpus, vocab, *windows.split(corpus, config.num_steps, config.num_train,
                                              config.num_val))

  def clean(self, text: str, clean: str) -> str:
    """``text`` cleaned as d2l 1.0 cleans its corpus (:func:`~deeprnn_jax.text.windows.cleaned`)."""
    return windows.cleaned(text, clean)

  def held_out(self, text: Text) -> np.ndarray:
    """The validation windows' text as one stream: each window overlaps the next in all but its
    first token, so the stream is the first window followed by every later window's last."""
    rows = np.asarray(text.valid)
    if not len(rows):
      raise UsageError("the run holds no text out (--num-val 0): pass --text FILE")
    return np.concatenate([rows[0], rows[1:, -1]])

  def loader(self, text: Text, config: TrainConfig, seed: int | None = None):
    return windows.WindowLoader(text.train, config.batch_size,
                                seed=config.seed if seed is None else seed)

  def prefixes(self, config: TrainConfig, corpus, vocab) -> tuple[str, str]:
    return _first_words(config, corpus, vocab) or ("it has", "it has")

  def perplexity(self, losses: np.ndarray) -> float:
    """The mean of ``exp(loss)`` over the minibatches, as d2l 1.0's board draws it."""
    return mean_perplexity(losses)

  def tokens(self, losses: np.ndarray, text: Text, config: TrainConfig) -> int:
    return len(text.train) * config.num_steps  # the last minibatch's padding left out

  def evaluate(self, model: RNNLM, params, text: Text, config: TrainConfig) -> float:
    return evaluate_windows(model, params, text.valid, config.batch_size)

  def compile_evaluate(self, model: RNNLM, params, text: Text, config: TrainConfig) -> None:
    pass  # the first epoch validates: it compiles then

  def from_torch(self, state_dict: Mapping, path) -> dict:
    if not interop.is_d2l_en(state_dict):
      raise UsageError(f"{path} is the classic edition's RNNModel (rnn.* keys), not d2l 1.0's "
                       "RNNLM: the windows pipeline (--preset d2l-en) reads d2l 1.0's")
    return interop.from_d2l_en(state_dict)

  def to_torch(self, state_dict: dict) -> dict:
    return interop.to_d2l_en(state_dict)

  def torch_model(self, layer: str, vocab_size: int, config: TrainConfig) -> str:
    return (f"d2l 1.0's RNNLM(rnn, vocab_size={vocab_size}) whose rnn.rnn is {layer}: "
            f"d2l.GRU({vocab_size}, {config.num_hiddens}, {config.num_layers}) for a GRU")


EDITIONS = {e.name: e for e in (Classic(), D2L10())}


def edition(config: TrainConfig) -> Classic:
  """The edition ``config`` trains as (its ``pipeline``)."""
  return EDITIONS[config.pipeline]


def load_text(config: TrainConfig) -> Text:
  """``config``'s corpus, as its edition reads and splits it."""
  return edition(config).load_text(config)


def default_prefixes(config: TrainConfig, corpus: np.ndarray | Callable[[], np.ndarray],
                     vocab: data.Vocab) -> tuple[str, str]:
  """The prefixes a run's lines continue, as its edition chooses them."""
  return edition(config).prefixes(config, corpus, vocab)


def prefix_for(config: TrainConfig, prefix: str, vocab: data.Vocab) -> tuple[str, list[str]]:
  """``prefix`` cleaned as ``config``'s corpus is (its edition's cleaning, ``config.clean``), and
  the characters of it the vocabulary lacks (read as ``<unk>``), in order of appearance.

  Raises:
    UsageError: where nothing of ``prefix`` is left after cleaning.
  """
  if not prefix:
    raise UsageError("the prefix must have at least one character")
  text = edition(config).clean(prefix, config.clean)
  if not text:  # only d2l's cleaning removes characters
    raise UsageError(f"the prefix {prefix!r} has no characters left after the corpus's cleaning "
                     f"(--clean {config.clean}: letters only, lower case)")
  unknown = [c for c in dict.fromkeys(text) if c not in vocab.token_to_idx]
  return text, unknown


# ----------------------------------------------------------------------------------------------
# d2l 1.0's perplexities, as its ProgressBoard plots them.


def mean_perplexity(losses) -> float:
  """The mean of ``exp(loss)`` over minibatch losses ``<float>[num_batches]``; ``inf`` where
  one overflows."""
  with np.errstate(over="ignore"):
    return float(np.mean(np.exp(np.asarray(losses, np.float64))))


@functools.partial(jax.jit, static_argnums=0)
def batch_losses(model: RNNLM, params, Xs, Ys) -> jax.Array:
  """Each minibatch's mean loss over its real rows, each read from a zero state:
  ``Xs, Ys <int32>[num_batches, batch, steps]`` -> ``<float32>[num_batches]``."""

  def loss(batch):
    X, Y = batch
    logits, _ = model.apply({"params": params}, X)
    return training.masked_cross_entropy(logits, Y)

  return jax.lax.map(loss, (Xs, Ys))


def evaluate_windows(model: RNNLM, params, rows: np.ndarray, batch_size: int) -> float:
  """d2l 1.0's validation perplexity of ``rows <int32>[n, steps + 1]`` (n >= 1), in order."""
  Xs, Ys = windows.batches(rows, batch_size)
  return mean_perplexity(batch_losses(model, params, Xs, Ys))
