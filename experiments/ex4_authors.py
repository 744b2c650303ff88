"""Exercise 4: texts by different authors, Wells and Shakespeare, apart and mixed.

"Would you want to combine sources of different authors when modeling text?" Three models are
trained through ``runs.train_run``: one on The Time Machine (Wells), one on Tiny Shakespeare, one
on both. Both corpora are d2l-cleaned (lower-case letters and spaces: the same 28 tokens) and cut
to their first ``--chars`` characters, of which the last 10 % is held out. The mixed model trains
on the two training parts together; every model is then evaluated on both held-out tails (a
cross-evaluation matrix of validation perplexities, mean ± std over seeds), and each writes a
sample.

  python experiments/ex4_authors.py --quick    # seconds: tiny models, 1 epoch, 1 seed
  python experiments/ex4_authors.py            # 3 seeds, 12 runs, about 9 min on 2 cores
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import _common
import jax

from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import training
from deeprnn_jax.model import generate, models
from deeprnn_jax.run import checkpoint
from deeprnn_jax.text import data

AUTHORS = {"Wells": "timemachine.txt", "Shakespeare": "tinyshakespeare.txt"}
PREFIXES = {"Wells": "the time traveller", "Shakespeare": "my lord ", "mixed": "the king "}


def slug(name: str) -> str:
  return name.lower().replace(", ", "-").replace(" ", "-")


def cleaned(corpus: str, chars: int) -> str:
  """The first ``chars`` characters of a corpus after d2l's cleaning (lines joined as d2l does:
  with nothing in between)."""
  from deeprnn_jax.text.corpora import resolve_corpus

  text = "".join(data.read_lines(resolve_corpus(corpus), clean="d2l"))
  if len(text) < chars:
    raise UsageError(f"{corpus} has {len(text):,} characters after cleaning; --chars asks "
                     f"for {chars:,}")
  return text[:chars]


def write_texts(folder: Path, chars: int) -> tuple[dict, dict]:
  """Writes ``<name>.txt`` for each author and for the mix; returns the training files and the
  held-out tails (as strings)."""
  folder.mkdir(parents=True, exist_ok=True)
  files, tails, train_parts = {}, {}, []
  for name, corpus in AUTHORS.items():
    text = cleaned(corpus, chars)
    cut = len(text) - round(0.1 * len(text))  # as data.split_corpus splits
    files[name] = folder / f"{name.lower()}.txt"
    files[name].write_text(text + "\n")
    tails[name] = text[cut:]
    train_parts.append(text[:cut])
  files["mixed"] = folder / "mixed.txt"
  files["mixed"].write_text("\n".join(train_parts) + "\n")  # one line per author, no tail
  return files, tails


def held_out_perplexity(run_dir: Path, tail: str) -> float:
  """Perplexity of a trained run's model on ``tail``, read as one stream from a zero state."""
  saved = checkpoint.load_checkpoint(run_dir)
  model = models.from_config(saved.config, len(saved.vocab))
  return training.evaluate(model, saved.params, saved.vocab[list(tail)])


def sample(run_dir: Path, prefix: str, num_preds: int = 160) -> str:
  saved = checkpoint.load_checkpoint(run_dir)
  model = models.from_config(saved.config, len(saved.vocab))
  return generate.predict(prefix, num_preds, saved.params, model, saved.vocab, temperature=0.6,
                          key=jax.random.PRNGKey(0))


def plot(matrix: dict, trained: list[str], authors: list[str], path) -> None:
  """The cross-evaluation matrix as a heat map, mean over seeds in each cell."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  values = np.array([[np.mean(matrix[t, a]) for a in authors] for t in trained])
  fig, ax = plt.subplots(figsize=(6.5, 3.4))
  ax.imshow(values, cmap="viridis_r", aspect="auto")
  for (i, j), v in np.ndenumerate(values):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v > values.mean() else "k")
  ax.set(xticks=range(len(authors)), xticklabels=authors, xlabel="held-out tail of",
         yticks=range(len(trained)), yticklabels=[f"trained on {t}" for t in trained],
         title="validation perplexity")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = _common.parser(__doc__)
  p.add_argument("--chars", type=int, default=None,
                 help="characters of each corpus (default 50000; quick: 3000)")
  p.add_argument("--num-epochs", type=int, default=None, help="default 6 (quick: 1)")
  args = p.parse_args(argv)
  seeds = _common.check_seeds(args.seeds, 1 if args.quick else 3)
  chars = args.chars or (3000 if args.quick else 50_000)
  if chars < 1000:
    raise UsageError(f"--chars must be at least 1000, got {chars}")
  base = TrainConfig(num_hiddens=16 if args.quick else 256, num_layers=2, cell="lstm",
                     dropout=0.2, batch_size=8 if args.quick else 32, num_steps=35 if args.quick
                     else 64, optimizer="adam", lr=2e-3, clip=1.0,
                     num_epochs=args.num_epochs or (1 if args.quick else 6), max_tokens=-1,
                     clean="d2l").validate()
  t0 = time.perf_counter()
  folder = _common.runs_folder(args, "ex4_authors")
  files, tails = write_texts(folder / "texts", chars)

  # The mixed text is twice as long: at equal epochs the mixed model takes twice the steps, so it
  # is also trained for half the epochs, as many steps as each author's model.
  trained = {name: (path, base.num_epochs) for name, path in files.items()}
  trained["mixed, equal steps"] = (files["mixed"], max(1, base.num_epochs // 2))
  matrix = {}  # (trained on, evaluated on) -> [perplexity per seed]
  for seed in range(seeds):
    for name, (path, epochs) in trained.items():
      config = dataclasses.replace(base, corpus=str(path.resolve()), seed=seed, num_epochs=epochs,
                                   valid_fraction=0.1 if name in AUTHORS else 0.0)
      run_dir = folder / f"{slug(name)}-seed{seed}"
      _common.run_config(config, run_dir, log_every=epochs)
      for author, tail in tails.items():
        matrix.setdefault((name, author), []).append(held_out_perplexity(run_dir, tail))
      print(f"seed {seed}, trained on {name}: " + ", ".join(
          f"{a} {matrix[name, a][-1]:.2f}" for a in tails), flush=True)

  rows = [[f"trained on {name}"] + [_common.mean_std(matrix[name, a]) for a in tails]
          for name in trained]
  report = _common.table(["", *(f"valid {a}" for a in tails)], rows)
  samples = "\n\n".join(f"**{name}** (`{PREFIXES[name]}` …):\n\n> "
                        + sample(folder / f"{slug(name)}-seed0", PREFIXES[name])
                        for name in files)
  print(report)
  print(samples)
  out = _common.results_path(args, "ex4_authors")
  if out is not None:
    png = out.with_name(out.stem + ".png")
    plot(matrix, list(trained), list(tails), png)
    body = (f"Each corpus is cut to its first {chars:,} characters after d2l's cleaning (so the "
            f"two share one 28-token vocabulary); the last 10 % of each is held out. The mixed "
            f"model trains on both training parts ({2 * (chars - round(0.1 * chars)):,} "
            f"characters, twice the others', so at equal epochs it takes twice the steps; "
            f"\"mixed, equal steps\" is trained for half the epochs, as many steps as each "
            f"author's model). "
            f"Model: {base.num_layers}×{base.num_hiddens} LSTM, dropout {base.dropout}, Adam lr "
            f"{base.lr:g}, clip {base.clip:g}, batch {base.batch_size}×{base.num_steps}, "
            f"{base.num_epochs} epochs, sequential partitioning. Each cell is the validation "
            f"perplexity of the model of the row on the held-out tail of the column, read as one "
            f"stream from a zero state; mean ± std over {seeds} seeds.\n\n## Cross-evaluation"
            f"\n\n{report}\n\n![cross-evaluation]({png.name})\n\n## Samples\n\n"
            f"Seed 0's models, sampled at temperature 0.6:\n\n"
            f"{samples}\n")
    _common.write_results(out, "Exercise 4: Wells and Shakespeare, apart and mixed", body,
                          time.perf_counter() - t0)
  return 0


if __name__ == "__main__":
  _common.main(main, "ex4_authors")
