"""Run checkpoints: one msgpack file, written atomically, that resumes a run exactly.

A checkpoint holds the parameters, the optimiser state, the data loader's RNG state, the number of
finished epochs, the vocabulary and the run's :class:`~deeprnn_jax.config.TrainConfig`. It lives at
``<run_dir>/checkpoint.msgpack``; writing goes to a temporary file renamed over the old one, so an
interrupted save never destroys the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np

from deeprnn_jax.config import MODEL_FIELDS, TrainConfig
from deeprnn_jax.errors import UsageError
from deeprnn_jax.files import atomic_write_bytes
from deeprnn_jax.vocab import Vocab

FILENAME = "checkpoint.msgpack"
FORMAT = 1


class CheckpointError(UsageError):
  """A checkpoint that is missing, corrupt, or of another configuration."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  params: dict
  opt_state: Any  # flax state dict; restore with flax.serialization.from_state_dict(template, ·)
  epoch: int
  vocab: Vocab
  config: TrainConfig
  data_rng_state: dict | None = None


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
  path = Path(run_dir)
  return path if path.suffix == ".msgpack" else path / FILENAME


def save_checkpoint(run_dir, *, params, opt_state, epoch: int, vocab: Vocab,
                    config: TrainConfig, data_rng_state: dict | None = None) -> Path:
  """Saves a checkpoint into ``run_dir`` (atomically) and returns its path."""
  to_host = lambda tree: flax.serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, tree))
  meta = {
      "format": FORMAT,
      "epoch": int(epoch),
      "vocab": vocab.to_json(),
      "config": config.to_json(),
      "data_rng_state": data_rng_state,
  }
  payload = flax.serialization.msgpack_serialize({
      "params": to_host(params),
      "opt_state": to_host(opt_state),
      "meta": json.dumps(meta),
  })
  path = checkpoint_path(run_dir)
  atomic_write_bytes(path, payload)
  return path


def load_checkpoint(run_dir) -> Checkpoint:
  """Reads a checkpoint, with one clear :class:`CheckpointError` for anything wrong with it."""
  path = checkpoint_path(run_dir)
  if not path.is_file():
    raise CheckpointError(f"no checkpoint at {path}")
  try:
    raw = flax.serialization.msgpack_restore(path.read_bytes())
    meta = json.loads(raw["meta"])
    if meta.get("format") != FORMAT:
      raise ValueError(f"unsupported format {meta.get('format')!r}")
    config = TrainConfig.from_json(meta["config"])
    vocab = Vocab.from_tokens_list(meta["vocab"])
    return Checkpoint(raw["params"], raw["opt_state"], int(meta["epoch"]), vocab, config,
                      meta.get("data_rng_state"))
  except Exception as e:  # msgpack, JSON, key and type errors all mean the same to the user.
    raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {e}") from None


def restore(template, state_dict, what: str = "checkpoint"):
  """``template``'s pytree filled from a saved state dict, checking structure and shapes."""
  try:
    tree = flax.serialization.from_state_dict(template, state_dict)
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{what} does not fit the model: {e}") from None
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(template),
                               jax.tree_util.tree_leaves(tree)):
    if np.shape(want) != np.shape(got):
      raise CheckpointError(f"{what} does not fit the model: {jax.tree_util.keystr(path)} has "
                            f"shape {np.shape(got)}, the model needs {np.shape(want)}")
  return tree


def check_compatible(saved: TrainConfig, requested: TrainConfig) -> None:
  """A resumed run must build the same model from the same data."""
  fields = MODEL_FIELDS + ("corpus", "clean", "max_tokens", "batch_size", "num_steps",
                           "use_random_iter", "valid_fraction", "optimizer")
  diffs = [f"{f}: checkpoint {getattr(saved, f)!r}, asked {getattr(requested, f)!r}"
           for f in fields if getattr(saved, f) != getattr(requested, f)]
  if diffs:
    raise CheckpointError("checkpoint is of another configuration (" + "; ".join(diffs) + ")")
