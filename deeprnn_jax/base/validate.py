"""The names a run can choose from, and the checks every layer of the project shares.

Plain Python: importing it imports no JAX, so a configuration is checked (and its errors
reported) before JAX starts. The cells are the one exception: their names and what each can run
are declared with their equations (``deeprnn_jax.model.cells.CELLS``), which a check of a cell
imports the first time (JAX is imported, not started). Every check raises
:class:`~deeprnn_jax.base.errors.UsageError` with one line that names the setting and the value it
got.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, Sequence, get_args

from deeprnn_jax.base.errors import UsageError

Cell = str  # a name in deeprnn_jax.model.cells.CELLS (CELLS below)
Activation = Literal["tanh", "relu"]
Impl = Literal["layerwise", "scan", "wavefront", "cudnn", "onednn"]
Precision = Literal["float32", "bfloat16"]
Optimizer = Literal["sgd", "adam"]
Schedule = Literal["constant", "cosine"]
Cleaning = Literal["d2l", "none"]
Pipeline = Literal["classic", "windows"]

ACTIVATIONS: tuple[str, ...] = get_args(Activation)
IMPLS: tuple[str, ...] = get_args(Impl)
# The impls that run a vendor's fused kernel of a whole layer (``CellSpec.fused``).
FUSED_IMPLS = ("cudnn", "onednn")
# The impls whose products can take bfloat16 operands (``precision``).
BFLOAT16_IMPLS = ("layerwise", "wavefront", "onednn")
PRECISIONS: tuple[str, ...] = get_args(Precision)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
CLEANINGS: tuple[str, ...] = get_args(Cleaning)
PIPELINES: tuple[str, ...] = get_args(Pipeline)


def positive_int(name: str, value) -> int:
  """``value`` as an ``int``, if it is a whole number >= 1."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
      or value != int(value) or value < 1):
    raise UsageError(f"{name} must be a positive integer, got {value}")
  return int(value)


def one_of(name: str, value, choices: Sequence[str]) -> str:
  """``value``, if it is one of ``choices``."""
  if value not in choices:
    raise UsageError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
  return value


def _cells() -> dict:
  """``deeprnn_jax.model.cells.CELLS``, the registry of cells (name -> ``CellSpec``)."""
  from deeprnn_jax.model import cells  # JAX code: imported on first use, not with this module
  return cells.CELLS


def __getattr__(name: str):
  if name == "CELLS":  # the cells' names, read from the registry each time
    return tuple(_cells())
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cell(value) -> str:
  """``value``, if it names a registered cell (``rnn``, ``gru``, ``lstm``)."""
  return one_of("cell", value, tuple(_cells()))


KERNEL_RULE = ("its step must compute H_{t-1} W_hh once and use W_hh and b_hh only through "
               "H_{t-1} W_hh + b_hh: cells.CellSpec.fits_kernels")


def fast_kernels(cell_name: str, impl: str) -> None:
  """Raises :class:`UsageError` where ``impl`` is a fast one (every impl but ``"scan"``) and the
  cell breaks the rule the fast kernels are built on (``cells.CellSpec.fits_kernels``)."""
  if impl != "scan" and not _cells()[cell(cell_name)].fits_kernels:
    raise UsageError(f"cell {cell_name!r} does not fit the fast kernels of impl {impl!r} "
                     f"({KERNEL_RULE}); use impl 'scan'")


FLOAT32_MAX = 3.4028234663852886e38  # the parameters' type: a larger number is inf there


def positive_finite(name: str, value) -> float:
  """``value``, if it is a number > 0 that is finite in float32 (a learning rate, a clipping
  norm)."""
  if not (isinstance(value, numbers.Real) and 0 < value <= FLOAT32_MAX):
    raise UsageError(f"{name} must be a finite number > 0, got {value}")
  return float(value)


def temperature(value) -> float:
  """``value``, if it is a sampling temperature: a finite number >= 0 (0: greedy)."""
  if not (isinstance(value, numbers.Real) and 0 <= value <= FLOAT32_MAX):
    raise UsageError(f"temperature must be a finite number >= 0 (0: greedy), got {value}")
  return float(value)


def fraction(name: str, value) -> float:
  """``value``, if it is in ``[0, 1)`` (a dropout rate, a held-out fraction)."""
  if not (isinstance(value, numbers.Real) and 0.0 <= value < 1.0):
    raise UsageError(f"{name} must be in [0, 1), got {value}")
  return float(value)


def layer_activations(activation: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
  """φ_l for each layer: one name for all layers, or a sequence of ``num_layers`` names."""
  names = (activation,) * num_layers if isinstance(activation, str) else tuple(activation)
  if len(names) != num_layers:
    raise UsageError(f"got {len(names)} activations for {num_layers} layers")
  for name in names:
    one_of("activation", name, ACTIVATIONS)
  return names


def model(vocab_size: int, num_hiddens: int, num_layers: int, cell_name: str, activation,
          dropout: float, impl: str = "layerwise", precision: str = "float32",
          unroll: int | None = None, locked_dropout: bool = False,
          weight_drop: float = 0.0, embed_dim: int | None = None,
          embed_dropout: float = 0.0) -> None:
  """Raises :class:`UsageError` for hyperparameters no model can have."""
  spec = _cells()[cell(cell_name)]
  positive_int("vocabulary size", vocab_size)
  positive_int("number of hidden units", num_hiddens)
  positive_int("number of layers", num_layers)
  names = layer_activations(activation, num_layers)
  if not spec.takes_activation and set(names) != {"tanh"}:
    raise UsageError(f"the activation is the RNN's φ; a {cell_name.upper()} has its own gate "
                     f"nonlinearities (got {activation!r})")
  fraction("dropout", dropout)
  fraction("weight drop", weight_drop)
  if embed_dim is not None:
    positive_int("embedding size", embed_dim)
  fraction("embedding dropout", embed_dropout)
  if embed_dropout > 0 and embed_dim is None:
    raise UsageError("embedding dropout drops rows of an embedding: set an embedding size too")
  if not isinstance(locked_dropout, bool):
    raise UsageError(f"locked dropout must be True or False, got {locked_dropout!r}")
  one_of("impl", impl, IMPLS)
  fast_kernels(cell_name, impl)
  # one layer has nowhere to drop between layers; locked dropout drops its output too
  dropped = dropout > 0.0 and (num_layers > 1 or locked_dropout)
  if impl in FUSED_IMPLS and (not spec.fused or dropped):
    kinds = " or ".join(f"{name.upper()}s" for name, s in _cells().items() if s.fused)
    raise UsageError(f"impl {impl!r} runs {kinds} without dropout (got cell {cell_name!r}, "
                     f"dropout {dropout}); use impl 'layerwise'")
  if impl == "wavefront" and dropped:
    raise UsageError(f"impl 'wavefront' runs without dropout (got {dropout}); use impl "
                     "'layerwise'")
  one_of("precision", precision, PRECISIONS)
  if precision != "float32" and impl not in BFLOAT16_IMPLS:
    raise UsageError(f"precision {precision!r} is for impl "
                     f"{', '.join(repr(i) for i in BFLOAT16_IMPLS)} (got {impl!r}: the reference "
                     "and cuDNN run float32)")
  if unroll is not None:
    positive_int("unroll", unroll)


def optimizer(lr: float, clip_norm: float, name: str, weight_decay: float = 0.0,
              ema: float = 0.0) -> None:
  """Raises :class:`UsageError` for an optimiser no run can have."""
  positive_finite("learning rate", lr)
  positive_finite("clipping norm", clip_norm)
  one_of("optimizer", name, OPTIMIZERS)
  if not (isinstance(weight_decay, numbers.Real) and math.isfinite(weight_decay)
          and weight_decay >= 0):
    raise UsageError(f"weight decay must be a finite number >= 0, got {weight_decay}")
  if not (isinstance(ema, numbers.Real) and 0 <= ema < 1):
    raise UsageError(f"ema (the average's decay) must be in [0, 1), got {ema}")


def schedule(name: str, warmup_epochs, min_factor, num_epochs: int) -> None:
  """Raises :class:`UsageError` for a learning-rate schedule no run can have."""
  one_of("learning-rate schedule", name, SCHEDULES)
  if (isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, numbers.Integral)
      or warmup_epochs < 0):
    raise UsageError(f"warmup epochs must be an integer >= 0, got {warmup_epochs}")
  if warmup_epochs >= num_epochs:
    raise UsageError(f"warmup epochs must be fewer than the run's {num_epochs} epochs, got "
                     f"{warmup_epochs}")
  if not (isinstance(min_factor, numbers.Real) and 0.0 <= min_factor <= 1.0):
    raise UsageError(f"lr min factor must be in [0, 1], got {min_factor}")


def windows(num_train, num_val, valid_fraction: float, use_random_iter: bool) -> None:
  """Raises :class:`UsageError` for settings the windows pipeline (d2l 1.0's) cannot have."""
  positive_int("number of training windows", num_train)
  if isinstance(num_val, bool) or not isinstance(num_val, int) or num_val < 0:
    raise UsageError(f"number of validation windows must be an integer >= 0, got {num_val}")
  if valid_fraction:
    raise UsageError("the windows pipeline holds out its num_val windows for validation; "
                     "valid fraction is for the classic pipeline")
  if use_random_iter:
    raise UsageError("the windows pipeline shuffles its windows every epoch; random "
                     "partitioning is for the classic pipeline")
