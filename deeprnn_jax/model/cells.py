"""The recurrent cell equations: the one place they are written.

Each cell is split into an input part, which depends only on the layer's input ``X_t`` and so can
be computed for all time steps at once, and a recurrent part, which needs ``H_{t-1}``::

    gx_t = X_t W_xh + b_xh                         (input_gates)
    H_t  = step(params, H_{t-1}, gx_t)             (rnn_step, gru_step, lstm_step)

Parameters follow the chapter's names, with gates fused along the last axis in PyTorch's order:

    W_xh <float32>[num_inputs, G * num_hiddens]   (PyTorch's weight_ih, transposed)
    W_hh <float32>[num_hiddens, G * num_hiddens]  (PyTorch's weight_hh, transposed)
    b_xh <float32>[G * num_hiddens]               (PyTorch's bias_ih)
    b_hh <float32>[G * num_hiddens]               (PyTorch's bias_hh)

with G = 1 for the RNN, 3 for the GRU (gates r, z, n) and 4 for the LSTM (gates i, f, g, o).
Each cell is declared once, as a :class:`CellSpec` in :data:`CELLS`: its gates, its carry, its
step and what the rest of the project asks of it (PyTorch's module, the fast kernels, cuDNN).
The LSTM's and GRU's gate nonlinearities (:func:`lstm_gates`, :func:`gru_gates`) carry their
derivatives written out (``jax.custom_vjp``); tests/test_cells.py checks them against automatic
differentiation of the equations as written (:func:`lstm_gates_textbook`,
:func:`gru_gates_textbook`).
The chapter's single bias is ``b_h = b_xh + b_hh``; it is kept as two so that PyTorch weights
convert both ways exactly and the GRU's ``b_hn`` can sit inside ``r ⊙ (·)`` as PyTorch has it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprnn_jax.base import validate
from deeprnn_jax.base.validate import Activation

Array = jax.Array
Carry = Any  # <float32>[batch, hiddens] for RNN and GRU, a pair (H, C) of those for LSTM.

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}
assert tuple(ACTIVATIONS) == validate.ACTIVATIONS


def torch_uniform(num_hiddens: int) -> Callable[[Array, tuple[int, ...]], Array]:
  """PyTorch's initialiser for recurrent layers and d2l's output layer: ``U(±1/√num_hiddens)``."""
  bound = 1.0 / num_hiddens**0.5
  return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def input_gates(params: dict, x: Array) -> Array:
  """``X W_xh + b_xh`` for any leading axes.

  ``x`` is either ``<float32>[..., num_inputs]`` or token indices ``<int32>[...]``, which stand
  for one-hot rows: multiplying a one-hot row by ``W_xh`` selects a row, so it is a gather.
  """
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.take(params["W_xh"], x, axis=0) + params["b_xh"]
  return x @ params["W_xh"] + params["b_xh"]


def rnn_step(params: dict, h: Array, gx: Array, activation: str = "tanh") -> tuple[Array, Array]:
  """H_t = φ(X_t W_xh + b_xh + H_{t-1} W_hh + b_hh)."""
  h = ACTIVATIONS[activation](gx + h @ params["W_hh"] + params["b_hh"])
  return h, h


def gru_step(params: dict, h: Array, gx: Array) -> tuple[Array, Array]:
  """PyTorch's GRU.

  R_t = σ(X W_xr + b_xr + H W_hr + b_hr)
  Z_t = σ(X W_xz + b_xz + H W_hz + b_hz)
  N_t = tanh(X W_xn + b_xn + R_t ⊙ (H W_hn + b_hn))
  H_t = (1 - Z_t) ⊙ N_t + Z_t ⊙ H_{t-1}
  """
  h = gru_gates(gx, h @ params["W_hh"] + params["b_hh"], h)
  return h, h


def lstm_step(params: dict, carry: tuple[Array, Array],
              gx: Array) -> tuple[tuple[Array, Array], Array]:
  """PyTorch's LSTM.

  [I; F; G; O] = X W_xh + b_xh + H_{t-1} W_hh + b_hh
  C_t = σ(F) ⊙ C_{t-1} + σ(I) ⊙ tanh(G)
  H_t = σ(O) ⊙ tanh(C_t)
  """
  h, c = carry
  h, c = lstm_gates(gx + h @ params["W_hh"] + params["b_hh"], c)
  return (h, c), h


# The gate nonlinearities of the two equations above, with their derivatives written out.
# σ(x) = (1 + tanh(x/2)) / 2 lets one tanh run over a whole gate array: XLA:CPU evaluates
# σ and tanh on column slices of one array several times slower than one tanh over all of it
# (BENCHMARKS.md), and the derivatives need only the tanh values: σ'(x) = (1 - tanh²(x/2)) / 4.


def _sigmoid(t: Array) -> Array:
  """σ(x) from ``t = tanh(x/2)``."""
  return 0.5 * t + 0.5


def _sigmoid_grad(t: Array) -> Array:
  """σ'(x) from ``t = tanh(x/2)``."""
  return 0.25 * (1.0 - t * t)


def _lstm_gates_fwd(z: Array, c: Array):
  H = c.shape[-1]
  scale = jnp.repeat(jnp.asarray([0.5, 0.5, 1.0, 0.5], z.dtype), H)  # G's tanh is a tanh already
  t = jnp.tanh(z * scale)
  t_i, t_f, g, t_o = jnp.split(t, 4, axis=-1)
  c_new = _sigmoid(t_f) * c + _sigmoid(t_i) * g
  tanh_c = jnp.tanh(c_new)
  return (_sigmoid(t_o) * tanh_c, c_new), (t, c, tanh_c)


def _lstm_gates_bwd(res, cotangents):
  t, c, tanh_c = res
  d_h, d_c = cotangents
  t_i, t_f, g, t_o = jnp.split(t, 4, axis=-1)
  d_c = d_c + d_h * _sigmoid(t_o) * (1.0 - tanh_c * tanh_c)
  # Each block in full before the concatenation: one more pass over [batch, 4H] was slower.
  d_z = jnp.concatenate([d_c * g * _sigmoid_grad(t_i), d_c * c * _sigmoid_grad(t_f),
                         d_c * _sigmoid(t_i) * (1.0 - g * g), d_h * tanh_c * _sigmoid_grad(t_o)],
                        axis=-1)
  return d_z, d_c * _sigmoid(t_f)


@jax.custom_vjp
def lstm_gates(z: Array, c: Array) -> tuple[Array, Array]:
  """``(H_t, C_t)`` from ``z = [I; F; G; O] <float32>[batch, 4H]`` and
  ``C_{t-1} <float32>[batch, H]``."""
  return _lstm_gates_fwd(z, c)[0]


lstm_gates.defvjp(_lstm_gates_fwd, _lstm_gates_bwd)


def _gru_gates_fwd(gx: Array, gh: Array, h: Array):
  H = h.shape[-1]
  t = jnp.tanh(0.5 * (gx[..., :2 * H] + gh[..., :2 * H]))  # R and Z
  t_r, t_z = jnp.split(t, 2, axis=-1)
  hn = gh[..., 2 * H:]
  n = jnp.tanh(gx[..., 2 * H:] + _sigmoid(t_r) * hn)
  z = _sigmoid(t_z)
  return (1.0 - z) * n + z * h, (t, n, hn, h)


def _gru_gates_bwd(res, d_h):
  t, n, hn, h = res
  t_r, t_z = jnp.split(t, 2, axis=-1)
  z = _sigmoid(t_z)
  d_n = d_h * (1.0 - z) * (1.0 - n * n)
  d_r = d_n * hn * _sigmoid_grad(t_r)
  d_z = d_h * (h - n) * _sigmoid_grad(t_z)
  return (jnp.concatenate([d_r, d_z, d_n], axis=-1),
          jnp.concatenate([d_r, d_z, d_n * _sigmoid(t_r)], axis=-1), d_h * z)


@jax.custom_vjp
def gru_gates(gx: Array, gh: Array, h: Array) -> Array:
  """``H_t`` from the input part ``gx <float32>[batch, 3H]``, the recurrent part
  ``gh = H_{t-1} W_hh + b_hh <float32>[batch, 3H]`` and ``H_{t-1} <float32>[batch, H]``."""
  return _gru_gates_fwd(gx, gh, h)[0]


gru_gates.defvjp(_gru_gates_fwd, _gru_gates_bwd)


def lstm_gates_textbook(z: Array, c: Array) -> tuple[Array, Array]:
  """:func:`lstm_gates` as the equations read (σ and tanh on slices), differentiated by JAX: the
  reference its derivatives are tested against and the baseline it was measured against."""
  i, f, g, o = jnp.split(z, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def gru_gates_textbook(gx: Array, gh: Array, h: Array) -> Array:
  """:func:`gru_gates` as the equations read, differentiated by JAX (as
  :func:`lstm_gates_textbook`)."""
  xr, xz, xn = jnp.split(gx, 3, axis=-1)
  hr, hz, hn = jnp.split(gh, 3, axis=-1)
  r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
  return (1.0 - z) * jnp.tanh(xn + r * hn) + z * h


@dataclasses.dataclass(frozen=True)
class CellSpec:
  """A cell, declared once: what the models, the kernels, the checks and PyTorch conversion ask
  of it. :data:`CELLS` holds one per cell.

  Every cell has the four parameters :class:`Cell` declares (``W_xh``, ``W_hh``, ``b_xh``,
  ``b_hh``, each ``G * H`` wide) and is split into the input part ``gx = X_t W_xh + b_xh`` and a
  step.

  Attributes:
    name: what a run calls it (``--cell``).
    gates: the names of the ``G`` blocks fused along the parameters' last axis, in the order
      they sit there (the RNN's one block is ``H_t``'s pre-activation).
    step: one time step, ``step(params, carry, gx <float32>[batch, G*H]) -> (carry,
      H_t <float32>[batch, H])``, with φ's name as a fourth argument where
      :attr:`takes_activation`. ``params`` holds ``W_hh`` and ``b_hh``.
    pair: the carry is the pair ``(H, C)`` (the LSTM's), each ``<float32>[batch, H]``; else
      ``H`` alone. A model's state stacks the carries over layers: ``[L, batch, H]`` (a pair of
      those).
    takes_activation: the step takes φ, ``"tanh"`` or ``"relu"`` per layer (PyTorch's
      ``nonlinearity``); the other cells have their own nonlinearities and run with ``"tanh"``.
    adds_input: the step uses ``gx`` only through ``gx + H_{t-1} W_hh + b_hh`` (RNN, LSTM), so
      ``gx``'s gradient is the gate gradient and the wavefront adds ``W_xh``'s product into the
      recurrent one. Not the GRU: its ``N_t`` puts ``R_t ⊙ (·)`` between the two parts.
    fits_kernels: the step keeps the rule the fast kernels (``recurrence``; every impl but
      ``"scan"``) are built on. They compute ``H_{t-1} W_hh`` themselves, once per step, hand
      the step a stand-in for ``W_hh`` whose ``h @ W`` is that product, and read the gate
      gradient off as ``b_hh``'s gradient, from which they form ``W_hh``'s. So the step must
      (1) compute ``h @ params["W_hh"]`` exactly once, with ``h = hidden(carry)``; (2) use
      ``W_hh`` and ``b_hh`` only through ``h @ W_hh + b_hh``; (3) read no other parameter
      (``W_xh`` and ``b_xh`` reach it in ``gx``). A cell that breaks the rule says ``False``:
      it runs under impl ``"scan"`` only (``validate.fast_kernels`` refuses the others).
    torch_module: PyTorch's layer of the same equations (``"nn.LSTM"``), whose state dict
      converts to and from the parameters (``interop``); ``None``: the cell does not convert.
    torch_gates: the gates in PyTorch's order where it is not :attr:`gates`' (``interop``
      reorders the blocks); ``None``: PyTorch's order is :attr:`gates`.
    fused: cuDNN and oneDNN have the cell's fused kernel (their LSTM), for impls ``"cudnn"``
      (``jax.experimental.rnn``) and ``"onednn"``.
  """

  name: str
  gates: tuple[str, ...]
  step: Callable[..., tuple[Carry, Array]]
  pair: bool = False
  takes_activation: bool = False
  adds_input: bool = True
  fits_kernels: bool = True
  torch_module: str | None = None
  torch_gates: tuple[str, ...] | None = None
  fused: bool = False

  @property
  def num_gates(self) -> int:
    """``G``: the parameters are ``G * num_hiddens`` wide."""
    return len(self.gates)

  def __call__(self, params: dict, carry: Carry, gx: Array, activation: str = "tanh"):
    """One time step: :attr:`step`, given ``activation`` where the cell takes one."""
    if self.takes_activation:
      return self.step(params, carry, gx, activation)
    return self.step(params, carry, gx)

  def hidden(self, carry: Carry) -> Array:
    """``H <float32>[batch, H]`` of a carry: the next layer's input, the factor of ``W_hh``."""
    return carry[0] if self.pair else carry

  def zero_state(self, shape: tuple[int, ...]) -> Carry:
    """Zeros ``<float32>[*shape]`` in the carry's structure (a pair for the LSTM)."""
    h = jnp.zeros(shape, jnp.float32)
    return (h, h) if self.pair else h

  def layer_carries(self, state) -> list:
    """The d2l layout ``[L, batch, H]`` (a pair of those) -> one carry per layer."""
    if self.pair:
      h, c = state
      return [(h[l], c[l]) for l in range(h.shape[0])]
    return [state[l] for l in range(state.shape[0])]

  def stacked_state(self, carries: Sequence[Carry]):
    """One carry per layer -> the d2l layout ``[L, batch, H]`` (a pair of those)."""
    if self.pair:
      return (jnp.stack([h for h, _ in carries]), jnp.stack([c for _, c in carries]))
    return jnp.stack(list(carries))


# The cells a run can choose (``--cell``, ``validate.CELLS``), in this order. Adding one: its step
# above, its CellSpec here, its NumPy reference in tests/references/numpy_model.py
# (docs/implementations.md).
CELLS: dict[str, CellSpec] = {spec.name: spec for spec in (
    CellSpec("rnn", ("h",), rnn_step, takes_activation=True, torch_module="nn.RNN"),
    CellSpec("gru", ("r", "z", "n"), gru_step, adds_input=False, torch_module="nn.GRU"),
    CellSpec("lstm", ("i", "f", "g", "o"), lstm_step, pair=True, torch_module="nn.LSTM",
             fused=True),
)}


def cell_spec(name: str) -> CellSpec:
  """The :class:`CellSpec` of cell ``name``; a ``UsageError`` naming the choices otherwise."""
  return CELLS[validate.cell(name)]


def step(cell: str, params: dict, carry: Carry, gx: Array, activation: str = "tanh"):
  """One time step of ``cell``: ``(carry, gx <float32>[batch, G*hiddens]) -> (carry, H_t)``."""
  return cell_spec(cell)(params, carry, gx, activation)


class Cell(nn.Module):
  """One recurrent layer's parameters and one time step of it.

  Initialised as PyTorch's ``nn.RNN/GRU/LSTM`` (and d2l): every parameter
  ``~ U(-1/√num_hiddens, 1/√num_hiddens)``.

  Attributes:
    cell: a name in :data:`CELLS` (``"rnn"``, ``"gru"``, ``"lstm"``).
    num_inputs: width of ``X_t`` (the vocabulary size for layer 0 with one-hot inputs).
    num_hiddens: width of ``H_t``.
    activation: φ for the RNN, ``"tanh"`` or ``"relu"``; ignored by GRU and LSTM.
  """

  cell: str
  num_inputs: int
  num_hiddens: int
  activation: Activation = "tanh"

  def setup(self):
    width = cell_spec(self.cell).num_gates * self.num_hiddens
    init = torch_uniform(self.num_hiddens)
    self.W_xh = self.param("W_xh", init, (self.num_inputs, width))
    self.W_hh = self.param("W_hh", init, (self.num_hiddens, width))
    self.b_xh = self.param("b_xh", init, (width,))
    self.b_hh = self.param("b_hh", init, (width,))

  @property
  def weights(self) -> dict:
    return {"W_xh": self.W_xh, "W_hh": self.W_hh, "b_xh": self.b_xh, "b_hh": self.b_hh}

  def input_gates(self, x: Array) -> Array:
    return input_gates(self.weights, x)

  def __call__(self, carry: Carry, x: Array):
    """``(carry, X_t <float32>[batch, num_inputs]) -> (carry, H_t <float32>[batch, hiddens])``."""
    return step(self.cell, self.weights, carry, self.input_gates(x), self.activation)
