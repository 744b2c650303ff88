"""Deep (stacked) recurrent networks and the character language model built on them.

Five ways to run the same parameters, chosen by ``impl``:

* ``"scan"`` — the chapter, literally: ``nn.scan`` carries all L stacked cells through time, one
  time step at a time, with one-hot inputs. This is the reference.
* ``"layerwise"`` — the fast path: layer by layer, the input part ``H^(l-1) W_xh + b_xh`` of every
  time step is one matrix product (a row gather for one-hot tokens) hoisted out of the time loop,
  and ``lax.scan`` runs only the recurrent part (``recurrence.layer_scan``, whose backward pass
  forms the weight gradients as one matrix product). Same equations (``cells.step``), same
  numbers (with dropout, equal in distribution: the masks are drawn differently).
* ``"wavefront"`` — the layerwise kernels with the L layers skewed in time (layer ``l`` at step
  ``t - l``) and run as one recurrence (``recurrence.wave_scan``): ``steps + L - 1`` sequential
  steps instead of ``L * steps``, each one larger product. For GPUs, where a step's cost is
  latency, not arithmetic; no dropout.
* ``"cudnn"`` — LSTM only, no dropout: the whole stack as one cuDNN call forward and one
  backward (``jax.experimental.rnn``; see ``cudnn``), on the same parameters.
* ``"onednn"`` — LSTM only, no dropout, on the CPU: each layer as one call of oneDNN's fused LSTM
  forward and one backward (PyTorch's CPU kernel; see ``onednn``), on the same parameters.

Parameters (``params`` of :class:`RNNLM`)::

    embedding <float32>[vocab_size, embed_dim]   only with ``embed_dim``
    rnn/layer_{l}/{W_xh, W_hh, b_xh, b_hh}   see ``cells``
    W_hq <float32>[num_hiddens, vocab_size]
    b_q  <float32>[vocab_size]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprnn_jax.base import validate
from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.validate import Activation, Cell, Impl, Precision, layer_activations
from deeprnn_jax.model import cells, cudnn, onednn, recurrence

Array = jax.Array
def _time_major(inputs: Array) -> Array:
  """``<int32>[batch, steps]`` or ``<float32>[batch, steps, n]`` with time first, for lax.scan."""
  return inputs.T if inputs.ndim == 2 else jnp.swapaxes(inputs, 0, 1)


class _Stack(nn.Module):
  """The attributes of L stacked recurrent layers.

  Attributes:
    cell: a name in ``cells.CELLS`` (``"rnn"``, ``"gru"``, ``"lstm"``).
    num_inputs: width of ``X_t`` (the vocabulary size for one-hot inputs).
    num_hiddens: width of every layer's hidden state.
    activations: φ_l for each layer (RNN only).
    dropout: drop probability between layers.
    locked: one dropout mask per sequence and layer, the same at every time step (variational
      dropout); else a fresh mask at every step.
    deterministic: ``False`` applies dropout (needs a ``"dropout"`` PRNG key).
    precision: operand type of the fast paths' products (``recurrence.PRECISIONS``).
    unroll: ``lax.scan`` unroll factor of the fast paths' recurrence.
  """

  cell: Cell
  num_inputs: int
  num_hiddens: int
  activations: tuple[Activation, ...]
  dropout: float = 0.0
  deterministic: bool = True
  precision: Precision = "float32"
  unroll: int = 1
  locked: bool = False

  def layer_cells(self) -> list[cells.Cell]:
    """Each layer's ``cells.Cell`` (its parameters), named ``layer_{l}``."""
    return [cells.Cell(self.cell, self.num_inputs if l == 0 else self.num_hiddens,
                       self.num_hiddens, activation, name=f"layer_{l}")
            for l, activation in enumerate(self.activations)]

  def layer_by_layer(self, layers, carries, xs: Array):
    """The recurrence of :class:`LayerwiseRNN` on time-major ``xs``; ``(carries, hs)``."""
    new_carries = []
    for l, (layer, activation) in enumerate(zip(layers, self.activations)):
      if l > 0 and self.dropout > 0.0:  # xs: [steps, batch, n]; a locked mask spans the steps
        xs = nn.Dropout(self.dropout, broadcast_dims=(0,) if self.locked else ())(
            xs, deterministic=self.deterministic)
      # <float32>[steps, batch, G * hiddens]
      gx = recurrence.input_gates(layer.weights, xs, self.precision)
      # The recurrent part with weight gradients as one GEMM after the scan (recurrence.py).
      carry, xs = recurrence.layer_scan(self.cell, activation, self.unroll,
                                        layer.W_hh, layer.b_hh, carries[l], gx, self.precision)
      new_carries.append(carry)
    return tuple(new_carries), xs


class StackStep(_Stack):
  """One time step through all L layers: ``H_t^(l) = cell_l(H_{t-1}^(l), H_t^(l-1))``.

  ``(carries, X_t <float32>[batch, num_inputs]) -> (carries, H_t^(L) <float32>[batch, hiddens])``
  with one carry per layer.
  """

  @nn.compact
  def __call__(self, carries, x):
    new_carries = []
    for l, layer in enumerate(self.layer_cells()):
      if l > 0 and self.dropout > 0.0:  # Between layers only, as PyTorch.
        x = nn.Dropout(self.dropout)(x, deterministic=self.deterministic)
      carry, x = layer(carries[l], x)
      new_carries.append(carry)
    return tuple(new_carries), x


# The chapter's deep RNN: ``nn.scan`` carries the L stacked cells through time, parameters
# broadcast over time, a fresh dropout mask at every step. Same attributes as StackStep;
# ``(carries, inputs <float32>[batch, steps, num_inputs]) -> (carries, <float32>[batch, steps,
# hiddens])``.
def _scanned_stack(fresh_masks: bool):
  return nn.scan(StackStep, variable_broadcast="params",
                 split_rngs={"params": False, "dropout": fresh_masks}, in_axes=1, out_axes=1)


DeepRNN = _scanned_stack(fresh_masks=True)
# Locked dropout: every step draws from the same key, so every step drops the same units.
DeepRNNLocked = _scanned_stack(fresh_masks=False)


def drop_recurrent_weights(variables: dict, key: Array, rate: float) -> dict:
  """Weight drop (DropConnect on ``W_hh``, Merity et al.): every layer's ``W_hh`` with each
  entry zeroed with probability ``rate`` and the rest scaled by ``1 / (1 - rate)``; one mask per
  call, so the same at every time step of a minibatch. ``variables``: ``{"params": the stack's
  params}``; the gradient reaches ``W_hh`` through the mask."""

  def drop(path, a):
    if getattr(path[-1], "key", None) != "W_hh":
      return a
    layer = int(path[-2].key.removeprefix("layer_"))
    keep = jax.random.bernoulli(jax.random.fold_in(key, layer), 1.0 - rate, a.shape)
    return jnp.where(keep, a / (1.0 - rate), 0.0)

  return jax.tree_util.tree_map_with_path(drop, variables)


class LayerwiseRNN(_Stack):
  """The fast path to the same function as :data:`DeepRNN`, with the same parameters.

  Layer by layer: the input part of every time step is one matrix product hoisted out of the
  time loop (a row gather for token indices), then ``recurrence.layer_scan`` runs the recurrent
  part under ``lax.scan``, with weight gradients as one product after the backward scan.
  ``inputs`` may be ``<float32>[batch, steps, num_inputs]`` or tokens ``<int32>[batch, steps]``
  standing for one-hot rows.
  """

  @nn.compact
  def __call__(self, carries, inputs: Array):
    carries, xs = self.layer_by_layer(self.layer_cells(), carries, _time_major(inputs))
    return carries, jnp.swapaxes(xs, 0, 1)


class WavefrontRNN(_Stack):
  """:class:`LayerwiseRNN` with the layers skewed in time and run as one recurrence.

  Layer 0's input part is hoisted as in :class:`LayerwiseRNN`; every other layer's input,
  ``H_t^(l-1)``, is the previous wave step's output of layer ``l - 1``, so its ``W_xh`` product
  joins the recurrent one (``recurrence.wave_scan``). No dropout. One time step (generation)
  runs layer by layer: there is nothing to overlap.
  """

  @nn.compact
  def __call__(self, carries, inputs: Array):
    xs, layers = _time_major(inputs), self.layer_cells()
    if len(layers) == 1 or xs.shape[0] == 1:
      carries, xs = self.layer_by_layer(layers, carries, xs)
    else:
      # <float32>[steps, batch, G * hiddens]
      gx = recurrence.input_gates(layers[0].weights, xs, self.precision)
      carries, xs = recurrence.wave_scan(self.cell, self.activations, self.unroll,
                                         [layer.weights for layer in layers], carries, gx,
                                         self.precision)
    return tuple(carries), jnp.swapaxes(xs, 0, 1)


class _FusedLSTM(_Stack):
  """:data:`DeepRNN` for LSTMs without dropout, as a vendor's fused kernel (:meth:`stack`).

  The same parameters (``layer_{l}/…``, declared by ``cells.Cell``); ``inputs`` as for
  :class:`LayerwiseRNN` (tokens are expanded to one-hot rows: the kernels take dense inputs).
  """

  def stack(self, layers, inputs: Array, h0: Array, c0: Array):
    """``inputs <float32>[batch, steps, n]`` -> ``(hs <float32>[batch, steps, H], h_n, c_n)``."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, carries, inputs: Array):
    if inputs.ndim == 2:
      inputs = jax.nn.one_hot(inputs, self.num_inputs, dtype=jnp.float32)
    layers = [layer.weights for layer in self.layer_cells()]
    spec = cells.cell_spec(self.cell)
    h0, c0 = spec.stacked_state(carries)
    hs, h_n, c_n = self.stack(layers, inputs, h0, c0)
    return tuple(spec.layer_carries((h_n, c_n))), hs


class CudnnLSTM(_FusedLSTM):
  """:class:`_FusedLSTM` as one cuDNN call per pass (``cudnn.lstm_stack``)."""

  def stack(self, layers, inputs, h0, c0):
    return cudnn.lstm_stack(layers, inputs, h0, c0)


class OnednnLSTM(_FusedLSTM):
  """:class:`_FusedLSTM` on the CPU, one oneDNN call per layer and pass (``onednn.lstm_stack``;
  ``precision="bfloat16"`` is oneDNN's bfloat16 LSTM)."""

  def stack(self, layers, inputs, h0, c0):
    hs, h_n, c_n = onednn.lstm_stack(layers, _time_major(inputs), h0, c0,
                                     bf16=self.precision == "bfloat16")
    return jnp.swapaxes(hs, 0, 1), h_n, c_n


class RNNLM(nn.Module):
  """A character (or word) language model: one-hot inputs, a deep RNN, a linear head.

  ``O_t = H_t^(L) W_hq + b_q``. The head is initialised as PyTorch's ``nn.Linear``:
  ``U(-1/√num_hiddens, 1/√num_hiddens)``.

  Attributes:
    vocab_size: number of tokens.
    num_hiddens: hidden units per layer.
    num_layers: L.
    cell: a name in ``cells.CELLS``: ``"rnn"``, ``"gru"`` or ``"lstm"``.
    activation: φ for RNN layers, one name or one per layer.
    dropout: drop probability between recurrent layers (training only).
    locked_dropout: the dropout masks are locked (variational): one per sequence and layer, the
      same at every time step, and the last layer's output is dropped too (AWD-LSTM's).
    weight_drop: drop probability of each entry of every ``W_hh`` (weight drop, training only):
      one mask per minibatch, the same at every step, on every implementation.
    embed_dim: ``None`` (d2l): one-hot inputs; else each token's row of a learned embedding
      ``<float32>[vocab_size, embed_dim]`` (param ``embedding``) is layer 0's input.
    embed_dropout: drop probability of each token's whole embedding row for a minibatch
      (training only; the rest scaled by ``1 / (1 - p)``).
    impl: ``"layerwise"`` (fast, default), ``"scan"`` (the chapter's reference formulation),
      ``"wavefront"`` (layers skewed in time, for GPUs; no dropout), ``"cudnn"`` (LSTM without
      dropout, one cuDNN call; JAX's reference of it off the GPU) or ``"onednn"`` (LSTM without
      dropout on the CPU, oneDNN's fused kernel per layer). A cell that does not fit the
      fast kernels (``cells.CellSpec.fits_kernels``) runs under ``"scan"`` only.
    precision: ``"float32"`` (default) or ``"bfloat16"``: the recurrent layers' products take
      bfloat16 operands and accumulate in float32 (``layerwise``, ``wavefront`` and ``onednn``;
      the head, the cell state, the nonlinearities and the parameters stay float32; ``onednn``
      also rounds ``H`` to bfloat16, as oneDNN's bfloat16 LSTM does).
    unroll: ``lax.scan`` unroll factor of the ``layerwise`` and ``wavefront`` recurrence; ``None``
      takes the backend's measured best (:data:`deeprnn_jax.model.recurrence.DEFAULT_UNROLL`). It
      changes speed and compile time, never the numbers.
  """

  vocab_size: int
  num_hiddens: int = 256
  num_layers: int = 2
  cell: Cell = "lstm"
  activation: Activation | tuple[Activation, ...] = "tanh"
  dropout: float = 0.0
  impl: Impl = "layerwise"
  precision: Precision = "float32"
  unroll: int | None = None
  locked_dropout: bool = False
  weight_drop: float = 0.0
  embed_dim: int | None = None
  embed_dropout: float = 0.0

  def __post_init__(self):
    validate.model(self.vocab_size, self.num_hiddens, self.num_layers, self.cell,
                   self.activation, self.dropout, self.impl, self.precision, self.unroll,
                   self.locked_dropout, self.weight_drop, self.embed_dim, self.embed_dropout)
    super().__post_init__()

  @property
  def stochastic(self) -> bool:
    """Whether training draws masks (any dropout, weight drop): needs a ``"dropout"`` key."""
    return self.dropout > 0.0 or self.weight_drop > 0.0 or self.embed_dropout > 0.0

  def embed(self, X: Array, deterministic: bool) -> Array:
    """Tokens ``<int32>[batch, steps]`` -> their embedding rows ``<float32>[batch, steps, E]``,
    whole rows dropped for the minibatch in training (embedding dropout)."""
    table = self.param("embedding", nn.initializers.normal(1.0), (self.vocab_size,
                                                                 self.embed_dim))
    if self.embed_dropout > 0.0 and not deterministic:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.embed_dropout,
                                  (self.vocab_size, 1))
      table = jnp.where(keep, table / (1.0 - self.embed_dropout), 0.0)
    return jnp.take(table, X, axis=0)

  def begin_state(self, batch_size: int = 1):
    """Zeros in d2l/PyTorch layout: ``<float32>[num_layers, batch, num_hiddens]``
    (LSTM: ``(H, C)``)."""
    return cells.cell_spec(self.cell).zero_state((self.num_layers, batch_size, self.num_hiddens))

  @nn.compact
  def __call__(self, X: Array, state=None, deterministic: bool = True):
    """Runs the model over a minibatch.

    Args:
      X: token indices ``<int32>[batch, steps]``.
      state: from :meth:`begin_state` or a previous call; zeros when ``None``.
      deterministic: ``False`` applies dropout (needs a ``"dropout"`` PRNG key).

    Returns:
      ``(logits <float32>[batch, steps, vocab_size], state)``.
    """
    spec = cells.cell_spec(self.cell)
    if state is None:
      state = self.begin_state(X.shape[0])
    if self.impl == "scan":
      rnn = DeepRNNLocked if self.locked_dropout else DeepRNN
      inputs = jax.nn.one_hot(X, self.vocab_size, dtype=jnp.float32)
    else:
      rnn = {"cudnn": CudnnLSTM, "onednn": OnednnLSTM,
             "wavefront": WavefrontRNN}.get(self.impl, LayerwiseRNN)
      inputs = X
    if self.embed_dim is not None:
      inputs = self.embed(X, deterministic)
    if self.weight_drop > 0.0 and not deterministic:
      key, rate = self.make_rng("dropout"), self.weight_drop
      rnn = nn.map_variables(rnn, "params", init=self.is_initializing(),
                             trans_in_fn=lambda v: drop_recurrent_weights(v, key, rate))
    carries, hs = rnn(
        self.cell, self.embed_dim or self.vocab_size, self.num_hiddens,
        layer_activations(self.activation, self.num_layers), self.dropout, deterministic,
        self.precision, self.unroll or recurrence.default_unroll(), self.locked_dropout,
        name="rnn",
    )(tuple(spec.layer_carries(state)), inputs)
    if self.locked_dropout and self.dropout > 0.0:  # hs: [batch, steps, hiddens]
      hs = nn.Dropout(self.dropout, broadcast_dims=(1,))(hs, deterministic=deterministic)
    init = cells.torch_uniform(self.num_hiddens)
    W_hq = self.param("W_hq", init, (self.num_hiddens, self.vocab_size))
    b_q = self.param("b_q", init, (self.vocab_size,))
    return hs @ W_hq + b_q, spec.stacked_state(carries)


def check_available(impl: str) -> None:
  """Raises :class:`~deeprnn_jax.base.errors.UsageError` (one line) where ``impl`` cannot train on
  this machine: ``"cudnn"`` without a GPU, ``"onednn"`` off the CPU or without oneDNN."""
  cudnn.check_available(impl)
  onednn.check_available(impl)


def from_config(config: TrainConfig, vocab_size: int) -> RNNLM:
  """The model a run of ``config`` trains, over ``vocab_size`` tokens."""
  return RNNLM(vocab_size, config.num_hiddens, config.num_layers, config.cell, config.activation,
               config.dropout, config.impl, config.precision, config.unroll,
               config.locked_dropout, config.weight_drop, config.embed_dim,
               config.embed_dropout)
