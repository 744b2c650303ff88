"""Every fast path computes the reference's numbers.

The reference is ``RNNLM(impl="scan")`` (the chapter's ``nn.scan`` over stacked cells) and the
NumPy model in ``tests/reference.py``. The fast paths are ``impl="layerwise"`` and the kernels in
``deeprnn_jax.recurrence`` it runs on: the custom-VJP layer scan (weight gradients as one GEMM
after the scan, any unroll) and the input projection with its own backward pass; and
``impl="cudnn"`` (cuDNN's LSTM on a CUDA GPU, JAX's reference of that kernel elsewhere: the
weight packing, state layout and gradients through them are checked on every machine).
Forward values agree to 1e-5, gradients to 1e-4.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental import rnn

from deeprnn_jax import cells, cudnn, generate, recurrence, training
from deeprnn_jax.errors import UsageError
from deeprnn_jax.models import RNNLM

from reference import reference_forward

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
VOCAB, HIDDENS = 7, 5
CELLS = [("rnn", "tanh"), ("rnn", "relu"), ("gru", "tanh"), ("lstm", "tanh")]


def _close(a, b, tol):
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


def _tree_like(key, tree, scale=1.0):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def _loss(model: RNNLM):
  """``(params, state, X, R, S) -> (loss, (logits, state))``: the logits and the final state
  projected on random directions ``R`` and ``S``, so that every output's gradient is checked."""

  def loss(params, state, X, R, S):
    logits, new_state = model.apply({"params": params}, X, state)
    value = jnp.sum(logits * R) + sum(jnp.sum(a * b) for a, b in
                                      zip(jax.tree.leaves(new_state), jax.tree.leaves(S)))
    return value, (logits, new_state)

  return loss


@functools.lru_cache(maxsize=None)
def _loss_and_grad(model: RNNLM):
  """jit of ``(params, state, X, R, S) -> ((loss, (logits, state)), (dparams, dstate))``."""
  return jax.jit(jax.value_and_grad(_loss(model), argnums=(0, 1), has_aux=True))


def _case(cell, activation, num_layers, batch, steps, seed=0, impl="layerwise", unroll=None):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  scan = RNNLM(VOCAB, HIDDENS, num_layers, cell, activation, impl="scan")
  fast = RNNLM(VOCAB, HIDDENS, num_layers, cell, activation, impl=impl, unroll=unroll)
  X = jax.random.randint(k[0], (batch, steps), 0, VOCAB)
  params = scan.init(k[1], X)["params"]
  state = _tree_like(k[2], scan.begin_state(batch), 0.5)
  R = jax.random.normal(k[3], (batch, steps, VOCAB))
  S = _tree_like(k[4], state)
  return scan, fast, params, state, X, R, S


def _check(impl, cell, activation, num_layers, batch, steps, seed=0, unroll=None):
  """``impl`` against ``impl="scan"`` (values, final state, gradients) and the NumPy reference."""
  scan, fast, params, state, X, R, S = _case(cell, activation, num_layers, batch, steps, seed,
                                             impl, unroll)
  (_, out_s), grads_s = _loss_and_grad(scan)(params, state, X, R, S)
  (_, out_f), grads_f = _loss_and_grad(fast)(params, state, X, R, S)
  _close(out_f, out_s, FWD_TOL)
  _close(grads_f, grads_s, GRAD_TOL)
  _close(out_f, reference_forward(params, np.asarray(X), state, cell, activation), FWD_TOL)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell,activation", CELLS)
def test_layerwise_matches_scan_and_numpy(cell, activation, num_layers):
  _check("layerwise", cell, activation, num_layers, batch=3, steps=6)


@pytest.mark.parametrize("cell,activation,batch,steps", [
    ("lstm", "tanh", 1, 1), ("gru", "tanh", 4, 1), ("rnn", "relu", 1, 5)])
def test_layerwise_edge_shapes(cell, activation, batch, steps):
  _check("layerwise", cell, activation, 2, batch, steps, seed=1)


@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("cell,activation", CELLS + [("rnn", ("relu", "tanh", "relu"))])
def test_wavefront_matches_scan_and_numpy(cell, activation, num_layers):
  if not isinstance(activation, str):
    activation = activation[:num_layers]
  _check("wavefront", cell, activation, num_layers, batch=3, steps=6)


@pytest.mark.parametrize("cell,num_layers,batch,steps,unroll", [
    ("lstm", 2, 1, 1, 1), ("gru", 4, 2, 2, 1), ("lstm", 1, 2, 5, 1), ("gru", 2, 3, 9, 4),
    ("lstm", 3, 2, 7, 100)])
def test_wavefront_edge_shapes_and_unrolls(cell, num_layers, batch, steps, unroll):
  """Fewer steps than layers, one layer (no wave), unrolls with a remainder or past the end."""
  _check("wavefront", cell, "tanh", num_layers, batch, steps, seed=5, unroll=unroll)


def test_wavefront_refuses_dropout_between_layers():
  with pytest.raises(UsageError, match="without dropout"):
    RNNLM(VOCAB, HIDDENS, 2, "lstm", dropout=0.1, impl="wavefront")
  RNNLM(VOCAB, HIDDENS, 1, "lstm", dropout=0.1, impl="wavefront")  # one layer: nothing to drop


@pytest.mark.parametrize("num_layers,batch,steps", [(1, 3, 6), (2, 3, 6), (3, 2, 4), (2, 1, 1)])
def test_cudnn_matches_scan_and_numpy(num_layers, batch, steps):
  _check("cudnn", "lstm", "tanh", num_layers, batch, steps, seed=num_layers)


def test_cudnn_weight_layout():
  """The packed vector is cuDNN's documented layout: all W_ih, W_hh, then all b_ih, b_hh."""
  sizes = {"W_xh": [(3, 8), (2, 8)], "W_hh": [(2, 8), (2, 8)], "b_xh": [(8,), (8,)],
           "b_hh": [(8,), (8,)]}
  layers = [{name: 100 * (4 * l + i) + jnp.arange(np.prod(shapes[l]), dtype=jnp.float32)
             .reshape(shapes[l]) for i, (name, shapes) in enumerate(sizes.items())}
            for l in range(2)]
  w = cudnn.pack_lstm_weights(layers)
  assert w.shape == (rnn.get_num_params_in_lstm(3, 2, 2, False),)
  W_ih, W_hh, b_ih, b_hh = rnn.unpack_lstm_weights(w, 3, 2, 2, False)
  for l in range(2):  # [4H, in] and [4H, H]: PyTorch's weight_ih, weight_hh
    np.testing.assert_array_equal(W_ih[l], layers[l]["W_xh"].T)
    np.testing.assert_array_equal(W_hh[l], layers[l]["W_hh"].T)
    np.testing.assert_array_equal(b_ih[l], layers[l]["b_xh"])
    np.testing.assert_array_equal(b_hh[l], layers[l]["b_hh"])


@pytest.mark.parametrize("impl", ["wavefront", "cudnn"])
def test_forward_only_and_generation_match_layerwise(impl):
  """The paths taken without gradients: a jitted apply, and compiled generation (one step)."""
  scan, fast, params, state, X, _, _ = _case("lstm", "tanh", 2, batch=3, steps=6, seed=7,
                                             impl=impl)
  apply = lambda m: jax.jit(lambda p, x, s: m.apply({"params": p}, x, s))(params, X, state)
  _close(apply(fast), apply(scan), FWD_TOL)
  prefix = jnp.asarray([1, 2, 3, 0], jnp.int32)
  want = generate.generate_tokens(scan, params, prefix, 8, 0.0, None, jnp.int32(3))
  got = generate.generate_tokens(fast, params, prefix, 8, 0.0, None, jnp.int32(3))
  np.testing.assert_array_equal(got, want)


def test_cudnn_impl_refuses_what_it_cannot_run():
  with pytest.raises(UsageError, match="LSTMs without dropout"):
    RNNLM(VOCAB, HIDDENS, 2, "gru", impl="cudnn")
  with pytest.raises(UsageError, match="LSTMs without dropout"):
    RNNLM(VOCAB, HIDDENS, 2, "lstm", dropout=0.2, impl="cudnn")


def test_layerwise_mixed_activations_match_numpy():
  _check("layerwise", "rnn", ("relu", "tanh"), 2, batch=2, steps=4)


@pytest.mark.parametrize("cell,activation,unroll", [
    (c, a, 1) for c, a in CELLS] + [("lstm", "tanh", 3), ("gru", "tanh", 100)])
def test_layer_scan_custom_vjp_matches_autodiff(cell, activation, unroll):
  """The kernel alone on dense gates; unroll 3 leaves a remainder of 7 steps, 100 exceeds them."""
  steps, batch, G = 7, 3, cells.NUM_GATES[cell]
  k = jax.random.split(jax.random.PRNGKey(2), 6)
  W_hh = 0.5 * jax.random.normal(k[0], (HIDDENS, G * HIDDENS))
  b_hh = jax.random.normal(k[1], (G * HIDDENS,))
  h = jax.random.normal(k[2], (batch, HIDDENS))
  carry = (h, jax.random.normal(k[3], (batch, HIDDENS))) if cell == "lstm" else h
  gx = jax.random.normal(k[4], (steps, batch, G * HIDDENS))
  d_hs = jax.random.normal(k[5], (steps, batch, HIDDENS))

  def reference(W_hh, b_hh, carry, gx):
    weights = {"W_hh": W_hh, "b_hh": b_hh}
    return jax.lax.scan(lambda c, g: cells.step(cell, weights, c, g, activation), carry, gx)

  def loss(fn, *args):
    last, hs = fn(*args)
    return jnp.sum(hs * d_hs) + sum(jnp.sum(x * x) for x in jax.tree.leaves(last)), (last, hs)

  fast = functools.partial(recurrence.layer_scan, cell, activation, unroll)
  grad = lambda fn: jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3),
                                               has_aux=True))
  (_, out_r), grads_r = grad(reference)(W_hh, b_hh, carry, gx)
  (_, out_f), grads_f = grad(fast)(W_hh, b_hh, carry, gx)
  _close(out_f, out_r, FWD_TOL)
  _close(grads_f, grads_r, GRAD_TOL)
  _close(jax.jit(fast)(W_hh, b_hh, carry, gx), out_r, FWD_TOL)  # primal path, no VJP


def test_input_gates_dense_and_tokens():
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  params = {"W_xh": jax.random.normal(k[0], (6, 8)), "b_xh": jax.random.normal(k[1], (8,))}
  x = jax.random.normal(k[2], (4, 3, 6))
  tokens = jax.random.randint(k[3], (4, 3), 0, 6)
  for inputs in (x, tokens):
    R = jnp.cos(jnp.arange(4 * 3 * 8, dtype=jnp.float32)).reshape(4, 3, 8)
    ref = lambda p, x: jnp.sum(cells.input_gates(p, x) * R)
    new = lambda p, x: jnp.sum(recurrence.input_gates(p, x) * R)
    _close(recurrence.input_gates(params, inputs), cells.input_gates(params, inputs), FWD_TOL)
    argnums = (0, 1) if inputs.dtype == jnp.float32 else 0
    _close(jax.grad(new, argnums)(params, inputs), jax.grad(ref, argnums)(params, inputs),
           GRAD_TOL)


def test_train_epoch_same_parameters():
  """Two SGD minibatches under make_train_epoch: the fast path lands on the same parameters."""
  k = jax.random.split(jax.random.PRNGKey(4), 2)
  Xs = jax.random.randint(k[0], (2, 3, 5), 0, VOCAB)
  Ys = jax.random.randint(k[1], (2, 3, 5), 0, VOCAB)
  opt = training.make_optimizer(1.0, 1.0)
  results = []
  for impl in ("scan", "layerwise", "wavefront", "cudnn"):
    model = RNNLM(VOCAB, HIDDENS, 2, "lstm", impl=impl)
    ts = training.init_train_state(model, opt, jax.random.PRNGKey(0))
    ts, losses = training.make_train_epoch(model, opt)(ts, Xs, Ys, jax.random.PRNGKey(1))
    results.append((ts.params, losses))
  _close(results[1], results[0], GRAD_TOL)
  for result in results[2:]:
    _close(result, results[0], GRAD_TOL)
