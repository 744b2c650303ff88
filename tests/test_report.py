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


def test_a_device_is_described_by_its_newest_record():
  report = _report()
  cpu = {"model": "AMD EPYC", "vendor": "AuthenticAMD", "family": 25, "model_number": 17,
         "microarchitecture": "Zen 4", "cores": 2, "virtual_machine": True}
  old = {"device": "cpu-epyc-zen4-2c", "measurement": "full_run", "date": "2026-11-27",
         "machine": {"kind": "cpu", "cpu": dict(cpu, flags=["avx512f"]), "gpu": None},
         "versions": {"python": "3.11.7", "jax": "0.10.2"}}
  new = dict(old, measurement="throughput", date="2026-12-05",
             machine={"kind": "cpu", "cpu": dict(cpu, flags=["avx2", "avx512f"]), "gpu": None})
  for docs in ([old, new], [new, old]):
    rows = [line for line in report.render_machines(docs) if "cpu-epyc-zen4-2c" in line]
    assert len(rows) == 1
    assert rows[0].count("AMD EPYC") == 1 and "; AVX2, AVX-512 |" in rows[0], rows[0]
