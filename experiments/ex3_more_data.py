"""Exercise 3: how low validation perplexity goes with more training data.

Trains LSTMs on three corpora of growing size, each with its contiguous tail held out
(``TrainConfig.valid_fraction``): the chapter's 10,000 characters of The Time Machine, the whole
book (170,580 characters, d2l cleaning: 28 tokens), and Tiny Shakespeare (1.1M characters,
``clean="none"``: 65 tokens, case and punctuation kept). It reports train and validation
perplexity, the validation loss in nats per character, and the budget each figure took,
against three goals: the first 10,000 characters' validation perplexity <= 8.0, the whole book's
<= 4.0, and Tiny Shakespeare's validation loss <= 1.43 nats per character with one LSTM. The
recipe is AWD-LSTM's regularisers (locked dropout, weight drop on ``W_hh``, an embedding with
embedding dropout, decoupled weight decay), scored as the run keeps its best model
(``best.msgpack``); dynamic evaluation of that model is reported beside it, labelled, and the
whole book's recipe is trained once more as one program of two seeds whose best models are scored
as an ensemble (their probabilities averaged), in a section of its own.

  python experiments/ex3_more_data.py --quick          # seconds: tiny models, 2 epochs each
  python experiments/ex3_more_data.py                  # the recipes: about two hours on 2 cores
  python experiments/ex3_more_data.py --epochs-scale 4 # the same recipe trained 4x longer
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path

import _common

from deeprnn_jax.base.config import Sweep, TrainConfig
from deeprnn_jax.base.errors import UsageError

GOALS = {"timemachine-10k": ("valid perplexity", 8.0),
         "timemachine-full": ("valid perplexity", 4.0),
         "tinyshakespeare": ("valid nats/char", 1.43)}
DYNAMIC_LR = 0.3  # dynamic evaluation's SGD rate, segments of the run's num_steps
ENSEMBLE = ("timemachine-full", 2)  # this corpus's recipe again, as one program of 2 seeds


def recipes(quick: bool, scale: float) -> list[tuple[str, TrainConfig]]:
  """``(name, config)`` per corpus, smallest first. AdamW whose learning rate falls along half a
  cosine to 0 at the last epoch, global norm clipping at 1, sequential partitioning (the state
  carries across minibatches, as it does when the held-out tail is read), locked dropout, weight
  drop and a learned embedding; the held-out tail is 10 %."""
  if quick:
    small = dict(num_hiddens=32, batch_size=8, num_steps=16, num_epochs=2, optimizer="adam",
                 lr=1e-2, lr_schedule="cosine", valid_fraction=0.1, max_tokens=3000)
    return [("timemachine-10k", TrainConfig(**small)),
            ("timemachine-full", TrainConfig(**dict(small, max_tokens=6000))),
            ("tinyshakespeare", TrainConfig(**dict(small, corpus="tinyshakespeare.txt",
                                                   clean="none", max_tokens=9000)))]
  epochs = lambda n: max(1, round(n * scale))
  lstm = dict(cell="lstm", num_layers=2, num_hiddens=512, optimizer="adam", lr=3e-3,
              lr_schedule="cosine", clip=1.0, valid_fraction=0.1, locked_dropout=True,
              embed_dim=128)
  strong = dict(lstm, dropout=0.4, weight_drop=0.4, embed_dropout=0.1, weight_decay=0.1)
  return [
      ("timemachine-10k", TrainConfig(**strong, batch_size=32, num_steps=35,
                                      num_epochs=epochs(40), patience=10, max_tokens=10_000)),
      ("timemachine-full", TrainConfig(**strong, batch_size=32, num_steps=64,
                                       num_epochs=epochs(80), ema=0.999, max_tokens=-1)),
      ("tinyshakespeare", TrainConfig(**lstm, dropout=0.25, weight_drop=0.25, weight_decay=0.05,
                                      batch_size=64, num_steps=64, num_epochs=epochs(14),
                                      max_tokens=-1, corpus="tinyshakespeare.txt",
                                      clean="none")),
  ]


def describe(c: TrainConfig) -> str:
  dropout = (f"locked dropout {c.dropout}" if c.locked_dropout else f"dropout {c.dropout}")
  extras = "".join([f", weight drop {c.weight_drop}" if c.weight_drop else "",
                    f", embedding {c.embed_dim} (dropout {c.embed_dropout})" if c.embed_dim else "",
                    f", weight decay {c.weight_decay:g}" if c.weight_decay else "",
                    f", ema {c.ema:g}" if c.ema else "",
                    f", patience {c.patience}" if c.patience else ""])
  return (f"{c.num_layers}×{c.num_hiddens} {c.cell.upper()}, {dropout}{extras}, "
          f"{c.optimizer} lr {c.lr:g} ({c.lr_schedule}), clip {c.clip:g}, "
          f"batch {c.batch_size}×{c.num_steps}, {c.num_epochs} epochs")


def dynamic_nats(run_dir: str, config: TrainConfig) -> float:
  """Nats per character of the run's best model on its held-out text, dynamically evaluated
  (the model adapts by SGD on each segment after scoring it)."""
  from deeprnn_jax.fit import scoring
  from deeprnn_jax.predict import model_of
  from deeprnn_jax.run import checkpoint
  from deeprnn_jax.text import editions

  saved = checkpoint.load_checkpoint(run_dir, best=True)
  model, params, _ = model_of(saved, None, run_dir)
  tokens = editions.edition(config).held_out(editions.load_text(config))
  X, Y = scoring.stream_rows(tokens, scoring.default_rows(len(tokens)))
  nll = scoring.dynamic_nll(model, params, X, Y, config.num_steps, DYNAMIC_LR, config.clip)
  return scoring.summary(nll)["nats"]


def ensemble(config: TrainConfig, run_dir: Path) -> dict:
  """The recipe trained as one program of ``ENSEMBLE[1]`` seeds (``--num-seeds``), each model's
  best kept: each one's best validation perplexity, and that of the ensemble of those best
  models (their next-character probabilities averaged), as ``deeprnn-evaluate --best
  --ensemble`` scores it."""
  import deeprnn_jax.evaluate as evaluate_command

  r = _common.run_sweep(config, Sweep(num_seeds=ENSEMBLE[1]), run_dir)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    code = evaluate_command.main(["--checkpoint", str(run_dir), "--best", "--ensemble", "--json"])
  if code != 0:
    raise SystemExit(code)
  scored = json.loads(printed.getvalue())
  return dict(r, ensemble=scored["static"]["perplexity"], ensembled=scored["models"])


def plot(results: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for r in results:
    rows = r["rows"]
    line, = ax.plot([x["epoch"] for x in rows], [x["valid_perplexity"] for x in rows],
                    label=f"{r['name']} valid")
    ax.plot([x["epoch"] for x in rows], [x["train_perplexity"] for x in rows], "--",
            color=line.get_color(), alpha=0.6, label=f"{r['name']} train")
  ax.axhline(4.0, color="gray", lw=0.8, ls=":")
  ax.set(xlabel="epoch", ylabel="perplexity", yscale="log",
         title="validation (solid) and training (dashed) perplexity")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = _common.parser(__doc__, seeds=False)
  p.add_argument("--epochs-scale", type=float, default=1.0,
                 help="multiply every recipe's epochs (default 1)")
  p.add_argument("--only", choices=[n for n, _ in recipes(True, 1)], action="append",
                 help="run only this corpus (repeatable)")
  args = p.parse_args(argv)
  if not args.epochs_scale > 0 or not math.isfinite(args.epochs_scale):
    raise UsageError(f"--epochs-scale must be a positive number, got {args.epochs_scale}")
  t0 = time.perf_counter()
  folder = _common.runs_folder(args, "ex3_more_data")
  results = []
  for name, config in recipes(args.quick, args.epochs_scale):
    if args.only and name not in args.only:
      continue
    r = _common.run_config(config, folder / name)
    r.update(name=name, config=config)
    results.append(r)
    print(f"{name}: train perplexity {r['train_perplexity']:.2f}, best valid perplexity "
          f"{r['best_valid']:.2f} (epoch {r['best_epoch']}), "
          f"{math.log(r['best_valid']):.3f} nats/char, {r['wall_seconds']:.0f} s", flush=True)

  combined = None
  if ENSEMBLE[0] in [r["name"] for r in results]:
    config = next(r["config"] for r in results if r["name"] == ENSEMBLE[0])
    combined = ensemble(config, folder / f"{ENSEMBLE[0]}-seeds")
    print(f"{ENSEMBLE[0]}, {ENSEMBLE[1]} seeds: best valid perplexity "
          + ", ".join(f"{p:.3f}" for p in combined["best_valid_perplexity"])
          + f"; their ensemble {combined['ensemble']:.3f}, {combined['wall_seconds']:.0f} s",
          flush=True)

  rows, goals = [], []
  for r in results:
    from deeprnn_jax.text import editions

    text = editions.load_text(r["config"])
    nats = math.log(r["best_valid"])
    dynamic = dynamic_nats(r["run_dir"], r["config"])
    rows.append([r["name"], f"{len(text.train):,}", f"{len(text.valid):,}", len(text.vocab),
                 f"{r['train_perplexity']:.2f}", f"{r['best_valid']:.2f} ({r['best_epoch']})",
                 f"{r['valid_perplexity']:.2f}", f"{nats:.3f}",
                 f"{math.exp(dynamic):.2f} ({dynamic:.3f})",
                 f"{r['epochs']}", f"{r['wall_seconds'] / 60:.1f}"])
    if r["name"] in GOALS:
      what, target = GOALS[r["name"]]
      got = r["best_valid"] if what == "valid perplexity" else nats
      verdict = "met" if got <= target else f"not met, {got - target:.2f} above"
      goals.append(f"- {r['name']}: {what} ≤ {target} — best {got:.3f} ({verdict}), at epoch "
                   f"{r['best_epoch']} of {r['epochs']} run, in a run of "
                   f"{r['wall_seconds'] / 60:.1f} min on this machine (static evaluation of one "
                   "model).")
  report = _common.table(
      ["corpus", "train chars", "valid chars", "vocab", "train ppl (last)",
       "best valid ppl (epoch)", "valid ppl (last)", "best valid nats/char",
       "dynamic eval ppl (nats/char)", "epochs run", "minutes"], rows)
  seeds = ""
  if combined is not None:
    single = next(r for r in results if r["name"] == ENSEMBLE[0])
    members = [[f"seed {m['seed']}",
                f"{p:.3f} ({e})", f"{math.log(p):.4f}"]
               for m, p, e in zip(combined["models"], combined["best_valid_perplexity"],
                                  combined["best_epoch"])]
    ensembled = ", ".join(str(combined["models"][k]["seed"]) for k in combined["ensembled"])
    members.append([f"ensemble of seeds {ensembled}",
                    f"{combined['ensemble']:.3f}", f"{math.log(combined['ensemble']):.4f}"])
    seeds = (f"\n\n## An ensemble on the whole book\n\n{ENSEMBLE[0]}'s recipe trained once more "
             f"as one program of {ENSEMBLE[1]} seeds (`--num-seeds {ENSEMBLE[1]}`, "
             f"{combined['wall_seconds'] / 60:.1f} min), each model's best kept; the ensemble "
             f"averages those best models' next-character probabilities (`deeprnn-evaluate "
             f"--checkpoint RUN --best --ensemble`). Static evaluation throughout. Seed 0 is "
             f"the single run's seed, but a program of {ENSEMBLE[1]} models sums its products in "
             f"another order, and over {single['epochs']} epochs training drifts apart: its best "
             f"is {combined['best_valid_perplexity'][0]:.3f}, the single run's "
             f"{single['best_valid']:.3f}.\n\n"
             + _common.table(["model", "best valid ppl (epoch)", "nats/char"], members))
  recipe = "\n".join(f"- {r['name']}: {describe(r['config'])}" for r in results)
  print(report)
  print("\n".join(goals) + seeds)
  out = _common.results_path(args, "ex3_more_data")
  if out is not None:
    png = out.with_name(out.stem + ".png")
    plot(results, png)
    body = (f"{report}\n\nPerplexities are per character (d2l's, `exp` of the mean loss); the "
            f"held-out text is each corpus's last 10 %, read as one contiguous stream from a zero "
            f"state. The best epoch is where validation perplexity bottomed out: the run keeps "
            f"that model in `best.msgpack` (`deeprnn-evaluate --checkpoint RUN --best` scores it "
            f"again to the same figure). Dynamic evaluation (its own column, never mixed with the "
            f"static figures) scores that model while adapting it by SGD at rate {DYNAMIC_LR} on "
            f"each segment of `num_steps` characters after predicting it (`deeprnn-evaluate "
            f"--best --dynamic-lr {DYNAMIC_LR}`); its rate was chosen on the same held-out text, "
            f"so it is an optimistic figure.\n\n## Recipes\n\n{recipe}\n\nAll: sequential "
            f"partitioning, AdamW whose learning rate falls along half a cosine from its peak to 0 "
            f"at the last epoch (`--lr-schedule cosine`), gradients clipped to global norm 1, "
            f"seed 0.\n\n## Goals\n\n" + "\n".join(goals) + seeds
            + f"\n\n![curves]({png.name})\n")
    _common.write_results(out, "Exercise 3: more data", body, time.perf_counter() - t0)
  return 0


if __name__ == "__main__":
  _common.main(main, "ex3_more_data")
