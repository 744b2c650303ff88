"""``python -m deeprnn_jax.evaluate``: what a trained run scores on held-out text.

Scores a run folder's model (of a run of several models, the best or ``--model K``, or all of
them as an ensemble whose probabilities are averaged) on the run's own held-out split or on a
text file, cleaned as the run's corpus was. Prints nats and bits per character and perplexity;
``--json`` prints one JSON object instead::

    python -m deeprnn_jax.evaluate --checkpoint runs/book
    python -m deeprnn_jax.evaluate --checkpoint runs/sweep --ensemble --text other.txt --json

``--dynamic-lr`` adds dynamic evaluation (the model adapts by SGD to each segment after scoring
it), reported on its own line, never mixed with the static numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Sequence

import jax
import numpy as np

from deeprnn_jax import cli
from deeprnn_jax.base import validate
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import scoring
from deeprnn_jax.predict import model_of
from deeprnn_jax.run import checkpoint
from deeprnn_jax.text import editions

PROG = "python -m deeprnn_jax.evaluate"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG,
      description="What a trained run scores on held-out text: nats and bits per character and "
                  "perplexity.",
      formatter_class=cli.HelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoint.msgpack)")
  p.add_argument("--text", default=None,
                 help="a UTF-8 text file to score (default: the run's held-out split)")
  cli.add_best_flag(p)
  which = p.add_mutually_exclusive_group()
  which.add_argument("--model", type=int, default=None,
                     help="of a run of several models, which one (default: the best by "
                          "validation, else training, perplexity)")
  which.add_argument("--ensemble", action="store_true",
                     help="of a run of several models, all that did not diverge, their "
                          "next-character probabilities averaged")
  p.add_argument("--rows", type=int, default=None,
                 help="contiguous rows read in parallel, each from a zero state (default: as "
                      "the run validates, one per 10,000 characters)")
  p.add_argument("--dynamic-lr", type=float, default=None,
                 help="also dynamic evaluation at this SGD learning rate (0 scores as static) "
                      "(default: static evaluation only)")
  p.add_argument("--dynamic-segment", type=int, default=None,
                 help="characters per dynamic-evaluation step (default: the run's --num-steps)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  return p


def _ensemble(saved: checkpoint.Checkpoint, where):
  """``(model, stacked params, indices)`` of every model of ``saved`` that did not diverge."""
  if saved.models is None:
    raise UsageError(f"--ensemble: {where} holds one model")
  indices = [d["model"] for d in saved.models if d.get("diverged_epoch") is None]
  if not indices:
    raise UsageError(f"--ensemble: every model in {where} diverged")
  loaded = [model_of(saved, k, where) for k in indices]
  stacked = jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *(p for _, p, _ in loaded))
  return loaded[0][0], stacked, indices


def _stream(args, saved: checkpoint.Checkpoint) -> tuple[np.ndarray, str]:
  """``(tokens <int32>[n], what they are)``: ``--text``, else the run's held-out split."""
  config, edition = saved.config, editions.edition(saved.config)
  if args.text is not None:
    return edition.encode_file(args.text, saved.vocab, config), args.text
  return edition.held_out(edition.load_text(config)), "the run's held-out split"


def _line(name: str, result: dict) -> str:
  return (f"{name}: {result['nats']:.4f} nats/char, {result['bits']:.4f} bits/char, "
          f"perplexity {result['perplexity']:.3f}")


def _main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  for name in ("rows", "dynamic_segment"):
    if getattr(args, name) is not None:
      validate.positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
  if args.dynamic_lr is not None and not (math.isfinite(args.dynamic_lr) and args.dynamic_lr >= 0):
    raise UsageError(f"--dynamic-lr must be a finite number >= 0, got {args.dynamic_lr}")
  saved = checkpoint.load_checkpoint(args.checkpoint, best=args.best)
  if args.ensemble:
    model, params, models = _ensemble(saved, args.checkpoint)
  else:
    model, params, _ = model_of(saved, args.model, args.checkpoint)
    models = [checkpoint.choose_model(saved.models, args.model, args.checkpoint)
              if saved.models else 0]
  tokens, source = _stream(args, saved)
  rows = args.rows or scoring.default_rows(len(tokens))
  X, Y = scoring.stream_rows(tokens, rows)
  score = scoring.ensemble_nll if args.ensemble else scoring.token_nll
  results = {"static": scoring.summary(score(model, params, X, Y))}
  if args.dynamic_lr is not None:
    if args.ensemble:
      raise UsageError("--dynamic-lr scores one model: leave out --ensemble")
    segment = args.dynamic_segment or saved.config.num_steps
    results["dynamic"] = scoring.summary(scoring.dynamic_nll(
        model, params, X, Y, segment, args.dynamic_lr, saved.config.clip))
    results["dynamic"].update(lr=args.dynamic_lr, segment=segment)
  described = {"checkpoint": str(args.checkpoint), "epoch": saved.epoch, "text": source,
               "models": models, "ensemble": args.ensemble, "rows": X.shape[0]}
  if args.json:
    print(json.dumps({**described, **results}))
    return 0
  who = f"ensemble of models {models}" if args.ensemble else f"model {models[0]}"
  read_in = f"{X.shape[0]} row" + ("s" if X.shape[0] > 1 else "")
  print(f"{source}, {results['static']['tokens']:,} characters scored in {read_in}; "
        f"{who} at epoch {saved.epoch}")
  print(_line("static", results["static"]))
  if "dynamic" in results:
    print(_line(f"dynamic (lr {args.dynamic_lr:g}, segments of {results['dynamic']['segment']})",
                results["dynamic"]))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv, prog="deeprnn_jax.evaluate")


if __name__ == "__main__":
  raise SystemExit(main())
