"""Text generation: d2l's ``predict_ch8``, compiled.

One ``lax.scan`` warms the state up on the prefix, token by token as d2l does, then feeds each
predicted token back in: ``num_preds`` characters cost one compiled loop, not ``num_preds``
Python calls, and prefixes of similar length share one compilation. A long text is made in
pieces (:func:`stream_tokens`), one compiled loop of a few hundred steps run again and again, so
that it can be written as it comes and stopped between pieces.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn_jax.base import validate
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.model.models import RNNLM

if TYPE_CHECKING:  # any table of tokens will do: the model layer reads no text
  from deeprnn_jax.text.vocab import Vocab

Array = jax.Array


def _bucket(n: int) -> int:
  """Prefixes are padded to a power of two (at least 16) so few lengths ever compile."""
  return max(16, 1 << (n - 1).bit_length())


def _steps(model: RNNLM, params, prefix: Array, prefix_len, carry, start, length: int,
           temperature, key) -> tuple[tuple, Array]:
  """Steps ``start .. start + length - 1`` of the generation loop, from ``carry``.

  Step ``t`` feeds one token and chooses the next: a prefix token while the prefix lasts, then the
  prediction, greedy (argmax) when ``temperature == 0``, else sampled from
  ``softmax(logits / temperature)`` with ``fold_in(key, t)``. The key of a step depends on ``t``
  alone (with JAX's default threefry, ``fold_in(key, t)`` is ``split(key, steps)[t]``), so the
  loop run in pieces draws exactly what it draws in one.

  Args:
    prefix: ``<int32>[P]``, its first ``prefix_len`` tokens the prefix, the rest padding.
    carry: ``(token <int32>[], state)``: the token step ``start`` feeds and the state before it.
    start: the first step's number, ``<int32>[]``.

  Returns:
    The carry after the last step, and the tokens the steps chose ``<int32>[length]``.
  """
  P = prefix.shape[0]
  # Step t feeds position i = t - (P - n): the loop's first P - n steps are no-ops, so that step
  # P - 1 + j makes prediction j, whatever n is.
  skip = P - prefix_len

  def body(carry, t):
    token, state = carry
    i = t - skip
    logits, new_state = model.apply({"params": params}, token.reshape(1, 1), state)
    logits = logits[0, -1]
    k = jax.random.fold_in(key, t)
    sampled = jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6))
    chosen = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
    nxt = jnp.where(i < prefix_len - 1, prefix[jnp.clip(i + 1, 0, P - 1)], chosen)
    active = i >= 0
    state = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new_state, state)
    return (jnp.where(active, nxt, token), state), nxt

  return jax.lax.scan(body, carry, start + jnp.arange(length, dtype=jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 3))
def generate_tokens(model: RNNLM, params, prefix: Array, num_preds: int, temperature=0.0,
                    key=None, prefix_len=None) -> Array:
  """Continues ``prefix`` by ``num_preds`` tokens, one compiled loop, d2l's ``predict_ch8``.

  The state warms up on the prefix one token at a time, then each prediction is fed back in.
  Greedy (argmax) when ``temperature == 0``, as d2l; otherwise samples from
  ``softmax(logits / temperature)`` with ``key``.

  Args:
    prefix: ``<int32>[P]``; its first ``prefix_len`` tokens (all when ``None``, at least one)
      are the prefix, the rest padding. ``prefix_len`` is traced, so prefixes of any length up
      to ``P`` share one compilation.

  Returns:
    ``<int32>[num_preds]``.
  """
  P = prefix.shape[0]
  n = P if prefix_len is None else prefix_len
  key = jax.random.PRNGKey(0) if key is None else key
  steps = P - 1 + num_preds
  carry = (prefix[0], model.begin_state(1))
  _, out = _steps(model, params, prefix, n, carry, jnp.int32(0), steps, temperature, key)
  return out[steps - num_preds:]


CHUNK = 256  # steps a piece of :func:`stream_tokens`: tens of milliseconds for d2l's model
MAX_PREDS = 2**31 - 2**20  # step numbers stay int32 for any prefix up to a million characters


@functools.partial(jax.jit, static_argnums=(0, 4))
def _chunk(model: RNNLM, params, prefix: Array, prefix_len, length: int, carry, start,
           temperature, key):
  """:func:`_steps` compiled once for every piece of a stream (``start`` is traced)."""
  return _steps(model, params, prefix, prefix_len, carry, start, length, temperature, key)


def stream_tokens(model: RNNLM, params, prefix_tokens, num_preds: int, temperature=0.0,
                  key=None, chunk: int = CHUNK) -> Iterator[np.ndarray]:
  """:func:`generate_tokens`' ``num_preds`` tokens in pieces, as they are made.

  One compiled loop of ``chunk`` steps runs again and again, carrying the state and the token
  fed next from piece to piece; each step's key depends on its number alone. So the pieces
  joined are exactly :func:`generate_tokens`' output for the same key, memory stays flat however
  long the text, and a caller can stop between pieces (each takes a fraction of a second).

  Args:
    prefix_tokens: ``<int32>[n]``, n >= 1.
    key: the PRNG key of sampling (``temperature > 0``); ``PRNGKey(0)`` when ``None``.

  Yields:
    ``<int32>[k]`` arrays, 1 <= k <= ``chunk``, ``num_preds`` tokens in all.
  """
  if len(prefix_tokens) < 1:
    raise UsageError("the prefix must have at least one character")
  if not 0 <= num_preds <= MAX_PREDS:
    raise UsageError(f"number of predictions must be in [0, {MAX_PREDS}], got {num_preds}")
  padded, temperature, length = _inputs(prefix_tokens, validate.temperature(temperature))
  key = jax.random.PRNGKey(0) if key is None else key
  first = len(padded) - 1  # the step that makes the first prediction
  end = first + num_preds
  carry = (padded[0], model.begin_state(1))
  for start in range(0, end, chunk):
    carry, out = _chunk(model, params, padded, length, chunk, carry, np.int32(start),
                        temperature, key)
    out = np.asarray(out)[max(first - start, 0):end - start]  # no prefix tokens, nothing past
    if out.size:
      yield out


def predict(prefix: str, num_preds: int, params, model: RNNLM, vocab: Vocab,
            temperature: float = 0.0, key=None) -> str:
  """``prefix`` followed by ``num_preds`` generated characters (d2l's ``predict_ch8``).

  Characters not in the vocabulary read as ``<unk>``.
  """
  if not prefix:
    raise UsageError("the prefix must have at least one character")
  if num_preds < 0:
    raise UsageError(f"number of predictions must be >= 0, got {num_preds}")
  validate.temperature(temperature)
  if num_preds == 0:
    return prefix
  padded, temperature, length = _inputs(vocab[list(prefix)], temperature)
  out = generate_tokens(model, params, padded, num_preds, temperature, key, length)
  # One transfer: iterating over a device array fetches element by element.
  return prefix + "".join(vocab.to_tokens(np.asarray(out).tolist()))


def compile_predict(model: RNNLM, params, prefix_length: int, num_preds: int) -> None:
  """Compiles the loop that :func:`predict` runs for a greedy prediction of ``num_preds``
  characters after a prefix of ``prefix_length``, without running it: the first such prediction
  then finds it compiled. ``params``: the model's parameters, or only their shapes
  (``jax.ShapeDtypeStruct``)."""
  padded, temperature, length = _inputs(np.zeros(prefix_length, np.int32), 0.0)
  generate_tokens.lower(model, params, padded, num_preds, temperature, None, length).compile()


def _inputs(tokens, temperature: float) -> tuple[np.ndarray, np.float32, np.int32]:
  """:func:`generate_tokens`' prefix (padded to its bucket), temperature and prefix length."""
  padded = np.zeros(_bucket(len(tokens)), np.int32)
  padded[:len(tokens)] = tokens
  return padded, np.float32(temperature), np.int32(len(tokens))
