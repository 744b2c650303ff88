"""Parameters to and from PyTorch: d2l's ``RNNModel``, or an ``nn.RNN/GRU/LSTM`` and ``nn.Linear``.

d2l's ``RNNModel`` (classic edition, ``d2l/torch.py``) holds a recurrent layer ``rnn`` and a head
``linear``; its ``state_dict()`` has, for each layer ``k``::

    rnn.weight_ih_l{k} <float32>[G*H, num_inputs]   = W_xh.T   (num_inputs = vocab_size for k = 0)
    rnn.weight_hh_l{k} <float32>[G*H, H]            = W_hh.T
    rnn.bias_ih_l{k}   <float32>[G*H]               = b_xh
    rnn.bias_hh_l{k}   <float32>[G*H]               = b_hh

and ``linear.weight <float32>[vocab_size, H]`` (= ``W_hq.T``), ``linear.bias <float32>[vocab_size]``
(= ``b_q``). Each cell's spec (``cells.CELLS``) names its PyTorch layer (``torch_module``) and
PyTorch's gate order; the three cells' gates already sit in that order, so converting them is
transposing, both ways exactly (a cell whose order differs has its gate blocks reordered too).
States need nothing: :class:`~deeprnn_jax.model.models.RNNLM` takes and returns them in PyTorch's
``[num_layers, batch, H]`` layout (LSTM: ``(H, C)``).

d2l 1.0 (the English edition, ``d2l.RNNLM``) holds its ``nn.GRU`` one module deeper, in
``d2l.GRU``'s ``rnn``: its keys are ``rnn.rnn.weight_ih_l{k}`` … (:data:`D2L_EN_RNN_PREFIX`) and the
same ``linear.*`` (a ``LazyLinear``); :func:`from_d2l_en` and :func:`to_d2l_en` rename between the
two layouts. Its vocabulary is sorted (``deeprnn_jax.text.windows``), which the keys do not record.

Which nonlinearity an ``nn.RNN`` uses is not in its state dict; pass it to the model yourself.
Torch is not imported here: tensors are converted by duck typing (``.detach().cpu().numpy()``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from deeprnn_jax.base import validate
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.model import cells

RNN_PREFIX = "rnn."
HEAD_PREFIX = "linear."
D2L_EN_RNN_PREFIX = "rnn.rnn."
_LAYER_KEY = re.compile(r"^rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")
# (torch name, our name, transposed?) for each recurrent layer.
_LAYER_PARAMS = (("weight_ih", "W_xh", True), ("weight_hh", "W_hh", True),
                 ("bias_ih", "b_xh", False), ("bias_hh", "b_hh", False))


def layer_keys(num_layers: int) -> list[str]:
  """The recurrent keys of a d2l ``RNNModel`` state dict, in PyTorch's order."""
  return [f"{RNN_PREFIX}{name}_l{k}" for k in range(num_layers) for name, _, _ in _LAYER_PARAMS]


def state_dict_keys(num_layers: int) -> list[str]:
  """Every key of a d2l ``RNNModel`` state dict, in PyTorch's order."""
  return layer_keys(num_layers) + [f"{HEAD_PREFIX}weight", f"{HEAD_PREFIX}bias"]


def with_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """``{prefix + key: value}``: a bare ``nn.LSTM``'s state dict as part of an ``RNNModel``'s.

  ``{**with_prefix(lstm.state_dict(), "rnn."), **with_prefix(linear.state_dict(), "linear.")}``
  """
  return {prefix + key: value for key, value in state_dict.items()}


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The entries whose key starts with ``prefix``, without it: ``lstm.load_state_dict(
  strip_prefix(sd, "rnn."))`` and ``linear.load_state_dict(strip_prefix(sd, "linear."))``."""
  return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def is_d2l_en(state_dict: Mapping[str, Any]) -> bool:
  """Whether a state dict has d2l 1.0's ``RNNLM`` layout (``rnn.rnn.*`` keys)."""
  return any(str(key).startswith(D2L_EN_RNN_PREFIX) for key in state_dict)


def from_d2l_en(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """d2l 1.0's ``RNNLM`` state dict in the classic ``RNNModel`` layout: ``rnn.rnn.X`` -> ``rnn.X``,
  in the same order; any other key is kept, for :func:`params_from_torch` to name."""
  n = len(RNN_PREFIX)
  return {(key[n:] if str(key).startswith(D2L_EN_RNN_PREFIX) else key): value
          for key, value in state_dict.items()}


def to_d2l_en(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A classic ``RNNModel`` state dict in d2l 1.0's ``RNNLM`` layout: ``rnn.X`` -> ``rnn.rnn.X``."""
  return {(RNN_PREFIX + key if key.startswith(RNN_PREFIX) else key): value
          for key, value in state_dict.items()}


def to_numpy(value, key: str = "value") -> np.ndarray:
  """A torch tensor (duck-typed, any device) or array-like as ``<float32>`` NumPy."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    try:
      value = value.numpy()
    except TypeError:  # bfloat16 and friends have no NumPy dtype; go through float32.
      value = value.float().numpy()
  array = np.asarray(value)
  if array.dtype.kind in "biucOSU":  # bfloat16 (kind "V") and the float kinds pass.
    raise UsageError(f"{key} has dtype {array.dtype}; expected floating-point weights")
  return array.astype(np.float32)


def torch_cell(cell: str) -> cells.CellSpec:
  """The spec of ``cell``, if it has a PyTorch layer (``CellSpec.torch_module``) to convert."""
  spec = cells.cell_spec(cell)
  if spec.torch_module is None:
    raise UsageError(f"cell {cell!r} has no PyTorch layer to convert to or from")
  return spec


def _check_cell(cell: str, num_layers) -> cells.CellSpec:
  validate.positive_int("number of layers", num_layers)
  return torch_cell(cell)


def _cell_guess(rows: int, cols: int) -> str:
  """Which cells a ``[rows, cols]`` ``weight_hh`` would fit, for error messages."""
  fits = [name for name, spec in cells.CELLS.items()
          if spec.torch_module is not None and rows == spec.num_gates * cols]
  return f"it fits {' or '.join(fits)}" if fits else "it fits no cell"


def _reorder_gates(array: np.ndarray, order: tuple[str, ...], to: tuple[str, ...]) -> np.ndarray:
  """``array``'s gate blocks (PyTorch's layout: ``G`` blocks along axis 0, in ``order``) in the
  order ``to``."""
  if order == to:
    return array
  blocks = np.split(array, len(order), axis=0)
  return np.concatenate([blocks[order.index(gate)] for gate in to], axis=0)


def _check_keys(keys, num_layers: int) -> None:
  """Missing and unexpected keys, each named, with a hint at the likely cause."""
  expected = state_dict_keys(num_layers)
  missing = [k for k in expected if k not in keys]
  unexpected = [k for k in keys if k not in set(expected)]
  layers_present = sorted({int(m.group(2)) for k in keys if (m := _LAYER_KEY.match(str(k)))})
  num_present = (layers_present[-1] + 1) if layers_present else 0
  if missing:
    key = missing[0]
    if is_d2l_en(dict.fromkeys(keys)):
      hint = "; this is d2l 1.0's RNNLM layout (rnn.rnn.*): convert it with interop.from_d2l_en"
    elif not any(str(k).startswith(RNN_PREFIX) for k in keys) and "weight_ih_l0" in keys:
      hint = ("; this looks like a bare nn.RNN/GRU/LSTM state dict: add the 'rnn.' prefix and the "
              "head's 'linear.' keys (interop.with_prefix)")
    elif key.startswith(RNN_PREFIX) and num_present < num_layers and _LAYER_KEY.match(key):
      hint = f"; the state dict has {num_present} layer(s), not {num_layers}"
    else:
      hint = ""
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise UsageError(f"state dict has no {key}{more}{hint}")
  if unexpected:
    key = str(unexpected[0])
    if _LAYER_KEY.match(key):
      hint = f"; the state dict has {num_present} layers, not {num_layers}"
    elif key.endswith("_reverse"):
      hint = "; bidirectional RNNs are not supported"
    elif "weight_hr" in key:
      hint = "; LSTMs with proj_size are not supported"
    else:
      hint = ""
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise UsageError(f"unexpected key {key} in state dict{more}{hint}")


def infer_sizes(state_dict: Mapping[str, Any], cell: str, num_layers: int) -> tuple[int, int]:
  """``(vocab_size, num_hiddens)`` of a d2l ``RNNModel`` state dict, checking every key and shape.

  Raises:
    UsageError: naming the first missing, unexpected or misshapen key, or a gate count that is
      not ``cell``'s (rows of ``weight_ih``/``weight_hh`` must be ``G * H``).
  """
  num_gates = _check_cell(cell, num_layers).num_gates
  _check_keys(list(state_dict.keys()), num_layers)
  shape = lambda key: tuple(np.shape(state_dict[key]))
  hh = shape("rnn.weight_hh_l0")
  if len(hh) != 2 or hh[1] < 1:
    raise UsageError(f"rnn.weight_hh_l0 has shape {list(hh)}; expected [G*H, H]")
  H = hh[1]
  if hh[0] != num_gates * H:
    raise UsageError(f"rnn.weight_hh_l0 has shape {list(hh)}, not [{num_gates}*H, H] as a "
                     f"{cell} needs ({num_gates} gate(s)); {_cell_guess(*hh)}")
  ih = shape("rnn.weight_ih_l0")
  if len(ih) != 2 or ih[1] < 1:
    raise UsageError(f"rnn.weight_ih_l0 has shape {list(ih)}; "
                     f"expected [{num_gates * H}, vocab_size]")
  V = ih[1]
  want = {"linear.weight": (V, H), "linear.bias": (V,)}
  for k in range(num_layers):
    want.update({f"rnn.weight_ih_l{k}": (num_gates * H, V if k == 0 else H),
                 f"rnn.weight_hh_l{k}": (num_gates * H, H),
                 f"rnn.bias_ih_l{k}": (num_gates * H,),
                 f"rnn.bias_hh_l{k}": (num_gates * H,)})
  for key in state_dict_keys(num_layers):
    if shape(key) != want[key]:
      raise UsageError(f"{key} has shape {list(shape(key))}; a {num_layers}-layer {cell} with "
                       f"{H} hidden units and vocabulary {V} needs {list(want[key])}")
  return V, H


def params_from_torch(state_dict: Mapping[str, Any], cell: str, num_layers: int) -> dict:
  """Flax ``params`` of :class:`~deeprnn_jax.model.models.RNNLM` from a d2l ``RNNModel`` state dict.

  Args:
    state_dict: ``rnn.{weight,bias}_{ih,hh}_l{k}``, ``linear.weight`` and ``linear.bias``, as
      torch tensors or NumPy arrays (``model.state_dict()``, or a ``torch.load``-ed file).
    cell: the cell (``"rnn"``, ``"gru"``, ``"lstm"``) whose ``CellSpec.torch_module`` the state
      dict's layer is (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``).
    num_layers: its ``num_layers``.

  Returns:
    ``{"rnn": {"layer_{l}": {W_xh, W_hh, b_xh, b_hh}}, "W_hq", "b_q"}`` of ``<float32>`` NumPy
    arrays, for ``RNNLM(vocab_size, num_hiddens, num_layers, cell)`` (see :func:`infer_sizes`).

  Raises:
    UsageError: a missing or unexpected key, a wrong shape, or a gate count not ``cell``'s.
  """
  infer_sizes(state_dict, cell, num_layers)
  spec = cells.cell_spec(cell)
  rnn = {}
  for k in range(num_layers):
    layer = {}
    for torch_name, name, transpose in _LAYER_PARAMS:
      key = f"rnn.{torch_name}_l{k}"
      array = _reorder_gates(to_numpy(state_dict[key], key), spec.torch_gates or spec.gates,
                             spec.gates)
      layer[name] = np.ascontiguousarray(array.T if transpose else array)
    rnn[f"layer_{k}"] = layer
  return {
      "rnn": rnn,
      "W_hq": np.ascontiguousarray(to_numpy(state_dict["linear.weight"], "linear.weight").T),
      "b_q": to_numpy(state_dict["linear.bias"], "linear.bias"),
  }


def _get(tree, path: str):
  node = tree
  for part in path.split("/"):
    try:
      node = node[part]
    except (KeyError, TypeError, IndexError):
      raise UsageError(f"params have no {path}") from None
  return node


def params_to_torch(params: Mapping[str, Any], cell: str, num_layers: int) -> dict[str, np.ndarray]:
  """A d2l ``RNNModel`` state dict (``<float32>`` NumPy arrays, PyTorch's key order) from
  :class:`~deeprnn_jax.model.models.RNNLM` ``params``.

  Load it with ``net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``; for a
  bare ``nn.LSTM`` and ``nn.Linear`` pair, use :func:`strip_prefix` with ``"rnn."``/``"linear."``.

  Raises:
    UsageError: params that are not a ``num_layers``-layer ``cell`` model.
  """
  spec = _check_cell(cell, num_layers)
  try:
    extra = sorted(set(params) - {"rnn", "W_hq", "b_q"})
  except TypeError:
    raise UsageError(f"params must be a mapping, got {type(params).__name__}") from None
  if extra:
    raise UsageError(f"unexpected params {extra[0]}: not an RNNLM's")
  rnn = _get(params, "rnn")
  extra = sorted(set(rnn) - {f"layer_{k}" for k in range(num_layers)})
  if extra:
    raise UsageError(f"unexpected params rnn/{extra[0]}: the params have more than "
                     f"{num_layers} layer(s)")
  state_dict = {}
  for k in range(num_layers):
    for torch_name, name, transpose in _LAYER_PARAMS:
      path = f"rnn/layer_{k}/{name}"
      array = to_numpy(_get(params, path), path)
      array = _reorder_gates(array.T if transpose else array, spec.gates,
                             spec.torch_gates or spec.gates)
      state_dict[f"rnn.{torch_name}_l{k}"] = np.ascontiguousarray(array)
  state_dict["linear.weight"] = np.ascontiguousarray(to_numpy(_get(params, "W_hq"), "W_hq").T)
  state_dict["linear.bias"] = to_numpy(_get(params, "b_q"), "b_q")
  try:
    infer_sizes(state_dict, cell, num_layers)  # Same shape checks, in PyTorch's names.
  except UsageError as e:
    raise UsageError(f"params do not fit a {num_layers}-layer {cell} (in PyTorch's names: "
                     f"{e})") from None
  return state_dict


def model_from_torch(state_dict: Mapping[str, Any], cell: str, num_layers: int,
                     activation: str | tuple[str, ...] = "tanh", **model_kwargs):
  """``(RNNLM, params)`` equivalent to a d2l ``RNNModel`` from its state dict.

  ``activation`` is the ``nn.RNN``'s ``nonlinearity`` (not recorded in the state dict);
  ``model_kwargs`` go to :class:`~deeprnn_jax.model.models.RNNLM` (``dropout``, ``impl``).
  """
  from deeprnn_jax.model.models import RNNLM  # Keeps `import deeprnn_jax.model.interop` light.

  params = params_from_torch(state_dict, cell, num_layers)
  num_hiddens, vocab_size = params["W_hq"].shape
  return RNNLM(vocab_size, num_hiddens, num_layers, cell, activation, **model_kwargs), params
