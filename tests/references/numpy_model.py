"""A NumPy reference for the deep RNN language model, written straight from the equations.

Independent of ``deeprnn_jax.model.cells``: explicit Python loops over time ``t`` and layers ``l``,
one-hot inputs, float64 throughout. Parameters use the project's pytree layout::

    rnn/layer_{l}/{W_xh, W_hh, b_xh, b_hh}   gates fused on the last axis (G = 1, 3, 4)
    W_hq <[num_hiddens, vocab_size]>
    b_q  <[vocab_size]>

with the GRU's gates ordered r, z, n and the LSTM's i, f, g, o (PyTorch's order). State is in
d2l layout ``<[L, batch, hiddens]>`` (LSTM: a pair ``(H, C)`` of those).

Equations, for layer ``l`` at time ``t`` with input ``X`` (``H_t^(l-1)``, or the one-hot token for
``l = 0``) and previous state ``H`` (``H_{t-1}^(l)``)::

  RNN:  H_t = φ_l(X W_xh + b_xh + H W_hh + b_hh)
  GRU:  R = σ(X W_xr + b_xr + H W_hr + b_hr)
        Z = σ(X W_xz + b_xz + H W_hz + b_hz)
        N = tanh(X W_xn + b_xn + R ⊙ (H W_hn + b_hn))
        H_t = (1 - Z) ⊙ N + Z ⊙ H
  LSTM: I, F, G, O = split(X W_xh + b_xh + H W_hh + b_hh, 4)
        C_t = σ(F) ⊙ C + σ(I) ⊙ tanh(G)
        H_t = σ(O) ⊙ tanh(C_t)
  head: O_t = H_t^(L) W_hq + b_q

Each cell is one entry of :data:`CELLS` (its gate count, its state and its step), as each is one
``CellSpec`` in ``deeprnn_jax.model.cells.CELLS``; tests/test_cells.py checks that the two list the
same cells with the same layout.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def relu(x: np.ndarray) -> np.ndarray:
  return np.maximum(x, 0.0)


PHI = {"tanh": np.tanh, "relu": relu}


def _f64(tree):
  """A nested dict of arrays (NumPy or JAX) as float64 NumPy arrays."""
  if isinstance(tree, dict):
    return {k: _f64(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float64)


def one_hot(X: np.ndarray, vocab_size: int) -> np.ndarray:
  """``<int>[batch, steps]`` -> ``<float64>[batch, steps, vocab_size]``."""
  X = np.asarray(X)
  out = np.zeros(X.shape + (vocab_size,), np.float64)
  for b in range(X.shape[0]):
    for t in range(X.shape[1]):
      out[b, t, int(X[b, t])] = 1.0
  return out


def rnn_cell(p: dict, x: np.ndarray, h: np.ndarray, activation: str) -> np.ndarray:
  """One RNN step: ``x <[batch, inputs]>``, ``h <[batch, hiddens]>`` -> ``H_t``."""
  return PHI[activation](x @ p["W_xh"] + p["b_xh"] + h @ p["W_hh"] + p["b_hh"])


def gru_cell(p: dict, x: np.ndarray, h: np.ndarray) -> np.ndarray:
  """One GRU step with PyTorch's gates r, z, n."""
  n_h = h.shape[-1]
  W_xr, W_xz, W_xn = (p["W_xh"][:, k * n_h:(k + 1) * n_h] for k in range(3))
  W_hr, W_hz, W_hn = (p["W_hh"][:, k * n_h:(k + 1) * n_h] for k in range(3))
  b_xr, b_xz, b_xn = (p["b_xh"][k * n_h:(k + 1) * n_h] for k in range(3))
  b_hr, b_hz, b_hn = (p["b_hh"][k * n_h:(k + 1) * n_h] for k in range(3))
  r = sigmoid(x @ W_xr + b_xr + h @ W_hr + b_hr)
  z = sigmoid(x @ W_xz + b_xz + h @ W_hz + b_hz)
  n = np.tanh(x @ W_xn + b_xn + r * (h @ W_hn + b_hn))
  return (1.0 - z) * n + z * h


def lstm_cell(p: dict, x: np.ndarray, h: np.ndarray, c: np.ndarray):
  """One LSTM step with PyTorch's gates i, f, g, o. Returns ``(H_t, C_t)``."""
  n_h = h.shape[-1]
  pre = x @ p["W_xh"] + p["b_xh"] + h @ p["W_hh"] + p["b_hh"]
  i, f, g, o = (pre[:, k * n_h:(k + 1) * n_h] for k in range(4))
  c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
  h = sigmoid(o) * np.tanh(c)
  return h, c


class RefCell(NamedTuple):
  """A cell of the reference: ``num_gates`` blocks fused on the parameters' last axis, a state
  that is ``H`` or the pair ``(H, C)``, and ``step(p, x, state, φ) -> state``."""

  num_gates: int
  pair: bool
  step: Callable


CELLS = {
    "rnn": RefCell(1, False, lambda p, x, h, phi: rnn_cell(p, x, h, phi)),
    "gru": RefCell(3, False, lambda p, x, h, phi: gru_cell(p, x, h)),
    "lstm": RefCell(4, True, lambda p, x, hc, phi: lstm_cell(p, x, *hc)),
}
NUM_GATES = {name: ref.num_gates for name, ref in CELLS.items()}


def activations_per_layer(activations: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
  names = (activations,) * num_layers if isinstance(activations, str) else tuple(activations)
  assert len(names) == num_layers, (names, num_layers)
  return names


def reference_rnn(params: dict, X: np.ndarray, state, cell: str,
                  activations: str | Sequence[str] = "tanh"):
  """The stacked recurrent part alone.

  Args:
    params: the ``rnn`` subtree, ``{"layer_0": {...}, ...}``.
    X: token indices ``<int>[batch, steps]`` (one-hot encoded here) or inputs
      ``<float>[batch, steps, num_inputs]``.
    state: ``<[L, batch, hiddens]>`` (LSTM: ``(H, C)``), or ``None`` for zeros.
    cell: a name in :data:`CELLS` (``"rnn"``, ``"gru"``, ``"lstm"``).
    activations: φ for every RNN layer, or one per layer.

  Returns:
    ``(outputs <float64>[batch, steps, hiddens], state)``: ``H_t^(L)`` for every ``t`` and the
    final state in the layout of ``state``.
  """
  if cell not in CELLS:
    raise ValueError(f"unknown cell {cell!r}")
  ref = CELLS[cell]
  p = _f64(params)
  num_layers = len(p)
  layers = [p[f"layer_{l}"] for l in range(num_layers)]
  num_hiddens = layers[0]["W_hh"].shape[0]
  X = np.asarray(X)
  if X.ndim == 2:
    X = one_hot(X, layers[0]["W_xh"].shape[0])
  X = X.astype(np.float64)
  batch, steps = X.shape[:2]
  phis = activations_per_layer(activations, num_layers)

  if state is None:
    zeros = np.zeros((num_layers, batch, num_hiddens))
    state = (zeros, zeros.copy()) if ref.pair else zeros
  # One state per layer: H, or the pair (H, C).
  if ref.pair:
    S = [tuple(np.asarray(s, np.float64)[l].copy() for s in state) for l in range(num_layers)]
  else:
    S = [np.asarray(state, np.float64)[l].copy() for l in range(num_layers)]

  outputs = np.zeros((batch, steps, num_hiddens))
  for t in range(steps):
    x = X[:, t, :]
    for l in range(num_layers):
      S[l] = ref.step(layers[l], x, S[l], phis[l])
      x = S[l][0] if ref.pair else S[l]
    outputs[:, t, :] = x

  if ref.pair:
    return outputs, tuple(np.stack(parts) for parts in zip(*S))
  return outputs, np.stack(S)


def reference_forward(params: dict, X: np.ndarray, state, cell: str,
                      activations: str | Sequence[str] = "tanh"):
  """The whole language model: ``O_t = H_t^(L) W_hq + b_q``.

  Args:
    params: the model's ``params`` (``{"rnn": ..., "W_hq": ..., "b_q": ...}``); a variables dict
      ``{"params": ...}`` is accepted too.
    X: token indices ``<int>[batch, steps]``.
    state: ``<[L, batch, hiddens]>`` (LSTM: ``(H, C)``), or ``None`` for zeros.
    cell: a name in :data:`CELLS` (``"rnn"``, ``"gru"``, ``"lstm"``).
    activations: φ for every RNN layer, or one per layer (ignored by GRU and LSTM).

  Returns:
    ``(logits <float64>[batch, steps, vocab], state)``, state in d2l layout as float64.
  """
  if "params" in params and "rnn" not in params:
    params = params["params"]
  outputs, state = reference_rnn(params["rnn"], X, state, cell, activations)
  W_hq = np.asarray(params["W_hq"], np.float64)
  b_q = np.asarray(params["b_q"], np.float64)
  batch, steps = outputs.shape[:2]
  logits = np.zeros((batch, steps, W_hq.shape[1]))
  for t in range(steps):
    logits[:, t, :] = outputs[:, t, :] @ W_hq + b_q
  return logits, state
