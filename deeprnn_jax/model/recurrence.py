"""Fast recurrence kernels: the recurrent part of one layer, or of a whole stack, over all steps.

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
  nonlinearities was slower on CPU: BENCHMARKS.md.)
* Transposed operands of the backward products are laid out first (:func:`_t`): XLA:CPU
  multiplies them slower in place.
* ``precision="bfloat16"`` rounds the operands of these products (and of :func:`input_gates`) to
  bfloat16 and accumulates in float32 (:func:`_matmul`); the state, the nonlinearities, the
  parameters and their updates stay float32. A CPU with AVX512-BF16 instructions runs them
  faster (how much: BENCHMARKS.md).

Both passes differentiate the step function itself (``jax.vjp`` of ``cells.step`` per step, which
uses the gate derivatives ``cells`` writes out), so no derivative of a cell is written here: the
gate gradient is read off as the gradient with respect to a per-row copy of ``b_hh``, and the
product ``H_{t-1} W_hh``, computed once per step, is handed to the step as a stand-in for ``W_hh``
(:class:`_Product`) whose ``h @ W`` is the stored product. :func:`input_gates` is the hoisted input
projection with the same treatment of its backward products.

:func:`wave_scan` runs the same kernel on L stacked layers skewed in time (a wavefront): one
recurrence whose hidden state is all layers' ``H`` side by side and whose ``W`` is block
bidiagonal (for the GRU, with its input blocks in extra columns), ``steps + L - 1`` sequential
steps instead of ``L * steps``. Measurements: BENCHMARKS.md.

Both run a cell only if its step keeps the rule they are built on (``cells.CellSpec.fits_kernels``:
it computes ``H_{t-1} W_hh`` once and uses ``W_hh`` and ``b_hh`` only through ``H_{t-1} W_hh +
b_hh``); another cell is refused with a ``UsageError`` (``validate.fast_kernels``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from deeprnn_jax.base import validate
from deeprnn_jax.model import cells

Array = jax.Array

# Operand types of the recurrent layers' matrix products; accumulation is always float32.
PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
assert tuple(PRECISIONS) == validate.PRECISIONS

# lax.scan unroll per backend, the fastest measured (BENCHMARKS.md): on a CPU unrolling only
# slows the loop; on a GPU a step is latency-bound and unrolling hides it, at some compile time.
# TPU: not measured. A model's `unroll` attribute overrides it.
DEFAULT_UNROLL = {"cpu": 1, "gpu": 8, "cuda": 8, "rocm": 8, "tpu": 8}


def default_unroll() -> int:
  """The unroll of :data:`DEFAULT_UNROLL` for JAX's default backend."""
  return DEFAULT_UNROLL.get(jax.default_backend(), 1)


class _Product:
  """Stands for ``W_hh`` in ``cells.step`` when ``H_{t-1} W_hh`` is already computed.

  ``h @ _Product(p)`` is ``p``: JAX arrays defer ``@`` to an operand type they do not know, so
  the step's ``h @ params["W_hh"]`` calls :meth:`__rmatmul__`. Its gradient with respect to
  ``h`` is then zero; :func:`_recurrent_scan` adds the ``dG W_hhᵀ`` path itself.
  """

  def __init__(self, product: Array):
    self.product = product

  def __rmatmul__(self, h: Array) -> Array:
    return self.product


def _split(unroll: int, steps: int) -> int:
  # unroll > steps only inflates the program.
  return max(1, min(unroll, steps))


# The steps the kernel runs: ``step(product, b_rows, carry, x) -> (carry, y)`` with
# ``product = hidden(carry) @ W`` already computed and ``b_rows`` the bias ``b`` broadcast to one
# row per batch element (the gate gradient is read off as its gradient). Frozen dataclasses, so
# that equal steps are equal static arguments.


@dataclasses.dataclass(frozen=True)
class _LayerStep:
  """One layer: the cell's step with ``W = W_hh``, ``b = b_hh``, ``x = gx_t``."""

  spec: cells.CellSpec
  activation: str

  def hidden(self, carry) -> Array:
    return self.spec.hidden(carry)

  @property
  def dx_is_dgates(self) -> bool:
    """``x`` is added to the gates before any nonlinearity (``CellSpec.adds_input``)."""
    return self.spec.adds_input

  def dx_from_dgates(self, d_gates: Array, xs):
    """``∂L/∂xs`` from the gate gradient, where :attr:`dx_is_dgates`."""
    return d_gates

  def __call__(self, product, b_rows, carry, gx):
    return self.spec({"W_hh": _Product(product), "b_hh": b_rows}, carry, gx, self.activation)


@dataclasses.dataclass(frozen=True)
class _WaveStep:
  """L layers at once, layer ``l`` one time step behind layer ``l - 1`` (a wavefront).

  ``hidden(carry) = [H^(0) … H^(L-1)]`` ``<float32>[batch, L*H]``, so that one product with
  :func:`wave_scan`'s ``W`` gives every layer's ``H_{t-1}^(l) W_hh`` and ``H_t^(l-1) W_xh``:
  layer ``l-1``'s current carry is the input layer ``l`` needs. Where the cell adds the two
  (``CellSpec.adds_input``: RNN, LSTM), ``W`` is block bidiagonal (``[L*H, L*G*H]``); the GRU
  keeps ``W_xn`` outside ``R ⊙ (·)``, so its ``W`` has the input blocks in ``L - 1`` more
  columns. ``x = (gx, valid)``: layer 0's ``X_t W_xh + b_xh`` ``<float32>[batch, G*H]`` and
  ``valid <float32>[L]``, which keeps a layer's carry unchanged at the wave steps before its
  first and after its last time step.
  """

  spec: cells.CellSpec
  activations: tuple[str, ...]

  def hidden(self, carry) -> Array:
    return jnp.concatenate([self.spec.hidden(c) for c in carry], axis=-1)

  dx_is_dgates = _LayerStep.dx_is_dgates

  def dx_from_dgates(self, d_gates: Array, xs):
    """As :meth:`_LayerStep.dx_from_dgates`: layer 0's block; ``valid`` is a constant."""
    gx0, valid = xs
    return d_gates[..., :gx0.shape[-1]], jnp.zeros_like(valid)

  def __call__(self, product, b_rows, carry, x):
    gx0, valid = x
    L, width = len(self.activations), gx0.shape[-1]
    block = lambda k: slice(k * width, (k + 1) * width)
    new = []
    for l, activation in enumerate(self.activations):
      if l == 0:
        gx = gx0
      elif not self.spec.adds_input:
        gx = product[:, block(L + l - 1)] + b_rows[:, block(L + l - 1)]
      else:
        gx = 0.0  # W_xh's product and b_xh are in this layer's block of product and b_rows.
      c, _ = _LayerStep(self.spec, activation)(product[:, block(l)], b_rows[:, block(l)],
                                               carry[l], gx)
      new.append(jax.tree.map(lambda n, o: jnp.where(valid[l] > 0, n, o), c, carry[l]))
    return tuple(new), self.spec.hidden(new[-1])


def _forward(step, unroll, precision, W, b, carry, xs, keep=False):
  """The plain recurrence; with ``keep``, also each step's entering ``hidden(carry)`` and its
  linearisation (``jax.vjp`` residuals: gate activations and the like) for the backward pass.
  """
  steps = jax.tree.leaves(xs)[0].shape[0]
  b_rows = jnp.broadcast_to(b, (step.hidden(carry).shape[0], b.shape[0]))
  W = W.astype(PRECISIONS[precision])  # once, not at every step

  def body(carry, x):
    h = step.hidden(carry)
    product = _matmul(h, W, precision)
    if not keep:
      return step(product, b_rows, carry, x)
    (new, y), vjp = jax.vjp(functools.partial(step, product), b_rows, carry, x)
    return new, (y, h, vjp)

  if not keep and steps == 1:  # one step (generation): no loop around it
    carry, y = body(carry, jax.tree.map(lambda a: a[0], xs))
    return carry, y[None]
  return jax.lax.scan(body, carry, xs, unroll=_split(unroll, steps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrent_scan(step, unroll: int, precision: str, W: Array, b: Array, carry, xs):
  """``lax.scan`` of ``step`` with the backward pass described in the module docstring.

  Where the step adds ``x`` to the gates before any nonlinearity (``CellSpec.adds_input``: RNN,
  LSTM), the gradient of ``x`` is the gate gradient (``step.dx_from_dgates``): one
  ``[steps, batch, G*H]`` output buffer less for the backward scan to fill.
  """
  return _forward(step, unroll, precision, W, b, carry, xs)


def _recurrent_scan_fwd(step, unroll, precision, W, b, carry, xs):
  last, (ys, h_prev, vjps) = _forward(step, unroll, precision, W, b, carry, xs, keep=True)
  return (last, ys), (W, h_prev, vjps, carry, xs)


def _recurrent_scan_bwd(step, unroll, precision, res, cotangents):
  W, h_prev, vjps, carry, xs = res
  d_last, d_ys = cotangents
  W_T = _t(W, precision)  # laid out once, not transposed again in every step's product
  _, hidden_T = jax.vjp(step.hidden, carry)  # linear: the same map at every step

  def body(d_carry, per_step):
    vjp, d_y = per_step
    d_b, d_prev, d_x = vjp((d_carry, d_y))
    # The product path, hidden(carry) @ W, which the step saw as a constant.
    d_prev = jax.tree.map(jnp.add, d_prev, hidden_T(_matmul(d_b, W_T, precision))[0])
    return d_prev, (None if step.dx_is_dgates else d_x, d_b)

  d_first, (d_xs, d_gates) = jax.lax.scan(body, d_last, (vjps, d_ys), reverse=True,
                                          unroll=_split(unroll, d_ys.shape[0]))
  # Weight gradients as one GEMM over all steps * batch rows; h_prev is hidden(carry) entering
  # each step.
  d_gates_2d = d_gates.reshape(-1, d_gates.shape[-1])
  d_W = _matmul(_t(h_prev.reshape(-1, h_prev.shape[-1]), precision), d_gates_2d, precision)
  d_b = d_gates_2d.sum(axis=0)
  if step.dx_is_dgates:
    d_xs = step.dx_from_dgates(d_gates, xs)
  return d_W, d_b, d_first, d_xs


_recurrent_scan.defvjp(_recurrent_scan_fwd, _recurrent_scan_bwd)


def _kernel_spec(cell: str, impl: str) -> cells.CellSpec:
  """The spec of ``cell``; a ``UsageError`` if it does not fit the kernels ``impl`` runs."""
  validate.fast_kernels(cell, impl)
  return cells.cell_spec(cell)


def layer_scan(cell: str, activation: str, unroll: int, W_hh: Array, b_hh: Array, carry,
               gx: Array, precision: str = "float32"):
  """One layer's recurrence over time.

  Args:
    cell: a name in ``cells.CELLS`` whose spec
      :attr:`~deeprnn_jax.model.cells.CellSpec.fits_kernels`
      (``"rnn"``, ``"gru"``, ``"lstm"``).
    activation: φ for the RNN (``"tanh"`` or ``"relu"``); ignored by GRU and LSTM.
    unroll: ``lax.scan`` unroll factor (:func:`default_unroll` for the backend's measured best).
    W_hh: ``<float32>[H, G*H]``.
    b_hh: ``<float32>[G*H]``.
    carry: ``H_0 <float32>[batch, H]`` (LSTM: the pair ``(H_0, C_0)``; ``CellSpec.pair``).
    gx: the input part ``X_t W_xh + b_xh`` of every step, ``<float32>[steps, batch, G*H]``.
    precision: the products' operand type, a key of :data:`PRECISIONS`.

  Returns:
    ``(carry_T, hs <float32>[steps, batch, H])``, as ``lax.scan`` over ``cells.step``.
  """
  step = _LayerStep(_kernel_spec(cell, "layerwise"), activation)
  return _recurrent_scan(step, unroll, precision, W_hh, b_hh, carry, gx)


def wave_scan(cell: str, activations: tuple[str, ...], unroll: int, layers: list[dict],
              carries: tuple, gx0: Array, precision: str = "float32"):
  """L stacked layers over time as one recurrence: wave step ``s`` runs layer ``l``'s step
  ``s - l`` for every layer, so the L layers cost ``steps + L - 1`` sequential products instead
  of ``L * steps``, one larger product each (:class:`_WaveStep`).

  Args:
    cell, activations, unroll, precision: as :func:`layer_scan`, one activation per layer.
    layers: each layer's ``{W_xh, W_hh, b_xh, b_hh}`` (``cells`` layout); layer 0's ``W_xh`` and
      ``b_xh`` are not used (its input part is ``gx0``).
    carries: one carry per layer.
    gx0: layer 0's input part ``X_t W_xh + b_xh``, ``<float32>[steps, batch, G*H]``.

  Returns:
    ``(carries_T, hs <float32>[steps, batch, H])`` with ``hs`` the last layer's outputs: the
    same as :func:`layer_scan` layer after layer.
  """
  spec = _kernel_spec(cell, "wavefront")
  L, (steps, _, width) = len(layers), gx0.shape
  H = layers[0]["W_hh"].shape[0]
  zeros = jnp.zeros((H, width), gx0.dtype)
  if not spec.adds_input:  # [W_hh blocks on the diagonal | W_xh^(k+1) in row k of L-1 more columns]
    block = lambda k, j: (layers[k]["W_hh"] if j == k else
                          layers[k + 1]["W_xh"] if j == L + k else zeros)
    columns = 2 * L - 1
    b = jnp.concatenate([p["b_hh"] for p in layers] + [p["b_xh"] for p in layers[1:]])
  else:  # block row k: W_hh^(k) in column k, W_xh^(k+1) in column k+1; biases summed
    block = lambda k, j: (layers[k]["W_hh"] if j == k else
                          layers[j]["W_xh"] if j == k + 1 else zeros)
    columns = L
    b = jnp.concatenate([layers[0]["b_hh"]] + [p["b_hh"] + p["b_xh"] for p in layers[1:]])
  W = jnp.concatenate([jnp.concatenate([block(k, j) for j in range(columns)], axis=1)
                       for k in range(L)], axis=0)
  waves = steps + L - 1
  s, l = jnp.arange(waves)[:, None], jnp.arange(L)[None, :]
  valid = ((s >= l) & (s < steps + l)).astype(gx0.dtype)  # <float32>[waves, L]
  gx = jnp.pad(gx0, ((0, L - 1), (0, 0), (0, 0)))
  carries, ys = _recurrent_scan(_WaveStep(spec, tuple(activations)), unroll, precision, W, b,
                                tuple(carries), (gx, valid))
  return carries, ys[L - 1:]


def _matmul(a: Array, b: Array, precision: str) -> Array:
  """``a @ b`` ``<float32>`` with both operands rounded to the ``precision`` type first."""
  if precision == "float32":
    return a @ b
  dtype = PRECISIONS[precision]
  return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _t(a: Array, precision: str = "float32") -> Array:
  """``aᵀ`` ``<[C, R]>`` of ``a <[R, C]>`` laid out in memory, as the ``precision`` type.

  XLA:CPU multiplies a transposed float32 operand slower in place. For bfloat16 the stakes are
  higher: its bfloat16 products (YNNPACK) take only row-major operands, and a 2-D transpose
  reaches that check as a column-major layout, so XLA would silently do the product in float32
  (its operand upcaster), optimization barrier or not. The same transpose written in 3-D (a unit
  axis added) and reshaped back is row-major there (tests/test_precision.py checks that no
  product of a training epoch is upcast).
  """
  if precision == "float32":
    return jax.lax.optimization_barrier(a.T)
  R, C = a.shape
  a = a.astype(PRECISIONS[precision]).reshape(1, R, C)
  return jnp.transpose(a, (2, 0, 1)).reshape(C, R)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(precision: str, x: Array, W: Array, b: Array) -> Array:
  return _matmul(x, W, precision) + b


def _dense_fwd(precision, x, W, b):
  return _dense(precision, x, W, b), (x, W)


def _dense_bwd(precision, res, dy):
  x, W = res
  x2d, dy2d = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dx = _matmul(dy2d, _t(W, precision), precision).reshape(x.shape)
  return dx, _matmul(_t(x2d, precision), dy2d, precision), dy2d.sum(axis=0)


_dense.defvjp(_dense_fwd, _dense_bwd)


def input_gates(params: dict, x: Array, precision: str = "float32") -> Array:
  """``cells.input_gates`` (``X W_xh + b_xh`` for all steps at once) with a CPU-friendly backward.

  Token indices ``<int32>[...]`` keep XLA's gather and scatter-add, which is cheap (and exact:
  ``precision`` does not apply); for dense ``x <float32>[..., num_inputs]`` the two weight-sized
  products of the backward pass are done on operands laid out untransposed.
  """
  if jnp.issubdtype(x.dtype, jnp.integer):
    return cells.input_gates(params, x)
  return _dense(precision, x, params["W_xh"], params["b_xh"])


def layer_scan_autodiff(cell: str, activation: str, unroll: int, W_hh: Array, b_hh: Array, carry,
                        gx: Array):
  """:func:`layer_scan` differentiated by XLA (per-step weight-gradient accumulation).

  The same function; kept as the baseline the custom backward pass is measured against.
  """
  step = _LayerStep(_kernel_spec(cell, "layerwise"), activation)
  return _forward(step, unroll, "float32", W_hh, b_hh, carry, gx)
