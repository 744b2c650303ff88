"""What the experiment scripts share: training one configuration, tables, and the results page.

Each experiment trains through the library's own run (``runs.train_run``), so a run folder holds
what a run of the train command holds (``config.json``, ``metrics.jsonl``, ``summary.json``, the
curve and the checkpoint); this module reads those back into table rows and writes
``experiments/results/<name>.md`` with the command, the machine, the library versions, the date
and the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
if str(ROOT) not in sys.path:  # benchmarks/machine.py names the machine; it is not installed
  sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402
from deeprnn_jax import cli  # noqa: E402
from deeprnn_jax.base.config import Sweep, TrainConfig  # noqa: E402
from deeprnn_jax.base.errors import UsageError  # noqa: E402
from deeprnn_jax.run import runs, sweeps  # noqa: E402


def parser(doc: str, seeds: bool = True, run_folders: bool = True) -> argparse.ArgumentParser:
  """The flags the experiments share: ``--quick``, ``--results``, and where they apply
  ``--seeds`` (configurations compared over seeds) and ``--runs`` (run folders kept)."""
  p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                              epilog="\n".join(doc.strip().splitlines()[1:]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="a small version that finishes in seconds (what CI runs); writes no results")
  if seeds:
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration")
  if run_folders:
    p.add_argument("--runs", default=None,
                   help="folder for the run folders (default runs/<experiment>[-quick])")
  p.add_argument("--results", default=None,
                 help="the results page to write (default experiments/results/<experiment>.md; "
                      "not written with --quick unless given)")
  return p


def check_seeds(seeds: int | None, default: int) -> int:
  seeds = default if seeds is None else seeds
  if seeds < 1:
    raise UsageError(f"--seeds must be at least 1, got {seeds}")
  return seeds


REUSED: list[float] = []  # wall seconds of the finished runs read back instead of trained


def finished(run_dir: Path, config: TrainConfig) -> bool:
  """Whether ``run_dir`` holds a finished run of exactly ``config`` (its last epoch, or the one
  its ``--patience`` stopped it at)."""
  try:
    saved = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
  except (OSError, ValueError):
    return False
  return saved == config.to_json() and (summary.get("epochs") == config.num_epochs
                                        or summary.get("stopped_early", False))


def _train_or_reuse(run_dir: Path, reuse: bool, log_every: int, train) -> tuple[dict, list]:
  """``(summary, rows)`` of the finished run in ``run_dir`` where ``reuse`` (it holds the run
  asked for); otherwise the folder's files are removed and ``train(options)`` trains afresh."""
  if reuse:
    REUSED.append(json.loads((run_dir / "summary.json").read_text())["wall_seconds"])
  else:
    if (run_dir / "config.json").exists():
      for f in run_dir.iterdir():
        if f.is_file():
          f.unlink()
    train(runs.RunOptions(log_every=log_every, checkpoint_every=10**6, quiet=True,
                          progress=False))
  summary = json.loads((run_dir / "summary.json").read_text())
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return summary, rows


def run_config(config: TrainConfig, run_dir: Path, log_every: int = 1,
               reuse: bool = True) -> dict:
  """Trains ``config`` into ``run_dir`` and returns its summary with ``rows`` (one per epoch),
  ``best_valid`` and ``best_epoch`` added. A folder that already holds a finished run of the
  same configuration is read, not trained again (``reuse``); any other is trained afresh."""
  run_dir = Path(run_dir)
  summary, rows = _train_or_reuse(
      run_dir, reuse and finished(run_dir, config), log_every,
      lambda options: runs.train_run(config, run_dir, options=options, out=io.StringIO()))
  valid = [(r["valid_perplexity"], r["epoch"]) for r in rows
           if isinstance(r.get("valid_perplexity"), (int, float))]
  best = min(valid) if valid else (math.nan, 0)
  return dict(summary, rows=rows, best_valid=best[0], best_epoch=best[1], run_dir=str(run_dir))


def run_sweep(config: TrainConfig, sweep: Sweep, run_dir: Path, log_every: int = 1) -> dict:
  """:func:`run_config` for the models of ``sweep``, trained in one program: the summary with
  ``rows`` (one per model and epoch). A folder holding that finished sweep is read, not
  trained again."""
  run_dir = Path(run_dir)
  summary, rows = _train_or_reuse(
      run_dir, sweeps.saved_sweep(run_dir) == sweep and finished(run_dir, config), log_every,
      lambda options: sweeps.sweep_run(config, sweep, run_dir, options=options,
                                       out=io.StringIO()))
  return dict(summary, rows=rows, run_dir=str(run_dir))


def mean_std(values: Sequence[float], fmt: str = "{:.2f}") -> str:
  """``m ± s`` over seeds (the sample standard deviation; just ``m`` for one value)."""
  values = [float(v) for v in values]
  if len(values) == 1:
    return fmt.format(values[0])
  return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
  """A Markdown table; ``align`` is one of ``l``/``r`` per column (default: first left)."""
  align = align or "l" + "r" * (len(header) - 1)
  rule = ["---:" if a == "r" else "---" for a in align]
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def provenance(wall_seconds: float) -> str:
  """The lines under a results page's title: command, machine, versions, date, wall time."""
  import jax

  info = machine.machine("gpu" if jax.devices()[0].platform == "gpu" else "cpu")
  cpu = info["cpu"]
  where = (f"`{machine.device_slug(info)}`: "
           + (info["gpu"]["name"] if info["gpu"] else
              f"{cpu['cores']}-core {cpu['model']} ({cpu['microarchitecture'] or 'unknown'})"))
  versions = machine.versions()
  lib = ", ".join(f"{k} {v}" for k, v in versions.items() if k in
                  ("python", "jax", "jaxlib", "flax", "optax", "numpy"))
  command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  wall = f"{wall_seconds / 60:.1f} min ({wall_seconds:.0f} s)"
  if REUSED:
    wall += (f", plus {sum(REUSED) / 60:.1f} min of {len(REUSED)} finished run(s) of the same "
             f"configuration read back from the run folders")
  return (f"- command: `{command}`\n- device: {where}\n- libraries: {lib}\n"
          f"- date: {date}\n- wall time: {wall}\n")


def write_results(path: str | Path, title: str, body: str, wall_seconds: float) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"# {title}\n\n{provenance(wall_seconds)}\n{body.strip()}\n")
  print(f"wrote {path}")
  return path


def results_path(args, name: str) -> Path | None:
  """Where the results page goes: ``--results``, or ``experiments/results/<name>.md`` for a full
  run; ``None`` (no page) for ``--quick`` without ``--results``."""
  path = Path(args.results) if args.results else None if args.quick else RESULTS / f"{name}.md"
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
  return path


def runs_folder(args, name: str) -> Path:
  return Path(args.runs or f"runs/{name}{'-quick' if args.quick else ''}")


def main(body: Callable[[Sequence[str] | None], int | None], prog: str) -> None:
  """Runs an experiment's ``body`` as the library's commands run: bad input is one line on
  stderr and a non-zero exit, never a traceback."""
  t0 = time.perf_counter()
  code = cli.run(body, prog=prog)
  if code == 0:
    print(f"{prog}: done in {time.perf_counter() - t0:.0f} s")
  sys.exit(code)
