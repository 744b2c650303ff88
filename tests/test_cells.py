"""The gate nonlinearities' written-out derivatives equal automatic differentiation of the
equations as the chapter writes them (σ as ``jax.nn.sigmoid``, the gates as slices), and those
textbook forms equal the NumPy reference's cells."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import numpy_model as reference

from deeprnn_jax.model import cells

lstm_textbook, gru_textbook = cells.lstm_gates_textbook, cells.gru_gates_textbook


def _normal(key, shape, scale):
  return scale * jax.random.normal(key, shape, jnp.float32)


GATES = {"lstm": (cells.lstm_gates, lstm_textbook), "gru": (cells.gru_gates, gru_textbook)}


def _inputs(cell, key, lead, hiddens, scale):
  """The gates' arguments: LSTM ``(z [..., 4H], C [..., H])``, GRU
  ``(gx, gh [..., 3H], H [..., H])``."""
  k = jax.random.split(key, 3)
  if cell == "lstm":
    return _normal(k[0], lead + (4 * hiddens,), scale), _normal(k[1], lead + (hiddens,), scale)
  return (_normal(k[0], lead + (3 * hiddens,), scale), _normal(k[1], lead + (3 * hiddens,), scale),
          _normal(k[2], lead + (hiddens,), 1.0))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 6.0])  # 6: saturated gates
@pytest.mark.parametrize("batch,hiddens", [(1, 1), (3, 5), (8, 32)])
def test_fused_gates_equal_the_textbook_equations_in_value_and_vjp(cell, scale, batch, hiddens):
  fn, textbook = GATES[cell]
  args = _inputs(cell, jax.random.PRNGKey(hiddens), (batch,), hiddens, scale)
  out, vjp = jax.vjp(fn, *args)
  out_ref, vjp_ref = jax.vjp(textbook, *args)
  leaves, treedef = jax.tree.flatten(out)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  cot = treedef.unflatten([_normal(k, x.shape, 1.0) for k, x in zip(keys, leaves)])
  chex.assert_trees_all_close(out, out_ref, atol=1e-6, rtol=1e-6)
  # float32 rounding of products of saturated gates reaches ~1e-6 in a few elements.
  chex.assert_trees_all_close(vjp(cot), vjp_ref(cot), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradients_under_jit_and_vmap(cell):
  """Per-example gradients (``vmap`` of ``grad``, jitted) through the written-out derivatives."""
  fn, textbook = GATES[cell]
  xs = _inputs(cell, jax.random.PRNGKey(0), (4, 2), 3, 1.0)
  loss = lambda f: lambda *a: jnp.sum(jax.tree.leaves(f(*a))[0] ** 2)
  argnums = tuple(range(len(xs)))
  grads = jax.jit(jax.vmap(jax.grad(loss(fn), argnums=argnums)))(*xs)
  grads_ref = jax.vmap(jax.grad(loss(textbook), argnums=argnums))(*xs)
  chex.assert_trees_all_close(grads, grads_ref, atol=1e-6, rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_textbook_gates_equal_the_numpy_reference_cells():
  rng = np.random.default_rng(0)
  B, H = 4, 6
  h, c = rng.normal(size=(B, H)), rng.normal(size=(B, H))
  W_hh, b_hh = rng.normal(size=(H, 4 * H)), rng.normal(size=4 * H)
  x = rng.normal(size=(B, 4 * H))  # with W_xh = I and b_xh = 0, X W_xh + b_xh = x
  p = {"W_xh": np.eye(4 * H), "b_xh": np.zeros(4 * H), "W_hh": W_hh, "b_hh": b_hh}
  z = x + h @ W_hh + b_hh
  f32 = lambda *a: [jnp.asarray(v, jnp.float32) for v in a]
  np.testing.assert_allclose(lstm_textbook(*f32(z, c)), reference.lstm_cell(p, x, h, c),
                             atol=2e-6)
  p = {"W_xh": np.eye(3 * H), "b_xh": np.zeros(3 * H), "W_hh": W_hh[:, :3 * H],
       "b_hh": b_hh[:3 * H]}
  gh = h @ p["W_hh"] + p["b_hh"]
  np.testing.assert_allclose(gru_textbook(*f32(x[:, :3 * H], gh, h)),
                             reference.gru_cell(p, x[:, :3 * H], h), atol=2e-6)


def test_every_cell_has_a_numpy_reference_of_the_same_layout():
  """Each ``CellSpec`` in ``cells.CELLS`` has its entry in the NumPy reference, in the same
  order, with the same number of gates and the same state (``H`` or the pair ``(H, C)``)."""
  assert list(reference.CELLS) == list(cells.CELLS)
  for name, spec in cells.CELLS.items():
    assert (reference.CELLS[name].num_gates, reference.CELLS[name].pair) == (spec.num_gates,
                                                                            spec.pair), name
