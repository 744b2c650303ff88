"""A whole training run and its folder: d2l's ``train_ch8`` with everything a run should keep.

``run_dir`` receives ``config.json``, ``metrics.jsonl`` (one row per epoch), ``summary.json``,
``perplexity.png``/``.svg`` and ``checkpoint.msgpack``. Only files this module writes are ever
replaced, each atomically, and a checkpoint is only written from finite parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn_jax import checkpoint as ckpt
from deeprnn_jax import cudnn, data, files, generate, models, parallel, plots, training
from deeprnn_jax.config import TrainConfig
from deeprnn_jax.errors import Diverged, UsageError
from deeprnn_jax.pipeline import EpochPipeline


def device_name(device=None) -> str:
  """``cpu`` or ``cuda:0``, as PyTorch names devices (and d2l prints them)."""
  device = device or jax.devices()[0]
  return "cpu" if device.platform == "cpu" else f"cuda:{device.id}"


def default_prefixes(config: TrainConfig, corpus: np.ndarray, vocab: data.Vocab) -> tuple[str, str]:
  """d2l's ``time traveller`` and ``traveller``; the first two words of any other corpus."""
  if Path(config.corpus).name == "timemachine.txt" and config.clean == "d2l":
    return "time traveller", "traveller"
  words = "".join(vocab.to_tokens([int(i) for i in corpus[:200]])).split()
  if not words:
    return (vocab.to_tokens(int(corpus[0])),) * 2
  first = " ".join(words[:2])
  return first, words[1] if len(words) > 1 else words[0]


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
  if not path.is_file():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      break  # A line cut short by a crash: everything after it is unreliable.
    if row.get("epoch", math.inf) <= up_to_epoch:
      rows.append(row)
  return rows


def check_run_dir(run_dir) -> Path:
  """``run_dir`` as a path, refusing one that names a file (or a checkpoint) instead of a folder."""
  run_dir = Path(run_dir)
  if run_dir.suffix == ".msgpack":
    raise UsageError(f"--out {run_dir}: give the run folder, not its checkpoint file")
  if run_dir.exists() and not run_dir.is_dir():
    raise UsageError(f"--out {run_dir} is a file, not a run folder")
  return run_dir


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How a run reports and saves, as opposed to what it trains (:class:`TrainConfig`)."""

  log_every: int = 10
  checkpoint_every: int = 50
  quiet: bool = False
  progress: bool | None = None  # None: a bar on stderr when it is a terminal.
  shards: int | None = None  # CPU devices a minibatch's rows are split over; None: parallel's rule

  def validate(self) -> "RunOptions":
    if self.log_every < 1:
      raise UsageError(f"--log-every must be >= 1, got {self.log_every}")
    if self.checkpoint_every < 1:
      raise UsageError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
    if self.shards is not None and self.shards < 1:
      raise UsageError(f"--shards must be >= 1, got {self.shards}")
    return self


def train_run(config: TrainConfig, run_dir: str | Path, resume: bool = False,
              options: RunOptions = RunOptions(), out: TextIO | None = None,
              err: TextIO | None = None) -> dict:
  """Trains as ``config`` says, writing everything into ``run_dir``; returns the summary.

  Raises:
    UsageError: bad configuration, corpus or checkpoint (nothing in ``run_dir`` is touched).
    Diverged: a non-finite loss; the last good checkpoint and the metrics before it are kept.
  """
  t_start = time.perf_counter()
  out, err = out or sys.stdout, err or sys.stderr
  config.validate()
  cudnn.check_available(config.impl)
  options.validate()
  devices = parallel.batch_devices(config.batch_size, config.num_hiddens, options.shards)
  run_dir = check_run_dir(run_dir)
  saved = None
  if resume:
    saved = ckpt.load_checkpoint(run_dir)
    ckpt.check_compatible(saved.config, config)
  elif any((run_dir / name).exists() for name in (ckpt.FILENAME, "metrics.jsonl", "summary.json")):
    raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it, "
                     "or choose another --out")

  corpus, vocab = data.load_corpus(config.corpus, clean=config.clean, max_tokens=config.max_tokens)
  if saved is not None and saved.vocab.idx_to_token != vocab.idx_to_token:
    raise ckpt.CheckpointError("checkpoint's vocabulary differs from the corpus' vocabulary")
  train_corpus, valid_corpus = data.split_corpus(corpus, config.valid_fraction)
  if config.valid_fraction > 0 and len(valid_corpus) < 2:
    raise UsageError(f"valid fraction {config.valid_fraction} leaves fewer than 2 tokens "
                     f"of {len(corpus)} for validation")
  loader = data.SeqDataLoader(train_corpus, config.batch_size, config.num_steps,
                              config.use_random_iter, seed=config.seed)
  model = models.from_config(config, len(vocab))
  optimizer = training.make_optimizer(config.lr, config.clip, config.optimizer)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state = training.init_train_state(model, optimizer, init_key)
  start_epoch = 0
  if saved is not None:
    state = training.TrainState(
        jax.tree_util.tree_map(jnp.asarray, ckpt.restore(state.params, saved.params)),
        jax.tree_util.tree_map(jnp.asarray, ckpt.restore(state.opt_state, saved.opt_state)))
    if saved.data_rng_state is not None:
      loader.rng_state = saved.data_rng_state
    start_epoch = saved.epoch
    if start_epoch >= config.num_epochs:
      raise UsageError(f"checkpoint is at epoch {start_epoch}; ask for more with --num-epochs")
  state = parallel.replicate(state, devices)

  run_dir.mkdir(parents=True, exist_ok=True)
  files.atomic_write_json(run_dir / "config.json", config.to_json())
  metrics_file = run_dir / "metrics.jsonl"
  rows = _read_metrics(metrics_file, start_epoch)
  files.atomic_write_bytes(metrics_file, "".join(json.dumps(r) + "\n" for r in rows).encode())

  prefix, short_prefix = default_prefixes(config, corpus, vocab)
  predict = lambda p, params: generate.predict(p, 50, params, model, vocab)
  say: Callable[[str], None] = lambda line: print(line, file=out, flush=True)
  epoch_fn = training.make_train_epoch(model, optimizer, config.use_random_iter, devices)
  eval_rows = max(1, len(valid_corpus) // 10_000)  # Rows of >= 10k tokens read in parallel.

  def save(epoch: int, state: training.TrainState, data_rng_state: dict) -> None:
    ckpt.save_checkpoint(run_dir, params=state.params, opt_state=state.opt_state, epoch=epoch,
                         vocab=vocab, config=config, data_rng_state=data_rng_state)

  def logged(epoch: int) -> bool:
    return epoch % options.log_every == 0 or epoch == config.num_epochs

  def needs_state(tag) -> bool:  # the epochs whose parameters are read: kept, not donated
    epoch = tag[0]
    return ((logged(epoch) and (not options.quiet or len(valid_corpus) > 0))
            or epoch % options.checkpoint_every == 0 or epoch == config.num_epochs)

  def epochs():
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
      Xs, Ys = loader.epoch()
      yield (epoch, loader.rng_state), Xs, Ys, jax.random.fold_in(train_key, epoch)

  # Every epoch shape compiled now, not while an epoch runs (the pipeline reads ahead).
  t = time.perf_counter()
  compiled = {}
  for shape in loader.epoch_shapes():
    Xs = jax.ShapeDtypeStruct(shape, jnp.int32)
    compiled[shape] = epoch_fn.lower(state, Xs, Xs, train_key).compile()
  compile_seconds = time.perf_counter() - t
  pipeline = EpochPipeline(lambda s, Xs, Ys, key: compiled[Xs.shape](s, Xs, Ys, key),
                                    needs_state)

  show_bar = options.progress if options.progress is not None else err.isatty()
  bar = None
  if show_bar and not options.quiet:
    from tqdm.auto import tqdm
    bar = tqdm(total=config.num_epochs, initial=start_epoch, file=err, unit="epoch",
               dynamic_ncols=True)

  last_saved = start_epoch if saved is not None else None
  tokens = seconds = 0.0
  ppl = valid_ppl = math.nan
  metrics = metrics_file.open("a")

  n_tokens = lambda losses: losses.size * config.batch_size * config.num_steps

  def write_row(epoch: int, losses: np.ndarray, dt: float, valid_ppl) -> float:
    ppl = training.perplexity(losses.mean())
    row = {"epoch": epoch, "train_perplexity": ppl, "valid_perplexity": valid_ppl,
           "tokens_per_sec": n_tokens(losses) / dt, "seconds": dt}
    rows.append(row)
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()
    return ppl

  try:
    for done in pipeline.run(state, epochs()):
      (epoch, done_rng), losses, dt = done.tag, done.losses, done.seconds
      state = done.state  # None where it went on to the next epoch (donated)
      if not np.all(np.isfinite(losses)):
        where = (f"the checkpoint of epoch {last_saved} is kept" if last_saved is not None
                 else "no checkpoint had been saved")
        raise Diverged(f"non-finite loss at epoch {epoch} (try a lower --lr or --clip); "
                       f"{where}; metrics up to epoch {epoch - 1} are in {metrics_file}")
      # What evaluation and the predictions read, copied once onto one device.
      params = (parallel.on_first(state.params, devices)
                if logged(epoch) and state is not None else None)
      valid_ppl = None
      if len(valid_corpus) and logged(epoch):
        valid_ppl = training.evaluate(model, params, valid_corpus, eval_rows)
      ppl = write_row(epoch, losses, dt, valid_ppl)
      if epoch > start_epoch + 1 or epoch == config.num_epochs:
        tokens, seconds = tokens + n_tokens(losses), seconds + dt
      if bar is not None:
        bar.update(1)
        bar.set_postfix(perplexity=f"{ppl:.2f}")
      if logged(epoch) and not options.quiet:
        valid_text = f", valid perplexity {valid_ppl:.1f}" if valid_ppl is not None else ""
        line = f"epoch {epoch}, perplexity {ppl:.1f}{valid_text}: {predict(prefix, params)}"
        bar.write(line, file=out) if bar is not None else say(line)
      if epoch % options.checkpoint_every == 0 or epoch == config.num_epochs:
        save(epoch, state, done_rng)
        last_saved = epoch
  except KeyboardInterrupt:
    # Keep the newest finished epoch: its metrics rows, then its checkpoint.
    newest, last_row = None, rows[-1]["epoch"] if rows else start_epoch
    for done in pipeline.drain():
      if not np.all(np.isfinite(done.losses)):
        break
      if done.tag[0] > last_row:
        write_row(done.tag[0], done.losses, done.seconds, None)
      newest = done if done.state is not None else newest
    if newest is not None and newest.tag[0] != (last_saved or 0):
      save(newest.tag[0], newest.state, newest.tag[1])
      print(f"saved the checkpoint of epoch {newest.tag[0]} in {run_dir}", file=err)
    raise
  finally:
    metrics.close()
    if bar is not None:
      bar.close()

  speed = tokens / seconds if seconds else 0.0
  summary = {
      "train_perplexity": ppl,
      "valid_perplexity": valid_ppl,
      "tokens_per_sec": speed,
      "compile_seconds": compile_seconds,
      "wall_seconds": time.perf_counter() - t_start,
      "device": device_name(),
      "shards": len(devices),
      "precision": config.precision,
      "epochs": config.num_epochs,
  }
  files.atomic_write_json(run_dir / "summary.json", summary)
  plots.plot_perplexity(rows, run_dir / "perplexity",
                        title=f"{config.num_layers}-layer {config.cell.upper()}, "
                              f"{config.num_hiddens} hidden units")
  say(f"compile time {compile_seconds:.1f} sec")
  products = "" if config.precision == "float32" else f" ({config.precision} products)"
  say(f"perplexity {ppl:.1f}, {speed:.1f} tokens/sec on {summary['device']}{products}")
  say(predict(prefix, params))  # the last epoch's: always logged, its state kept
  say(predict(short_prefix, params))
  return summary
