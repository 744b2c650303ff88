"""What trained parameters score on a token stream: one model, an ensemble, dynamic evaluation.

A stream ``<int32>[n]`` is read as :func:`deeprnn_jax.fit.training.evaluate` reads it: cut into
``num_rows`` contiguous rows from a zero state, each carrying its state to its end, every token
after a row's first predicted from all the row's context before it. Each function returns the
negative log-likelihood of every predicted token, ``<float32>[rows, steps]``; its mean is the
nats per token (``exp`` of it the perplexity, divided by ``ln 2`` the bits).

* :func:`token_nll`: one model.
* :func:`ensemble_nll`: ``K`` models whose next-token probabilities are averaged.
* :func:`dynamic_nll`: dynamic evaluation (Krause et al., 2018): the stream is read in segments,
  each scored with the parameters as they are, then used for one SGD step, so that every token is
  still scored before the model adapts to it. With learning rate 0 it is :func:`token_nll`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.model.models import RNNLM

Array = jax.Array


ROW_TOKENS = 10_000  # a run validates on one row per this many held-out tokens


def default_rows(num_tokens: int) -> int:
  """The rows a run reads ``num_tokens`` held-out tokens in: one per :data:`ROW_TOKENS`."""
  return max(1, num_tokens // ROW_TOKENS)


def row_layout(num_tokens: int, num_rows: int) -> tuple[int, int]:
  """``(rows, tokens they predict in all)`` of a stream of ``num_tokens``: at most one row per
  predicted token, the tail past the last full row left out."""
  num_rows = max(1, min(num_rows, num_tokens - 1))
  return num_rows, (num_tokens - 1) // num_rows * num_rows


def stream_rows(tokens, num_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """``(X, Y)``, each ``<int32>[rows, steps]``: ``tokens <int32>[n]`` (n >= 2) as
  ``num_rows`` contiguous rows of inputs and their next tokens (:func:`row_layout`)."""
  tokens = np.asarray(tokens, np.int32)
  if tokens.size < 2:
    raise UsageError(f"evaluation needs at least 2 tokens, got {tokens.size}")
  num_rows, n = row_layout(tokens.size, num_rows)
  return tokens[:n].reshape(num_rows, -1), tokens[1:n + 1].reshape(num_rows, -1)


def _nll(logits: Array, Y: Array) -> Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y)


@functools.partial(jax.jit, static_argnums=0)
def token_nll(model: RNNLM, params, X: Array, Y: Array) -> Array:
  """Each token's negative log-likelihood under one model: ``X, Y <int32>[rows, steps]`` ->
  ``<float32>[rows, steps]``."""
  logits, _ = model.apply({"params": params}, X)
  return _nll(logits, Y)


@functools.partial(jax.jit, static_argnums=0)
def ensemble_nll(model: RNNLM, stacked_params, X: Array, Y: Array) -> Array:
  """Each token's negative log-likelihood under the mean of ``K`` models' next-token
  probabilities (``stacked_params``: every leaf with a leading ``[K]`` axis)."""

  def log_probs(params):
    logits, _ = model.apply({"params": params}, X)
    return jax.nn.log_softmax(logits)

  logp = jax.lax.map(log_probs, stacked_params)  # [K, rows, steps, vocab], one model at a time
  mean = jax.nn.logsumexp(logp, axis=0) - jnp.log(logp.shape[0])
  return -jnp.take_along_axis(mean, Y[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=(0, 4))
def dynamic_nll(model: RNNLM, params, X: Array, Y: Array, segment: int, lr, clip_norm
                ) -> Array:
  """Each token's negative log-likelihood under dynamic evaluation: the rows are read
  ``segment`` steps at a time, each segment scored, then one SGD step of rate ``lr`` on its
  mean loss (gradients clipped to global norm ``clip_norm``), the state carried on."""
  steps = X.shape[1]
  full = steps // segment

  def loss(params, state, x, y):
    logits, state = model.apply({"params": params}, x, state)
    nll = _nll(logits, y)
    return nll.mean(), (nll, state)

  def body(carry, xy):
    params, state = carry
    (_, (nll, state)), grads = jax.value_and_grad(loss, has_aux=True)(params, state, *xy)
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
    scale = jnp.minimum(1.0, clip_norm / (norm + 1e-12))  # d2l's grad_clipping
    params = jax.tree_util.tree_map(lambda p, g: p - lr * scale * g, params, grads)
    return (params, jax.lax.stop_gradient(state)), nll

  def segments(A):  # [rows, full * segment] -> [full, rows, segment]
    return A[:, :full * segment].reshape(A.shape[0], full, segment).swapaxes(0, 1)

  (params, state), nlls = jax.lax.scan(body, (params, model.begin_state(X.shape[0])),
                                       (segments(X), segments(Y)))
  nll = nlls.swapaxes(0, 1).reshape(X.shape[0], full * segment)
  if full * segment < steps:  # the last, shorter segment: scored, nothing left to adapt to
    logits, _ = model.apply({"params": params}, X[:, full * segment:], state)
    nll = jnp.concatenate([nll, _nll(logits, Y[:, full * segment:])], axis=1)
  return nll


def summary(nll) -> dict:
  """The mean of ``nll <float>[...]`` as ``nats``, ``bits`` and ``perplexity`` per token, and the
  number of tokens."""
  nats = float(np.mean(np.asarray(nll, np.float64)))
  with np.errstate(over="ignore"):
    return {"nats": nats, "bits": nats / np.log(2), "perplexity": float(np.exp(nats)),
            "tokens": int(np.size(nll))}
