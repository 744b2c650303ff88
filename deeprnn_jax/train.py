"""``python -m deeprnn_jax.train``: the chapter's run (a 2-layer LSTM on The Time Machine).

Every flag defaults to d2l's setting, so the bare command reproduces the chapter. See
``--help``; the library behind it is :func:`deeprnn_jax.runs.train_run`.

Only light modules are imported before :func:`main` has Ctrl-C, SIGTERM and SIGHUP handled
(:func:`deeprnn_jax.cli.run`): JAX and the rest are imported inside, so that a signal during the
seconds of importing them stops the command cleanly too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from typing import Sequence

from deeprnn_jax import cli
from deeprnn_jax.errors import UsageError


def parser() -> argparse.ArgumentParser:
  from deeprnn_jax.config import TrainConfig
  from deeprnn_jax.presets import PRESETS
  from deeprnn_jax.runs import RunOptions
  _D = TrainConfig()
  p = argparse.ArgumentParser(
      prog="python -m deeprnn_jax.train",
      description="Train a deep RNN/GRU/LSTM character language model (defaults: d2l's run).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default="classic",
                 help=f"{' or '.join(PRESETS)}: the d2l edition whose run to start from "
                      "(d2l-en: d2l 1.0's deep GRU, docs/presets.md); the flags below override "
                      "it, their defaults shown are the classic edition's")
  m = p.add_argument_group("model")
  m.add_argument("--cell", default=_D.cell, help="rnn, gru or lstm")
  m.add_argument("--num-layers", type=int, default=_D.num_layers)
  m.add_argument("--num-hiddens", type=int, default=_D.num_hiddens)
  m.add_argument("--activation", default=_D.activation,
                 help="RNN φ: tanh or relu, or one per layer separated by commas (relu,tanh)")
  m.add_argument("--dropout", type=float, default=_D.dropout, help="between layers")
  m.add_argument("--impl", default=_D.impl,
                 help="layerwise (fast), scan (the chapter's reference), wavefront (GPU, large "
                      "batches) or cudnn (LSTM on a CUDA GPU, wide layers)")
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
  d.add_argument("--batch-size", type=int, default=_D.batch_size)
  d.add_argument("--num-steps", type=int, default=_D.num_steps)
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
  o.add_argument("--lr", type=float, default=_D.lr)
  o.add_argument("--clip", type=float, default=_D.clip, help="global gradient norm")
  o.add_argument("--num-epochs", type=int, default=_D.num_epochs)
  o.add_argument("--seed", type=int, default=_D.seed)
  r = p.add_argument_group("run")
  r.add_argument("--out", default=None, help="run folder (default runs/<timestamp>/)")
  r.add_argument("--resume", action="store_true", help="continue the run in --out")
  r.add_argument("--checkpoint-every", type=int, default=RunOptions.checkpoint_every)
  r.add_argument("--keep-checkpoints", type=int, default=RunOptions.keep_checkpoints,
                 help="how many of the newest checkpoints stay in --out (an older one is used "
                      "where the newest is unreadable)")
  r.add_argument("--log-every", type=int, default=RunOptions.log_every)
  r.add_argument("--quiet", action="store_true", help="print only the final lines")
  r.add_argument("--shards", type=int, default=None,
                 help="CPU cores a minibatch's rows are split over (1: no split; default: split "
                      "where it was measured to pay, see deeprnn_jax/parallel.py)")
  return p


_RUN_FLAGS = {"out", "resume", "checkpoint_every", "keep_checkpoints", "log_every", "quiet",
              "shards", "preset"}
_RENAMED = {"random_iter": "use_random_iter"}


def config_fields(args: argparse.Namespace) -> dict:
  """The :class:`TrainConfig` fields among parsed flags (those present in ``args``)."""
  from deeprnn_jax.config import parse_activation
  fields = {_RENAMED.get(k, k): v for k, v in vars(args).items() if k not in _RUN_FLAGS}
  if "activation" in fields:
    fields["activation"] = parse_activation(fields["activation"])
  return fields


def _explicit(argv: Sequence[str] | None) -> dict:
  """The config fields the user typed, for a resumed run to override its saved config with."""
  p = parser()
  for action in p._actions:  # argparse has no public switch for "omit absent flags".
    action.default = argparse.SUPPRESS
  return config_fields(p.parse_args(argv))


def _main(argv: Sequence[str] | None = None) -> int:
  from deeprnn_jax.presets import preset
  from deeprnn_jax.runs import RunOptions, saved_config, train_run
  args = parser().parse_args(argv)
  saved = None
  if args.resume and args.preset != "classic":
    raise UsageError("--preset starts a run; --resume continues one with its saved settings")
  if args.resume:
    # The saved config, changed only where a flag says so: a bare --resume continues as started.
    if args.out is None:
      raise UsageError("--resume needs --out RUN_DIR, the run to continue")
    saved = saved_config(args.out)  # None: a run that left only metrics; the flags say it all
  if saved is not None:
    config = dataclasses.replace(saved, **_explicit(argv)).validate()
  else:
    config = preset(args.preset, **_explicit(argv)).validate()
  out = args.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}"
  train_run(config, out, resume=args.resume,
            options=RunOptions(args.log_every, args.checkpoint_every, args.quiet,
                               shards=args.shards, keep_checkpoints=args.keep_checkpoints))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv, prog="deeprnn_jax.train", stop_signals=True)


if __name__ == "__main__":
  raise SystemExit(main())
