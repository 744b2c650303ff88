"""Perplexity curves, like d2l's Animator, saved as PNG and SVG."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # Files only; never needs a display.
import matplotlib.pyplot as plt  # noqa: E402

from deeprnn_jax.base.files import atomic_write_bytes  # noqa: E402


def finite_points(rows: Sequence[dict], key: str) -> list[tuple[int, float]]:
  """``(epoch, rows[i][key])`` where that is a finite positive number: a missing (``None``),
  infinite or NaN value would leave a log-scale plot blank."""
  points = []
  for r in rows:
    value = r.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
      points.append((r["epoch"], value))
  return points


def plot_perplexity(rows: Sequence[dict], out_stem: str | Path, title: str = "") -> list[Path]:
  """Plots train (and validation, where measured) perplexity against epoch.

  Args:
    rows: metrics rows with ``epoch``, ``train_perplexity`` and ``valid_perplexity`` (or None);
      values that are not finite are left out.
    out_stem: path without suffix; ``.png`` and ``.svg`` are written.

  Returns:
    The written paths.
  """
  fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=150)
  train = finite_points(rows, "train_perplexity")
  if train:
    ax.plot(*zip(*train), label="train")
  valid = finite_points(rows, "valid_perplexity")
  if valid:
    ax.plot(*zip(*valid), "o-", markersize=2.5, label="valid")
  ax.set_xlabel("epoch")
  ax.set_ylabel("perplexity")
  ax.set_yscale("log")
  ax.grid(True, which="both", alpha=0.3)
  if train or valid:
    ax.legend()
  if title:
    ax.set_title(title, fontsize=9)
  return _save(fig, out_stem)


def _save(fig, out_stem: str | Path) -> list[Path]:
  fig.tight_layout()
  paths = []
  for suffix in (".png", ".svg"):
    path = Path(out_stem).with_suffix(suffix)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=suffix[1:])
    atomic_write_bytes(path, buffer.getvalue())
    paths.append(path)
  plt.close(fig)
  return paths


def plot_sweep(rows: Sequence[dict], out_stem: str | Path, title: str = "") -> list[Path]:
  """Plots every model's train perplexity (dots: validation) against epoch, one colour per
  learning rate; where the learning rate varies, beside it each model's last perplexity against
  its learning rate.

  Args:
    rows: metrics rows of several models (``model``, ``lr`` and the keys of
      :func:`plot_perplexity`).
    out_stem: path without suffix; ``.png`` and ``.svg`` are written.
  """
  by_model: dict[int, list[dict]] = {}
  for r in rows:
    by_model.setdefault(r["model"], []).append(r)
  lrs = sorted({r["lr"] for r in rows})
  colour = {lr: plt.cm.viridis(i / max(len(lrs) - 1, 1)) for i, lr in enumerate(lrs)}
  sweep = len(lrs) > 1
  fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(9 if sweep else 4.5, 3.2), dpi=150,
                           squeeze=False)
  ax = axes[0, 0]
  last = []  # (lr, the model's last finite perplexity)
  for k, model_rows in sorted(by_model.items()):
    lr = model_rows[0]["lr"]
    train = finite_points(model_rows, "train_perplexity")
    valid = finite_points(model_rows, "valid_perplexity")
    label = f"lr {lr:g}" if sweep and k == min(m for m, rs in by_model.items()
                                                if rs[0]["lr"] == lr) else None
    if train:
      ax.plot(*zip(*train), color=colour[lr], linewidth=0.8, alpha=0.8, label=label)
    if valid:
      ax.plot(*zip(*valid), "o", color=colour[lr], markersize=2)
    if valid or train:
      last.append((lr, (valid or train)[-1][1]))
  ax.set_xlabel("epoch")
  ax.set_ylabel("perplexity (dots: valid)")
  ax.set_yscale("log")
  ax.grid(True, which="both", alpha=0.3)
  if sweep:
    ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  if sweep:
    ax = axes[0, 1]
    if last:
      ax.plot(*zip(*last), "o", color="black", markersize=3)
    ax.set_xscale("log")
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.minorticks_off()
    ax.set_xlabel("learning rate")
    ax.set_ylabel("last perplexity (valid where measured)")
    ax.grid(True, alpha=0.3)
  return _save(fig, out_stem)
