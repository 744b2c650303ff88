"""The model's API: parameter layout and initialisation, dropout, begin_state, hyperparameters.

That each implementation (``impl=``) computes the reference's numbers is checked in
``test_implementations.py``, which uses the helpers here to build parameters, tokens and states in
the documented layouts.
"""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_state, cell_names, impls_for, layout_params, random_tokens
from references.numpy_model import reference_forward

from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.model import cells
from deeprnn_jax.model.models import RNNLM

IMPLS = ("scan", "layerwise")  # the implementations that take dropout between layers
TOL = dict(rtol=1e-5, atol=1e-5)
















def init_params(model: RNNLM, key, batch: int = 2, steps: int = 3):
  return model.init(key, jnp.zeros((batch, steps), jnp.int32))["params"]




# --------------------------------------------------------------------------------------------
# Parameters: layout and initialisation.


@pytest.mark.parametrize("cell", cell_names())
def test_init_same_for_every_impl_layout_and_bounds(cell):
  """``init`` gives the documented layout, the same for every implementation from one key, and
  every parameter (recurrent and head) ``~ U(-1/√hiddens, 1/√hiddens)``."""
  vocab, hiddens, L = 30, 16, 2
  key = jax.random.PRNGKey(14)
  impls = impls_for(cell)
  params = {impl: init_params(RNNLM(vocab, hiddens, L, cell, impl=impl), key) for impl in impls}
  for impl in impls[1:]:
    chex.assert_trees_all_equal(params[impl], params["scan"])
  # Names, nesting, shapes and dtypes are the documented ones.
  chex.assert_trees_all_equal_shapes_and_dtypes(params["scan"],
                                                layout_params(0, vocab, hiddens, L, cell))
  assert_uniform_init(params["scan"], 1.0 / np.sqrt(hiddens))
  # Different keys give different parameters.
  other = init_params(RNNLM(vocab, hiddens, L, cell, impl="scan"), jax.random.PRNGKey(15))
  assert not np.allclose(other["W_hq"], params["scan"]["W_hq"])


def test_init_bounds_small_hiddens():
  """The bound follows num_hiddens (here 1/√4 = 0.5), not the input width, in every layer."""
  vocab, hiddens = 40, 4
  assert_uniform_init(init_params(RNNLM(vocab, hiddens, 2, "lstm"), jax.random.PRNGKey(16)),
                      0.5)


def assert_uniform_init(params, bound):
  """Every parameter array lies within ±bound and spreads over the whole interval."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    leaf = np.asarray(leaf)
    assert leaf.dtype == np.float32, path
    assert np.all(np.abs(leaf) <= bound), (path, np.abs(leaf).max(), bound)
    assert np.unique(leaf).size > leaf.size // 2, path  # Random, not constant.
    # Not a narrower interval: the extremes come near ±bound (loosely for small arrays).
    reach = 0.9 if leaf.size >= 100 else 0.5
    assert leaf.max() > reach * bound and leaf.min() < -reach * bound, (path, bound)
    assert abs(leaf.mean()) < (0.15 if leaf.size >= 100 else 0.5) * bound, path


# --------------------------------------------------------------------------------------------
# Dropout.


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_acts_between_layers_only_when_training_and_follows_its_key(impl):
  vocab, hiddens, batch, steps = 6, 16, 3, 5
  X = random_tokens(jax.random.PRNGKey(17), batch, steps, vocab)
  k1, k2 = jax.random.PRNGKey(18), jax.random.PRNGKey(20)

  # Two layers: dropout acts between them when not deterministic.
  model = RNNLM(vocab, hiddens, 2, "gru", dropout=0.5, impl=impl)
  params = layout_params(19, vocab, hiddens, 2, "gru")
  train = jax.jit(lambda p, key: model.apply({"params": p}, X, deterministic=False,
                                             rngs={"dropout": key})[0])
  det, _ = model.apply({"params": params}, X, deterministic=True)
  ref, _ = reference_forward(params, np.asarray(X), None, "gru")
  np.testing.assert_allclose(det, ref, **TOL)  # deterministic=True ignores dropout...
  det_with_rng, _ = model.apply({"params": params}, X, rngs={"dropout": k1})
  np.testing.assert_allclose(det_with_rng, det, rtol=1e-6, atol=1e-6)  # ...even given a key.

  dropped = train(params, k1)
  chex.assert_shape(dropped, (batch, steps, vocab))
  chex.assert_tree_all_finite(dropped)
  assert not np.allclose(dropped, det, atol=1e-4)
  np.testing.assert_array_equal(train(params, k1), dropped)  # Same key, same masks.
  assert not np.allclose(train(params, k2), dropped, atol=1e-4)
  # Only the input of layer 1 is dropped, not the last layer's output before the head: with
  # layer 1's input weights zeroed, dropout can change nothing.
  no_input = jax.tree_util.tree_map(lambda x: x, params)
  no_input["rnn"]["layer_1"]["W_xh"] = jnp.zeros_like(params["rnn"]["layer_1"]["W_xh"])
  np.testing.assert_allclose(train(no_input, k1),
                             model.apply({"params": no_input}, X)[0], rtol=1e-6, atol=1e-6)
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply({"params": params}, X, deterministic=False)

  # One layer: there is no "between layers", so dropout changes nothing.
  model1 = RNNLM(vocab, hiddens, 1, "lstm", dropout=0.5, impl=impl)
  params1 = layout_params(21, vocab, hiddens, 1, "lstm")
  det1, state_det = model1.apply({"params": params1}, X)
  drop1, state_drop = model1.apply({"params": params1}, X, deterministic=False,
                                   rngs={"dropout": k1})
  np.testing.assert_allclose(drop1, det1, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(state_drop, state_det, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_is_inverted_with_a_fresh_mask_per_element_and_step(impl):
  """Inverted dropout with rate p on layer 1's input, a fresh mask per element and time step.

  Built so the logits show the mask: layer 0 outputs 0.5 everywhere (relu, W_hh = 0), layer 1
  and the head are identities, so logits are 0 where dropped and 0.5 / (1 - p) where kept.
  """
  n, batch, steps, p = 32, 4, 6, 0.5
  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
  params = {
      "rnn": {
          "layer_0": {"W_xh": jnp.full((n, n), 0.5, jnp.float32), "W_hh": zeros(n, n),
                      "b_xh": zeros(n), "b_hh": zeros(n)},
          "layer_1": {"W_xh": jnp.eye(n, dtype=jnp.float32), "W_hh": zeros(n, n),
                      "b_xh": zeros(n), "b_hh": zeros(n)},
      },
      "W_hq": jnp.eye(n, dtype=jnp.float32), "b_q": zeros(n),
  }
  model = RNNLM(n, n, 2, "rnn", "relu", dropout=p, impl=impl)
  X = random_tokens(jax.random.PRNGKey(23), batch, steps, n)
  np.testing.assert_allclose(model.apply({"params": params}, X)[0], 0.5, rtol=1e-6)
  logits = np.asarray(jax.jit(lambda key: model.apply(
      {"params": params}, X, deterministic=False, rngs={"dropout": key})[0])(
          jax.random.PRNGKey(24)))
  kept = np.isclose(logits, 0.5 / (1 - p), rtol=1e-5)
  assert np.all(kept | (logits == 0.0))
  assert 0.4 < 1.0 - kept.mean() < 0.6  # About p of them dropped.
  for t in range(1, steps):  # A fresh mask at every time step...
    assert not np.array_equal(kept[:, t], kept[:, 0]), t
  assert not np.array_equal(kept[0], kept[1])  # ...and for every sequence.


# --------------------------------------------------------------------------------------------
# begin_state, initialisation, bad hyperparameters.


@pytest.mark.parametrize("cell", cell_names())
@pytest.mark.parametrize("num_layers,batch,hiddens", [(1, 1, 3), (3, 4, 7)])
def test_begin_state_is_zeros_of_each_cells_carry_shape(cell, num_layers, batch, hiddens):
  model = RNNLM(5, hiddens, num_layers, cell, impl="scan")
  state = model.begin_state(batch)
  assert_state(state, cell, num_layers, batch, hiddens)
  for leaf in jax.tree_util.tree_leaves(state):
    np.testing.assert_array_equal(leaf, 0.0)
  if not cells.CELLS[cell].pair:
    assert not isinstance(state, tuple)
  # The default batch size is one.
  assert_state(model.begin_state(), cell, num_layers, 1, hiddens)


@pytest.mark.parametrize("kwargs", [
    dict(cell="cnn"),
    dict(cell="rnn", activation="sigmoid"),
    dict(cell="rnn", activation=("tanh", "softplus")),
    dict(cell="gru", activation="gelu"),
    dict(num_layers=2, activation=("tanh",)),
    dict(num_layers=2, activation=("tanh", "relu", "tanh")),
    dict(num_layers=0),
    dict(num_layers=-1),
    dict(num_hiddens=0),
    dict(num_hiddens=2.5),
    dict(vocab_size=0),
    dict(dropout=1.0),
    dict(dropout=-0.1),
    dict(dropout=float("nan")),
    dict(impl="unrolled"),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_impossible_hyperparameters_are_refused_when_the_model_is_built(kwargs):
  args = dict(vocab_size=5, num_hiddens=4, num_layers=2, cell="rnn", activation="tanh",
              dropout=0.0)
  args.update(kwargs)
  with pytest.raises(UsageError):
    RNNLM(**args)


def test_the_edges_of_the_valid_ranges_are_accepted_and_run():
  """The boundaries of the valid ranges are accepted (so the checks above are not blanket), and
  the models built from them run."""
  X = jnp.zeros((2, 3), jnp.int32)
  for model in (RNNLM(5, 1, 1, "rnn", "relu", dropout=0.0),
                RNNLM(5, 4, 2, "rnn", ("relu", "tanh"), dropout=0.999),
                RNNLM(5, 4, 3, "lstm", ["tanh", "tanh", "tanh"], impl="scan")):
    logits, state = model.apply(model.init(jax.random.PRNGKey(0), X), X)
    chex.assert_shape(logits, (2, 3, 5))
    chex.assert_tree_all_finite(logits)
    assert_state(state, model.cell, model.num_layers, 2, model.num_hiddens)
