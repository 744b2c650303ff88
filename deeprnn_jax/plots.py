"""Perplexity curves, like d2l's Animator, saved as PNG and SVG."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # Files only; never needs a display.
import matplotlib.pyplot as plt  # noqa: E402

from deeprnn_jax.files import atomic_write_bytes  # noqa: E402


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
