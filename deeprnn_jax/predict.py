"""``python -m deeprnn_jax.predict``: continue a prefix with a trained run's model."""

from __future__ import annotations

import argparse
from typing import Sequence

import jax
import jax.numpy as jnp

from deeprnn_jax import checkpoint, cli, generate, models
from deeprnn_jax.errors import UsageError


def load_model(run_dir, index: int | None = None):
  """``(model, params, vocab)`` from a run folder's checkpoint; of a checkpoint holding several
  models, model ``index`` (default: the best, :func:`checkpoint.model_params`)."""
  saved = checkpoint.load_checkpoint(run_dir)
  model = models.from_config(saved.config, len(saved.vocab))
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  params = checkpoint.restore(template["params"], checkpoint.model_params(saved, index, run_dir),
                              f"checkpoint in {run_dir}")
  return model, jax.tree_util.tree_map(jnp.asarray, params), saved.vocab


def _main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m deeprnn_jax.predict", description=__doc__)
  p.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoint.msgpack)")
  p.add_argument("--prefix", default="time traveller")
  p.add_argument("--num-preds", type=int, default=50)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (d2l)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--model", type=int, default=None,
                 help="of a run that trained several models, which one (default: the best by "
                      "validation, else training, perplexity)")
  args = p.parse_args(argv)
  if not 0 <= args.seed < 2**32:
    raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
  model, params, vocab = load_model(args.checkpoint, args.model)
  print(generate.predict(args.prefix, args.num_preds, params, model, vocab, args.temperature,
                         jax.random.PRNGKey(args.seed)))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv, prog="deeprnn_jax.predict")


if __name__ == "__main__":
  raise SystemExit(main())
