"""The run configuration: one frozen dataclass, the chapter's run as its defaults.

Plain data: it imports nothing of the training stack, so a configuration can be built, checked
and saved before JAX starts. ``models.from_config`` builds its model.
"""

from __future__ import annotations

import dataclasses
import itertools

from deeprnn_jax.base import validate
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.base.validate import (
  Activation,
  Cell,
  Cleaning,
  Impl,
  Optimizer,
  Pipeline,
  Precision,
  Schedule,
)


def parse_activation(text: str) -> str | tuple[str, ...]:
  """``"relu"`` -> ``"relu"``; ``"relu,tanh"`` (one per layer) -> ``("relu", "tanh")``."""
  names = tuple(name.strip() for name in text.split(","))
  return names[0] if len(names) == 1 else names


# Fields that fix the parameters' shapes and meaning: a checkpoint only resumes under these.
MODEL_FIELDS = ("cell", "num_layers", "num_hiddens", "activation", "embed_dim")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that determines a training run. Defaults reproduce d2l's chapter."""

  cell: Cell = "lstm"
  num_layers: int = 2
  num_hiddens: int = 256
  activation: Activation | tuple[Activation, ...] = "tanh"
  dropout: float = 0.0
  # Regularisers of the AWD-LSTM recipe (docs/training.md), all off by default (d2l has none):
  # locked (variational) dropout masks, DropConnect on W_hh, decoupled weight decay.
  locked_dropout: bool = False
  weight_drop: float = 0.0
  weight_decay: float = 0.0
  # > 0: evaluation, prediction and the best model use a moving average of the parameters with
  # this decay (training.average_params); 0: the parameters themselves (d2l).
  ema: float = 0.0
  # None: one-hot inputs (d2l); else a learned embedding of this size, with embed_dropout
  # dropping whole tokens' rows for a minibatch.
  embed_dim: int | None = None
  embed_dropout: float = 0.0
  batch_size: int = 32
  num_steps: int = 35
  lr: float = 2.0
  clip: float = 1.0
  # The learning rate over the run (training.lr_factor): d2l's is constant; "cosine" decays it
  # to lr * lr_min_factor at the last epoch. The first warmup_epochs raise it linearly from 0.
  lr_schedule: Schedule = "constant"
  warmup_epochs: int = 0
  lr_min_factor: float = 0.0
  num_epochs: int = 500
  # Stop once validation perplexity has not improved for this many epochs (None: never).
  patience: int | None = None
  max_tokens: int = 10000
  use_random_iter: bool = False
  seed: int = 0
  corpus: str = "timemachine.txt"
  clean: Cleaning = "d2l"
  valid_fraction: float = 0.0
  optimizer: Optimizer = "sgd"
  impl: Impl = "layerwise"
  precision: Precision = "float32"
  unroll: int | None = None  # lax.scan unroll of the recurrence; None: the backend's default
  # "classic": the first max_tokens tokens partitioned into minibatches (d2l's classic edition);
  # "windows": every overlapping window of num_steps + 1 tokens, num_train of them for training
  # and the next num_val for validation (d2l 1.0, deeprnn_jax.text.windows).
  pipeline: Pipeline = "classic"
  num_train: int = 10000
  num_val: int = 5000

  def validate(self) -> "TrainConfig":
    """Raises :class:`UsageError` for settings no run can have; returns ``self``."""
    validate.model(1, self.num_hiddens, self.num_layers, self.cell, self.activation,
                   self.dropout, self.impl, self.precision, self.unroll, self.locked_dropout,
                   self.weight_drop, self.embed_dim, self.embed_dropout)
    for name in ("batch_size", "num_steps", "num_epochs"):
      validate.positive_int(name.replace("_", " "), getattr(self, name))
    validate.optimizer(self.lr, self.clip, self.optimizer, self.weight_decay, self.ema)
    if self.patience is not None:
      validate.positive_int("patience", self.patience)
    validate.schedule(self.lr_schedule, self.warmup_epochs, self.lr_min_factor, self.num_epochs)
    if int(self.seed) != self.seed or not 0 <= self.seed < 2**32:
      raise UsageError(f"seed must be an integer in [0, 2**32), got {self.seed}")
    if int(self.max_tokens) != self.max_tokens or self.max_tokens == 0 or self.max_tokens < -1:
      raise UsageError(f"max tokens must be a positive integer, or -1 for the whole corpus, "
                       f"got {self.max_tokens}")
    validate.one_of("cleaning", self.clean, validate.CLEANINGS)
    validate.fraction("valid fraction", self.valid_fraction)
    validate.one_of("pipeline", self.pipeline, validate.PIPELINES)
    if self.pipeline == "windows":
      validate.windows(self.num_train, self.num_val, self.valid_fraction, self.use_random_iter)
    return self

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


# The settings each of several models trained in one program can have its own value of (besides
# its seed): the optimiser's hyperparameters, which its state holds as data
# (training.make_sweep_optimizer). Each is a TrainConfig field and a train flag taking values
# separated by commas; the grid crosses them in this order.
SWEPT = ("lr", "clip", "weight_decay")


@dataclasses.dataclass(frozen=True)
class Sweep:
  """The models one program trains: every learning rate, clip norm and weight decay crossed with
  ``num_seeds`` seeds (``seed``, ``seed + 1``, …). An empty tuple: the config's value."""

  num_seeds: int = 1
  lrs: tuple[float, ...] = ()
  clips: tuple[float, ...] = ()
  weight_decays: tuple[float, ...] = ()

  def grid(self) -> dict[str, tuple[float, ...]]:
    """Each :data:`SWEPT` field's values (empty: the config's)."""
    return dict(zip(SWEPT, (self.lrs, self.clips, self.weight_decays)))

  def members(self, config: TrainConfig) -> list[TrainConfig]:
    """Each model's own configuration: model ``k`` trains as a single run of ``members[k]``."""
    axes = [values or (getattr(config, name),) for name, values in self.grid().items()]
    return [dataclasses.replace(config, **dict(zip(SWEPT, point)), seed=config.seed + s)
            for point in itertools.product(*axes) for s in range(self.num_seeds)]

  @property
  def single(self) -> bool:
    """One model: a plain run."""
    return self.num_seeds == 1 and all(len(v) <= 1 for v in self.grid().values())

  def validate(self, config: TrainConfig) -> "Sweep":
    validate.positive_int("number of seeds", self.num_seeds)
    if config.pipeline != "classic":
      raise UsageError(f"several models train on the classic pipeline, not {config.pipeline!r} "
                       "(--preset d2l-en): run its seeds one at a time")
    for name, values in self.grid().items():
      if len(set(values)) != len(values):
        raise UsageError(f"--{name.replace('_', '-')} {','.join(f'{v:g}' for v in values)}: "
                         "a value twice")
    for member in self.members(config):
      member.validate()
    return self

  def to_json(self) -> dict:
    return {"num_seeds": self.num_seeds, "lrs": list(self.lrs), "clips": list(self.clips),
            "weight_decays": list(self.weight_decays)}

  @classmethod
  def from_json(cls, d: dict) -> "Sweep":
    try:
      return cls(int(d["num_seeds"]), tuple(map(float, d["lrs"])), tuple(map(float, d["clips"])),
                 tuple(map(float, d.get("weight_decays", ()))))
    except (KeyError, TypeError, ValueError) as e:
      raise UsageError(f"not a sweep: {e}") from None


def parse_floats(name: str, text: str) -> tuple[float, ...]:
  """``"0.5,1,2"`` -> ``(0.5, 1.0, 2.0)``, for the flags that take one value per model."""
  try:
    return tuple(float(v) for v in text.split(","))
  except ValueError:
    raise UsageError(f"{name} takes numbers separated by commas, got {text!r}") from None
