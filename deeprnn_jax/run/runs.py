"""A whole training run and its folder: d2l's ``train_ch8`` with everything a run should keep.

:func:`train_run` reads top to bottom: load the text, lock the folder, restore or initialise,
compile, then the epoch loop (:func:`run_epochs`, which a run of several models,
:func:`deeprnn_jax.run.sweeps.sweep_run`, shares: measure, record, save, show, stop on a signal),
then the summary. What the two d2l editions do differently is asked of
:mod:`deeprnn_jax.text.editions`; what each epoch shows and records, of
:mod:`deeprnn_jax.run.reporting`.
What it guarantees (docs/runs.md): Ctrl-C, SIGTERM and SIGHUP save the newest finished epoch and
say how to resume; a diverged epoch (a non-finite loss, perplexity or parameter) is never saved;
one process writes a folder at a time; a resumed run changes nothing in its folder before every
check has passed; every JSON file is strict JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, TextIO

import jax
import jax.numpy as jnp

from deeprnn_jax.base import validate
from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import Interrupted, UsageError
from deeprnn_jax.fit import parallel, training
from deeprnn_jax.fit.dispatch import EpochAbandoned, EpochPipeline
from deeprnn_jax.model import generate, models
from deeprnn_jax.run import best, plots, sinks, stopping
from deeprnn_jax.run import checkpoint as ckpt
from deeprnn_jax.run.reporting import Report, device_name
from deeprnn_jax.run.rundir import RunDir
from deeprnn_jax.text import data
from deeprnn_jax.text.editions import Text, edition, load_text


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How a run reports and saves, as opposed to what it trains (:class:`TrainConfig`)."""

  log_every: int = 10
  checkpoint_every: int = 50
  quiet: bool = False
  progress: bool | None = None  # None: a bar on stderr when it is a terminal.
  shards: int | str | None = None  # --devices: N, "all" or None (parallel.batch_devices' rule)
  keep_checkpoints: int = 1  # the newest K checkpoints stay in the folder
  tensorboard: bool = False  # also TensorBoard's event files (sinks.TensorBoard)
  # After a stop signal, how long the epoch in progress is waited for before it is abandoned
  # (an epoch known to take longer, the slowest so far, gets twice its time).
  stop_wait: float = 30.0

  def validate(self) -> "RunOptions":
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
      validate.positive_int("--" + name.replace("_", "-"), getattr(self, name))
    parallel.parse_devices(self.shards)
    if self.tensorboard:
      sinks.require_tensorboard()
    if not self.stop_wait >= 0:
      raise UsageError(f"stop_wait must be >= 0 seconds, got {self.stop_wait}")
    return self


# The options a run keeps in its checkpoints, for --resume to continue with: how it saves and
# what it records. How one process shows it (--quiet, the progress bar) and where it computes
# (--devices) are that process's own.
KEPT_OPTIONS = ("checkpoint_every", "keep_checkpoints", "log_every", "tensorboard")


def kept_options(options: RunOptions) -> dict:
  """The options a checkpoint keeps (:data:`KEPT_OPTIONS`), as JSON."""
  return {name: getattr(options, name) for name in KEPT_OPTIONS}


def resume_command(run_dir, flags: list[str] = ()) -> str:
  """The command that resumes ``run_dir``, with ``flags`` for the settings its files do not hold
  (:func:`unrecorded_flags`)."""
  return shlex.join(["python", "-m", "deeprnn_jax.train", "--resume", "--out", str(run_dir),
                     *flags])


_FLAG_NAMES = {"use_random_iter": "random_iter"}


def _flags(settings: dict, recorded: dict) -> list[str]:
  """``--name value`` for each setting that differs from ``recorded``'s."""
  flags = []
  for name, value in settings.items():
    if name not in recorded or recorded[name] == value or value is None or value is False:
      continue  # (None and False have no flag: the command's defaults)
    flag = "--" + _FLAG_NAMES.get(name, name).replace("_", "-")
    if value is True:
      flags.append(flag)
    else:
      text = ",".join(value) if isinstance(value, (tuple, list)) else str(value)
      flags += [flag, text]
  return flags


def unrecorded_flags(config: TrainConfig, options: RunOptions, recorded_config: dict,
                     recorded_options: dict | None) -> list[str]:
  """The flags that give a bare ``--resume`` of a folder recording ``recorded_config`` and
  ``recorded_options`` (``None``: no checkpoint, the defaults) the run's ``config`` and
  ``options``."""
  recorded_options = recorded_options or kept_options(RunOptions())
  return (_flags(config.to_json(), recorded_config)
          + _flags(kept_options(options), recorded_options))


def saved_run(run_dir) -> tuple[TrainConfig, dict | None]:
  """The settings a run folder's run was started with, for ``--resume`` to continue with: its
  newest usable checkpoint's configuration and options (:data:`KEPT_OPTIONS`), else its
  ``config.json``'s and ``None``. Raises :class:`UsageError` where the folder holds no run (or
  files of a run's names that are not one's), or every checkpoint is unusable."""
  folder = RunDir(run_dir)
  folder.check_resumable()
  if ckpt.checkpoint_files(folder.path):
    saved = _load_newest(folder, warn=None)
    return saved.config, saved.options
  return TrainConfig.from_json(folder.read_config()), None


def _load_newest(folder: RunDir, warn) -> ckpt.Checkpoint:
  try:
    return ckpt.load_checkpoint(folder.path, warn=warn)
  except ckpt.CheckpointError as e:
    raise ckpt.CheckpointError(f"{e}; no checkpoint in {folder.path} is usable (move them away "
                               "to start its run again from epoch 0)") from None


# ----------------------------------------------------------------------------------------------
# The steps of a run.


@dataclasses.dataclass
class Start:
  """Where a run starts: a fresh state at epoch 0, or its checkpoint's."""

  state: training.TrainState
  epoch: int = 0
  rows: list = dataclasses.field(default_factory=list)  # metrics rows kept, epochs 1 .. epoch
  data_rng_state: dict | None = None
  saved_epoch: int | None = None  # the checkpoint's epoch, None where there is none
  notes: list = dataclasses.field(default_factory=list)  # for stderr: what was dropped, and why
  models: list | None = None  # several models: the checkpoint's description of each
  # What the folder records of a resumed run (None: a new run, which writes its config.json
  # first): the settings of its newest checkpoint, or of its config.json where it has none, and
  # that checkpoint's options (None: no checkpoint).
  recorded: dict | None = None
  recorded_options: dict | None = None


def restore_or_init(folder: RunDir, config: TrainConfig, vocab: data.Vocab, fresh_state,
                    resume: bool, members: list[dict] | None = None) -> Start:
  """Checks what the folder holds against what is asked, and returns where the run starts.

  ``fresh_state`` is where a new run starts: a :class:`training.TrainState`, or for several
  models trained together (``members``: each one's ``seed``, ``lr`` and ``clip``) a
  :class:`training.Models`. Reads and writes nothing but what it checks: the folder is untouched
  where anything is wrong. A folder with no checkpoint (its run stopped before the first) resumes
  from epoch 0.
  """
  return check_start(folder, config, vocab, resume, members).start(fresh_state)


@dataclasses.dataclass
class Checked:
  """What :func:`check_start` found: the checkpoint to restore (``None``: a fresh start), with
  the metrics rows it keeps and the notes for stderr."""

  saved: ckpt.Checkpoint | None
  rows: list
  notes: list
  recorded: dict | None = None  # Start's

  def start(self, fresh_state) -> Start:
    """Where the run starts, from ``fresh_state`` (:func:`restore_or_init`'s)."""
    if self.saved is None:
      return Start(fresh_state, notes=self.notes, recorded=self.recorded)
    saved = self.saved
    return Start(_restored(fresh_state, saved), saved.epoch, self.rows, saved.data_rng_state,
                 saved.epoch, self.notes, saved.models, saved.config.to_json(), saved.options)


def check_start(folder: RunDir, config: TrainConfig, vocab: data.Vocab, resume: bool,
                members: list[dict] | None = None) -> Checked:
  """:func:`restore_or_init`'s checks, before there is a state to start from: every way the
  folder can be wrong for what is asked is found here."""
  notes = []
  if not resume:
    folder.check_fresh()
    return Checked(None, [], notes)
  folder.check_resumable()
  saved_json = folder.read_config()
  if not ckpt.checkpoint_files(folder.path):
    notes.append(f"{folder.path} holds no checkpoint yet: its run starts again from epoch 0")
    return Checked(None, [], notes, saved_json)
  saved = _load_newest(folder, warn=notes.append)
  if saved_json is not None:
    diffs = ckpt.config_differences(saved.config, TrainConfig.from_json(saved_json),
                                    "checkpoint", "config.json")
    if diffs:
      raise ckpt.CheckpointError(
          f"the checkpoint {saved.path} is not of the run config.json describes ("
          + "; ".join(diffs) + "); put back the run's own checkpoint, or start another --out")
  ckpt.check_compatible(saved.config, config)  # the seed too: the state is the seed's
  ckpt.check_members(saved.models, members)
  notes.extend(schedule_changes(saved.config, config, saved.epoch))
  if saved.vocab.idx_to_token != vocab.idx_to_token:
    raise ckpt.CheckpointError("checkpoint's vocabulary differs from the corpus' vocabulary")
  if saved.epoch >= config.num_epochs:
    raise UsageError(f"checkpoint is at epoch {saved.epoch}; ask for more with --num-epochs")
  rows, row_notes = folder.read_metrics(saved.epoch)
  best.check_resumable(config, rows, saved.epoch, 1 if members is None else len(members))
  return Checked(saved, rows, notes + row_notes)


def schedule_changes(saved: TrainConfig, config: TrainConfig, epoch: int) -> list[str]:
  """What a resumed run should be told of its decaying learning rate: the curve spans the run's
  epochs and ends at its floor, so a new ``--num-epochs`` or ``--lr-min-factor`` re-lays it."""
  if config.lr_schedule == "constant":
    return []
  changed = [f"{name} {getattr(saved, field):g} -> {getattr(config, field):g}"
             for name, field in (("epochs", "num_epochs"), ("lr min factor", "lr_min_factor"))
             if getattr(saved, field) != getattr(config, field)]
  if not changed:
    return []
  return [f"the {config.lr_schedule} learning-rate schedule is laid anew ({', '.join(changed)}): "
          f"from epoch {epoch + 1} the rate follows the new curve, not the one it was on"]


def _restored(fresh_state, saved: ckpt.Checkpoint):
  """``fresh_state`` (a train state, or :class:`training.Models`) with the checkpoint's values."""
  several = isinstance(fresh_state, training.Models)
  ts = fresh_state.train_state if several else fresh_state
  on_device = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
  ts = training.TrainState(on_device(ckpt.restore(ts.params, saved.params)),
                           on_device(ckpt.restore(ts.opt_state, saved.opt_state)))
  if not several:
    return ts
  alive = jnp.asarray([m.get("diverged_epoch") is None for m in saved.models])
  return training.Models(ts, alive)


def compile_epochs(model, optimizer, config: TrainConfig, loader: data.SeqDataLoader, devices,
                   state, key) -> tuple[Callable, float]:
  """The jitted epoch, compiled for every epoch shape (not while an epoch runs: the pipeline reads
  ahead) from the shapes of ``state`` and ``key``; and the seconds it took."""
  masked = edition(config).masked  # every minibatch from zeros, padding labels left out
  epoch_fn = training.make_train_epoch(model, optimizer, config.use_random_iter or masked,
                                       devices, masked=masked)
  t = time.perf_counter()
  shapes = [jax.ShapeDtypeStruct(shape, jnp.int32) for shape in loader.epoch_shapes()]
  compiled = {X.shape: epoch_fn.lower(state, X, X, key).compile() for X in shapes}
  return ((lambda s, Xs, Ys, k: compiled[Xs.shape](s, *parallel.epoch_inputs(devices, Xs, Ys, k))),
          time.perf_counter() - t)


class Programs:
  """The run's programs compiling in helper threads (:func:`compile_ahead`). As a context, it
  waits for them on the way out of an error, so that no thread is cut off inside XLA when the
  process exits."""

  def __init__(self, epoch: stopping.Background, others: list[stopping.Background]):
    self._epoch, self._others = epoch, others

  def result(self) -> tuple[Callable, float]:
    """Waits for them all (in short slices, so that a signal is handled at once), and returns
    :func:`compile_epochs`' epoch function and seconds."""
    for program in self._others:
      program.result()
    return self._epoch.result()

  def __enter__(self) -> "Programs":
    return self

  def __exit__(self, kind, error, trace) -> None:
    if error is not None:
      for program in (*self._others, self._epoch):
        with contextlib.suppress(BaseException):
          program.result()


def compile_ahead(model, optimizer, config: TrainConfig, text: Text, loader: data.SeqDataLoader,
                  devices, init_key, train_key) -> Programs:
  """Starts compiling the run's programs from their shapes alone, each in a helper thread: the
  epoch, and what a logged epoch runs (a prediction; an evaluation where there is validation
  text). They compile beside one another and beside the initialisation, as XLA lets go of the
  GIL while it compiles: on a GPU the epoch's products alone are autotuned for seconds."""
  state = jax.eval_shape(lambda k: training.init_train_state(model, optimizer, k), init_key)
  epoch = stopping.Background(lambda: compile_epochs(model, optimizer, config, loader, devices,
                                                     state, train_key))
  params = parallel.on_first_shapes(state.params, devices)  # as Report.measure places them
  book = edition(config)
  prefix = book.prefixes(config, text.corpus, text.vocab)[0]
  others = [stopping.Background(lambda: generate.compile_predict(
      model, params, len(prefix), book.prediction_length)),
            stopping.Background(lambda: jax.random.fold_in(train_key, 0))]  # epochs' keys
  if len(text.valid) > 0:
    others.append(stopping.Background(lambda: book.compile_evaluate(model, params, text,
                                                                    config)))
  return Programs(epoch, others)


def run_sinks(folder: RunDir, config: TrainConfig, options: RunOptions, steps_per_epoch: int,
              members: list[dict] | None = None) -> list[sinks.Sink]:
  """Where the run's metrics rows go (:func:`deeprnn_jax.run.sinks.open_sinks`); over several
  processes, process 0 alone writes TensorBoard's files."""
  rate = sinks.learning_rates(config.lr, training.config_lr_factor(config, steps_per_epoch),
                              steps_per_epoch)
  return sinks.open_sinks(folder, config.to_json(), options.tensorboard, rate, members,
                          writes=jax.process_index() == 0)


class EpochTag(NamedTuple):
  epoch: int
  data_rng_state: dict  # the loader's, after this epoch's minibatches: what resumes after it


def epochs(loader: data.SeqDataLoader, train_key, first: int, last: int):
  """The pipeline's items, epochs ``first .. last``: ``(tag, Xs, Ys, key)``."""
  for epoch in range(first, last + 1):
    Xs, Ys = loader.epoch()
    yield EpochTag(epoch, loader.rng_state), Xs, Ys, jax.random.fold_in(train_key, epoch)


class Saver:
  """Saves checkpoints into the folder, and remembers the newest one's epoch.

  A resumed run's settings are written to ``config.json`` with its first checkpoint, not before:
  the folder records a flag passed on ``--resume`` only together with a checkpoint trained under
  it (a run that diverges before one leaves ``config.json`` as it was)."""

  def __init__(self, folder: RunDir, config: TrainConfig, vocab: data.Vocab, options: RunOptions,
               start: Start):
    self.folder, self.config, self.vocab, self.options = folder, config, vocab, options
    self.keep, self.last = options.keep_checkpoints, start.saved_epoch
    # What a bare --resume of the folder would continue with (Start.recorded)
    self.recorded = start.recorded if start.recorded is not None else config.to_json()
    self.recorded_options = start.recorded_options

  def save(self, epoch: int, state: training.TrainState, data_rng_state: dict | list,
           models: list[dict] | None = None) -> None:
    """``models``: the description of each model, where ``state`` holds several."""
    if epoch == self.last:
      return
    ckpt.save_checkpoint(self.folder.path, params=state.params, opt_state=state.opt_state,
                         epoch=epoch, vocab=self.vocab, config=self.config,
                         data_rng_state=data_rng_state, keep=self.keep, models=models,
                         options=kept_options(self.options))
    self.last = epoch
    self.recorded_options = kept_options(self.options)
    if self.recorded != self.config.to_json() or not self.folder.config_path.is_file():
      self.folder.write_config(self.config.to_json())
      self.recorded = self.config.to_json()

  def resume_command(self) -> str:
    """The command that continues exactly this run from the folder as it is."""
    return resume_command(self.folder.path, unrecorded_flags(
        self.config, self.options, self.recorded, self.recorded_options))

  def kept(self) -> str:
    if self.last is None:
      return (f"no checkpoint had been saved ({self.resume_command()} starts it again "
              "from epoch 0)")
    return f"the checkpoint of epoch {self.last} is kept in {self.folder.path}"


def stopped(stop: stopping.StopRequest, saver: Saver, when: str) -> Interrupted:
  if saver.last is None:
    kept = f"no checkpoint was saved; {saver.resume_command()} starts it from epoch 0"
  else:
    kept = (f"the checkpoint of epoch {saver.last} is in {saver.folder.path}; resume with: "
            f"{saver.resume_command()}")
  return Interrupted(f"stopped by {stop.name} {when}; {kept}", stop.signum)


def say_start(folder: RunDir, config: TrainConfig, options: RunOptions, start: Start,
              resume: bool, out: TextIO) -> None:
  """Where a resumed run starts (on ``out``, unless ``options.quiet``)."""
  if resume and not options.quiet:
    which = (f"its checkpoint of epoch {start.saved_epoch}" if start.saved_epoch is not None
             else "no checkpoint: from the start")
    print(f"resuming {folder.path} at epoch {start.epoch + 1} of {config.num_epochs} ({which})",
          file=out, flush=True)


def run_pipeline(epoch_fn: Callable, config: TrainConfig, options: RunOptions, report: Report,
                 stop: stopping.StopRequest) -> tuple[EpochPipeline, Callable[[int], bool]]:
  """The pipeline that runs a run's epochs, and which epochs save a checkpoint."""
  due = lambda epoch: epoch % options.checkpoint_every == 0 or epoch == config.num_epochs
  # A state is kept (not donated to the next epoch) where it is read: reported, saved, or, once a
  # stop is asked for, the newest one, which is saved.
  pipeline = EpochPipeline(
      epoch_fn,
      needs_state=lambda tag: due(tag.epoch) or report.reads_state(tag.epoch) or stop.requested,
      should_abandon=lambda: stop.waited_more_than(max(options.stop_wait, 2 * report.slowest)))
  return pipeline, due


def abandoned(stop: stopping.StopRequest, saver: Saver, options: RunOptions,
              report: Report) -> Interrupted:
  return stopped(stop, saver, f"(the epoch in progress did not finish within "
                              f"{max(options.stop_wait, 2 * report.slowest):.0f} s and was "
                              "abandoned)")


def run_epochs(epoch_fn: Callable, state, items, config: TrainConfig, options: RunOptions,
               report: Report, saver: Saver, stop: stopping.StopRequest) -> None:
  """The epoch loop of a run, of one model or of several (its ``report`` says which): each
  finished epoch is measured, recorded, kept as the best model where validation improved, saved
  where a checkpoint is due and shown. A divergence that ends the run raises the report's error;
  a stop signal saves the newest epoch and raises :class:`Interrupted`; ``--patience`` running
  out saves it and ends the loop. The report is closed however the loop ends."""
  pipeline, due = run_pipeline(epoch_fn, config, options, report, stop)
  try:
    if stop.requested:
      raise stopped(stop, saver, "before the first epoch")
    for done in pipeline.run(state, items):
      measured = report.measure(done)
      report.record(measured, done)
      if measured.problem:
        raise report.failure(measured, saver)
      report.keep_best(measured)
      epoch = measured.epoch
      stop_early = report.out_of_patience(measured)
      if done.state is not None and (due(epoch) or stop.requested or stop_early):
        report.save(saver, done)
      report.show(measured)
      if stop_early:
        report.say(stop_early)
        return
      if stop.requested and done.state is not None and epoch < config.num_epochs:
        report.save(saver, done)  # if the stop came since
        raise stopped(stop, saver, f"after epoch {epoch}")
  except EpochAbandoned:
    raise abandoned(stop, saver, options, report) from None
  finally:
    report.close()


# ----------------------------------------------------------------------------------------------
# The run.


def train_run(config: TrainConfig, run_dir: str | Path, resume: bool = False,
              options: RunOptions = RunOptions(), out: TextIO | None = None,
              err: TextIO | None = None) -> dict:
  """Trains as ``config`` says, writing everything into ``run_dir``; returns the summary.

  Raises:
    UsageError: bad configuration, corpus, checkpoint or metrics, or a folder another process is
      writing (nothing in ``run_dir`` is changed).
    Diverged: a non-finite loss, perplexity or parameter; the newest checkpoint saved before it
      (always finite) and the metrics of the epochs before it are kept.
    Interrupted: Ctrl-C, SIGTERM or SIGHUP (a ``KeyboardInterrupt``): the epoch in progress was
      finished and saved with its metrics rows, unless it took longer than ``options.stop_wait``.
  """
  t_start = time.perf_counter()
  out, err = out or sys.stdout, err or sys.stderr
  config.validate()
  models.check_available(config.impl)
  options.validate()
  folder = RunDir(run_dir)
  if resume:
    folder.check_resumable()

  with stopping.watch() as stop:
    # The text, the model, the optimiser: everything that can be wrong with the settings.
    devices = parallel.batch_devices(config.batch_size, config.num_hiddens, options.shards)
    text = load_text(config)
    best.check_patience(config, len(text.valid))
    loader = edition(config).loader(text, config)
    model = models.from_config(config, len(text.vocab))
    optimizer = training.config_optimizer(config, loader.max_batches)
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    if stop.requested:
      raise Interrupted(f"stopped by {stop.name} before the run began; nothing was written",
                        stop.signum)

    with folder.locked():
      # Every check first; then the programs compile while the model initialises or restores;
      # then the first write.
      checked = check_start(folder, config, text.vocab, resume)
      with compile_ahead(model, optimizer, config, text, loader, devices, init_key,
                         train_key) as programs:
        start = checked.start(training.init_train_state(model, optimizer, init_key))
        for note in start.notes:
          print(f"note: {note}", file=err)
        say_start(folder, config, options, start, resume, out)
        folder.begin(None if resume else config.to_json(), start.rows)
        if start.data_rng_state is not None:
          loader.rng_state = start.data_rng_state
        state = parallel.replicate(start.state, devices)
        epoch_fn, compile_seconds = programs.result()

      report = Report(config, options, model, text, devices, folder, start.epoch, out, err,
                      run_sinks(folder, config, options, loader.max_batches))
      saver = Saver(folder, config, text.vocab, options, start)
      run_epochs(epoch_fn, state, epochs(loader, train_key, start.epoch + 1, config.num_epochs),
                 config, options, report, saver, stop)

      speed = report.tokens / report.seconds if report.seconds else 0.0
      summary = {
          "train_perplexity": report.ppl,
          "valid_perplexity": report.valid_ppl,
          "tokens_per_sec": speed,
          "compile_seconds": compile_seconds,
          "wall_seconds": time.perf_counter() - t_start,
          "device": device_name(),
          "shards": len(devices),
          "precision": config.precision,
          "epochs": report.stopped_early or config.num_epochs,
          "stopped_early": report.stopped_early is not None,
          **report.best_summary(),
      }
      folder.write_summary(summary)
      plots.plot_perplexity(folder.rows, folder.path / "perplexity",
                            title=f"{config.num_layers}-layer {config.cell.upper()}, "
                                  f"{config.num_hiddens} hidden units")
  report.say(f"compile time {compile_seconds:.1f} sec")
  products = "" if config.precision == "float32" else f" ({config.precision} products)"
  device = summary["device"]
  report.say(f"perplexity {report.ppl:.1f}, {speed:.1f} tokens/sec on {device}{products}")
  for line in report.final_lines():  # the last epoch's: always logged, its state kept
    report.say(line)
  return summary
