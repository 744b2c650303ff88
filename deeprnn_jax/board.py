"""d2l 1.0's perplexities, as its ``ProgressBoard`` plots them (the windows pipeline's figures).

d2l 1.0's ``RNNLMScratch.training_step`` and ``validation_step`` plot ``exp(loss)`` of each
minibatch, its mean cross-entropy per token; the board draws the mean of every
``num_batches / 2`` training points (two an epoch) and of all the validation points (one an
epoch). Every minibatch counts once, however many rows it holds (the last is smaller). An
epoch's training perplexity here is the mean over all its minibatches: the mean of its two points.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from deeprnn_jax import training, windows
from deeprnn_jax.models import RNNLM


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


def evaluate(model: RNNLM, params, rows: np.ndarray, batch_size: int) -> float:
  """d2l 1.0's validation perplexity of ``rows <int32>[n, steps + 1]`` (n >= 1), in order."""
  Xs, Ys = windows.batches(rows, batch_size)
  return mean_perplexity(batch_losses(model, params, Xs, Ys))
