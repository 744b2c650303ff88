"""``python -m deeprnn_jax.predict``: continue a prefix with a trained run's model."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn_jax import checkpoint, cli, generate, models
from deeprnn_jax.errors import UsageError


def load_model(run_dir, index: int | None = None):
  """``(model, params, vocab)`` from a run folder's checkpoint.

  Of a checkpoint holding several models (a seed or hyperparameter sweep), model ``index``; by
  default the best: the lowest validation perplexity, else training perplexity, among those that
  did not diverge.
  """
  saved = checkpoint.load_checkpoint(run_dir)
  model = models.from_config(saved.config, len(saved.vocab))
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  state_dict = saved.params
  if saved.models is not None:
    index = choose_model(saved.models, index, run_dir)
    state_dict = jax.tree_util.tree_map(lambda a: np.asarray(a)[index], saved.params)
  elif index not in (None, 0):
    raise UsageError(f"--model {index}: {run_dir} holds one model (model 0)")
  params = checkpoint.restore(template["params"], state_dict, f"checkpoint in {run_dir}")
  return model, jax.tree_util.tree_map(jnp.asarray, params), saved.vocab


def choose_model(described: list[dict], index: int | None, run_dir) -> int:
  """``index`` if the checkpoint holds it, else the best model that did not diverge."""
  if index is not None:
    if not 0 <= index < len(described):
      raise UsageError(f"--model {index}: {run_dir} holds models 0 to {len(described) - 1}")
    if described[index].get("diverged_epoch") is not None:
      print(f"note: model {index} diverged at epoch {described[index]['diverged_epoch']}; its "
            "parameters are those of the epoch before", file=sys.stderr)
    return index
  def score(d):
    value = d.get("valid_perplexity") or d.get("train_perplexity")
    return value if isinstance(value, (int, float)) else math.inf
  alive = [d for d in described if d.get("diverged_epoch") is None] or described
  return min(alive, key=score)["model"]


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
