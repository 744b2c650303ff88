"""Where a run's metrics go: every row it records passes through its sinks.

A row is one epoch's metrics (one per model where several train together), as ``metrics.jsonl``
keeps it: ``epoch``, ``train_perplexity``, ``valid_perplexity`` (``None`` where not measured),
``tokens_per_sec``, ``seconds``, and for several models ``model``, ``seed``, ``lr``, ``clip`` and
``diverged``. A sink has ``write(row)`` and ``close()``. The run folder's ``metrics.jsonl`` is
one (:class:`MetricsFile`); ``train --tensorboard`` adds :class:`TensorBoard`, TensorBoard's own
event files written with tensorboardX (the optional extra ``deeprnn-jax[tensorboard]``; no
TensorFlow). The console's lines and the plot are the run's report, drawn from the same rows.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Callable, Protocol

from deeprnn_jax.base.errors import UsageError

TENSORBOARD_DIR = "tensorboard"


class Sink(Protocol):
  def write(self, row: dict) -> None: ...

  def close(self) -> None: ...


class MetricsFile:
  """The run folder's ``metrics.jsonl`` (:meth:`deeprnn_jax.run.rundir.RunDir.append_row`)."""

  def __init__(self, folder):
    self.folder = folder

  def write(self, row: dict) -> None:
    self.folder.append_row(row)

  def close(self) -> None:
    pass


def require_tensorboard() -> None:
  """Raises :class:`UsageError` where tensorboardX is not installed."""
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    raise UsageError("--tensorboard writes with tensorboardX, which is not installed: "
                     "pip install 'deeprnn-jax[tensorboard]'") from None


class TensorBoard:
  """TensorBoard's event files under ``<run>/tensorboard``: one TensorBoard run per model
  (``<run>/tensorboard`` for one model, ``<run>/tensorboard/model-<k>`` for each of several), so
  that TensorBoard's own UI lays their curves side by side. Each row gives, at step ``epoch``:
  ``perplexity/train``, ``perplexity/valid`` (where measured), ``tokens_per_sec`` and
  ``learning_rate`` (the rate of the epoch's last step); each run begins with the settings as
  text (``settings``), its model's own where several train.

  Args:
    path: ``<run>/tensorboard``.
    settings: the run's ``config.json``.
    learning_rate: a row's learning rate.
    members: the models' ``seed``, ``lr`` and ``clip``, where several train together.
  """

  def __init__(self, path: str | Path, settings: dict, learning_rate: Callable[[dict], float],
               members: list[dict] | None = None):
    require_tensorboard()
    self.path, self.settings, self.learning_rate = Path(path), settings, learning_rate
    self.members = members
    self._writers = {}

  def _writer(self, model: int | None):
    if model not in self._writers:
      from tensorboardX import SummaryWriter
      logdir = self.path if model is None else self.path / f"model-{model}"
      writer = SummaryWriter(str(logdir))
      settings = dict(self.settings, **(self.members[model] if model is not None else {}))
      writer.add_text("settings", "```\n" + json.dumps(settings, indent=1) + "\n```", 0)
      self._writers[model] = writer
    return self._writers[model]

  def write(self, row: dict) -> None:
    writer, epoch = self._writer(row.get("model")), row["epoch"]
    for tag, key in (("perplexity/train", "train_perplexity"),
                     ("perplexity/valid", "valid_perplexity"),
                     ("tokens_per_sec", "tokens_per_sec")):
      value = row.get(key)
      if value is not None and math.isfinite(value):
        writer.add_scalar(tag, value, epoch)
    writer.add_scalar("learning_rate", self.learning_rate(row), epoch)

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers = {}


def learning_rates(lr: float, factor: Callable[[int], float] | None,
                   steps_per_epoch: int) -> Callable[[dict], float]:
  """A row's learning rate: its model's rate (the row's ``lr`` where several train, else ``lr``)
  times the schedule's ``factor`` (:func:`deeprnn_jax.fit.training.lr_factor`; ``None``: constant)
  at the epoch's last step."""
  @functools.lru_cache(maxsize=1)  # an epoch's rows (one per model) share its factor
  def at(epoch: int) -> float:
    return 1.0 if factor is None else float(factor(epoch * steps_per_epoch - 1))

  return lambda row: float(row.get("lr", lr) * at(row["epoch"]))


def open_sinks(folder, settings: dict, tensorboard: bool, learning_rate: Callable[[dict], float],
               members: list[dict] | None = None, writes: bool = True) -> list[Sink]:
  """A run's sinks: ``metrics.jsonl``, and with ``tensorboard`` TensorBoard's files. ``writes``:
  whether this process writes them (over several processes, process 0 alone)."""
  sinks: list[Sink] = [MetricsFile(folder)]
  if tensorboard and writes:
    sinks.append(TensorBoard(folder.path / TENSORBOARD_DIR, settings, learning_rate, members))
  return sinks
