"""Text generation: d2l's ``predict_ch8``, compiled.

The prefix warms the state up in one call of the model, then ``lax.scan`` feeds each predicted
token back in, so ``num_preds`` characters cost one compiled loop, not ``num_preds`` Python calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deeprnn_jax.data import Vocab
from deeprnn_jax.errors import UsageError
from deeprnn_jax.models import RNNLM

Array = jax.Array


@functools.partial(jax.jit, static_argnums=(0, 3))
def generate_tokens(model: RNNLM, params, prefix: Array, num_preds: int, temperature=0.0,
                    key=None) -> Array:
  """Continues ``prefix <int32>[n]`` (n >= 1) by ``num_preds`` tokens.

  Greedy (argmax) when ``temperature == 0``, as d2l; otherwise samples from
  ``softmax(logits / temperature)`` with ``key``.

  Returns:
    ``<int32>[num_preds]``.
  """
  key = jax.random.PRNGKey(0) if key is None else key

  def choose(logits, k):
    sampled = jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)

  logits, state = model.apply({"params": params}, prefix[None, :], model.begin_state(1))
  keys = jax.random.split(key, num_preds)
  first = choose(logits[0, -1], keys[0])

  def body(carry, k):
    token, state = carry
    logits, state = model.apply({"params": params}, token.reshape(1, 1), state)
    nxt = choose(logits[0, -1], k)
    return (nxt, state), nxt

  _, rest = jax.lax.scan(body, (first, state), keys[1:])
  return jnp.concatenate([first[None], rest])


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
  tokens = jnp.asarray(vocab[list(prefix)], jnp.int32)
  out = generate_tokens(model, params, tokens, num_preds, jnp.float32(temperature), key)
  return prefix + "".join(vocab.to_tokens([int(i) for i in out]))
