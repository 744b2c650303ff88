"""Exercise 2: RNN (tanh, relu) against GRU against LSTM, 1 to 3 layers deep.

Two comparisons on the same text (the first characters of The Time Machine, its last 10 % held
out), each configuration trained from several seeds through ``runs.train_run``:

* at equal epochs and equal width: every cell with 1, 2 and 3 layers of ``--hiddens`` units;
* at equal parameter count: every cell with 2 layers, its width chosen so that its parameters
  match the 2-layer LSTM's.

The tables give train and validation perplexity after the last epoch (mean ± std over seeds),
training tokens/s, parameters and wall time per run.

  python experiments/ex2_cells.py --quick     # seconds: 1 layer, tiny models, 2 epochs, 1 seed
  python experiments/ex2_cells.py             # 3 seeds, 45 runs, about 6 min on 2 cores
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import _common
import jax
import numpy as np

from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.model.models import from_config

CELLS = {"RNN (tanh)": dict(cell="rnn", activation="tanh"),
         "RNN (relu)": dict(cell="rnn", activation="relu"),
         "GRU": dict(cell="gru"), "LSTM": dict(cell="lstm")}


def num_params(config: TrainConfig, vocab_size: int = 28) -> int:
  """The model's parameter count, from shapes alone (nothing is computed)."""
  model = from_config(config, vocab_size)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def width_for(config: TrainConfig, target: int) -> int:
  """The width whose parameter count is nearest ``target`` (parameters grow with width)."""
  lo, hi = 1, 4096
  while lo < hi:
    mid = (lo + hi) // 2
    if num_params(dataclasses.replace(config, num_hiddens=mid)) < target:
      lo = mid + 1
    else:
      hi = mid
  below = dataclasses.replace(config, num_hiddens=max(1, lo - 1))
  return lo if abs(num_params(dataclasses.replace(config, num_hiddens=lo)) - target) <= abs(
      num_params(below) - target) else lo - 1


def train_seeds(name: str, config: TrainConfig, seeds: int, folder) -> dict:
  results = []
  for seed in range(seeds):
    c = dataclasses.replace(config, seed=seed)
    results.append(_common.run_config(c, folder / f"{name}-seed{seed}",
                                      log_every=config.num_epochs))
  row = {"name": name, "config": config, "params": num_params(config)}
  for key in ("train_perplexity", "valid_perplexity", "tokens_per_sec", "wall_seconds"):
    row[key] = [r[key] for r in results]
  print(f"{name}: valid perplexity {_common.mean_std(row['valid_perplexity'])}", flush=True)
  return row


def table_of(rows: list[dict]) -> str:
  return _common.table(
      ["model", "layers × width", "parameters", "train ppl", "valid ppl", "tokens/s",
       "s per run"],
      [[r["name"].split(" ×")[0], f"{r['config'].num_layers} × {r['config'].num_hiddens}",
        f"{r['params']:,}", _common.mean_std(r["train_perplexity"]),
        _common.mean_std(r["valid_perplexity"]), f"{statistics.mean(r['tokens_per_sec']):,.0f}",
        f"{statistics.mean(r['wall_seconds']):.1f}"] for r in rows])


def plot(equal_epochs: list[dict], equal_params: list[dict], path) -> None:
  """Validation perplexity, mean ± std over seeds: by depth at equal width, and at equal
  parameters."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True,
                           gridspec_kw={"width_ratios": [3, 1.3]})
  width = 0.8 / len(CELLS)
  layers = sorted({r["config"].num_layers for r in equal_epochs})
  for i, name in enumerate(CELLS):
    for ax, rows, xs in ((axes[0], equal_epochs, layers), (axes[1], equal_params, [0])):
      mine = [r for r in rows if r["name"].startswith(name)]
      ax.bar([x + (i - 1.5) * width for x in xs],
             [statistics.mean(r["valid_perplexity"]) for r in mine], width,
             yerr=[statistics.stdev(r["valid_perplexity"]) if len(r["valid_perplexity"]) > 1
                   else 0 for r in mine], color=f"C{i}", label=name if ax is axes[0] else None)
  axes[0].set(xticks=layers, xticklabels=[f"{L} layer{'s' * (L > 1)}" for L in layers],
              ylabel="validation perplexity", title="equal width")
  axes[1].set(xticks=[0], xticklabels=["2 layers"], title="equal parameters")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = _common.parser(__doc__)
  p.add_argument("--hiddens", type=int, default=None, help="width at equal epochs (default 128)")
  p.add_argument("--num-epochs", type=int, default=None, help="default 8 (quick: 2)")
  p.add_argument("--max-tokens", type=int, default=None,
                 help="characters of The Time Machine (default 20000)")
  args = p.parse_args(argv)
  seeds = _common.check_seeds(args.seeds, 1 if args.quick else 3)
  hiddens = args.hiddens or (16 if args.quick else 128)
  base = TrainConfig(num_hiddens=hiddens, num_epochs=args.num_epochs or (2 if args.quick else 8),
                     max_tokens=args.max_tokens or (3000 if args.quick else 20_000),
                     batch_size=8 if args.quick else 32, num_steps=35, optimizer="adam",
                     lr=5e-3, clip=1.0, valid_fraction=0.1).validate()
  layers = (1,) if args.quick else (1, 2, 3)
  t0 = time.perf_counter()
  folder = _common.runs_folder(args, "ex2_cells")

  equal_epochs = [train_seeds(f"{name} ×{L}", TrainConfig(**dict(
      dataclasses.asdict(base), **cell, num_layers=L)), seeds, folder)
                  for L in layers for name, cell in CELLS.items()]
  depth = layers[-1] if args.quick else 2
  lstm = next(r for r in equal_epochs if r["config"].cell == "lstm"
              and r["config"].num_layers == depth)
  equal_params = []
  for name, cell in CELLS.items():
    config = TrainConfig(**dict(dataclasses.asdict(base), **cell, num_layers=depth))
    if cell["cell"] == "lstm":
      equal_params.append(lstm)
      continue
    config = dataclasses.replace(config, num_hiddens=width_for(config, lstm["params"]))
    equal_params.append(train_seeds(f"{name} ×{depth} equal-params", config, seeds, folder))

  best = lambda rows: min(rows, key=lambda r: statistics.mean(r["valid_perplexity"]))
  first = table_of(equal_epochs)
  second = table_of(equal_params)
  lines = [f"Lowest validation perplexity at equal width: {best(equal_epochs)['name']}; "
           f"at equal parameters: {best(equal_params)['name'].split(' equal')[0]}."]
  print(f"## Equal epochs, width {hiddens}\n\n{first}\n\n## Equal parameters ({depth} layers, "
        f"about {lstm['params']:,})\n\n{second}\n\n{lines[0]}")
  out = _common.results_path(args, "ex2_cells")
  if out is not None:
    png = out.with_name(out.stem + ".png")
    plot(equal_epochs, equal_params, png)
    body = (f"The Time Machine's first {base.max_tokens:,} characters (d2l cleaning), the last "
            f"10 % held out; {base.num_epochs} epochs of Adam (lr {base.lr:g}, clip {base.clip:g})"
            f", batch {base.batch_size}×{base.num_steps}, sequential partitioning; mean ± std "
            f"over {seeds} seeds; perplexities after the last epoch. Tokens/s is the training "
            f"throughput of the epochs after the first (compilation excluded); s per run includes "
            f"compilation and data loading.\n\n## Equal epochs, width {hiddens}\n\n{first}\n\n"
            f"## Equal parameters ({depth} layers, about the {depth}-layer LSTM's "
            f"{lstm['params']:,})\n\n{second}\n\n{lines[0]}\n\n![validation perplexity]"
            f"({png.name})\n")
    _common.write_results(out, "Exercise 2: RNN, GRU and LSTM, 1 to 3 layers", body,
                          time.perf_counter() - t0)
  return 0


if __name__ == "__main__":
  _common.main(main, "ex2_cells")
