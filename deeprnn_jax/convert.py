"""``python -m deeprnn_jax.convert``: PyTorch (d2l ``RNNModel``) weights <-> a run folder.

From PyTorch: a ``torch.save``-d state dict of d2l's ``RNNModel`` becomes a run folder
(``checkpoint.msgpack`` at epoch 0 and ``config.json``) that ``deeprnn_jax.predict --checkpoint``
reads and ``deeprnn_jax.train --out RUN_DIR --resume`` continues::

    python -m deeprnn_jax.convert --from-torch model.pt --cell lstm --num-layers 2 --out RUN_DIR

The vocabulary is rebuilt from ``--corpus`` exactly as training builds it, so it must be the text
(and cleaning) the PyTorch model was trained on; its size must equal the model's input width.

To PyTorch: a run folder's parameters become a state dict file that ``RNNModel.load_state_dict``
takes::

    python -m deeprnn_jax.convert --to-torch RUN_DIR --out model.pt

d2l 1.0's ``RNNLM`` (keys ``rnn.rnn.*``, a sorted vocabulary) converts with ``--preset d2l-en``,
which sets the run folder's settings to that run's (the flags override them); a run of the windows
pipeline converts back to that layout.

Torch is imported only here, and only when it is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

from deeprnn_jax import cli
from deeprnn_jax.base import files, presets
from deeprnn_jax.base.config import TrainConfig, parse_activation
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import training
from deeprnn_jax.model import cells, interop
from deeprnn_jax.run import checkpoint
from deeprnn_jax.run.rundir import RunDir
from deeprnn_jax.text import editions

PROG = "deeprnn_jax.convert"
_D = TrainConfig()


def _import_torch():
  try:
    import torch
  except ImportError:
    raise UsageError("converting PyTorch files needs torch; install it with `pip install torch`"
                     ) from None
  return torch


def _not_a_state_dict(e: BaseException) -> str:
  """Why torch's weights-only reader refused a file: the class it pickles (a whole ``nn.Module``
  saved), else that it is no state dict file. Torch's own advice, to load the file with
  ``weights_only=False``, runs whatever code the file holds: it is not passed on."""
  found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
  return (f"it pickles {found.group(1)}, not only weights" if found
          else "the file is not a PyTorch state dict")


def load_torch_state_dict(path: str | os.PathLike) -> dict:
  """A state dict from a ``torch.save``-d file, read with ``weights_only=True`` on the CPU."""
  path = Path(path)
  if not path.is_file():
    raise UsageError(f"no such file: {path}" if not path.exists() else f"not a file: {path}")
  torch = _import_torch()
  try:
    with warnings.catch_warnings():  # torch warns of unusual pickle protocols on stderr
      warnings.simplefilter("ignore")
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # Zip, pickle and weights-only refusals all mean "not a state dict file".
    raise UsageError(f"cannot read a PyTorch state dict from {path}: {_not_a_state_dict(e)} "
                     "(torch.save(net.state_dict(), path) writes one)") from None
  if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
    what = (f"a mapping with keys {', '.join(map(str, list(obj)[:5]))}"
            if isinstance(obj, Mapping) else f"a {type(obj).__name__}")
    raise UsageError(f"{path} holds {what}, not a state dict of tensors "
                     "(save one with torch.save(net.state_dict(), path))")
  return dict(obj)


def _check_out(path: Path, force: bool, is_dir: bool) -> None:
  """Refuses to replace an existing output unless ``force``."""
  if is_dir:
    RunDir(path)  # refuses a file, or a checkpoint, where the run folder should be
    taken = [p for p in (checkpoint.checkpoint_path(path), path / "config.json") if p.exists()]
    if taken and not force:
      raise UsageError(f"{taken[0]} exists; pass --force to overwrite it")
  else:
    if path.is_dir():
      raise UsageError(f"--out {path} is a folder; give a file name such as model.pt")
    if path.exists() and not force:
      raise UsageError(f"{path} exists; pass --force to overwrite it")


def from_torch(args: argparse.Namespace) -> int:
  cfg = presets.preset(
      args.preset,
      cell=args.cell, num_layers=args.num_layers, num_hiddens=1,  # Set below, from the shapes.
      activation=parse_activation(args.activation) if args.activation else _D.activation,
      corpus=args.corpus, clean=args.clean, max_tokens=args.max_tokens,
      batch_size=args.batch_size, num_steps=args.num_steps, use_random_iter=args.random_iter,
      optimizer=args.optimizer, lr=args.lr, clip=args.clip, num_epochs=args.num_epochs,
      seed=args.seed, pipeline=args.pipeline, num_train=args.num_train,
      num_val=args.num_val).validate()
  out = Path(args.out)
  _check_out(out, args.force, is_dir=True)
  state_dict = load_torch_state_dict(args.from_torch)
  state_dict = editions.edition(cfg).from_torch(state_dict, args.from_torch)
  params = interop.params_from_torch(state_dict, cfg.cell, cfg.num_layers)
  num_hiddens, vocab_size = params["W_hq"].shape
  cfg = dataclasses.replace(cfg, num_hiddens=num_hiddens)
  # The vocabulary exactly as training builds it: indices must mean the same characters.
  vocab = editions.load_text(cfg).vocab
  if len(vocab) != vocab_size:
    raise UsageError(f"the model's input width is {vocab_size} but corpus {cfg.corpus} "
                     f"(--clean {cfg.clean}) has {len(vocab)} tokens; pass the corpus and "
                     "cleaning the PyTorch model was trained with")
  opt_state = training.make_optimizer(cfg.lr, cfg.clip, cfg.optimizer,
                                      weight_decay=cfg.weight_decay, ema=cfg.ema).init(params)
  checkpoint.save_checkpoint(out, params=params, opt_state=opt_state, epoch=0, vocab=vocab,
                             config=cfg)
  files.atomic_write_json(out / "config.json", cfg.to_json())
  print(f"wrote {out}: {cfg.num_layers}-layer {cfg.cell} with {num_hiddens} hidden units, "
        f"vocabulary {vocab_size} (epoch 0)")
  return 0


def to_torch(args: argparse.Namespace) -> int:
  torch = _import_torch()
  out = Path(args.out)
  _check_out(out, args.force, is_dir=False)
  saved = checkpoint.load_checkpoint(args.to_torch, best=args.best)
  params = checkpoint.model_params(saved, args.model, args.to_torch)
  cfg = saved.config
  if cfg.embed_dim is not None:
    raise UsageError(f"{args.to_torch} reads an embedding (--embed-dim {cfg.embed_dim}); d2l's "
                     "RNNModel reads one-hot inputs and has no place for it")
  spec = interop.torch_cell(cfg.cell)
  if (spec.takes_activation and not isinstance(cfg.activation, str)
      and len(set(cfg.activation)) > 1):
    raise UsageError(f"{spec.torch_module} has one nonlinearity for all layers; this run uses "
                     f"{', '.join(cfg.activation)}")
  book = editions.edition(cfg)
  state_dict = book.to_torch(interop.params_to_torch(params, cfg.cell, cfg.num_layers))
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, buffer)
  files.atomic_write_bytes(out, buffer.getvalue())
  vocab_size = state_dict["linear.bias"].shape[0]
  layer = spec.torch_module
  extra = ""
  if spec.takes_activation:  # PyTorch's nonlinearity
    act = cfg.activation if isinstance(cfg.activation, str) else cfg.activation[0]
    extra = f", nonlinearity={act!r}"
  layer = f"{layer}({vocab_size}, {cfg.num_hiddens}, num_layers={cfg.num_layers}{extra})"
  print(f"wrote {out}: load it into {book.torch_model(layer, vocab_size, cfg)}")
  return 0


def _either(words: Sequence[str]) -> str:
  """``a, b or c``."""
  return " or ".join(filter(None, (", ".join(words[:-1]), words[-1])))


def parser(preset: str = "classic") -> argparse.ArgumentParser:
  """The flags, their defaults the settings of ``preset``
  (:data:`deeprnn_jax.base.presets.PRESETS`)."""
  defaults = presets.preset(preset)
  p = argparse.ArgumentParser(
      prog=f"python -m {PROG}",
      description="Convert d2l RNNModel weights between PyTorch state dicts and run folders.",
      formatter_class=cli.HelpFormatter)
  way = p.add_mutually_exclusive_group(required=True)
  way.add_argument("--from-torch", metavar="MODEL_PT",
                   help="a torch.save-d RNNModel state dict; --out is a run folder")
  way.add_argument("--to-torch", metavar="RUN_DIR",
                   help="a run folder (or its checkpoint.msgpack); --out is a .pt file")
  p.add_argument("--out", required=True, help="the run folder or .pt file to write")
  p.add_argument("--force", action="store_true", help="overwrite an existing output")
  cli.add_best_flag(p)
  p.add_argument("--model", type=int, default=None,
                 help="--to-torch of a run that trained several models: which one (default: the "
                      "best by validation, else training, perplexity)")
  p.add_argument("--preset", default="classic",
                 help=f"{' or '.join(presets.PRESETS)}: the run the PyTorch model is of "
                      "(--from-torch; d2l-en: d2l 1.0's RNNLM), the defaults of the flags below")
  m = p.add_argument_group("the PyTorch model (--from-torch)")
  fixed = preset != "classic"  # a preset names the layer; the classic edition's has every kind
  torch_cells = {name: s.torch_module for name, s in cells.CELLS.items() if s.torch_module}
  needed = "" if fixed else " (no default: --from-torch needs it)"
  m.add_argument("--cell", default=defaults.cell if fixed else None,
                 help=f"{_either(list(torch_cells))}: the RNNModel's "
                      f"{_either(list(torch_cells.values()))}{needed}")
  m.add_argument("--num-layers", type=int, default=defaults.num_layers if fixed else None,
                 help=f"its num_layers{needed}")
  m.add_argument("--activation", default=None,
                 help=f"nn.RNN's nonlinearity, tanh or relu (default {defaults.activation})")
  d = p.add_argument_group("the run folder's data and training settings (--from-torch)")
  d.add_argument("--corpus", default=defaults.corpus, help="the text the model was trained on")
  d.add_argument("--clean", default=defaults.clean, help="d2l (letters, lower case) or none")
  d.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                 help="-1 for the whole corpus")
  d.add_argument("--batch-size", type=int, default=defaults.batch_size,
                 help="rows of a minibatch, for the run folder's further training")
  d.add_argument("--num-steps", type=int, default=defaults.num_steps,
                 help="time steps of a minibatch's rows")
  d.add_argument("--random-iter", action="store_true",
                 help="random instead of sequential partitioning")
  d.add_argument("--pipeline", default=defaults.pipeline, help="classic or windows (d2l 1.0)")
  d.add_argument("--num-train", type=int, default=defaults.num_train,
                 help="windows pipeline: the first N windows train")
  d.add_argument("--num-val", type=int, default=defaults.num_val,
                 help="windows pipeline: the next N windows validate")
  d.add_argument("--optimizer", default=defaults.optimizer, help="sgd or adam")
  d.add_argument("--lr", type=float, default=defaults.lr,
                 help="learning rate of the run's further training")
  d.add_argument("--clip", type=float, default=defaults.clip, help="global gradient norm")
  d.add_argument("--num-epochs", type=int, default=defaults.num_epochs,
                 help="the epochs a resumed run trains to")
  d.add_argument("--seed", type=int, default=defaults.seed,
                 help="the run's seed: its data order when resumed")
  return p


def _main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if args.preset != "classic":
    if args.to_torch is not None:
      raise UsageError("--preset is for --from-torch; --to-torch reads the run folder's settings")
    args = parser(args.preset).parse_args(argv)
  if args.to_torch is not None:
    given = [f"--{n.replace('_', '-')}" for n in ("cell", "num_layers", "activation")
             if getattr(args, n) is not None]
    if given:
      raise UsageError(f"{given[0]} is for --from-torch; --to-torch reads it from the run folder")
    return to_torch(args)
  if args.best:
    raise UsageError("--best is for --to-torch: which of a run's models to convert")
  missing = [f"--{n.replace('_', '-')}" for n in ("cell", "num_layers")
             if getattr(args, n) is None]
  if missing:
    raise UsageError(f"--from-torch needs {' and '.join(missing)} (the RNNModel's layer)")
  return from_torch(args)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(_main, argv, prog=PROG, cpu_cores=False)


if __name__ == "__main__":
  raise SystemExit(main())
