"""The gate nonlinearities' written-out derivatives equal automatic differentiation of the
equations as the chapter writes them (σ as ``jax.nn.sigmoid``, the gates as slices), and those
textbook forms equal the NumPy reference's cells."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

from deeprnn_jax import cells


lstm_textbook, gru_textbook = cells.lstm_gates_textbook, cells.gru_gates_textbook


def _normal(key, shape, scale):
  return scale * jax.random.normal(key, shape, jnp.float32)


@pytest.mark.parametrize("scale", [0.1, 1.0, 6.0])  # 6: saturated gates
@pytest.mark.parametrize("batch,hiddens", [(1, 1), (3, 5), (8, 32)])
def test_lstm_gates_value_and_vjp(scale, batch, hiddens):
  k = jax.random.split(jax.random.PRNGKey(hiddens), 4)
  z, c = _normal(k[0], (batch, 4 * hiddens), scale), _normal(k[1], (batch, hiddens), scale)
  cot = (_normal(k[2], (batch, hiddens), 1.0), _normal(k[3], (batch, hiddens), 1.0))
  out, vjp = jax.vjp(cells.lstm_gates, z, c)
  out_ref, vjp_ref = jax.vjp(lstm_textbook, z, c)
  chex.assert_trees_all_close(out, out_ref, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(vjp(cot), vjp_ref(cot), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.1, 1.0, 6.0])
@pytest.mark.parametrize("batch,hiddens", [(1, 1), (3, 5), (8, 32)])
def test_gru_gates_value_and_vjp(scale, batch, hiddens):
  k = jax.random.split(jax.random.PRNGKey(hiddens), 4)
  gx, gh = (_normal(k[i], (batch, 3 * hiddens), scale) for i in range(2))
  h, cot = _normal(k[2], (batch, hiddens), 1.0), _normal(k[3], (batch, hiddens), 1.0)
  out, vjp = jax.vjp(cells.gru_gates, gx, gh, h)
  out_ref, vjp_ref = jax.vjp(gru_textbook, gx, gh, h)
  chex.assert_trees_all_close(out, out_ref, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(vjp(cot), vjp_ref(cot), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradients_under_jit_and_vmap(cell):
  """Per-example gradients (``vmap`` of ``grad``, jitted) through the written-out derivatives."""
  fn = cells.lstm_gates if cell == "lstm" else cells.gru_gates
  ref = lstm_textbook if cell == "lstm" else gru_textbook
  G = 4 if cell == "lstm" else 3
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  xs = ((_normal(k[0], (4, 2, G * 3), 1.0), _normal(k[1], (4, 2, 3), 1.0)) if cell == "lstm" else
        (_normal(k[0], (4, 2, G * 3), 1.0), _normal(k[1], (4, 2, G * 3), 1.0),
         _normal(k[2], (4, 2, 3), 1.0)))
  loss = lambda f: lambda *a: jnp.sum(jax.tree.leaves(f(*a))[0] ** 2)
  grads = jax.jit(jax.vmap(jax.grad(loss(fn), argnums=tuple(range(len(xs))))))(*xs)
  grads_ref = jax.vmap(jax.grad(loss(ref), argnums=tuple(range(len(xs)))))(*xs)
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
