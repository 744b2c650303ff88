"""``python -m deeprnn_jax.predict``: continue a prefix with a trained run's model."""

from __future__ import annotations

import argparse
from typing import Sequence

import jax
import jax.numpy as jnp

from deeprnn_jax import cli
from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import DataError, UsageError
from deeprnn_jax.model import generate, models
from deeprnn_jax.run import checkpoint
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


def _main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m deeprnn_jax.predict", description=__doc__)
  p.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoint.msgpack)")
  p.add_argument("--prefix", default=None,
                 help="text to continue (default: the prefix of the run's own lines, d2l's "
                      "'time traveller' for The Time Machine, else its corpus's first two words)")
  p.add_argument("--num-preds", type=int, default=50)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (d2l)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--model", type=int, default=None,
                 help="of a run that trained several models, which one (default: the best by "
                      "validation, else training, perplexity)")
  args = p.parse_args(argv)
  if not 0 <= args.seed < 2**32:
    raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
  saved = checkpoint.load_checkpoint(args.checkpoint)
  model, params, vocab = model_of(saved, args.model, args.checkpoint)
  if args.prefix is None:
    args.prefix = run_prefix(saved.config, vocab)
  print(generate.predict(args.prefix, args.num_preds, params, model, vocab, args.temperature,
                         jax.random.PRNGKey(args.seed)))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv, prog="deeprnn_jax.predict")


if __name__ == "__main__":
  raise SystemExit(main())
