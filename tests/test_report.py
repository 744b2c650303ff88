"""BENCHMARKS.md and README.md's measured passages are what benchmarks/report.py renders from the
committed results, so that neither can drift from them."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _report():
  spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmarks_md_is_rendered_from_the_results():
  report = _report()
  rendered = report.render_benchmarks(report.load_results(), report.TEMPLATE.read_text())
  assert (ROOT / "BENCHMARKS.md").read_text() == rendered, \
      "BENCHMARKS.md is out of date: run python benchmarks/report.py"


def test_readme_quotes_the_results():
  report = _report()
  readme = (ROOT / "README.md").read_text()
  assert readme.count("<!-- /report -->") == 2
  assert report.render_readme(report.load_results(), readme) == readme, \
      "README.md's figures are out of date: run python benchmarks/report.py"


def test_every_results_file_says_where_it_comes_from():
  files = sorted((ROOT / "benchmarks" / "results").glob("*/*.json"))
  assert files
  for path in files:
    doc = json.loads(path.read_text())
    assert (doc["device"], doc["measurement"]) == (path.parent.name, path.stem), path
    for run in doc.get("runs", [doc]) if doc["kind"] == "variants" else [doc]:
      assert run["command"] and run["date"] and run["versions"]["jax"], path
      assert len(run["commit"]) == 40 and run["machine"]["kind"] in ("cpu", "gpu"), path
