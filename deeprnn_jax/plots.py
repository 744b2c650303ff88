"""Perplexity curves, like d2l's Animator, saved as PNG and SVG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # Files only; never needs a display.
import matplotlib.pyplot as plt  # noqa: E402

from deeprnn_jax.files import atomic_write_bytes  # noqa: E402


def plot_perplexity(rows: Sequence[dict], out_stem: str | Path, title: str = "") -> list[Path]:
  """Plots train (and validation, where measured) perplexity against epoch.

  Args:
    rows: metrics rows with ``epoch``, ``train_perplexity`` and ``valid_perplexity`` (or None).
    out_stem: path without suffix; ``.png`` and ``.svg`` are written.

  Returns:
    The written paths.
  """
  fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=150)
  epochs = [r["epoch"] for r in rows]
  ax.plot(epochs, [r["train_perplexity"] for r in rows], label="train")
  valid = [(r["epoch"], r["valid_perplexity"]) for r in rows if r.get("valid_perplexity") is not None]
  if valid:
    ax.plot(*zip(*valid), "o-", markersize=2.5, label="valid")
  ax.set_xlabel("epoch")
  ax.set_ylabel("perplexity")
  ax.set_yscale("log")
  ax.grid(True, which="both", alpha=0.3)
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
