"""Fast recurrence kernels: one layer's recurrent part over all time steps.

:func:`layer_scan` runs ``H_t = step(H_{t-1}, gx_t)`` (``cells.step``, the only place the equations
are written) over ``gx <float32>[steps, batch, G*H]`` with a hand-written backward pass
(``jax.custom_vjp``) that XLA's automatic differentiation of ``lax.scan`` does not find:

* The backward scan computes, per step, only what the recurrence needs: the gate gradient
  ``dG_t = ∂L/∂(H_{t-1} W_hh + b_hh)`` ``<float32>[batch, G*H]`` and ``∂L/∂H_{t-1}``. The weight
  gradients are then one large matrix product over all ``steps * batch`` rows,
  ``dW_hh = [H_0..H_{T-1}]ᵀ [dG_1..dG_T]``, and ``db_hh = Σ dG``, instead of a rank-``batch``
  update of a ``[H, G*H]`` accumulator at every step.
* The forward pass keeps each step's linearisation (the ``jax.vjp`` residuals of the step: gate
  activations and the like), so the backward pass recomputes no nonlinearity and multiplies only
  by ``W_hhᵀ``, never by ``W_hh`` again. (Keeping ``H_{t-1} W_hh`` instead and recomputing the
  nonlinearities was measured 10% slower on CPU: BENCHMARKS.md.)
* Transposed operands of the backward products are laid out first (:func:`_t`): XLA:CPU
  multiplies them ~2.5x slower in place.

Both passes differentiate the step function itself (``jax.vjp`` of ``cells.step`` per step), so
no derivative of a cell is written by hand here: the gate gradient is read off as the gradient
with respect to a per-row copy of ``b_hh``, and the product ``H_{t-1} W_hh``, computed once per
step, is handed to the step as a stand-in for ``W_hh`` (:class:`_Product`) whose ``h @ W`` is the
stored product. :func:`input_gates` is the hoisted input projection with the same treatment of
its backward products. Measurements: BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from deeprnn_jax import cells
from deeprnn_jax.errors import UsageError

Array = jax.Array

# lax.scan unroll per backend. CPU: measured, unrolling only slows it (BENCHMARKS.md). GPU/TPU:
# not measured yet; unrolling amortises the per-iteration kernel launches of XLA's while loop.
# $DEEPRNN_JAX_UNROLL overrides it (benchmarks/gpu_check.sh compares).
DEFAULT_UNROLL = {"cpu": 1, "gpu": 8, "cuda": 8, "rocm": 8, "tpu": 8}


def default_unroll() -> int:
  value = os.environ.get("DEEPRNN_JAX_UNROLL")
  if value:
    if not value.isdigit() or int(value) < 1:
      raise UsageError(f"DEEPRNN_JAX_UNROLL must be a positive integer, got {value!r}")
    return int(value)
  return DEFAULT_UNROLL.get(jax.default_backend(), 1)


class _Product:
  """Stands for ``W_hh`` in ``cells.step`` when ``H_{t-1} W_hh`` is already computed.

  ``h @ _Product(p)`` is ``p``: JAX arrays defer ``@`` to an operand type they do not know, so
  the step's ``h @ params["W_hh"]`` calls :meth:`__rmatmul__`. Its gradient with respect to
  ``h`` is then zero; :func:`layer_scan` adds the ``dG W_hhᵀ`` path itself.
  """

  def __init__(self, product: Array):
    self.product = product

  def __rmatmul__(self, h: Array) -> Array:
    return self.product


def _hidden(cell: str, carry):
  return carry[0] if cell == "lstm" else carry


def _split(unroll: int, steps: int) -> int:
  # unroll > steps only inflates the program.
  return max(1, min(unroll, steps))


def _step_at(cell, activation, product):
  """``cells.step`` as a function of ``(carry, gx_t, b_hh rows)`` with ``H_{t-1} W_hh`` given."""
  return lambda c, g, b: cells.step(cell, {"W_hh": _Product(product), "b_hh": b}, c, g,
                                    activation)


def _forward(cell, activation, unroll, W_hh, b_hh, carry, gx, keep=False):
  """The plain recurrence; with ``keep``, also each step's entering ``H_{t-1}`` and its
  linearisation (``jax.vjp`` residuals: gate activations and the like) for the backward pass.
  """
  weights = {"W_hh": W_hh, "b_hh": b_hh}
  b_rows = jnp.broadcast_to(b_hh, (gx.shape[1], b_hh.shape[0]))

  if not keep and gx.shape[0] == 1:  # one step (generation): no loop around it
    carry, h = cells.step(cell, weights, carry, gx[0], activation)
    return carry, h[None]

  def body(carry, g):
    if not keep:
      return cells.step(cell, weights, carry, g, activation)
    product = _hidden(cell, carry) @ W_hh
    (new, h), vjp = jax.vjp(_step_at(cell, activation, product), carry, g, b_rows)
    return new, (h, _hidden(cell, carry), vjp)

  return jax.lax.scan(body, carry, gx, unroll=_split(unroll, gx.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def layer_scan(cell: str, activation: str, unroll: int, W_hh: Array, b_hh: Array, carry,
               gx: Array):
  """One layer's recurrence over time.

  Args:
    cell: ``"rnn"``, ``"gru"`` or ``"lstm"``.
    activation: φ for the RNN (``"tanh"`` or ``"relu"``); ignored by GRU and LSTM.
    unroll: ``lax.scan`` unroll factor (:func:`default_unroll` for the backend's measured best).
    W_hh: ``<float32>[H, G*H]``.
    b_hh: ``<float32>[G*H]``.
    carry: ``H_0 <float32>[batch, H]`` (LSTM: the pair ``(H_0, C_0)``).
    gx: the input part ``X_t W_xh + b_xh`` of every step, ``<float32>[steps, batch, G*H]``.

  Returns:
    ``(carry_T, hs <float32>[steps, batch, H])``, as ``lax.scan`` over ``cells.step``.
  """
  return _forward(cell, activation, unroll, W_hh, b_hh, carry, gx)


def _layer_scan_fwd(cell, activation, unroll, W_hh, b_hh, carry, gx):
  last, (hs, h_prev, vjps) = _forward(cell, activation, unroll, W_hh, b_hh, carry, gx, keep=True)
  return (last, hs), (W_hh, h_prev, vjps, gx)


def _layer_scan_bwd(cell, activation, unroll, res, cotangents):
  W_hh, h_prev, vjps, gx = res
  d_last, d_hs = cotangents
  W_hh_T = _t(W_hh)  # laid out once, not transposed again in every step's product

  def body(d_carry, xs):
    vjp, d_h = xs
    # The step returns (carry, H_t): H_t gets this step's output gradient, the carry the
    # gradient flowing back from later steps.
    d_prev, d_g, d_gates = vjp((d_carry, d_h))
    d_hidden = _hidden(cell, d_prev) + d_gates @ W_hh_T  # the H_{t-1} W_hh path
    d_prev = (d_hidden, d_prev[1]) if cell == "lstm" else d_hidden
    # RNN and LSTM add gx and the recurrent part before any nonlinearity, so their gradients
    # are equal: one [steps, batch, G*H] output buffer less to fill.
    return d_prev, (d_g if cell == "gru" else None, d_gates)

  d_first, (d_gx, d_gates) = jax.lax.scan(body, d_last, (vjps, d_hs), reverse=True,
                                          unroll=_split(unroll, gx.shape[0]))
  # Weight gradients as one GEMM over all steps * batch rows; h_prev is H_0 .. H_{T-1}.
  d_gates_2d = d_gates.reshape(-1, d_gates.shape[-1])
  d_W_hh = _t(h_prev.reshape(-1, h_prev.shape[-1])) @ d_gates_2d
  d_b_hh = d_gates_2d.sum(axis=0)
  if d_gx is None:
    d_gx = d_gates
  return d_W_hh, d_b_hh, d_first, d_gx


layer_scan.defvjp(_layer_scan_fwd, _layer_scan_bwd)


def _t(a: Array) -> Array:
  """``aᵀ`` laid out in memory: XLA:CPU multiplies a transposed operand ~2.5x slower."""
  return jax.lax.optimization_barrier(a.T)


@jax.custom_vjp
def _dense(x: Array, W: Array, b: Array) -> Array:
  return cells.input_gates({"W_xh": W, "b_xh": b}, x)


def _dense_fwd(x, W, b):
  return _dense(x, W, b), (x, W)


def _dense_bwd(res, dy):
  x, W = res
  x2d, dy2d = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dx = (dy2d @ _t(W)).reshape(x.shape)
  return dx, _t(x2d) @ dy2d, dy2d.sum(axis=0)


_dense.defvjp(_dense_fwd, _dense_bwd)


def input_gates(params: dict, x: Array) -> Array:
  """``cells.input_gates`` (``X W_xh + b_xh`` for all steps at once) with a CPU-friendly backward.

  Token indices ``<int32>[...]`` keep XLA's gather and scatter-add, which is cheap; for dense
  ``x <float32>[..., num_inputs]`` the two weight-sized products of the backward pass are done
  on operands laid out untransposed.
  """
  if jnp.issubdtype(x.dtype, jnp.integer):
    return cells.input_gates(params, x)
  return _dense(x, params["W_xh"], params["b_xh"])


def layer_scan_autodiff(cell: str, activation: str, unroll: int, W_hh: Array, b_hh: Array, carry,
                        gx: Array):
  """:func:`layer_scan` differentiated by XLA (per-step weight-gradient accumulation).

  The same function; kept as the baseline the custom backward pass is measured against.
  """
  return _forward(cell, activation, unroll, W_hh, b_hh, carry, gx)
