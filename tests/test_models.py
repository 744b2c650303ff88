"""The deep RNN language model against the NumPy reference, and its contracts.

``RNNLM`` with ``impl="scan"`` (the chapter's formulation) and ``impl="layerwise"`` (the default
fast path) must both compute the function written in ``tests/reference.py`` from the equations.
The other fast paths (``wavefront``, ``cudnn``) are checked in ``test_fast_paths.py``.
"""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from deeprnn_jax.errors import UsageError
from deeprnn_jax.models import RNNLM
from reference import NUM_GATES, reference_forward

IMPLS = ("scan", "layerwise")
TOL = dict(rtol=1e-5, atol=1e-5)

# (batch, steps, hiddens, vocab): batch 1 and steps 1 included.
SHAPES = ((1, 1, 4, 5), (2, 5, 3, 7), (3, 4, 8, 6), (1, 6, 5, 4), (4, 1, 6, 9))


# (name, cell, activation per model, layer counts): RNN tanh, relu and mixed per-layer φ_l; GRU;
# LSTM. (Mixed needs L >= 2; relu at L = 2 is covered by the mixed cases.)
KINDS = (
    ("rnn_tanh", "rnn", lambda L: "tanh", (1, 2, 3)),
    ("rnn_relu", "rnn", lambda L: "relu", (1, 3)),
    ("rnn_mixed", "rnn", lambda L: ("relu", "tanh", "relu")[:L], (2, 3)),
    ("gru", "gru", lambda L: "tanh", (1, 2, 3)),
    ("lstm", "lstm", lambda L: "tanh", (1, 2, 3)),
)


def _cases():
  """Every kind of cell with L = 1, 2, 3, the shapes rotating so each kind sees several."""
  cases = []
  combos = [(kind, L) for kind in KINDS for L in kind[3]]
  for i, ((name, cell, act, _), L) in enumerate(combos):
    batch, steps, hiddens, vocab = SHAPES[i % len(SHAPES)]
    cases.append(dict(
        testcase_name=f"{name}_L{L}_b{batch}_t{steps}_h{hiddens}_v{vocab}",
        cell=cell, activation=act(L), num_layers=L, batch=batch, steps=steps,
        hiddens=hiddens, vocab=vocab,
    ))
  return cases


def random_state(key, cell: str, num_layers: int, batch: int, hiddens: int):
  """A nonzero initial state in d2l layout."""
  kh, kc = jax.random.split(key)
  h = 0.5 * jax.random.normal(kh, (num_layers, batch, hiddens), jnp.float32)
  if cell == "lstm":
    return h, 0.5 * jax.random.normal(kc, (num_layers, batch, hiddens), jnp.float32)
  return h


def random_tokens(key, batch: int, steps: int, vocab: int):
  return jax.random.randint(key, (batch, steps), 0, vocab, jnp.int32)


def assert_state(state, cell: str, num_layers: int, batch: int, hiddens: int):
  if cell == "lstm":
    assert isinstance(state, tuple) and len(state) == 2
    chex.assert_shape(state, (num_layers, batch, hiddens))
  else:
    chex.assert_shape(state, (num_layers, batch, hiddens))
  chex.assert_type(state, jnp.float32)


def assert_state_close(state, ref_state, cell: str):
  chex.assert_trees_all_close(tuple(state) if cell == "lstm" else state,
                              tuple(ref_state) if cell == "lstm" else ref_state, **TOL)


def init_params(model: RNNLM, key, batch: int = 2, steps: int = 3):
  return model.init(key, jnp.zeros((batch, steps), jnp.int32))["params"]


def layout_params(seed: int, vocab: int, hiddens: int, num_layers: int, cell: str,
                  scale: float = 0.6) -> dict:
  """Random float32 parameters built from the documented layout alone (no ``init``).

  ``rnn/layer_{l}/{W_xh, W_hh, b_xh, b_hh}`` with G fused gates, ``W_hq``, ``b_q``; uniform on
  ``[-scale, scale]``, wider than the initialisation so the nonlinearities are exercised.
  """
  rng = np.random.default_rng(seed)
  G = NUM_GATES[cell]
  u = lambda *shape: rng.uniform(-scale, scale, shape).astype(np.float32)
  params = {"rnn": {}, "W_hq": u(hiddens, vocab), "b_q": u(vocab)}
  for l in range(num_layers):
    params["rnn"][f"layer_{l}"] = {
        "W_xh": u(vocab if l == 0 else hiddens, G * hiddens),
        "W_hh": u(hiddens, G * hiddens),
        "b_xh": u(G * hiddens),
        "b_hh": u(G * hiddens),
    }
  return jax.tree_util.tree_map(jnp.asarray, params)


# --------------------------------------------------------------------------------------------
# The model equals the reference.


class ReferenceTest(chex.TestCase):
  """Logits and final states equal the NumPy reference to 1e-5, jitted or not.

  Each case runs both implementations, from a random nonzero state and from ``state=None``
  (zeros), inside one function that the variant jits or not.
  """

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_cases())
  def test_matches_reference(self, cell, activation, num_layers, batch, steps, hiddens, vocab):
    seed = num_layers * 100 + batch * 10 + steps
    k_x, k_s = jax.random.split(jax.random.PRNGKey(seed))
    X = random_tokens(k_x, batch, steps, vocab)
    state = random_state(k_s, cell, num_layers, batch, hiddens)
    params = layout_params(seed, vocab, hiddens, num_layers, cell)
    models = [RNNLM(vocab, hiddens, num_layers, cell, activation, impl=impl) for impl in IMPLS]

    @self.variant
    def run(p, x, s):
      return [(m.apply({"params": p}, x, s), m.apply({"params": p}, x)) for m in models]

    expected = (reference_forward(params, np.asarray(X), state, cell, activation),
                reference_forward(params, np.asarray(X), None, cell, activation))
    for impl, outs in zip(IMPLS, run(params, X, state)):
      for (logits, new_state), (ref_logits, ref_state) in zip(outs, expected):
        chex.assert_shape(logits, (batch, steps, vocab))
        chex.assert_type(logits, jnp.float32)
        assert_state(new_state, cell, num_layers, batch, hiddens)
        np.testing.assert_allclose(np.asarray(logits), ref_logits, **TOL, err_msg=impl)
        assert_state_close(new_state, ref_state, cell)
    # The initial state matters, so the two comparisons are not one.
    assert not np.allclose(expected[0][0], expected[1][0], atol=1e-4)


# The reference is the oracle for everything above, so check it against an independent
# implementation too: PyTorch's nn.RNN/GRU/LSTM (float64), whose gate orders the layout follows.
@pytest.mark.parametrize("cell,activation", [("rnn", "tanh"), ("rnn", "relu"), ("gru", "tanh"),
                                             ("lstm", "tanh")])
def test_reference_matches_torch(cell, activation):
  import torch  # A declared test dependency (the "test" extra).

  batch, steps, hiddens, vocab, L = 2, 5, 4, 6, 2
  rng = np.random.default_rng(0)
  G = NUM_GATES[cell]
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
  state = (h0, c0) if cell == "lstm" else h0

  if cell == "rnn":
    net = torch.nn.RNN(vocab, hiddens, L, nonlinearity=activation, batch_first=True)
  else:
    net = getattr(torch.nn, cell.upper())(vocab, hiddens, L, batch_first=True)
  net = net.double()
  with torch.no_grad():
    for l in range(L):
      p = params["rnn"][f"layer_{l}"]
      getattr(net, f"weight_ih_l{l}").copy_(torch.from_numpy(p["W_xh"].T.copy()))
      getattr(net, f"weight_hh_l{l}").copy_(torch.from_numpy(p["W_hh"].T.copy()))
      getattr(net, f"bias_ih_l{l}").copy_(torch.from_numpy(p["b_xh"]))
      getattr(net, f"bias_hh_l{l}").copy_(torch.from_numpy(p["b_hh"]))
    inputs = torch.nn.functional.one_hot(torch.from_numpy(X), vocab).double()
    torch_state = tuple(torch.from_numpy(s) for s in state) if cell == "lstm" else \
        torch.from_numpy(state)
    out, torch_final = net(inputs, torch_state)
    torch_logits = (out @ torch.from_numpy(params["W_hq"]) + torch.from_numpy(params["b_q"]))

  logits, final = reference_forward(params, X, state, cell, activation)
  np.testing.assert_allclose(logits, torch_logits.numpy(), rtol=1e-10, atol=1e-10)
  if cell == "lstm":
    np.testing.assert_allclose(final[0], torch_final[0].numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(final[1], torch_final[1].numpy(), rtol=1e-10, atol=1e-10)
  else:
    np.testing.assert_allclose(final, torch_final.numpy(), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# vmap, gradients, the implementations.


@pytest.mark.parametrize("cell,impl", [("lstm", "layerwise"), ("rnn", "scan"),
                                       ("gru", "layerwise"), ("gru", "wavefront")])
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
    logits_i, state_i = apply(p)
    np.testing.assert_allclose(logits_v[i], logits_i, rtol=1e-5, atol=1e-6)
    for s_v, s_i in zip(jax.tree_util.tree_leaves(state_v), jax.tree_util.tree_leaves(state_i)):
      np.testing.assert_allclose(s_v[i], s_i, rtol=1e-5, atol=1e-6)
  # The parameter sets really differ, so the loop is not comparing one thing with itself.
  assert not np.allclose(logits_v[0], logits_v[1])


@pytest.mark.parametrize("cell,activation", [("rnn", ("relu", "tanh")), ("gru", "tanh"),
                                             ("lstm", "tanh")])
def test_gradients_finite_and_equal_across_impls(cell, activation):
  vocab, hiddens, L, batch, steps = 6, 5, 2, 3, 4
  X = random_tokens(jax.random.PRNGKey(11), batch, steps, vocab)
  Y = random_tokens(jax.random.PRNGKey(12), batch, steps, vocab)
  params = layout_params(13, vocab, hiddens, L, cell)

  def loss(p, model):
    logits, _ = model.apply({"params": p}, X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

  models = [RNNLM(vocab, hiddens, L, cell, activation, impl=impl) for impl in IMPLS]
  results = jax.jit(lambda p: [jax.value_and_grad(loss)(p, m) for m in models])(params)
  for value, g in results:
    assert np.isfinite(float(value)) and float(value) > 0
    chex.assert_tree_all_finite(g)
    chex.assert_trees_all_equal_shapes(g, params)
    # Every parameter array gets some gradient.
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
      assert np.abs(np.asarray(leaf)).max() > 0, path
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  chex.assert_trees_all_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
  # The loss is the mean cross-entropy of the reference logits.
  ref_logits, _ = reference_forward(params, np.asarray(X), None, cell, activation)
  log_probs = ref_logits - np.log(np.exp(ref_logits).sum(-1, keepdims=True))
  ref_loss = -np.take_along_axis(log_probs, np.asarray(Y)[..., None], -1).mean()
  np.testing.assert_allclose(float(results[0][0]), ref_loss, rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_init_same_for_both_impls_layout_and_bounds(cell):
  """``init`` gives the documented layout, the same for scan and layerwise from one key, and
  every parameter (recurrent and head) ``~ U(-1/√hiddens, 1/√hiddens)``."""
  vocab, hiddens, L = 30, 16, 2
  key = jax.random.PRNGKey(14)
  params = {impl: init_params(RNNLM(vocab, hiddens, L, cell, impl=impl), key) for impl in IMPLS}
  chex.assert_trees_all_equal(params["scan"], params["layerwise"])
  # Names, nesting, shapes and dtypes are the documented ones.
  chex.assert_trees_all_equal_shapes_and_dtypes(params["scan"],
                                                layout_params(0, vocab, hiddens, L, cell))
  assert_uniform_init(params["scan"], 1.0 / np.sqrt(hiddens))
  # Different keys give different parameters.
  other = init_params(RNNLM(vocab, hiddens, L, cell), jax.random.PRNGKey(15))
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
def test_dropout(impl):
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
def test_dropout_masks(impl):
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


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("num_layers,batch,hiddens", [(1, 1, 3), (3, 4, 7)])
def test_begin_state(cell, num_layers, batch, hiddens):
  state = RNNLM(5, hiddens, num_layers, cell).begin_state(batch)
  assert_state(state, cell, num_layers, batch, hiddens)
  for leaf in jax.tree_util.tree_leaves(state):
    np.testing.assert_array_equal(leaf, 0.0)
  if cell != "lstm":
    assert not isinstance(state, tuple)
  # The default batch size is one.
  assert_state(RNNLM(5, hiddens, num_layers, cell).begin_state(), cell, num_layers, 1, hiddens)


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
def test_bad_hyperparameters(kwargs):
  args = dict(vocab_size=5, num_hiddens=4, num_layers=2, cell="rnn", activation="tanh",
              dropout=0.0)
  args.update(kwargs)
  with pytest.raises(UsageError):
    RNNLM(**args)


def test_good_hyperparameters_accepted():
  """The boundaries of the valid ranges are accepted (so the checks above are not blanket)."""
  RNNLM(5, 1, 1, "rnn", "relu", dropout=0.0)
  RNNLM(5, 4, 2, "rnn", ("relu", "tanh"), dropout=0.999)
  RNNLM(5, 4, 3, "lstm", ["tanh", "tanh", "tanh"], impl="scan")
