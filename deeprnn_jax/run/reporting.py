"""What a run shows and records of each epoch, for one model (:class:`Report`) and, through the
same methods, for several (:class:`deeprnn_jax.run.sweeps.SweepReport`).

The run loop (:func:`deeprnn_jax.run.runs.run_epochs`) asks a report, for each finished epoch, to
``measure`` it (its metrics rows, and a divergence that ends the run), ``record`` it (the rows to
the metric sinks, its share of the throughput), ``keep_best`` (the best model by validation),
``save`` it where a checkpoint is due, ``show`` it (the progress bar, d2l's line with a
prediction), and whether it is ``out_of_patience``; ``failure`` is the error a divergence raises,
and ``close`` ends the bar and the sinks.
"""

from __future__ import annotations

import contextlib
import errno
import math
from typing import TYPE_CHECKING, NamedTuple, TextIO

import jax
import numpy as np

from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import Diverged
from deeprnn_jax.fit import parallel, training
from deeprnn_jax.fit.dispatch import FinishedEpoch
from deeprnn_jax.model import generate
from deeprnn_jax.run import sinks
from deeprnn_jax.run.best import BestModel
from deeprnn_jax.run.rundir import RunDir
from deeprnn_jax.text import editions
from deeprnn_jax.text.editions import Text

if TYPE_CHECKING:
  from deeprnn_jax.run.runs import RunOptions, Saver


class Measured(NamedTuple):
  """One epoch as a report measured it."""

  epoch: int
  rows: list[dict]  # metrics.jsonl's rows: one, or one per model
  tokens: int  # the tokens the epoch trained on (all its models')
  problem: str | None = None  # a divergence that ends the run
  newly_diverged: tuple[int, ...] = ()  # models that stopped at this epoch (several models)


def device_name(device=None) -> str:
  """``cpu`` or ``cuda:0``, as PyTorch names devices (and d2l prints them)."""
  device = device or jax.devices()[0]
  return "cpu" if device.platform == "cpu" else f"cuda:{device.id}"


class Report:
  """What a run shows and records of each epoch: the metrics row, the progress bar, d2l's lines
  with a prediction, and the throughput of the run's final line."""

  def __init__(self, config: TrainConfig, options: RunOptions, model, text: Text, devices,
               folder: RunDir, start_epoch: int, out: TextIO, err: TextIO,
               metric_sinks: list[sinks.Sink] | None = None, described: list[dict] | None = None):
    self.config, self.options, self.model, self.text = config, options, model, text
    self.devices, self.folder, self.start_epoch, self.out = devices, folder, start_epoch, out
    self.sinks = metric_sinks if metric_sinks is not None else [sinks.MetricsFile(folder)]
    self.edition = editions.edition(config)
    self.prefix, self.short_prefix = self.edition.prefixes(config, text.corpus, text.vocab)
    self.tokens = self.seconds = self.slowest = 0.0
    self.ppl = self.valid_ppl = math.nan
    self.params = None  # the newest logged epoch's, on one device
    # The best model by validation (described: each model's, where the run trains several)
    self.best = BestModel(folder, config, text.vocab, described) if len(text.valid) else None
    self.stopped_early: int | None = None  # the epoch --patience ended the run at
    self.bar = None
    show_bar = options.progress if options.progress is not None else err.isatty()
    if show_bar and not options.quiet:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=config.num_epochs, initial=start_epoch, file=err, unit="epoch",
                      dynamic_ncols=True)

  def logged(self, epoch: int) -> bool:
    return epoch % self.options.log_every == 0 or epoch == self.config.num_epochs

  def validated(self, epoch: int) -> bool:
    return len(self.text.valid) > 0 and (self.logged(epoch) or self.edition.validates_every_epoch)

  def reads_state(self, epoch: int) -> bool:
    """Whether reporting ``epoch`` reads its parameters (evaluation, a prediction)."""
    return (self.logged(epoch) and not self.options.quiet or self.validated(epoch)
            or epoch == self.config.num_epochs)

  def measure(self, done: FinishedEpoch) -> Measured:
    """The epoch's metrics row, or none where it diverged (the problem says what)."""
    epoch, losses = done.tag.epoch, done.losses
    tokens = self.edition.tokens(losses, self.text, self.config)
    self.ppl = self.edition.perplexity(losses)
    self.params = (parallel.on_first(training.evaluated_params(done.state), self.devices)
                   if (self.logged(epoch) or self.validated(epoch)) and done.state is not None
                   else None)
    self.valid_ppl = None
    if self.validated(epoch) and self.params is not None:
      self.valid_ppl = self.edition.evaluate(self.model, self.params, self.text, self.config)
    row = {"epoch": epoch, "train_perplexity": self.ppl, "valid_perplexity": self.valid_ppl,
           "tokens_per_sec": tokens / done.seconds, "seconds": done.seconds}
    if training.diverged(losses):
      if np.all(np.isfinite(losses)):
        return Measured(epoch, [], tokens, f"perplexity overflows at epoch {epoch} (mean loss "
                                           f"{losses.mean():.3g})")
      return Measured(epoch, [], tokens, f"non-finite loss at epoch {epoch}")
    if self.valid_ppl is not None and not math.isfinite(self.valid_ppl):
      return Measured(epoch, [], tokens, f"non-finite validation perplexity at epoch {epoch}")
    return Measured(epoch, [row], tokens)

  def record(self, measured: Measured, done: FinishedEpoch) -> None:
    """The epoch's metrics rows, to every sink, and its share of the run's throughput."""
    for row in measured.rows:
      self.write(row)
    # The epoch's share of the run's throughput (the first epoch of a run warms up: left out,
    # unless it is the only one).
    if measured.epoch > self.start_epoch + 1 or measured.epoch == self.config.num_epochs:
      self.tokens += measured.tokens
      self.seconds += done.seconds
    self.slowest = max(self.slowest, done.seconds)

  def failure(self, measured: Measured, saver: Saver) -> Exception:
    """The error that a divergence (``measured.problem``) ends the run with."""
    earlier = (f"; metrics of the epochs before are in {saver.folder.metrics_path}"
               if measured.epoch > 1 else "")
    return Diverged(f"{measured.problem}: the run diverged (try a lower --lr than "
                    f"{self.config.lr:g}, or a lower --clip than {self.config.clip:g}); "
                    f"{saver.kept()}{earlier}")

  def validation(self) -> tuple[list[float | None], object]:
    """The epoch's validation perplexity of each model (``None``: not validated), and the
    parameters evaluated (stacked where the run trains several)."""
    return [self.valid_ppl], self.params

  def alive(self) -> list[int]:
    return [0]

  def keep_best(self, measured: Measured) -> None:
    """The best model by validation, where this epoch improved it."""
    if self.best is not None:
      self.best.update(measured.epoch, *self.validation())

  def out_of_patience(self, measured: Measured) -> str | None:
    """Where ``--patience`` has run out at this epoch, the line that ends the run (and the
    report remembers the epoch, :attr:`stopped_early`); else ``None``."""
    epoch = measured.epoch
    if self.best is None or not any(v is not None for v in self.validation()[0]):
      return None
    if not self.best.exhausted(epoch, self.alive()):
      return None
    self.stopped_early = epoch
    return self.best.stop_line(epoch)

  def best_summary(self) -> dict:
    """The best model's validation perplexity and epoch, for the summary (one per model where
    the run trains several)."""
    if self.best is None:
      return {}
    values = [v if math.isfinite(v) else None for v in self.best.values]
    if self.best.described is None:
      return {"best_valid_perplexity": values[0], "best_epoch": self.best.epochs[0]}
    return {"best_valid_perplexity": values, "best_epoch": self.best.epochs}

  def save(self, saver: Saver, done: FinishedEpoch) -> None:
    """The epoch's checkpoint."""
    saver.save(done.tag.epoch, done.state, done.tag.data_rng_state)

  def show(self, measured: Measured) -> None:
    """The progress bar, and d2l's line with a prediction where the epoch is logged."""
    epoch = measured.epoch
    with self._terminal():
      if self.bar is not None:
        self.bar.update(1)
        self.bar.set_postfix(perplexity=f"{self.ppl:.2f}")
      if self.logged(epoch) and not self.options.quiet:
        valid = f", valid perplexity {self.valid_ppl:.1f}" if self.valid_ppl is not None else ""
        self.say(f"epoch {epoch}, perplexity {self.ppl:.1f}{valid}: {self.predict(self.prefix)}")

  def predict(self, prefix: str) -> str:
    return generate.predict(prefix, self.edition.prediction_length, self.params, self.model,
                            self.text.vocab)

  def final_lines(self) -> list[str]:
    """The predictions a run ends with, as its edition's ``train`` prints them."""
    prefixes = (self.prefix, self.short_prefix)[:self.edition.final_predictions]
    return [self.predict(prefix) for prefix in prefixes]

  def say(self, line: str) -> None:
    with self._terminal():
      if self.bar is not None:
        self.bar.write(line, file=self.out)
      elif self.out is not None:
        print(line, file=self.out, flush=True)

  @contextlib.contextmanager
  def _terminal(self):
    """Output that stops, not the run, where the terminal is gone (it hung up: EIO); the run
    folder is the record."""
    try:
      yield
    except OSError as e:
      if e.errno != errno.EIO:
        raise
      self.out = self.bar = None

  def write(self, row: dict) -> None:
    """One metrics row, to every sink."""
    for sink in self.sinks:
      sink.write(row)

  def close(self) -> None:
    with self._terminal():
      if self.bar is not None:
        self.bar.close()
    self.bar = None
    for sink in self.sinks:
      sink.close()
