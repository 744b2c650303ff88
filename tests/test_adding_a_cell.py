"""A cell is one declaration: registering a ``CellSpec`` in ``cells.CELLS`` is all the models, the
checks, the kernels and the conversion need, with no other module edited.

Two toy cells, registered for these tests only (``toy_cells``), with the parameters every cell
has (``W_xh``, ``W_hh``, ``b_xh``, ``b_hh``, ``G * H`` wide) and ``gx = X W_xh + b_xh``:

* ``gated`` (G = 2) keeps the fast kernels' rule, so every fast path runs it as ``scan`` does::

      [F; N] = gx + H_{t-1} W_hh + b_hh
      H_t    = σ(F) ⊙ H_{t-1} + (1 - σ(F)) ⊙ tanh(N)

* ``twice`` (G = 1) multiplies by ``W_hh`` twice, which breaks the rule: it runs under ``scan``
  and every fast path refuses it with one message::

      U_t = tanh(H_{t-1} W_hh + b_hh)
      H_t = tanh(gx + U_t W_hh + b_hh)
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import projected_loss, random_like
from references.numpy_model import one_hot, sigmoid

from deeprnn_jax.base import validate
from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.model import cells, interop, recurrence
from deeprnn_jax.model.models import RNNLM

VOCAB, HIDDENS, LAYERS, BATCH, STEPS = 6, 4, 3, 2, 5
TOL = 1e-5


def gated_step(params, h, gx):
  f, n = jnp.split(gx + h @ params["W_hh"] + params["b_hh"], 2, axis=-1)
  f = jax.nn.sigmoid(f)
  h = f * h + (1.0 - f) * jnp.tanh(n)
  return h, h


def twice_step(params, h, gx):
  u = jnp.tanh(h @ params["W_hh"] + params["b_hh"])
  h = jnp.tanh(gx + u @ params["W_hh"] + params["b_hh"])
  return h, h


def gated_numpy(p, x, h):
  f, n = np.split(x @ p["W_xh"] + p["b_xh"] + h @ p["W_hh"] + p["b_hh"], 2, axis=-1)
  return sigmoid(f) * h + (1.0 - sigmoid(f)) * np.tanh(n)


def twice_numpy(p, x, h):
  u = np.tanh(h @ p["W_hh"] + p["b_hh"])
  return np.tanh(x @ p["W_xh"] + p["b_xh"] + u @ p["W_hh"] + p["b_hh"])


GATED = cells.CellSpec("gated", ("f", "n"), gated_step)
TWICE = cells.CellSpec("twice", ("h",), twice_step, fits_kernels=False)
NUMPY = {"gated": gated_numpy, "twice": twice_numpy}
FAST_IMPLS = ("layerwise", "wavefront", "cudnn", "onednn")


@pytest.fixture
def toy_cells(monkeypatch):
  for spec in (GATED, TWICE):
    monkeypatch.setitem(cells.CELLS, spec.name, spec)


def numpy_forward(params, X, state, cell):
  """The toy model written as a loop over time and layers, in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  H = [np.asarray(state[l], np.float64) for l in range(LAYERS)]
  x_t = one_hot(np.asarray(X), VOCAB)
  logits = np.zeros((BATCH, STEPS, VOCAB))
  for t in range(STEPS):
    x = x_t[:, t]
    for l in range(LAYERS):
      H[l] = x = NUMPY[cell](p["rnn"][f"layer_{l}"], x, H[l])
    logits[:, t] = x @ p["W_hq"] + p["b_q"]
  return logits, np.stack(H)


def case(cell, impl="scan", seed=0):
  """``(model, params, state, X, R, S)`` for :func:`projected_loss`."""
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  model = RNNLM(VOCAB, HIDDENS, LAYERS, cell, impl=impl)
  X = jax.random.randint(k[0], (BATCH, STEPS), 0, VOCAB)
  params = model.init(k[1], X)["params"]
  state = random_like(k[2], model.begin_state(BATCH), 0.5)
  return model, params, state, X, jax.random.normal(k[3], (BATCH, STEPS, VOCAB)), \
      random_like(k[4], state)


def loss_and_grad(model, *args):
  return jax.jit(jax.value_and_grad(projected_loss(model), argnums=(0, 1), has_aux=True))(*args)


def test_a_registered_cell_is_a_choice_everywhere(toy_cells):
  assert validate.CELLS == ("rnn", "gru", "lstm", "gated", "twice")
  assert TrainConfig(cell="gated").validate().cell == "gated"
  assert TrainConfig(cell="twice", impl="scan").validate().cell == "twice"
  model, params, _, X, _, _ = case("gated")
  chex.assert_shape(params["rnn"]["layer_0"]["W_hh"], (HIDDENS, 2 * HIDDENS))
  chex.assert_shape(model.begin_state(BATCH), (LAYERS, BATCH, HIDDENS))
  with pytest.raises(UsageError, match=r"^unknown cell 'gru2'; choose one of rnn, gru, lstm, "
                                       r"gated, twice$"):
    validate.cell("gru2")


@pytest.mark.parametrize("cell", ["gated", "twice"])
def test_scan_runs_a_registered_cell_as_its_equations_read(toy_cells, cell):
  model, params, state, X, _, _ = case(cell)
  logits, final = jax.jit(model.apply)({"params": params}, X, state)
  want_logits, want_final = numpy_forward(params, X, state, cell)
  np.testing.assert_allclose(logits, want_logits, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(final, want_final, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("impl", ["layerwise", "wavefront"])
def test_a_cell_that_keeps_the_kernel_rule_runs_on_the_fast_paths(toy_cells, impl):
  scan, params, *args = case("gated", seed=1)
  fast = RNNLM(VOCAB, HIDDENS, LAYERS, "gated", impl=impl)
  (_, out_scan), grads_scan = loss_and_grad(scan, params, *args)
  (_, out_fast), grads_fast = loss_and_grad(fast, params, *args)
  chex.assert_trees_all_close(out_fast, out_scan, rtol=TOL, atol=TOL)
  chex.assert_trees_all_close(grads_fast, grads_scan, rtol=1e-4, atol=1e-4)


def test_a_cell_that_breaks_the_kernel_rule_is_refused_by_every_fast_path(toy_cells):
  for impl in FAST_IMPLS:
    message = (rf"^cell 'twice' does not fit the fast kernels of impl '{impl}' \(.*"
               r"cells\.CellSpec\.fits_kernels\); use impl 'scan'$")
    with pytest.raises(UsageError, match=message):
      RNNLM(VOCAB, HIDDENS, LAYERS, "twice", impl=impl)
    with pytest.raises(UsageError, match=message):
      TrainConfig(cell="twice", impl=impl).validate()
  h = jnp.zeros((BATCH, HIDDENS))
  W_hh, b_hh, gx = jnp.eye(HIDDENS), jnp.zeros(HIDDENS), jnp.ones((STEPS, BATCH, HIDDENS))
  with pytest.raises(UsageError, match="impl 'layerwise'"):
    recurrence.layer_scan("twice", "tanh", 1, W_hh, b_hh, h, gx)
  layers = [{"W_xh": W_hh, "W_hh": W_hh, "b_xh": b_hh, "b_hh": b_hh}] * 2
  with pytest.raises(UsageError, match="impl 'wavefront'"):
    recurrence.wave_scan("twice", ("tanh", "tanh"), 1, layers, (h, h), gx)


def test_the_kernel_rule_is_real():
  """Run by the layer kernel anyway, ``twice`` computes something else: the kernel hands both of
  its ``h @ W_hh`` the one product it computed, ``H_{t-1} W_hh``."""
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  W_hh = jax.random.normal(k[0], (HIDDENS, HIDDENS))
  b_hh = jnp.zeros(HIDDENS)
  h0, gx = jax.random.normal(k[1], (BATCH, HIDDENS)), jax.random.normal(k[2], (3, BATCH, HIDDENS))
  weights = {"W_hh": W_hh, "b_hh": b_hh}
  _, want = jax.lax.scan(lambda h, g: twice_step(weights, h, g), h0, gx)
  _, got = recurrence._recurrent_scan(recurrence._LayerStep(TWICE, "tanh"), 1, "float32", W_hh,
                                      b_hh, h0, gx)
  assert not np.allclose(got, want, atol=1e-3)


def test_conversion_follows_the_spec(toy_cells, monkeypatch):
  """A cell without a PyTorch layer does not convert; one whose gates sit in another order than
  PyTorch's has its gate blocks reordered, both ways exactly."""
  _, params, *_ = case("gated")
  with pytest.raises(UsageError, match=r"^cell 'gated' has no PyTorch layer to convert"):
    interop.params_to_torch(params, "gated", LAYERS)
  # A cell whose forget and input gate blocks sit swapped (only its conversion runs here).
  swapped = dataclasses.replace(cells.CELLS["lstm"], name="lstm_fi", gates=("f", "i", "g", "o"),
                                torch_gates=("i", "f", "g", "o"))
  monkeypatch.setitem(cells.CELLS, swapped.name, swapped)
  sd = {k: v.detach() for k, v in interop.with_prefix(torch.nn.LSTM(VOCAB, HIDDENS, 1)
                                                      .state_dict(), "rnn.").items()}
  sd.update({"linear.weight": torch.zeros(VOCAB, HIDDENS), "linear.bias": torch.zeros(VOCAB)})
  ours = interop.params_from_torch(sd, "lstm_fi", 1)["rnn"]["layer_0"]
  i, f, g, o = np.split(sd["rnn.weight_hh_l0"].numpy(), 4, axis=0)
  np.testing.assert_array_equal(ours["W_hh"], np.concatenate([f, i, g, o]).T)
  back = interop.params_to_torch(interop.params_from_torch(sd, "lstm_fi", 1), "lstm_fi", 1)
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
