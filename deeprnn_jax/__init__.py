"""deeprnn-jax: d2l's deep recurrent neural networks chapter in JAX and Flax.

The package is layered, each layer importing only those below it (tests/test_layering.py)::

    base/    settings, their checks, errors, crash-safe files,    plain Python, no JAX
             the usable cores
    text/    corpora, vocabulary, d2l's two editions              NumPy (editions: + model, fit)
    model/   cell equations, recurrence, cuDNN, oneDNN, RNNLM,    JAX and Flax; no text
             generation, PyTorch interop
    fit/     optimiser, step and epoch, epoch dispatch, devices   no text
    run/     runs, sweeps, reporting, run folder, checkpoints,
             plots, signals, processes
    train, predict, convert, cli                                  the commands

The public API is importable from here; each name loads its module on first use, so that
``import deeprnn_jax`` (and the settings) import no JAX::

    from deeprnn_jax import RNNLM, TrainConfig, make_optimizer, make_train_epoch
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it (``module:attribute`` where the names differ: the command
# module ``deeprnn_jax.predict`` holds the name ``predict``, so d2l's name is used here)
_API = {
  "TrainConfig": "base.config", "Sweep": "base.config", "preset": "base.presets",
  "UsageError": "base.errors", "DataError": "base.errors", "Diverged": "base.errors",
  "Vocab": "text.vocab", "load_corpus": "text.data", "SeqDataLoader": "text.data",
  "load_data_time_machine": "text.data", "edition": "text.editions",
  "RNNLM": "model.models", "from_config": "model.models", "CELLS": "model.cells",
  "predict_ch8": "model.generate:predict", "generate_tokens": "model.generate",
  "make_optimizer": "fit.training", "init_train_state": "fit.training",
  "make_train_step": "fit.training", "make_train_epoch": "fit.training",
  "make_models_epoch": "fit.training", "evaluate": "fit.training",
  "perplexity": "fit.training", "TrainState": "fit.training",
  "train_run": "run.runs", "RunOptions": "run.runs", "sweep_run": "run.sweeps",
  "load_checkpoint": "run.checkpoint",
}

__all__ = sorted(_API)


def __getattr__(name: str):
  if name not in _API:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module, _, attribute = _API[name].partition(":")
  value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute or name)
  globals()[name] = value  # once loaded, a plain attribute
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_API))
