"""``python -m deeprnn_jax.train``: the chapter's run (a 2-layer LSTM on The Time Machine).

Every flag defaults to d2l's setting, so the bare command reproduces the chapter. See
``--help``; the library behind it is :func:`deeprnn_jax.run.runs.train_run`.

Only light modules are imported before :func:`main` has Ctrl-C, SIGTERM and SIGHUP handled
(:func:`deeprnn_jax.cli.run`): JAX and the rest are imported inside, so that a signal during the
seconds of importing them stops the command cleanly too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import sys
from pathlib import Path
from typing import Sequence

from deeprnn_jax import cli
from deeprnn_jax.base.errors import UsageError


def parser() -> argparse.ArgumentParser:
  from deeprnn_jax.base import validate
  from deeprnn_jax.base.config import TrainConfig
  from deeprnn_jax.base.presets import PRESETS
  from deeprnn_jax.run.runs import RunOptions
  _D = TrainConfig()
  p = argparse.ArgumentParser(
      prog="python -m deeprnn_jax.train",
      description="Train a deep RNN/GRU/LSTM character language model (defaults: d2l's run).",
      formatter_class=cli.HelpFormatter)
  p.add_argument("--preset", default="classic",
                 help=f"{' or '.join(PRESETS)}: the d2l edition whose run to start from "
                      "(d2l-en: d2l 1.0's deep GRU, docs/presets.md); the flags below override "
                      "it, their defaults shown are the classic edition's")
  m = p.add_argument_group("model")
  m.add_argument("--cell", default=_D.cell, help=", ".join(validate.CELLS))
  m.add_argument("--num-layers", type=int, default=_D.num_layers,
                 help="recurrent layers stacked, each feeding the next (d2l's deep RNN)")
  m.add_argument("--num-hiddens", type=int, default=_D.num_hiddens,
                 help="hidden units of each recurrent layer")
  m.add_argument("--activation", default=_D.activation,
                 help="RNN φ: tanh or relu, or one per layer separated by commas (relu,tanh)")
  m.add_argument("--dropout", type=float, default=_D.dropout, help="between layers")
  m.add_argument("--locked-dropout", action="store_true", default=_D.locked_dropout,
                 help="one dropout mask per sequence and layer for all its steps, and the last "
                      "layer's output dropped too (variational dropout, AWD-LSTM)")
  m.add_argument("--embed-dim", type=int, default=_D.embed_dim,
                 help="a learned embedding of this size as layer 0's input (default: one-hot, "
                      "d2l's)")
  m.add_argument("--embed-dropout", type=float, default=_D.embed_dropout,
                 help="drop each token's whole embedding row for a minibatch")
  m.add_argument("--weight-drop", type=float, default=_D.weight_drop,
                 help="drop each entry of every W_hh with this probability, one mask per "
                      "minibatch (DropConnect, AWD-LSTM)")
  m.add_argument("--impl", default=_D.impl,
                 help="layerwise (fast), scan (the chapter's reference), wavefront (GPU, large "
                      "batches), cudnn (LSTM on a CUDA GPU, wide layers) or onednn (LSTM on "
                      "the CPU, oneDNN's fused kernel: the onednn extra)")
  m.add_argument("--precision", default=_D.precision,
                 help="operand type of the recurrent layers' matrix products: float32 or "
                      "bfloat16 (float32 accumulation; faster on CPUs with AVX512-BF16, see "
                      "BENCHMARKS.md)")
  m.add_argument("--unroll", type=int, default=_D.unroll,
                 help="lax.scan unroll of the recurrence (speed and compile time only; default: "
                      "the backend's fastest measured, 1 on a CPU, 8 on a GPU)")
  d = p.add_argument_group("data")
  d.add_argument("--corpus", default=_D.corpus, help="a known corpus name or a path to UTF-8 text")
  d.add_argument("--clean", default=_D.clean, help="d2l (letters, lower case) or none")
  d.add_argument("--max-tokens", type=int, default=_D.max_tokens,
                 help="the first N tokens of the corpus; -1 for all of it")
  d.add_argument("--valid-fraction", type=float, default=_D.valid_fraction,
                 help="held-out tail of the corpus (0 = d2l: no validation)")
  d.add_argument("--batch-size", type=int, default=_D.batch_size,
                 help="rows of a minibatch, each a stretch of the corpus")
  d.add_argument("--num-steps", type=int, default=_D.num_steps,
                 help="time steps of a minibatch's rows: how far back the gradient reaches")
  d.add_argument("--random-iter", action="store_true",
                 help="random instead of sequential partitioning")
  d.add_argument("--pipeline", default=_D.pipeline,
                 help="classic (partitioned text) or windows (d2l 1.0: every overlapping window)")
  d.add_argument("--num-train", type=int, default=_D.num_train,
                 help="windows pipeline: the first N windows train")
  d.add_argument("--num-val", type=int, default=_D.num_val,
                 help="windows pipeline: the next N windows validate")
  o = p.add_argument_group("optimisation")
  o.add_argument("--optimizer", default=_D.optimizer, help="sgd or adam")
  o.add_argument("--weight-decay", default=f"{_D.weight_decay:g}",
                 help="decoupled weight decay: SGD steps by -lr (g + wd w); Adam becomes AdamW; "
                      "several separated by commas: a model each, crossed with the others")
  o.add_argument("--ema", type=float, default=_D.ema,
                 help="evaluate, predict with and keep as the best model a moving average of the "
                      "parameters with this decay (0.999: over about the last 1000 steps); 0: "
                      "the parameters themselves")
  o.add_argument("--lr", default=f"{_D.lr:g}",
                 help="learning rate; several separated by commas (0.5,1,2,4) train one model "
                      "each, all in one program")
  o.add_argument("--clip", default=f"{_D.clip:g}",
                 help="global gradient norm; several separated by commas: a model each, crossed "
                      "with the learning rates")
  o.add_argument("--lr-schedule", default=_D.lr_schedule,
                 help="constant (d2l) or cosine: the rate falls along half a cosine to lr × "
                      "--lr-min-factor at the last epoch")
  o.add_argument("--warmup-epochs", type=int, default=_D.warmup_epochs,
                 help="raise the rate linearly from 0 over the first N epochs")
  o.add_argument("--lr-min-factor", type=float, default=_D.lr_min_factor,
                 help="cosine: the last epoch's rate as a fraction of --lr")
  o.add_argument("--num-epochs", type=int, default=_D.num_epochs,
                 help="passes over the training text (the run's total, counting resumed epochs)")
  o.add_argument("--patience", type=int, default=_D.patience,
                 help="stop once validation perplexity has not improved for N epochs (the best "
                      "model is in <out>/best.msgpack, with held-out text: --valid-fraction) "
                      "(default: train every epoch)")
  o.add_argument("--seed", type=int, default=_D.seed,
                 help="the seed of the initial parameters, the data order and dropout: a seed "
                      "gives the same run")
  o.add_argument("--num-seeds", type=int, default=1,
                 help="train each setting with seeds --seed, --seed + 1, ...: all the models in "
                      "one program (jax.vmap), a row per model in metrics.jsonl")
  r = p.add_argument_group("run")
  r.add_argument("--out", default=None,
                 help="run folder (default: a new runs/<timestamp>/, with -2, -3, ... where "
                      "that is taken)")
  r.add_argument("--resume", action="store_true",
                 help="continue the run in --out, with its settings (those of its newest "
                      "checkpoint: the run's flags, --checkpoint-every, --keep-checkpoints, "
                      "--log-every and --tensorboard included); a flag passed overrides one")
  r.add_argument("--checkpoint-every", type=int, default=RunOptions.checkpoint_every,
                 help="save a checkpoint every N epochs, and at the last one and when Ctrl-C, "
                      "SIGTERM or SIGHUP stops the run; a SIGKILL (the OOM killer, kill -9) or a "
                      "crash loses the epochs since the last save, up to N - 1: lower it where "
                      "epochs are long")
  r.add_argument("--keep-checkpoints", type=int, default=RunOptions.keep_checkpoints,
                 help="how many of the newest checkpoints stay in --out (an older one is used "
                      "where the newest is unreadable)")
  r.add_argument("--log-every", type=int, default=RunOptions.log_every,
                 help="print d2l's line (perplexity and a prediction) every N epochs")
  r.add_argument("--quiet", action="store_true", help="print only the final lines")
  r.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                 help="also write TensorBoard's event files into <out>/tensorboard (one run per "
                      "model; needs the extra deeprnn-jax[tensorboard]); view them with "
                      "tensorboard --logdir runs/")
  r.add_argument("--devices", "--shards", dest="devices", default=None,
                 help="devices a minibatch's rows are split over: N or all (1: no split); with "
                      "several models, the devices they are spread over. By default: on a CPU, "
                      "its cores where that was measured to pay (deeprnn_jax/fit/parallel.py); on "
                      "a GPU, one; over several processes, all; for several models, the most that "
                      "divide them evenly")
  h = p.add_argument_group("several processes (docs/performance.md)")
  h.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0, which every process connects to (default: "
                      "$JAX_COORDINATOR_ADDRESS)")
  h.add_argument("--join-timeout", type=float, default=60,
                 help="seconds to wait for every process to join before giving up (exit 2)")
  h.add_argument("--num-processes", type=int, default=None,
                 help="how many processes train together (default: what JAX detects of a "
                      "cluster: SLURM, Open MPI, ...)")
  h.add_argument("--process-id", type=int, default=None,
                 help="this process's rank, 0 .. N-1; only process 0 writes and prints "
                      "(default: what JAX detects of a cluster)")
  return p


_RUN_FLAGS = {"out", "resume", "checkpoint_every", "keep_checkpoints", "log_every", "quiet",
              "tensorboard", "devices", "coordinator", "join_timeout", "num_processes",
              "process_id", "num_seeds", "preset"}
_RENAMED = {"random_iter": "use_random_iter"}


def config_fields(args: argparse.Namespace) -> dict:
  """The :class:`TrainConfig` fields among parsed flags (those present in ``args``)."""
  from deeprnn_jax.base.config import SWEPT, parse_activation
  fields = {_RENAMED.get(k, k): v for k, v in vars(args).items() if k not in _RUN_FLAGS}
  if "activation" in fields:
    fields["activation"] = parse_activation(fields["activation"])
  for name in SWEPT:  # the first value: the config's; all of them: the sweep's
    if name in fields:
      fields[name] = sweep_values(args, name)[0]
  return fields


def sweep_values(args: argparse.Namespace, name: str) -> tuple[float, ...]:
  """The values of a flag of :data:`~deeprnn_jax.base.config.SWEPT` (``--lr``, ``--clip``,
  ``--weight-decay``: numbers separated by commas); ``()`` where absent."""
  from deeprnn_jax.base.config import parse_floats
  text = getattr(args, name, None)
  return () if text is None else parse_floats(f"--{name.replace('_', '-')}", str(text))


def sweep_of(args: argparse.Namespace):
  """The models the flags in ``args`` ask for (those present)."""
  from deeprnn_jax.base.config import SWEPT, Sweep
  several = lambda values: values if len(values) > 1 else ()
  return Sweep(getattr(args, "num_seeds", 1),
               *(several(sweep_values(args, name)) for name in SWEPT))


def _explicit_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The flags the user typed, for a resumed run to override its saved settings with."""
  p = parser()
  for action in p._actions:  # argparse has no public switch for "omit absent flags".
    action.default = argparse.SUPPRESS
  return p.parse_args(argv)


def _main(argv: Sequence[str] | None = None) -> int:
  import jax

  from deeprnn_jax.base.config import SWEPT
  from deeprnn_jax.base.presets import preset
  from deeprnn_jax.fit import parallel
  from deeprnn_jax.run import distributed
  from deeprnn_jax.run.runs import KEPT_OPTIONS, RunOptions, saved_run, train_run
  from deeprnn_jax.run.sweeps import saved_sweep, sweep_run
  args = parser().parse_args(argv)
  if args.out is not None and not args.out.strip():
    raise UsageError("--out is empty: give the run folder (without --out, a new one under runs/)")
  if distributed.requested(args.coordinator, args.num_processes, args.process_id):
    distributed.join(args.coordinator, args.num_processes, args.process_id, args.join_timeout,
                     prog="deeprnn_jax.train")
  sweep = sweep_of(args)
  typed = _explicit_args(argv)
  kept = {}  # the saved options a bare --resume continues with
  if args.resume and args.preset != "classic":
    raise UsageError("--preset starts a run; --resume continues one with its saved settings")
  if args.resume:
    # The saved settings, changed only where a flag says so: a bare --resume continues as started.
    if args.out is None:
      raise UsageError("--resume needs --out RUN_DIR, the run to continue")
    saved, kept = saved_run(args.out)
    kept = {k: v for k, v in (kept or {}).items() if k in KEPT_OPTIONS}
    if not {"num_seeds", *SWEPT} & set(vars(typed)):
      sweep = saved_sweep(args.out) or sweep
    config = dataclasses.replace(saved, **config_fields(typed)).validate()
  else:
    config = preset(args.preset, **config_fields(typed)).validate()
  chosen = dict(kept, **{k: v for k, v in vars(typed).items() if k in KEPT_OPTIONS})
  options = RunOptions(**dict(dict(log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                                   keep_checkpoints=args.keep_checkpoints,
                                   tensorboard=args.tensorboard), **chosen),
                       quiet=args.quiet, shards=parallel.parse_devices(args.devices))
  if not sweep.single and jax.process_count() > 1:
    raise UsageError("several models train in one process (spread over its devices with "
                     "--devices); over several processes, train one model")
  options.validate()
  out, made = args.out, None
  if out is None and distributed.is_writer():  # a folder of its own, that no other run takes
    out = made = new_run_folder()
    print(f"run folder: {out}", file=sys.stderr, flush=True)
  elif out is None:
    out = "runs"  # unused: a follower writes into a scratch folder (distributed.outputs)
  try:
    if not sweep.single:
      sweep_run(config, sweep, out, resume=args.resume, options=options)
      return 0
    with distributed.outputs(out, copy_from=args.out) as (run_dir, stdout, stderr):
      train_run(config, run_dir, resume=args.resume, options=options, out=stdout, err=stderr)
    return 0
  finally:
    if made is not None:
      with contextlib.suppress(OSError):  # refused before it wrote anything: no empty folder
        made.rmdir()


def new_run_folder(parent: str = "runs") -> Path:
  """A new folder ``parent/<timestamp>``, or ``<timestamp>-2``, ``-3``, ... where that is taken:
  made with ``mkdir``, which one process alone succeeds in, so that two runs started in the same
  second get a folder each."""
  stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
  Path(parent).mkdir(parents=True, exist_ok=True)
  for n in itertools.count(1):
    path = Path(parent) / (stamp if n == 1 else f"{stamp}-{n}")
    try:
      path.mkdir()
      return path
    except FileExistsError:
      continue


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv, prog="deeprnn_jax.train", stop_signals=True)


if __name__ == "__main__":
  raise SystemExit(main())
