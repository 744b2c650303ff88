"""``python -m deeprnn_jax.predict``: continue a prefix with a trained run's model."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from deeprnn_jax import cli
from deeprnn_jax.base import validate
from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import DataError, Interrupted, UsageError
from deeprnn_jax.model import generate, models
from deeprnn_jax.run import checkpoint, stopping
from deeprnn_jax.text import editions


def load_model(run_dir, index: int | None = None):
  """``(model, params, vocab)`` from a run folder's checkpoint; of a checkpoint holding several
  models, model ``index`` (default: the best, :func:`checkpoint.model_params`)."""
  return model_of(checkpoint.load_checkpoint(run_dir), index, run_dir)


def model_of(saved: checkpoint.Checkpoint, index: int | None, run_dir):
  """:func:`load_model` of a checkpoint already read from ``run_dir``."""
  model = models.from_config(saved.config, len(saved.vocab))
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  params = checkpoint.restore(template["params"], checkpoint.model_params(saved, index, run_dir),
                              f"checkpoint in {run_dir}")
  return model, jax.tree_util.tree_map(jnp.asarray, params), saved.vocab


def run_prefix(config: TrainConfig, vocab) -> str:
  """The prefix a run's own lines continue (:func:`editions.default_prefixes`): d2l's ``time
  traveller`` (``it has`` for d2l 1.0's pipeline), else the first two words of its corpus."""
  try:
    return editions.default_prefixes(config, lambda: editions.load_text(config).corpus, vocab)[0]
  except DataError as e:
    raise UsageError(f"no --prefix given, and the run's corpus, whose first words would be the "
                     f"default, cannot be read: {e}") from None


PROG = "deeprnn_jax.predict"
PROGRESS_FROM = 20_000  # characters: a shorter text takes seconds, a bar would only flicker


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=f"python -m {PROG}",
      description="Continue a prefix with a trained run's model, writing the text as it comes "
                  "(Ctrl-C stops it, keeping what was written).",
      formatter_class=cli.HelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoint.msgpack)")
  p.add_argument("--prefix", default=None,
                 help="text to continue, cleaned as the run's corpus is (--clean d2l: letters, "
                      "lower case) (default: the prefix of the run's own lines, d2l's 'time "
                      "traveller' for The Time Machine, else its corpus's first two words)")
  p.add_argument("--num-preds", type=int, default=50,
                 help=f"characters to generate after the prefix (at most {generate.MAX_PREDS:,})")
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0: greedy, d2l's argmax; > 0: sample from softmax(logits / temperature)")
  p.add_argument("--seed", type=int, default=0,
                 help="the sampling's PRNG seed, in [0, 2**32): a seed gives the same text")
  cli.add_best_flag(p)
  p.add_argument("--model", type=int, default=None,
                 help="of a run that trained several models, which one (default: the best by "
                      "validation, else training, perplexity)")
  return p


class _Progress:
  """Characters written so far, on stderr, where it is a terminal that the text does not go to
  (on the terminal the text itself shows how far it is)."""

  def __init__(self, total: int):
    self.total, self.shown = total, 0.0
    self.on = (total >= PROGRESS_FROM and sys.stderr.isatty() and not sys.stdout.isatty())

  def update(self, done: int) -> None:
    if self.on and time.monotonic() - self.shown > 0.2:
      self.shown = time.monotonic()
      sys.stderr.write(f"\r{done:,} of {self.total:,} characters ({100 * done // self.total}%)")
      sys.stderr.flush()

  def close(self) -> None:
    if self.on and self.shown:
      sys.stderr.write("\r\033[K")  # the line cleared for what follows
      sys.stderr.flush()


def write_prediction(prefix: str, num_preds: int, params, model, vocab, temperature: float,
                     key, stop: stopping.StopRequest) -> int:
  """Writes ``prefix`` and its continuation to stdout piece by piece
  (:func:`generate.stream_tokens`), flushing each; stops between pieces where ``stop`` is
  requested. Returns the characters generated."""
  out, progress, done = sys.stdout, _Progress(num_preds), 0
  out.write(prefix)
  out.flush()
  try:
    if not stop.requested:
      for piece in generate.stream_tokens(model, params, vocab[list(prefix)], num_preds,
                                          temperature, key):
        out.write("".join(vocab.to_tokens(piece.tolist())))
        out.flush()
        done += len(piece)
        progress.update(done)
        if stop.requested:
          break
  finally:
    progress.close()
    out.write("\n")
    out.flush()
  return done


def _main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if not 0 <= args.seed < 2**32:
    raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
  if not 0 <= args.num_preds <= generate.MAX_PREDS:
    raise UsageError(f"--num-preds must be in [0, {generate.MAX_PREDS}], got {args.num_preds}")
  validate.temperature(args.temperature)
  saved = checkpoint.load_checkpoint(args.checkpoint, best=args.best)
  model, params, vocab = model_of(saved, args.model, args.checkpoint)
  if args.prefix is None:
    args.prefix = run_prefix(saved.config, vocab)
  prefix, unknown = editions.prefix_for(saved.config, args.prefix, vocab)
  if unknown:
    print(f"{PROG}: warning: the vocabulary has no {', '.join(map(repr, unknown))}: the prefix "
          "reads each as <unk>", file=sys.stderr)
  # Signals only ask to stop: the piece on the device ends, and what was written stays.
  with stopping.watch(PROG, second="exit", notice=False) as stop:
    try:
      done = write_prediction(prefix, args.num_preds, params, model, vocab, args.temperature,
                              jax.random.PRNGKey(args.seed), stop)
    except BrokenPipeError:  # the reader left (| head): stop quietly, as a pipe's writer does
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      return 128 + signal.SIGPIPE
    if stop.requested and done < args.num_preds:
      raise Interrupted(f"{stop.name}: stopped after {done:,} of {args.num_preds:,} characters",
                        stop.signum)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv, prog=PROG)


if __name__ == "__main__":
  raise SystemExit(main())
