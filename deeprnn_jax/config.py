"""The run configuration: one frozen dataclass, the chapter's run as its defaults."""

from __future__ import annotations

import dataclasses

from deeprnn_jax import cudnn
from deeprnn_jax.data import CLEANINGS, check_valid_fraction
from deeprnn_jax.errors import UsageError
from deeprnn_jax.models import RNNLM, check_model_args
from deeprnn_jax.training import make_optimizer


def parse_activation(text: str) -> str | tuple[str, ...]:
  """``"relu"`` -> ``"relu"``; ``"relu,tanh"`` (one per layer) -> ``("relu", "tanh")``."""
  names = tuple(name.strip() for name in text.split(","))
  return names[0] if len(names) == 1 else names


# Fields that fix the parameters' shapes and meaning: a checkpoint only resumes under these.
MODEL_FIELDS = ("cell", "num_layers", "num_hiddens", "activation")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that determines a training run. Defaults reproduce d2l's chapter."""

  cell: str = "lstm"
  num_layers: int = 2
  num_hiddens: int = 256
  activation: str | tuple[str, ...] = "tanh"
  dropout: float = 0.0
  batch_size: int = 32
  num_steps: int = 35
  lr: float = 2.0
  clip: float = 1.0
  num_epochs: int = 500
  max_tokens: int = 10000
  use_random_iter: bool = False
  seed: int = 0
  corpus: str = "timemachine.txt"
  clean: str = "d2l"
  valid_fraction: float = 0.0
  optimizer: str = "sgd"
  impl: str = "layerwise"
  precision: str = "float32"

  def validate(self) -> "TrainConfig":
    """Raises :class:`UsageError` for settings no run can have; returns ``self``."""
    check_model_args(1, self.num_hiddens, self.num_layers, self.cell, self.activation,
                     self.dropout, self.impl, self.precision)
    if self.impl == "cudnn" and not cudnn.has_gpu():
      raise UsageError("impl 'cudnn' needs a CUDA GPU (JAX sees none here); use impl 'layerwise'")
    for name in ("batch_size", "num_steps", "num_epochs"):
      value = getattr(self, name)
      if int(value) != value or value < 1:
        raise UsageError(f"{name.replace('_', ' ')} must be a positive integer, got {value}")
    make_optimizer(self.lr, self.clip, self.optimizer)  # Checks lr, clip and the name.
    if int(self.seed) != self.seed or not 0 <= self.seed < 2**32:
      raise UsageError(f"seed must be an integer in [0, 2**32), got {self.seed}")
    if self.clean not in CLEANINGS:
      raise UsageError(f"unknown cleaning {self.clean!r}; choose one of {CLEANINGS}")
    check_valid_fraction(self.valid_fraction)
    return self

  def model(self, vocab_size: int) -> RNNLM:
    return RNNLM(vocab_size, self.num_hiddens, self.num_layers, self.cell, self.activation,
                 self.dropout, self.impl, self.precision)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    if isinstance(d["activation"], tuple):
      d["activation"] = list(d["activation"])
    return d

  @classmethod
  def from_json(cls, d: dict) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise UsageError(f"unknown config fields: {', '.join(unknown)}")
    d = dict(d)
    if isinstance(d.get("activation"), list):
      d["activation"] = tuple(d["activation"])
    return cls(**d)
