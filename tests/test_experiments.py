"""The experiment scripts of experiments/: each one's ``--quick`` mode, run as a user runs it.

Each script's ``--quick`` mode runs in a subprocess from the repository root with its run
folders under ``tmp_path``, and its printed output is checked: ex1's equality checks pass, the
tables have the rows they should. ``--help`` and bad input (one line and a non-zero exit) go
through each script's ``main`` in this process, as its ``__main__`` calls it. The notebook is
executed separately (nbmake, in the same ``python -m pytest`` run).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import corpus_path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ("ex1_scratch", "ex2_cells", "ex3_more_data", "ex4_authors")

pytestmark = pytest.mark.usefixtures("time_machine_path")


@pytest.fixture(scope="module", autouse=True)
def experiments_importable():
  """``experiments/`` on ``sys.path``, as it is for a script run from it."""
  sys.path.insert(0, str(ROOT / "experiments"))
  yield
  sys.path.remove(str(ROOT / "experiments"))


def run_main(name: str, *args: str) -> int:
  """What ``python experiments/<name>.py ARGS`` exits with, in this process: its ``__main__``
  is ``_common.main(main, name)``, which exits with ``cli.run``'s code."""
  from deeprnn_jax import cli
  return cli.run(importlib.import_module(name).main, list(args), prog=name)


def run(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  proc = subprocess.run([sys.executable, f"experiments/{name}.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def table_rows(text: str) -> list[list[str]]:
  """The body rows of every Markdown table in ``text``, as lists of stripped cells."""
  return [[c.strip() for c in line.strip().strip("|").split("|")]
          for line in text.splitlines()
          if line.startswith("|") and not re.match(r"\|\s*(---|model|corpus|\s*\|)", line)]


def value(cell: str) -> float:
  """The first number of a cell: ``"8.74 (27)"`` -> 8.74, ``"1.2 ± 0.1"`` -> 1.2."""
  return float(re.match(r"[\d,.]+", cell).group().replace(",", ""))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_documents_quick_and_results_in_its_help(name, capsys):
  with pytest.raises(SystemExit) as exit_:
    run_main(name, "--help")
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert "--quick" in out and "--results" in out


@pytest.mark.slow
def test_ex1_scratch_equals_the_library_and_trains():
  out = run("ex1_scratch", "--quick").stdout
  checks = re.findall(r"check: (.+) equal to the library's, max \|difference\| (\S+)", out)
  assert [c for c, _ in checks] == ["logits", "gradients", "one clipped SGD step"]
  assert all(float(d) <= 1e-5 for _, d in checks)
  ppl = [float(p) for p in re.findall(r"^epoch \d+, perplexity ([\d.]+): time traveller", out,
                                      re.M)]
  assert len(ppl) == 2 and ppl[-1] < ppl[0] < 28  # d2l's lines, learning (28 = vocabulary)
  assert re.search(r"^perplexity [\d.]+, [\d.]+ tokens/sec on cpu$", out, re.M)


@pytest.mark.slow
def test_ex2_cells_tables_list_the_four_cells_at_equal_epochs_and_equal_parameters(tmp_path):
  out = run("ex2_cells", "--quick", "--runs", str(tmp_path)).stdout
  equal_epochs, equal_params = out.split("## Equal parameters")
  models = ["RNN (tanh)", "RNN (relu)", "GRU", "LSTM"]
  for part in (equal_epochs, equal_params):
    rows = table_rows(part)
    assert [r[0] for r in rows] == models
    assert all(math.isfinite(value(r[4])) for r in rows)  # validation perplexity
  params = [value(r[2]) for r in table_rows(equal_params)]
  assert max(params) / min(params) < 1.1  # equal parameter counts
  assert [r[1] for r in table_rows(equal_epochs)] == ["1 × 16"] * 4


@pytest.mark.slow
def test_ex3_more_data_rows_and_results_page(tmp_path):
  corpus_path("tinyshakespeare.txt")
  page = tmp_path / "ex3.md"
  out = run("ex3_more_data", "--quick", "--runs", str(tmp_path / "runs"), "--results",
            str(page)).stdout
  single, ensemble = out.split("## An ensemble on the whole book")
  rows = table_rows(single)
  assert [r[0] for r in rows] == ["timemachine-10k", "timemachine-full", "tinyshakespeare"]
  assert [r[3] for r in rows] == ["28", "28", "66"]  # vocabularies: d2l cleaning, then none
  assert all(math.isfinite(value(r[5])) for r in rows)
  assert all(math.isfinite(value(r[8])) for r in rows)  # dynamic evaluation of the best model
  assert ("valid perplexity ≤ 8.0" in out and "valid perplexity ≤ 4.0" in out
          and "valid nats/char ≤ 1.43" in out)
  # The whole book's recipe again as 2 seeds in one program: seed 0 is the single run, and the
  # ensemble of the two is a figure of its own.
  seeds = table_rows(ensemble)
  assert [r[0] for r in seeds] == ["seed 0", "seed 1", "ensemble of seeds 0, 1"]
  assert f"{value(seeds[0][1]):.2f}" == f"{value(rows[1][5]):.2f}"
  assert all(math.isfinite(value(r[1])) for r in seeds) and seeds[2][1] not in (seeds[0][1],
                                                                                 seeds[1][1])
  text = page.read_text()
  for field in ("command", "device", "libraries", "date", "wall time"):
    assert f"- {field}: " in text
  assert (tmp_path / "ex3.png").stat().st_size > 0


@pytest.mark.slow
def test_ex4_authors_matrix_and_samples(tmp_path):
  corpus_path("tinyshakespeare.txt")
  out = run("ex4_authors", "--quick", "--runs", str(tmp_path)).stdout
  rows = table_rows(out)
  assert [r[0] for r in rows] == [f"trained on {n}" for n in
                                  ("Wells", "Shakespeare", "mixed", "mixed, equal steps")]
  assert all(len(r) == 3 and all(1 < value(c) < 30 for c in r[1:]) for r in rows)
  for prefix in ("the time traveller", "my lord ", "the king "):
    assert f"> {prefix}" in out


@pytest.mark.parametrize("name, args, message", [
    ("ex2_cells", ["--quick", "--seeds", "0"], "--seeds must be at least 1"),
    ("ex3_more_data", ["--epochs-scale", "-1"], "--epochs-scale must be a positive number"),
    ("ex4_authors", ["--quick", "--chars", "10"], "--chars must be at least 1000"),
    ("ex1_scratch", ["--quick", "--lr", "0"], "must be positive"),
])
def test_bad_input_is_one_line(name, args, message, capsys):
  assert run_main(name, *args) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1
