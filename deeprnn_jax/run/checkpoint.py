"""Run checkpoints: one msgpack file each, written atomically, that resumes a run exactly.

A checkpoint holds the parameters, the optimiser state, the data loader's RNG state, the number of
finished epochs, the vocabulary and the run's :class:`~deeprnn_jax.base.config.TrainConfig`. The
newest lives at ``<run_dir>/checkpoint.msgpack``; with ``keep > 1`` the older ones kept are
``checkpoint-<epoch>.msgpack`` beside it. Writing goes to a temporary file renamed over the old one,
so an interrupted save never destroys the last good checkpoint, and only finite parameters are
ever saved by a run. Reading a folder falls back from a corrupt (or non-finite) newest file to the
older ones, with a warning.

Why not ``orbax-checkpoint`` (docs/runs.md): one small file that ``msgpack`` and NumPy alone can
read, against a folder of a dozen files per checkpoint, tensorstore and ~90 MB of dependencies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import flax.serialization
import jax
import numpy as np

from deeprnn_jax.base.config import MODEL_FIELDS, SWEPT, TrainConfig
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.base.files import atomic_write_bytes, fsync_dir
from deeprnn_jax.text.vocab import Vocab

FILENAME = "checkpoint.msgpack"
# The best model by validation (deeprnn_jax.run.best), in the same format; never resumed from.
BEST = "best.msgpack"
FORMAT = 1
_OLDER = re.compile(r"checkpoint-(\d+)\.msgpack")
# What a resumed run must share with its checkpoint: the model, the data it reads, and what
# shapes its optimiser's state.
RESUME_FIELDS = MODEL_FIELDS + ("corpus", "clean", "max_tokens", "batch_size", "num_steps",
                                "use_random_iter", "valid_fraction", "optimizer", "ema",
                                "lr_schedule", "warmup_epochs", "pipeline", "num_train",
                                "num_val")


class CheckpointError(UsageError):
  """A checkpoint that is missing, corrupt, or of another configuration."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  params: dict
  opt_state: Any  # flax state dict; restore with flax.serialization.from_state_dict(template, ·)
  epoch: int
  vocab: Vocab
  config: TrainConfig
  data_rng_state: dict | list | None = None  # a list: one per model
  path: Path | None = None  # the file it was read from
  # Where the file holds several models trained together (every array with a leading [K] axis):
  # each one's seed, learning rate, clip norm, perplexities and the epoch it diverged at.
  models: list[dict] | None = None
  # How the run that saved it saves and records (runs.KEPT_OPTIONS: --checkpoint-every, ...),
  # for --resume to continue alike; None in files saved without them.
  options: dict | None = None
  # A best model's file (BEST): each model's best validation perplexity and its epoch,
  # {"valid_perplexity": [...], "epochs": [...]}; None in a checkpoint.
  best: dict | None = None


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
  """The newest checkpoint's path: ``run_dir/checkpoint.msgpack`` (``run_dir`` itself if it
  names a ``.msgpack`` file)."""
  path = Path(run_dir)
  return path if path.suffix == ".msgpack" else path / FILENAME


def older_path(run_dir: str | os.PathLike, epoch: int) -> Path:
  return Path(run_dir) / f"checkpoint-{int(epoch)}.msgpack"


def checkpoint_files(run_dir: str | os.PathLike) -> list[Path]:
  """A folder's checkpoint files, newest first: ``checkpoint.msgpack``, then the older ones
  kept, by epoch."""
  run_dir = Path(run_dir)
  if not run_dir.is_dir():
    return []
  older = sorted(((int(m.group(1)), p) for p in run_dir.iterdir()
                  if (m := _OLDER.fullmatch(p.name))), reverse=True)
  newest = [run_dir / FILENAME] if (run_dir / FILENAME).is_file() else []
  return newest + [p for _, p in older]


def _to_host(tree) -> dict:
  return flax.serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, tree))


def save_checkpoint(run_dir, *, params, opt_state, epoch: int, vocab: Vocab,
                    config: TrainConfig, data_rng_state: dict | list | None = None,
                    keep: int = 1, models: list[dict] | None = None,
                    options: dict | None = None, best: dict | None = None) -> Path:
  """Saves a checkpoint into ``run_dir`` (atomically) and returns its path.

  With ``keep > 1`` the checkpoint it replaces stays as ``checkpoint-<epoch>.msgpack`` (a hard
  link: no copy), and only the newest ``keep`` checkpoints are left in the folder; a newest file
  that cannot be read is replaced, not kept. At every moment the folder holds a readable
  checkpoint if it held one before. ``models`` describes the models of a file that holds several
  (:attr:`Checkpoint.models`); ``options``, the run's options (:attr:`Checkpoint.options`);
  ``best``, a best model's record (:attr:`Checkpoint.best`).
  """
  meta = {
      "format": FORMAT,
      "epoch": int(epoch),
      "vocab": vocab.to_json(),
      "config": config.to_json(),
      "data_rng_state": data_rng_state,
  }
  if models is not None:
    meta["models"] = models
  if options is not None:
    meta["options"] = options
  if best is not None:
    meta["best"] = best
  payload = flax.serialization.msgpack_serialize({
      "params": _to_host(params),
      "opt_state": _to_host(opt_state),
      "meta": json.dumps(meta),
  })
  path = checkpoint_path(run_dir)
  in_folder = path.name == FILENAME
  if in_folder and keep > 1 and path.is_file():
    previous = _epoch_of(path)
    if previous is not None and previous != int(epoch):
      _link_or_copy(path, older_path(path.parent, previous))
  atomic_write_bytes(path, payload)
  if in_folder:
    for old in checkpoint_files(path.parent)[max(keep, 1):]:
      old.unlink(missing_ok=True)
  return path


def _epoch_of(path: Path) -> int | None:
  try:
    return int(json.loads(flax.serialization.msgpack_restore(path.read_bytes())["meta"])["epoch"])
  except Exception:  # unreadable: not worth keeping
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
  """``dst`` becomes the same file as ``src``, atomically (a hard link, or a copy where links
  are not supported)."""
  tmp = dst.with_name(f".{dst.name}.link.tmp")
  tmp.unlink(missing_ok=True)
  try:
    os.link(src, tmp)
  except OSError:
    shutil.copyfile(src, tmp)
  os.replace(tmp, dst)
  fsync_dir(dst.parent)


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(a).dtype, np.inexact))


def read_checkpoint_file(path: str | os.PathLike) -> Checkpoint:
  """One checkpoint file, with one clear :class:`CheckpointError` for anything wrong with it,
  non-finite parameters included (a run never saves them; a file from elsewhere may)."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"no checkpoint at {path}")
  try:
    raw = flax.serialization.msgpack_restore(path.read_bytes())
    meta = json.loads(raw["meta"])
    if meta.get("format") != FORMAT:
      raise ValueError(f"unsupported format {meta.get('format')!r}")
    config = TrainConfig.from_json(meta["config"])
    vocab = Vocab.from_tokens_list(meta["vocab"])
    saved = Checkpoint(raw["params"], raw["opt_state"], int(meta["epoch"]), vocab, config,
                       meta.get("data_rng_state"), path, meta.get("models"),
                       meta.get("options"), meta.get("best"))
  except Exception as e:  # msgpack, JSON, key and type errors all mean the same to the user.
    raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {e}") from None
  if not _all_finite((saved.params, saved.opt_state)):
    raise CheckpointError(f"checkpoint {path} holds non-finite parameters (its run diverged)")
  return saved


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def load_checkpoint(run_dir, warn: Callable[[str], None] | None = _warn,
                    best: bool = False) -> Checkpoint:
  """The newest usable checkpoint of a run folder (or the ``.msgpack`` file ``run_dir`` names);
  with ``best``, the folder's best model by validation (:data:`BEST`) instead.

  Where the newest file is corrupt or holds non-finite values, the next older one kept
  (``--keep-checkpoints``) is read instead, and ``warn`` (by default a line on stderr) is told
  why. Raises :class:`CheckpointError` where none is usable.
  """
  path = Path(run_dir)
  if best:
    return load_best(path)
  candidates = [path] if path.suffix == ".msgpack" else checkpoint_files(path)
  if not candidates:
    raise CheckpointError(f"no checkpoint at {checkpoint_path(path)}")
  problems = []
  for candidate in candidates:
    try:
      saved = read_checkpoint_file(candidate)
    except CheckpointError as e:
      problems.append(str(e))
      continue
    if warn is not None:
      for problem in problems:
        warn(f"{problem}; using {candidate.name} (epoch {saved.epoch}) instead")
    return saved
  raise CheckpointError("; ".join(problems))


def load_best(run_dir) -> Checkpoint:
  """A run folder's best model by validation (:data:`BEST`), with one clear
  :class:`CheckpointError` where it has none."""
  path = Path(run_dir)
  if path.suffix == ".msgpack":
    raise CheckpointError(f"--best takes a run folder, not a file ({path})")
  if not (path / BEST).is_file():
    why = ("it is not a run folder" if not checkpoint_files(path) else
           "its run had no held-out text to validate on (--valid-fraction), or has not "
           "validated yet")
    raise CheckpointError(f"no best model in {path} ({why})")
  return read_checkpoint_file(path / BEST)


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


def config_differences(a: TrainConfig, b: TrainConfig, a_name: str, b_name: str) -> list[str]:
  """Where ``a`` and ``b`` would train another model or read other data."""
  return [f"{f}: {a_name} {getattr(a, f)!r}, {b_name} {getattr(b, f)!r}"
          for f in RESUME_FIELDS if getattr(a, f) != getattr(b, f)]


def check_compatible(saved: TrainConfig, requested: TrainConfig) -> None:
  """A resumed run must build the same model from the same data."""
  diffs = config_differences(saved, requested, "checkpoint", "asked")
  if diffs:
    raise CheckpointError("checkpoint is of another configuration (" + "; ".join(diffs) + ")")
  if saved.seed != requested.seed:  # its parameters and data order came from the seed
    raise CheckpointError(f"--seed {requested.seed} cannot apply to a resumed run: its model was "
                          f"initialised with seed {saved.seed}; start another --out for another "
                          "seed")


MEMBER_FIELDS = ("seed", *SWEPT)  # what tells the models of one file apart


def check_members(saved: list[dict] | None, requested: list[dict] | None) -> None:
  """A run of several models resumes from a checkpoint of the same models, a single run from a
  single model's."""
  count = lambda models: 1 if models is None else len(models)
  if (saved is None) != (requested is None) or count(saved) != count(requested):
    raise CheckpointError(f"checkpoint holds {count(saved)} model(s), the run asks for "
                          f"{count(requested)}")
  if requested is None:
    return
  for k, (a, b) in enumerate(zip(saved, requested)):
    # a field the file does not name is not checked (weight_decay: its models share the config's)
    diffs = [f"{f} {a.get(f)!r} in the checkpoint, {b[f]!r} asked" for f in MEMBER_FIELDS
             if a.get(f, b[f]) != b[f]]
    if diffs:
      raise CheckpointError(f"checkpoint's model {k} differs: " + ", ".join(diffs))


def averaged(state_dict) -> dict | None:
  """The moving average of the parameters that a saved optimiser state keeps
  (:func:`deeprnn_jax.fit.training.average_params`: its ``ema`` field), or ``None``."""
  if not isinstance(state_dict, dict):
    return None
  if "ema" in state_dict:
    return state_dict["ema"]
  found = [a for a in map(averaged, state_dict.values()) if a is not None]
  return found[0] if found else None


def evaluated(saved: Checkpoint) -> dict:
  """The parameters the run evaluated and predicted with: its moving average where it kept one,
  else its parameters (a state dict, of every model the file holds)."""
  average = averaged(saved.opt_state)
  return saved.params if average is None else average


def model_params(saved: Checkpoint, index: int | None, where) -> dict:
  """One model's parameters as its run evaluated them (:func:`evaluated`), a state dict. Of a
  checkpoint holding several (:attr:`models`), model ``index``, by default the best: the lowest
  validation perplexity, else training perplexity, among those that did not diverge. Raises
  :class:`UsageError` for an index the file does not hold."""
  params = evaluated(saved)
  if saved.models is None:
    if index not in (None, 0):
      raise UsageError(f"--model {index}: {where} holds one model (model 0)")
    return params
  index = choose_model(saved.models, index, where)
  return jax.tree_util.tree_map(lambda a: np.asarray(a)[index], params)


def choose_model(described: list[dict], index: int | None, where) -> int:
  """``index`` if the checkpoint holds it, else the best model that did not diverge."""
  if index is not None:
    if not 0 <= index < len(described):
      raise UsageError(f"--model {index}: {where} holds models 0 to {len(described) - 1}")
    if described[index].get("diverged_epoch") is not None:
      epoch = described[index]["diverged_epoch"]
      _warn(f"model {index} diverged at epoch {epoch}; its parameters are epoch {epoch - 1}'s, "
            f"or epoch {epoch}'s where only its validation perplexity was not finite")
    return index

  def score(d):
    value = d.get("valid_perplexity") or d.get("train_perplexity")
    return value if isinstance(value, (int, float)) else math.inf

  alive = [d for d in described if d.get("diverged_epoch") is None] or described
  return min(alive, key=score)["model"]
