"""Every implementation computes the chapter's function, in float32.

``RNNLM(impl=...)`` has five implementations of the recurrent stack: ``"scan"`` (the chapter's
``nn.scan`` over stacked cells, the reference), ``"layerwise"`` (the default: one custom-VJP scan
per layer, see ``deeprnn_jax.model.recurrence``), ``"wavefront"`` (all layers advance in one scan),
``"cudnn"`` (cuDNN's LSTM on a CUDA GPU; elsewhere JAX's reference of that kernel, so the weight
packing, state layout and gradients through them are checked on every machine) and ``"onednn"``
(oneDNN's fused LSTM on the CPU, compiled on first use: the ``onednn`` extra, part of the test
extra).

Each is held to two references: the NumPy model in ``tests/references/numpy_model.py``, written
from the equations (itself checked against PyTorch here), and ``impl="scan"``. Forward values
(logits and final state) agree to 1e-5, gradients to 1e-4. Then the kernels alone (the layer
scan's custom VJP, the input projection), transformations (``jit``, ``vmap``, ``grad``), the paths
taken without gradients (generation), one training epoch, and what an implementation refuses.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
  assert_state,
  assert_state_close,
  cell_cases,
  cell_names,
  impls_for,
  layout_params,
  projected_loss,
  random_like,
  random_state,
  random_tokens,
)
from jax.experimental import rnn
from references.numpy_model import NUM_GATES, reference_forward

from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import training
from deeprnn_jax.model import cells, cudnn, generate, recurrence
from deeprnn_jax.model.models import RNNLM

IMPLS = impls_for("lstm")  # every implementation: the LSTM has them all
TOL = dict(rtol=1e-5, atol=1e-5)
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
VOCAB, HIDDENS = 7, 5
CELLS = cell_cases(fast=True)  # the cells the fast paths run, with each φ they take


def _close(a, b, tol):
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)






@functools.lru_cache(maxsize=None)
def _loss_and_grad(model: RNNLM):
  """jit of ``(params, state, X, R, S) -> ((loss, (logits, state)), (dparams, dstate))``."""
  return jax.jit(jax.value_and_grad(projected_loss(model), argnums=(0, 1), has_aux=True))


def _case(cell, activation, num_layers, batch, steps, seed=0, impl="layerwise", unroll=None):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  scan = RNNLM(VOCAB, HIDDENS, num_layers, cell, activation, impl="scan")
  fast = RNNLM(VOCAB, HIDDENS, num_layers, cell, activation, impl=impl, unroll=unroll)
  X = jax.random.randint(k[0], (batch, steps), 0, VOCAB)
  params = scan.init(k[1], X)["params"]
  state = random_like(k[2], scan.begin_state(batch), 0.5)
  R = jax.random.normal(k[3], (batch, steps, VOCAB))
  S = random_like(k[4], state)
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


# --------------------------------------------------------------------------------------------
# The NumPy reference is the oracle for everything below, so it is checked against an
# independent implementation first: PyTorch's nn.RNN/GRU/LSTM (float64), whose gate orders the
# parameter layout follows.


@pytest.mark.parametrize("cell,activation", cell_cases(torch=True))
def test_the_numpy_reference_equals_torch_rnn_gru_and_lstm(cell, activation):
  import torch  # A declared test dependency (the "test" extra).

  batch, steps, hiddens, vocab, L = 2, 5, 4, 6, 2
  rng = np.random.default_rng(0)
  G, spec = NUM_GATES[cell], cells.CELLS[cell]
  params = {"rnn": {}, "W_hq": rng.uniform(-0.5, 0.5, (hiddens, vocab)),
            "b_q": rng.uniform(-0.5, 0.5, vocab)}
  for l in range(L):
    params["rnn"][f"layer_{l}"] = {
        "W_xh": rng.uniform(-0.5, 0.5, (vocab if l == 0 else hiddens, G * hiddens)),
        "W_hh": rng.uniform(-0.5, 0.5, (hiddens, G * hiddens)),
        "b_xh": rng.uniform(-0.5, 0.5, G * hiddens),
        "b_hh": rng.uniform(-0.5, 0.5, G * hiddens),
    }
  X = rng.integers(0, vocab, (batch, steps))
  h0 = rng.normal(size=(L, batch, hiddens))
  c0 = rng.normal(size=(L, batch, hiddens))
  state = (h0, c0) if spec.pair else h0

  layer = getattr(torch.nn, spec.torch_module.removeprefix("nn."))
  nonlinearity = dict(nonlinearity=activation) if spec.takes_activation else {}
  net = layer(vocab, hiddens, L, batch_first=True, **nonlinearity)
  net = net.double()
  with torch.no_grad():
    for l in range(L):
      p = params["rnn"][f"layer_{l}"]
      getattr(net, f"weight_ih_l{l}").copy_(torch.from_numpy(p["W_xh"].T.copy()))
      getattr(net, f"weight_hh_l{l}").copy_(torch.from_numpy(p["W_hh"].T.copy()))
      getattr(net, f"bias_ih_l{l}").copy_(torch.from_numpy(p["b_xh"]))
      getattr(net, f"bias_hh_l{l}").copy_(torch.from_numpy(p["b_hh"]))
    inputs = torch.nn.functional.one_hot(torch.from_numpy(X), vocab).double()
    torch_state = tuple(torch.from_numpy(s) for s in state) if spec.pair else \
        torch.from_numpy(state)
    out, torch_final = net(inputs, torch_state)
    torch_logits = (out @ torch.from_numpy(params["W_hq"]) + torch.from_numpy(params["b_q"]))

  logits, final = reference_forward(params, X, state, cell, activation)
  np.testing.assert_allclose(logits, torch_logits.numpy(), rtol=1e-10, atol=1e-10)
  torch_final = tuple(s.numpy() for s in torch_final) if spec.pair else torch_final.numpy()
  chex.assert_trees_all_close(final, torch_final, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Forward: every implementation equals the NumPy reference, jitted or not.

# (batch, steps, hiddens, vocab): batch 1 and steps 1 included.
SHAPES = ((1, 1, 4, 5), (2, 5, 3, 7), (3, 4, 8, 6), (1, 6, 5, 4), (4, 1, 6, 9))

# (name, cell, activation per model, layer counts) for every cell: a cell that takes φ (the RNN)
# with tanh, relu and mixed per-layer φ_l; the others (GRU, LSTM) as they are. (Mixed needs
# L >= 2; relu at L = 2 is covered by the mixed cases.)
KINDS = tuple(
    kind for cell in cell_names() for kind in (
        ((f"{cell}_tanh", cell, lambda L: "tanh", (1, 2, 3)),
         (f"{cell}_relu", cell, lambda L: "relu", (1, 3)),
         (f"{cell}_mixed", cell, lambda L: ("relu", "tanh", "relu")[:L], (2, 3)))
        if cells.CELLS[cell].takes_activation else ((cell, cell, lambda L: "tanh", (1, 2, 3)),)))


def _forward_cases():
  """Every kind of cell with L = 1, 2, 3, the shapes rotating so each kind sees several."""
  cases = []
  combos = [(kind, L) for kind in KINDS for L in kind[3]]
  for i, ((name, cell, act, _), L) in enumerate(combos):
    batch, steps, hiddens, vocab = SHAPES[i % len(SHAPES)]
    cases.append(pytest.param(
        cell, act(L), L, batch, steps, hiddens, vocab,
        id=f"{name}_L{L}_b{batch}_t{steps}_h{hiddens}_v{vocab}"))
  return cases


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize("cell,activation,num_layers,batch,steps,hiddens,vocab",
                         _forward_cases())
def test_every_implementation_equals_the_numpy_reference(cell, activation, num_layers, batch,
                                                          steps, hiddens, vocab, jit):
  """Logits and final states equal the NumPy reference to 1e-5.

  Each case runs every implementation that has the cell, from a random nonzero state and from
  ``state=None`` (zeros), inside one function, jitted or not.
  """
  seed = num_layers * 100 + batch * 10 + steps
  k_x, k_s = jax.random.split(jax.random.PRNGKey(seed))
  X = random_tokens(k_x, batch, steps, vocab)
  state = random_state(k_s, cell, num_layers, batch, hiddens)
  params = layout_params(seed, vocab, hiddens, num_layers, cell)
  impls = impls_for(cell)
  models = [RNNLM(vocab, hiddens, num_layers, cell, activation, impl=impl) for impl in impls]

  def run(p, x, s):
    return [(m.apply({"params": p}, x, s), m.apply({"params": p}, x)) for m in models]

  expected = (reference_forward(params, np.asarray(X), state, cell, activation),
              reference_forward(params, np.asarray(X), None, cell, activation))
  results = (jax.jit(run) if jit else run)(params, X, state)
  assert len(results) == len(impls)
  for impl, outs in zip(impls, results):
    for (logits, new_state), (ref_logits, ref_state) in zip(outs, expected):
      chex.assert_shape(logits, (batch, steps, vocab))
      chex.assert_type(logits, jnp.float32)
      assert_state(new_state, cell, num_layers, batch, hiddens)
      np.testing.assert_allclose(np.asarray(logits), ref_logits, **TOL, err_msg=impl)
      assert_state_close(new_state, ref_state, cell)
  # The initial state matters, so the two comparisons are not one.
  assert not np.allclose(expected[0][0], expected[1][0], atol=1e-4)


# --------------------------------------------------------------------------------------------
# Values, final state and gradients: every fast path equals impl="scan" and the NumPy reference.


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell,activation", CELLS)
def test_layerwise_matches_scan_and_numpy(cell, activation, num_layers):
  _check("layerwise", cell, activation, num_layers, batch=3, steps=6)


@pytest.mark.parametrize("cell,activation,batch,steps", [
    ("lstm", "tanh", 1, 1), ("gru", "tanh", 4, 1), ("rnn", "relu", 1, 5)])
def test_layerwise_matches_scan_and_numpy_on_one_row_or_one_step(cell, activation, batch, steps):
  _check("layerwise", cell, activation, 2, batch, steps, seed=1)


def test_layerwise_mixed_activations_match_numpy():
  _check("layerwise", "rnn", ("relu", "tanh"), 2, batch=2, steps=4)


@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("cell,activation", CELLS + [("rnn", ("relu", "tanh", "relu"))])
def test_wavefront_matches_scan_and_numpy(cell, activation, num_layers):
  if not isinstance(activation, str):
    activation = activation[:num_layers]
  _check("wavefront", cell, activation, num_layers, batch=3, steps=6)


@pytest.mark.slow
@pytest.mark.parametrize("cell,num_layers,batch,steps,unroll", [
    ("lstm", 2, 1, 1, 1), ("gru", 4, 2, 2, 1), ("lstm", 1, 2, 5, 1), ("gru", 2, 3, 9, 4),
    ("lstm", 3, 2, 7, 100)])
def test_wavefront_edge_shapes_and_unrolls(cell, num_layers, batch, steps, unroll):
  """Fewer steps than layers, one layer (no wave), unrolls with a remainder or past the end."""
  _check("wavefront", cell, "tanh", num_layers, batch, steps, seed=5, unroll=unroll)


@pytest.mark.parametrize("impl", ["cudnn", "onednn"])
@pytest.mark.parametrize("num_layers,batch,steps", [(1, 3, 6), (2, 3, 6), (3, 2, 4), (2, 1, 1)])
def test_fused_kernels_match_scan_and_numpy(impl, num_layers, batch, steps):
  _check(impl, "lstm", "tanh", num_layers, batch, steps, seed=num_layers)


@pytest.mark.parametrize("cell,activation", [
    (cell, ("relu", "tanh") if cells.CELLS[cell].takes_activation else "tanh")
    for cell in cell_names()])
def test_gradients_finite_and_equal_across_impls(cell, activation):
  """The training loss (mean cross-entropy) and its gradients, one compiled call for every
  implementation of the cell: finite, nonzero for every parameter, equal to impl="scan"'s, and
  the loss equal to the NumPy reference's."""
  vocab, hiddens, L, batch, steps = 6, 5, 2, 3, 4
  X = random_tokens(jax.random.PRNGKey(11), batch, steps, vocab)
  Y = random_tokens(jax.random.PRNGKey(12), batch, steps, vocab)
  params = layout_params(13, vocab, hiddens, L, cell)

  def loss(p, model):
    logits, _ = model.apply({"params": p}, X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

  impls = impls_for(cell)
  models = [RNNLM(vocab, hiddens, L, cell, activation, impl=impl) for impl in impls]
  results = jax.jit(lambda p: [jax.value_and_grad(loss)(p, m) for m in models])(params)
  for value, g in results:
    assert np.isfinite(float(value)) and float(value) > 0
    chex.assert_tree_all_finite(g)
    chex.assert_trees_all_equal_shapes(g, params)
    # Every parameter array gets some gradient.
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
      assert np.abs(np.asarray(leaf)).max() > 0, path
  for impl, (value, g) in zip(impls[1:], results[1:]):
    np.testing.assert_allclose(value, results[0][0], rtol=1e-5, err_msg=impl)
    chex.assert_trees_all_close(g, results[0][1], rtol=1e-4, atol=1e-6)
  # The loss is the mean cross-entropy of the reference logits.
  ref_logits, _ = reference_forward(params, np.asarray(X), None, cell, activation)
  log_probs = ref_logits - np.log(np.exp(ref_logits).sum(-1, keepdims=True))
  ref_loss = -np.take_along_axis(log_probs, np.asarray(Y)[..., None], -1).mean()
  np.testing.assert_allclose(float(results[0][0]), ref_loss, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The kernels alone.


@pytest.mark.parametrize("cell,activation,unroll", [
    (c, a, 1) for c, a in CELLS] + [("lstm", "tanh", 3), ("gru", "tanh", 100)])
def test_layer_scan_custom_vjp_matches_autodiff(cell, activation, unroll):
  """The kernel alone on dense gates; unroll 3 leaves a remainder of 7 steps, 100 exceeds them."""
  spec = cells.CELLS[cell]
  steps, batch, G = 7, 3, spec.num_gates
  k = jax.random.split(jax.random.PRNGKey(2), 6)
  W_hh = 0.5 * jax.random.normal(k[0], (HIDDENS, G * HIDDENS))
  b_hh = jax.random.normal(k[1], (G * HIDDENS,))
  h = jax.random.normal(k[2], (batch, HIDDENS))
  carry = (h, jax.random.normal(k[3], (batch, HIDDENS))) if spec.pair else h
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


def test_input_gates_and_their_gradients_equal_numpy_for_dense_inputs_and_tokens():
  """``X W_xh + b_xh`` and its vjp, against NumPy: a token stands for its one-hot row."""
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  params = {"W_xh": jax.random.normal(k[0], (6, 8)), "b_xh": jax.random.normal(k[1], (8,))}
  W, b = np.asarray(params["W_xh"], np.float64), np.asarray(params["b_xh"], np.float64)
  x = jax.random.normal(k[2], (4, 3, 6))
  tokens = jax.random.randint(k[3], (4, 3), 0, 6)
  R = jnp.cos(jnp.arange(4 * 3 * 8, dtype=jnp.float32)).reshape(4, 3, 8)
  R64 = np.asarray(R, np.float64)
  loss = lambda p, x: jnp.sum(recurrence.input_gates(p, x) * R)
  for inputs, dense in ((x, np.asarray(x, np.float64)), (tokens, np.eye(6)[np.asarray(tokens)])):
    _close(recurrence.input_gates(params, inputs), dense @ W + b, FWD_TOL)
    grads = jax.grad(loss, argnums=(0, 1) if inputs.dtype == jnp.float32 else 0)(params, inputs)
    p_grad = grads[0] if isinstance(grads, tuple) else grads
    _close(p_grad, {"W_xh": np.einsum("bti,bth->ih", dense, R64), "b_xh": R64.sum((0, 1))},
           GRAD_TOL)
    if isinstance(grads, tuple):
      _close(grads[1], R64 @ W.T, GRAD_TOL)


def test_cudnn_packs_weights_in_its_documented_layout():
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


# --------------------------------------------------------------------------------------------
# Transformations, generation and training: the same results whatever the implementation.


@pytest.mark.parametrize("cell,impl", [("lstm", "layerwise"), ("rnn", "scan"),
                                       ("gru", "layerwise"), ("gru", "wavefront"),
                                       ("lstm", "onednn")])
def test_vmap_over_stacked_params_equals_loop(cell, impl):
  vocab, hiddens, L, batch, steps, n = 5, 4, 2, 2, 3, 3
  model = RNNLM(vocab, hiddens, L, cell, impl=impl)
  param_sets = [layout_params(8 + i, vocab, hiddens, L, cell) for i in range(n)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *param_sets)
  X = random_tokens(jax.random.PRNGKey(9), batch, steps, vocab)
  state = random_state(jax.random.PRNGKey(10), cell, L, batch, hiddens)

  apply = jax.jit(lambda p: model.apply({"params": p}, X, state))
  logits_v, state_v = jax.vmap(apply)(stacked)
  chex.assert_shape(logits_v, (n, batch, steps, vocab))
  for i, p in enumerate(param_sets):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], (logits_v, state_v)), apply(p),
                                rtol=1e-5, atol=1e-6)
  # The parameter sets really differ, so the loop is not comparing one thing with itself.
  assert not np.allclose(logits_v[0], logits_v[1])


@pytest.mark.parametrize("impl", ["wavefront", "cudnn", "onednn"])
def test_forward_only_and_generation_match_scan(impl):
  """The paths taken without gradients: a jitted apply, and compiled generation (one step)."""
  scan, fast, params, state, X, _, _ = _case("lstm", "tanh", 2, batch=3, steps=6, seed=7,
                                             impl=impl)
  apply = lambda m: jax.jit(lambda p, x, s: m.apply({"params": p}, x, s))(params, X, state)
  _close(apply(fast), apply(scan), FWD_TOL)
  prefix = jnp.asarray([1, 2, 3, 0], jnp.int32)
  want = generate.generate_tokens(scan, params, prefix, 8, 0.0, None, jnp.int32(3))
  got = generate.generate_tokens(fast, params, prefix, 8, 0.0, None, jnp.int32(3))
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_an_sgd_epoch_lands_every_fast_path_on_the_parameters_of_scan():
  """Two SGD minibatches under make_train_epoch: every fast path lands on the same parameters
  and losses as impl="scan"."""
  k = jax.random.split(jax.random.PRNGKey(4), 2)
  Xs = jax.random.randint(k[0], (2, 3, 5), 0, VOCAB)
  Ys = jax.random.randint(k[1], (2, 3, 5), 0, VOCAB)
  opt = training.make_optimizer(1.0, 1.0)
  results = []
  for impl in IMPLS:
    model = RNNLM(VOCAB, HIDDENS, 2, "lstm", impl=impl)
    ts = training.init_train_state(model, opt, jax.random.PRNGKey(0))
    ts, losses = training.make_train_epoch(model, opt)(ts, Xs, Ys, jax.random.PRNGKey(1))
    results.append((ts.params, losses))
  start = training.init_train_state(RNNLM(VOCAB, HIDDENS, 2, "lstm"), opt, jax.random.PRNGKey(0))
  assert not np.allclose(results[0][0]["W_hq"], start.params["W_hq"])  # the steps moved them
  for result in results[1:]:
    _close(result, results[0], GRAD_TOL)


# --------------------------------------------------------------------------------------------
# What an implementation cannot run is refused when the model is built.


def test_wavefront_refuses_dropout_between_layers():
  with pytest.raises(UsageError, match="without dropout"):
    RNNLM(VOCAB, HIDDENS, 2, "lstm", dropout=0.1, impl="wavefront")
  one_layer = RNNLM(VOCAB, HIDDENS, 1, "lstm", dropout=0.1, impl="wavefront")  # nothing to drop
  logits, _ = one_layer.apply(one_layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)),
                              jnp.zeros((1, 2), jnp.int32))
  chex.assert_shape(logits, (1, 2, VOCAB))


@pytest.mark.parametrize("impl", ["cudnn", "onednn"])
def test_fused_impls_refuse_what_they_cannot_run(impl):
  with pytest.raises(UsageError, match=f"impl '{impl}' runs LSTMs without dropout"):
    RNNLM(VOCAB, HIDDENS, 2, "gru", impl=impl)
  with pytest.raises(UsageError, match="LSTMs without dropout"):
    RNNLM(VOCAB, HIDDENS, 2, "lstm", dropout=0.2, impl=impl)
