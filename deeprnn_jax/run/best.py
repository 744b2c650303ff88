"""The best model by validation, kept beside the newest checkpoint, and early stopping.

Each validated epoch that lowers a model's validation perplexity writes its parameters, as the run
evaluates them (the moving average where ``--ema`` keeps one), into ``<run>/best.msgpack``: the
checkpoint format, without the optimiser's state (it is never resumed from). A run resumes from
its newest checkpoint, not from there; ``--best`` makes ``predict``, ``evaluate`` and ``convert``
read it. ``--patience N`` ends a run once validation has not improved for ``N`` epochs (for
several models: none of those still training has).
"""

from __future__ import annotations

import math

import flax.serialization
import jax
import numpy as np

from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.run import checkpoint as ckpt
from deeprnn_jax.text.vocab import Vocab


def check_patience(config: TrainConfig, num_valid_tokens: int) -> None:
  """``--patience`` stops on validation: a run without held-out text cannot have it."""
  if config.patience is not None and not num_valid_tokens:
    raise UsageError(f"--patience {config.patience} stops on validation perplexity, and this run "
                     "holds no text out: give it some with --valid-fraction")


def best_epochs(rows: list[dict], count: int) -> tuple[list[float], list[int]]:
  """Each model's lowest validation perplexity in metrics rows, and its epoch (``inf`` and 0
  for a model never validated)."""
  values, epochs = [math.inf] * count, [0] * count
  for row in rows:
    k, value = row.get("model", 0), row.get("valid_perplexity")
    if value is not None and not row.get("diverged") and value < values[k]:
      values[k], epochs[k] = value, row["epoch"]
  return values, epochs


def exhausted(patience: int | None, epoch: int, epochs: list[int], alive: list[int]) -> bool:
  """Whether every model in ``alive`` has gone ``patience`` epochs without improving."""
  return (patience is not None and bool(alive)
          and all(epoch - epochs[k] >= patience for k in alive))


def check_resumable(config: TrainConfig, rows: list[dict], epoch: int, count: int) -> None:
  """Refuses to resume a run that its own ``--patience`` stopped, unless asked for more."""
  values, epochs = best_epochs(rows, count)
  gone = {row.get("model", 0) for row in rows if row.get("diverged")}
  alive = [k for k in range(count) if k not in gone and math.isfinite(values[k])]
  if exhausted(config.patience, epoch, epochs, alive):
    since = max(epochs[k] for k in alive)
    raise UsageError(f"the run stopped early at epoch {epoch}: validation perplexity has not "
                     f"improved since epoch {since} (--patience {config.patience}); pass a "
                     "larger --patience to continue it")


class BestModel:
  """Each model's lowest validation perplexity so far, its epoch and its parameters, as
  ``best.msgpack`` keeps them.

  ``described``: ``None`` for one model, else each model's description (the checkpoint's
  :attr:`~deeprnn_jax.run.checkpoint.Checkpoint.models`); the parameters are then stacked on a
  leading ``[K]`` axis, each model's from its own best epoch.
  """

  def __init__(self, folder, config: TrainConfig, vocab: Vocab, described: list[dict] | None):
    self.path = folder.path / ckpt.BEST
    self.config, self.vocab, self.described = config, vocab, described
    count = 1 if described is None else len(described)
    self.values, self.epochs = [math.inf] * count, [0] * count
    self.params = None  # on the host; None until the first validation (or a file to resume)
    if self.path.is_file():
      self._resume()

  def _resume(self) -> None:
    """What the folder's file holds (a resumed run replays the epochs after its checkpoint
    exactly, so a file written by one of them is what they lead to again)."""
    try:
      saved = ckpt.read_checkpoint_file(self.path)
      values, epochs = saved.best["valid_perplexity"], saved.best["epochs"]
    except (ckpt.CheckpointError, KeyError, TypeError):
      return  # unreadable: the next improvement writes a good one
    if len(values) == len(self.values):
      self.values, self.epochs = [float(v) for v in values], [int(e) for e in epochs]
      self.params = saved.params

  def update(self, epoch: int, valid: list[float | None], params) -> list[int]:
    """Keeps the models whose validation perplexity ``valid[k]`` (``None``: not validated)
    improved at ``epoch``, with their ``params`` (stacked for several models), and writes the
    file; returns those models."""
    improved = [k for k, v in enumerate(valid) if v is not None and v < self.values[k]]
    if not improved:
      return improved
    params = _to_host(params)
    if self.described is None or self.params is None:
      kept = params
    else:
      take = np.zeros(len(self.values), bool)
      take[improved] = True
      kept = _select(take, params, self.params)
    for k in improved:
      self.values[k], self.epochs[k] = valid[k], epoch
    self._write(epoch, kept)
    self.params = kept
    return improved

  def _write(self, epoch: int, params) -> None:
    models = None
    if self.described is not None:
      models = [dict(d, valid_perplexity=v if math.isfinite(v) else None, best_epoch=e)
                for d, v, e in zip(self.described, self.values, self.epochs)]
    ckpt.save_checkpoint(self.path, params=params, opt_state={}, epoch=epoch, vocab=self.vocab,
                         config=self.config, models=models,
                         best={"valid_perplexity": self.values, "epochs": self.epochs})

  def exhausted(self, epoch: int, alive: list[int]) -> bool:
    """Whether ``--patience`` ends the run at ``epoch``."""
    return exhausted(self.config.patience, epoch, self.epochs, alive)

  def stop_line(self, epoch: int) -> str:
    k = int(np.argmin(self.values))
    which = "" if self.described is None else f" (model {k})"
    return (f"stopped early at epoch {epoch}: validation perplexity has not improved for "
            f"{self.config.patience} epochs; the best, {self.values[k]:.2f} at epoch "
            f"{self.epochs[k]}{which}, is in {self.path}")


def _to_host(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def _select(take: np.ndarray, new, old):
  """``new``'s models where ``take`` (``<bool>[K]``), ``old``'s (a state dict) elsewhere."""
  old = flax.serialization.from_state_dict(new, old)
  return jax.tree_util.tree_map(
      lambda a, b: np.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), a, np.asarray(b)),
      new, old)
