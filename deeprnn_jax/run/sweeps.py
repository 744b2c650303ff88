"""Several models trained in one compiled program: seeds and hyperparameter sweeps.

The chapter's questions are comparative (GRU or LSTM? which learning rate?), and one curve
answers none of them. :func:`sweep_run` trains every model of a
:class:`~deeprnn_jax.base.config.Sweep` (learning rates × clip norms × seeds) together: their
train states are stacked on a leading ``[K]`` axis and one ``jax.vmap``-ed epoch
(:func:`deeprnn_jax.fit.training.make_models_epoch`) trains them all, each on its own data
stream, with its own dropout masks and hyperparameters. Model ``k`` ends where a single run of
``sweep.members(config)[k]`` ends (float32 summation order aside).

The run folder is a run's (docs/runs.md), with one metrics row per epoch and model, a summary of
every model, a checkpoint holding them all and ``sweep.json`` naming them. One model that
diverges stops alone: its rows say so, the others go on, and the run ends with
:class:`~deeprnn_jax.base.errors.Diverged` after writing everything.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deeprnn_jax.base import files
from deeprnn_jax.base.config import SWEPT, Sweep, TrainConfig
from deeprnn_jax.base.errors import Diverged, Interrupted, UsageError
from deeprnn_jax.fit import training
from deeprnn_jax.fit.dispatch import FinishedEpoch
from deeprnn_jax.model import models
from deeprnn_jax.run import best, plots, stopping
from deeprnn_jax.run.reporting import Measured, Report, device_name
from deeprnn_jax.run.rundir import SWEEP, RunDir
from deeprnn_jax.run.runs import (
  RunOptions,
  Saver,
  restore_or_init,
  run_epochs,
  run_sinks,
  say_start,
)
from deeprnn_jax.text import data
from deeprnn_jax.text.editions import Text, load_text

MODELS_AXIS = "models"  # the mesh axis the models are spread over


def describe(members: list[TrainConfig]) -> list[dict]:
  """What tells each model apart: ``{"model", "seed", "lr", "clip", "weight_decay"}``."""
  return [{"model": k, "seed": m.seed, **{name: getattr(m, name) for name in SWEPT}}
          for k, m in enumerate(members)]


def saved_sweep(run_dir) -> Sweep | None:
  """The sweep a run folder's run trains (its ``sweep.json``); ``None`` for a single run."""
  path = Path(run_dir) / SWEEP
  if not path.is_file():
    return None
  try:
    return Sweep.from_json(json.loads(path.read_text(encoding="utf-8")))
  except (OSError, ValueError) as e:
    raise UsageError(f"{path} is unreadable: {e}") from None


def model_devices(num_models: int, devices: int | str | None = None) -> list[jax.Device]:
  """The devices the models are spread over (a :data:`MODELS_AXIS` mesh), each holding
  ``num_models / len(devices)`` of them: ``devices`` of them (a number, or ``"all"``) where
  asked, else the most of JAX's devices that divide the models evenly."""
  available = jax.devices()
  if devices == "all":
    devices = len(available)
  if devices is not None:
    if devices > len(available):
      raise UsageError(f"--devices {devices}: JAX has {len(available)} "
                       f"{available[0].platform.upper()} device(s)")
    if num_models % devices:
      raise UsageError(f"{num_models} models do not spread evenly over {devices} devices")
    return available[:devices]
  count = max(d for d in range(1, len(available) + 1) if num_models % d == 0)
  return available[:count]


def spread(tree, devices: list[jax.Device]):
  """``tree``'s arrays split along their leading (model) axis over ``devices``."""
  if len(devices) < 2:
    return jax.device_put(tree, devices[0])
  return jax.device_put(tree, NamedSharding(Mesh(np.asarray(devices), (MODELS_AXIS,)),
                                            P(MODELS_AXIS)))


def model_keys(seeds) -> tuple[np.ndarray, np.ndarray]:
  """Each model's initialisation and training keys, ``<key>[K]`` each, as a single run of that
  seed derives them."""
  keys = np.stack([np.asarray(jax.random.split(jax.random.PRNGKey(s))) for s in seeds])
  return keys[:, 0], keys[:, 1]


class Batches(NamedTuple):
  """One epoch of every model's minibatches, padded to a common count."""

  Xs: np.ndarray  # <int32>[K, max_batches, batch, steps]
  Ys: np.ndarray
  num_batches: np.ndarray  # <int32>[K], how many of each model's are real


def stack_epochs(loaders: list[data.SeqDataLoader], max_batches: int) -> Batches:
  """The next epoch of each model's loader: each model reads its own partition offset and
  order (a single run of its seed reads the same)."""
  epochs = [loader.epoch() for loader in loaders]
  pad = lambda a: np.concatenate([a, np.zeros((max_batches - len(a),) + a.shape[1:], a.dtype)])
  return Batches(np.stack([pad(X) for X, _ in epochs]), np.stack([pad(Y) for _, Y in epochs]),
                 np.asarray([len(X) for X, _ in epochs], np.int32))


class EpochTag(NamedTuple):
  epoch: int
  data_rng_state: list  # each loader's, after this epoch
  num_batches: np.ndarray


def sweep_epochs(loaders, max_batches: int, train_keys, first: int, last: int, devices,
                 diverged: list[int | None]):
  """The pipeline's items, epochs ``first .. last``: ``(tag, Xs, Ys, (keys, num_batches))``.

  A model the host has found diverged (``diverged[k]`` set: a non-finite validation perplexity,
  which the device does not see) reads no minibatch from the next epoch it is given: it keeps its
  state, as a model that diverges on the device does. Each item is read after the host has
  measured the epoch before it wherever that epoch was validated (its state was kept)."""
  fold = jax.jit(jax.vmap(jax.random.fold_in, (0, None)))
  for epoch in range(first, last + 1):
    b = stack_epochs(loaders, max_batches)
    num_batches = np.where([d is not None for d in diverged], 0, b.num_batches).astype(np.int32)
    tag = EpochTag(epoch, [loader.rng_state for loader in loaders], num_batches)
    keys = fold(train_keys, epoch)
    yield tag, *spread((b.Xs, b.Ys), devices), spread((keys, num_batches), devices)


def compile_models_epoch(model, optimizer, config: TrainConfig, state: training.Models, batches,
                         keys) -> tuple[Callable, float]:
  """The jitted epoch of all the models, compiled before the first epoch (for a prompt answer to
  a signal, in a helper thread); and the seconds it took."""
  fn = training.make_models_epoch(model, optimizer, config.use_random_iter)
  t = time.perf_counter()
  compiled = stopping.responsive(lambda: fn.lower(state, *batches, *keys).compile())
  return (lambda s, Xs, Ys, k: compiled(s, Xs, Ys, *k)), time.perf_counter() - t


def _mean_std(values) -> tuple[float | None, float | None]:
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return None, None
  return statistics.fmean(values), statistics.pstdev(values)


class SweepReport(Report):
  """:class:`~deeprnn_jax.run.runs.Report` for several models: a row per model, d2l's line with the
  mean ± standard deviation over the models that train, predictions from the best of them."""

  def __init__(self, members: list[TrainConfig], diverged: list[int | None], *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.members, self.diverged = members, diverged
    self.ppls = [math.nan] * len(members)
    self.valid_ppls: list[float | None] = [None] * len(members)
    self.best_model = 0
    self.evaluated = None  # the logged epoch's parameters as evaluated, every model's

  def alive(self) -> list[int]:
    return [k for k, d in enumerate(self.diverged) if d is None]

  def measure(self, done: FinishedEpoch) -> Measured:
    """The epoch's rows, one per model, and the models that diverged in it; a problem where no
    model is left."""
    epoch, tag = done.tag.epoch, done.tag
    state = done.state.train_state if done.state is not None and self.logged(epoch) else None
    self.evaluated = None if state is None else training.evaluated_params(state)
    newly = []
    for k in self.alive():
      losses = done.losses[k, : tag.num_batches[k]]
      self.ppls[k] = training.perplexity(losses.mean())
      self.valid_ppls[k] = None
      if training.diverged(losses):
        self.diverged[k] = epoch
        newly.append(k)
      elif state is not None and len(self.text.valid):
        params = jax.tree_util.tree_map(lambda a: a[k], self.evaluated)
        self.valid_ppls[k] = self.edition.evaluate(self.model, params, self.text, self.config)
        if not math.isfinite(self.valid_ppls[k]):
          self.diverged[k] = epoch
          newly.append(k)
    alive = self.alive()
    if alive:
      score = lambda k: (self.valid_ppls[k] if self.valid_ppls[k] is not None else self.ppls[k])
      self.best_model = min(alive, key=score)
      self.ppl, self.valid_ppl = self.ppls[self.best_model], self.valid_ppls[self.best_model]
      if state is not None:
        self.params = jax.tree_util.tree_map(lambda a: np.asarray(a[self.best_model]),
                                             self.evaluated)
    seconds = done.seconds
    tokens = sum(int(tag.num_batches[k]) for k in range(len(self.members))
                 if self.diverged[k] is None or self.diverged[k] == epoch)
    tokens *= self.config.batch_size * self.config.num_steps
    rows = []
    for k, member in enumerate(self.members):
      gone = self.diverged[k] is not None
      rows.append({"epoch": epoch, "model": k, "seed": member.seed,
                   **{name: getattr(member, name) for name in SWEPT},
                   "train_perplexity": None if gone else self.ppls[k],
                   "valid_perplexity": None if gone else self.valid_ppls[k],
                   "diverged": gone, "tokens_per_sec": tokens / seconds, "seconds": seconds})
    return Measured(epoch, rows, tokens, None if self.alive() else "every model diverged",
                    tuple(newly))

  def failure(self, measured: Measured, saver: Saver) -> Exception:
    self.show(measured)
    return Diverged(f"every model diverged ({_divergence_note(self)}); {saver.kept()}; metrics "
                    f"are in {self.folder.metrics_path}")

  def validation(self) -> tuple[list[float | None], object]:
    return list(self.valid_ppls), self.evaluated

  def save(self, saver: Saver, done: FinishedEpoch) -> None:
    saver.save(done.tag.epoch, done.state.train_state, done.tag.data_rng_state,
               self.descriptions())

  def spread_text(self, values) -> str:
    mean, std = _mean_std(values[k] for k in self.alive())
    return "nan" if mean is None else f"{mean:.1f} ± {std:.1f}"

  def show(self, measured: Measured) -> None:
    epoch, newly = measured.epoch, measured.newly_diverged
    with self._terminal():
      if self.bar is not None:
        self.bar.update(1)
        self.bar.set_postfix(perplexity=self.spread_text(self.ppls))
    for k in newly:
      self.say(f"model {k} ({self.name(k)}) diverged at epoch {epoch}: it stops, the others go "
               "on")
    if self.logged(epoch) and not self.options.quiet and self.alive():
      valid = (f", valid perplexity {self.spread_text(self.valid_ppls)}"
               if len(self.text.valid) else "")
      self.say(f"epoch {epoch}, perplexity {self.spread_text(self.ppls)}{valid} "
               f"({_models(len(self.alive()))}): {self.predict(self.prefix)}")

  def name(self, k: int) -> str:
    m = self.members[k]
    decay = f", weight decay {m.weight_decay:g}" if m.weight_decay else ""
    return f"seed {m.seed}, lr {m.lr:g}, clip {m.clip:g}{decay}"

  def descriptions(self) -> list[dict]:
    """Each model as the checkpoint and the summary keep it."""
    return [dict(d, train_perplexity=None if self.diverged[k] is not None else self.ppls[k],
                 valid_perplexity=None if self.diverged[k] is not None else self.valid_ppls[k],
                 diverged_epoch=self.diverged[k])
            for k, d in enumerate(describe(self.members))]


def _models(count: int) -> str:
  return f"{count} model" + ("" if count == 1 else "s")


def _divergence_note(report: SweepReport) -> str:
  gone = [k for k, d in enumerate(report.diverged) if d is not None]
  return ", ".join(f"model {k} ({report.name(k)}) at epoch {report.diverged[k]}" for k in gone)


def sweep_run(config: TrainConfig, sweep: Sweep, run_dir: str | Path, resume: bool = False,
              options: RunOptions | None = None, out: TextIO | None = None,
              err: TextIO | None = None) -> dict:
  """Trains every model of ``sweep`` (with ``config``'s other settings) in one program, writing
  everything into ``run_dir``; returns the summary.

  Raises as :func:`deeprnn_jax.run.runs.train_run` does, except that a model that diverges stops
  alone: :class:`~deeprnn_jax.base.errors.Diverged` is raised at the end, after the summary, the
  plot and the last checkpoint are written, naming the models that diverged (at once, where all
  have).
  """
  t_start = time.perf_counter()
  out, err = out or sys.stdout, err or sys.stderr
  options = options or RunOptions()
  config.validate()
  sweep.validate(config)
  models.check_available(config.impl)
  options.validate()
  members = sweep.members(config)
  folder = RunDir(run_dir)
  if resume:
    folder.check_resumable()

  with stopping.watch() as stop:
    # The text, the models, the optimiser: everything that can be wrong with the settings.
    text: Text = load_text(config)
    best.check_patience(config, len(text.valid))
    loaders = [data.SeqDataLoader(text.train, config.batch_size, config.num_steps,
                                  config.use_random_iter, seed=m.seed) for m in members]
    max_batches = loaders[0].max_batches
    devices = model_devices(len(members), options.shards)
    model = models.from_config(config, len(text.vocab))
    optimizer = training.make_sweep_optimizer(config.optimizer,
                                              training.config_lr_factor(config, max_batches),
                                              max(m.weight_decay for m in members), config.ema)
    init_keys, train_keys = model_keys([m.seed for m in members])
    fresh = training.Models(
        training.init_train_states(model, optimizer, init_keys, [m.lr for m in members],
                                   [m.clip for m in members], [m.weight_decay for m in members]),
        jnp.ones(len(members), bool))
    if stop.requested:
      raise Interrupted(f"stopped by {stop.name} before the run began; nothing was written",
                        stop.signum)

    with folder.locked():
      start = restore_or_init(folder, config, text.vocab, fresh, resume, describe(members))
      for note in start.notes:
        print(f"note: {note}", file=err)
      say_start(folder, config, options, start, resume, out)
      folder.begin(None if resume else config.to_json(), start.rows)
      files.atomic_write_json(folder.path / SWEEP, dict(sweep.to_json(), models=describe(members)))
      if start.data_rng_state is not None:
        for loader, rng_state in zip(loaders, start.data_rng_state):
          loader.rng_state = rng_state
      diverged = [None] * len(members)
      for k, m in enumerate(start.models or []):
        diverged[k] = m.get("diverged_epoch")
      state = spread(start.state, devices)
      # Compiled for the one shape every epoch is padded to; the values do not matter.
      tokens = np.zeros((len(members), max_batches, config.batch_size, config.num_steps), np.int32)
      epoch_fn, compile_seconds = compile_models_epoch(
          model, optimizer, config, state, spread((tokens, tokens), devices),
          spread((jnp.asarray(train_keys), np.full(len(members), max_batches, np.int32)), devices))

      report = SweepReport(members, diverged, config, options, model, text, devices, folder,
                           start.epoch, out, err,
                           run_sinks(folder, config, options, max_batches, describe(members)),
                           describe(members))
      saver = Saver(folder, config, text.vocab, options, start)
      items = sweep_epochs(loaders, max_batches, jnp.asarray(train_keys), start.epoch + 1,
                           config.num_epochs, devices, diverged)
      run_epochs(epoch_fn, state, items, config, options, report, saver, stop)

      summary = _summary(report, config, compile_seconds, time.perf_counter() - t_start, devices)
      folder.write_summary(summary)
      plots.plot_sweep(folder.rows, folder.path / "perplexity",
                       title=f"{len(members)} × {config.num_layers}-layer {config.cell.upper()}, "
                             f"{config.num_hiddens} hidden units")
  _say_end(report, summary, compile_seconds)
  if any(d is not None for d in report.diverged):
    raise Diverged(f"some models diverged: {_divergence_note(report)}; the others finished, "
                   f"see {folder.summary_path}")
  return summary


def _summary(report: SweepReport, config: TrainConfig, compile_seconds: float,
             wall_seconds: float, devices) -> dict:
  described = report.descriptions()
  train_mean, train_std = _mean_std(d["train_perplexity"] for d in described)
  valid_mean, valid_std = _mean_std(d["valid_perplexity"] for d in described)
  return {
      "num_models": len(described),
      "models": described,
      "train_perplexity": [d["train_perplexity"] for d in described],
      "valid_perplexity": [d["valid_perplexity"] for d in described],
      "train_perplexity_mean": train_mean,
      "train_perplexity_std": train_std,
      "valid_perplexity_mean": valid_mean,
      "valid_perplexity_std": valid_std,
      "best_model": report.best_model,
      "diverged": [d["model"] for d in described if d["diverged_epoch"] is not None],
      "tokens_per_sec": report.tokens / report.seconds if report.seconds else 0.0,
      "compile_seconds": compile_seconds,
      "wall_seconds": wall_seconds,
      "device": device_name(),
      "devices": len(devices),
      "precision": config.precision,
      "epochs": report.stopped_early or config.num_epochs,
      "stopped_early": report.stopped_early is not None,
      **report.best_summary(),
  }


def _say_end(report: SweepReport, summary: dict, compile_seconds: float) -> None:
  """d2l's closing lines: each model's perplexity, the throughput of all together, and the best
  model's predictions."""
  report.say(f"compile time {compile_seconds:.1f} sec")
  for d in summary["models"]:
    k = d["model"]
    if d["diverged_epoch"] is not None:
      result = f"diverged at epoch {d['diverged_epoch']}"
    else:
      valid = (f", valid perplexity {d['valid_perplexity']:.2f}"
               if d["valid_perplexity"] is not None else "")
      result = f"perplexity {d['train_perplexity']:.2f}{valid}"
    report.say(f"model {k} ({report.name(k)}): {result}")
  products = "" if report.config.precision == "float32" else \
      f" ({report.config.precision} products)"
  report.say(f"perplexity {report.spread_text(report.ppls)} over {_models(len(report.alive()))}, "
             f"{summary['tokens_per_sec']:.1f} tokens/sec on {summary['device']}{products}")
  report.say(f"best: model {report.best_model} ({report.name(report.best_model)})")
  for line in report.final_lines():
    report.say(line)
