"""Text generation: d2l's ``predict_ch8``, compiled.

One ``lax.scan`` warms the state up on the prefix, token by token as d2l does, then feeds each
predicted token back in: ``num_preds`` characters cost one compiled loop, not ``num_preds``
Python calls, and prefixes of similar length share one compilation.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.model.models import RNNLM

if TYPE_CHECKING:  # any table of tokens will do: the model layer reads no text
  from deeprnn_jax.text.vocab import Vocab

Array = jax.Array


def _bucket(n: int) -> int:
  """Prefixes are padded to a power of two (at least 16) so few lengths ever compile."""
  return max(16, 1 << (n - 1).bit_length())


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
  # Step t feeds position i = t - (P - n): the loop's first P - n steps are no-ops, so that the
  # last num_preds steps are always the predictions, whatever n is.
  skip = P - n

  def body(carry, xs):
    token, state = carry
    t, k = xs
    i = t - skip
    logits, new_state = model.apply({"params": params}, token.reshape(1, 1), state)
    logits = logits[0, -1]
    sampled = jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6))
    chosen = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
    nxt = jnp.where(i < n - 1, prefix[jnp.clip(i + 1, 0, P - 1)], chosen)
    active = i >= 0
    state = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new_state, state)
    return (jnp.where(active, nxt, token), state), nxt

  xs = (jnp.arange(steps), jax.random.split(key, steps))
  _, out = jax.lax.scan(body, (prefix[0], model.begin_state(1)), xs)
  return out[steps - num_preds:]


def predict(prefix: str, num_preds: int, params, model: RNNLM, vocab: Vocab,
            temperature: float = 0.0, key=None) -> str:
  """``prefix`` followed by ``num_preds`` generated characters (d2l's ``predict_ch8``).

  Characters not in the vocabulary read as ``<unk>``.
  """
  if not prefix:
    raise UsageError("the prefix must have at least one character")
  if num_preds < 0:
    raise UsageError(f"number of predictions must be >= 0, got {num_preds}")
  if temperature < 0:
    raise UsageError(f"temperature must be >= 0, got {temperature}")
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
