"""The LSTM stack as one cuDNN call per pass (``jax.experimental.rnn``), on our parameters.

cuDNN keeps an LSTM's weights in one flat vector: every layer's ``W_ih`` then ``W_hh``
(``[4H, in]``, ``[4H, H]``, PyTorch's layout, gates i, f, g, o), then every layer's ``b_ih`` then
``b_hh``. Ours are the same four arrays transposed (``W_xh = W_ihᵀ``, ``b_xh = b_ih``: see
``cells``), so :func:`pack_lstm_weights` is a pure repacking, differentiated by JAX: gradients
reach ``rnn/layer_{l}/…`` as for the other implementations, and checkpoints do not depend on
the implementation that wrote them.

On a CUDA GPU :func:`lstm_stack` runs cuDNN's LSTM forward and backward kernels (all layers,
all steps in one call each). Elsewhere it runs ``jax.experimental.rnn.lstm_ref``, JAX's own
reference of what that kernel computes, so the packing and the state layout are tested on any
machine; the train CLI refuses ``--impl cudnn`` without a GPU rather than run the slow reference.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import rnn

from deeprnn_jax.base.errors import UsageError

Array = jax.Array


def has_gpu() -> bool:
  """Whether JAX's default backend is a GPU, where ``jax.experimental.rnn`` has kernels (cuDNN;
  MIOpen on ROCm). Asked at trace time: under ``jax.default_device(cpu)`` on a GPU machine,
  ``impl="cudnn"`` would still choose the GPU kernel and fail to lower."""
  return jax.default_backend() == "gpu"


def check_available(impl: str) -> None:
  """Refuses ``impl="cudnn"`` for training where JAX sees no GPU (the reference is slow)."""
  if impl == "cudnn" and not has_gpu():
    raise UsageError("impl 'cudnn' needs a CUDA GPU (JAX sees none here); use impl 'layerwise'")


def pack_lstm_weights(layers: Sequence[dict]) -> Array:
  """Our per-layer LSTM parameters -> cuDNN's flat weight vector ``<float32>[num_params]``."""
  mats = [w for p in layers for w in (p["W_xh"].T, p["W_hh"].T)]
  biases = [b for p in layers for b in (p["b_xh"], p["b_hh"])]
  return jnp.concatenate([a.reshape(-1) for a in mats + biases])


def lstm_stack(layers: Sequence[dict], x: Array, h0: Array, c0: Array):
  """Runs L stacked LSTM layers over all steps.

  Args:
    layers: one ``{W_xh, W_hh, b_xh, b_hh}`` per layer (``cells`` layout).
    x: ``<float32>[batch, steps, num_inputs]``.
    h0, c0: ``<float32>[num_layers, batch, num_hiddens]``.

  Returns:
    ``(hs <float32>[batch, steps, num_hiddens], h_n, c_n)``, ``h_n`` and ``c_n`` shaped as ``h0``.
  """
  num_layers, batch, hiddens = h0.shape
  inputs = x.shape[-1]
  w = pack_lstm_weights(layers)
  seq_lengths = jnp.full((batch,), x.shape[1], jnp.int32)
  if has_gpu():
    return rnn.lstm(x, h0, c0, w, seq_lengths, input_size=inputs, hidden_size=hiddens,
                    num_layers=num_layers, dropout=0.0, bidirectional=False)
  W_ih, W_hh, b_ih, b_hh = rnn.unpack_lstm_weights(w, inputs, hiddens, num_layers, False)
  return rnn.lstm_ref(x, h0, c0, W_ih, W_hh, b_ih, b_hh, seq_lengths, inputs, hiddens,
                      num_layers, 0.0, False)
