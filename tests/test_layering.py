"""How the package is layered: base, text, model, fit, run, then the commands (the tree is in
deeprnn_jax/__init__.py)."""

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deeprnn_jax

PACKAGE = Path(deeprnn_jax.__file__).parent
COMMANDS = {"cli", "train", "predict", "convert", "evaluate"}
LAYERS = ("base", "text", "model", "fit", "run")

# What each layer may import besides itself. model and fit never read text; nothing below run
# imports it; only the commands import the commands.
ALLOWED = {
  "base": set(),
  "text": {"base"},
  "model": {"base"},
  "fit": {"base", "model"},
  "run": {"base", "text", "model", "fit"},
}
# The one text module that joins the book to the model: how each edition scores and converts.
ALLOWED_MODULES = {"text.editions": {"base", "model", "fit"}}
# Imports inside a function, made on first use: the cell names a check of --cell needs.
ALLOWED_LAZY = {("base.validate", "model.cells")}


def _module(path: Path) -> str:
  """``path``'s dotted name below the package: ``run.runs``, ``train``."""
  return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _target(name: str) -> str:
  """The module an import names (``deeprnn_jax.fit.training``, or ``deeprnn_jax.fit`` and the
  name ``training``), below the package."""
  return name.removeprefix("deeprnn_jax").lstrip(".")


def _imports(path: Path) -> set[tuple[str, bool]]:
  """The package's modules ``path`` imports at run time, each with whether the import sits in a
  function; ``if TYPE_CHECKING:`` blocks are left out."""
  found = set()

  def visit(node, in_function):
    if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
      return
    in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deeprnn_jax"):
      base = _target(node.module)
      for alias in node.names:
        sub = f"{base}.{alias.name}".lstrip(".")
        found.add(((sub if (PACKAGE / (sub.replace(".", "/") + ".py")).exists() else base),
                   in_function))
    elif isinstance(node, ast.Import):
      found.update((_target(a.name), in_function) for a in node.names
                   if a.name.startswith("deeprnn_jax."))
    for child in ast.iter_child_nodes(node):
      visit(child, in_function)

  visit(ast.parse(path.read_text()), False)
  return {(name, lazy) for name, lazy in found if name}


def _layer(module: str) -> str:
  top = module.split(".")[0]
  return top if top in LAYERS else "commands"


def _library() -> list[Path]:
  return [p for p in PACKAGE.rglob("*.py") if _layer(_module(p)) != "commands"]


def test_every_library_module_sits_in_a_layer_and_the_commands_at_the_top():
  top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
  assert top == COMMANDS
  assert {p.parent.name for p in _library()} == set(LAYERS)
  assert len(_library()) > 25


def test_each_layer_imports_only_the_layers_below_it():
  offenders = {}
  for path in _library():
    module = _module(path)
    layer = _layer(module)
    allowed = ALLOWED_MODULES.get(module, ALLOWED[layer]) | {layer}
    bad = sorted(name for name, lazy in _imports(path)
                 if _layer(name) not in allowed and not (lazy and (module, name) in ALLOWED_LAZY))
    if bad:
      offenders[module] = bad
  assert offenders == {}


def test_the_layering_check_sees_a_forbidden_import(tmp_path):
  source = tmp_path / "example.py"
  source.write_text("from deeprnn_jax.text import data\n"
                    "from deeprnn_jax.run.runs import train_run\n"
                    "def f():\n  from deeprnn_jax.model import cells\n"
                    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "  from deeprnn_jax.fit import training\n")
  assert _imports(source) == {("text.data", False), ("run.runs", False), ("model.cells", True)}


def test_library_modules_do_not_import_the_command_line_layer():
  offenders = {_module(p): sorted(n for n, _ in _imports(p) if _layer(n) == "commands")
               for p in _library()}
  assert {m: names for m, names in offenders.items() if names} == {}


def test_settings_and_the_public_api_import_no_jax():
  code = ("import sys; import deeprnn_jax; "
          "import deeprnn_jax.base.config, deeprnn_jax.base.validate, deeprnn_jax.base.errors; "
          "from deeprnn_jax import TrainConfig, preset, UsageError; "
          "print(sorted(m for m in ('jax', 'flax', 'optax', 'numpy') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_the_text_readers_import_no_jax():
  code = ("import sys; import deeprnn_jax.text.data, deeprnn_jax.text.windows; "
          "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_the_public_api_names_what_its_modules_define():
  models = importlib.import_module("deeprnn_jax.model.models")
  generate = importlib.import_module("deeprnn_jax.model.generate")
  assert deeprnn_jax.RNNLM is models.RNNLM
  assert deeprnn_jax.predict_ch8 is generate.predict
  for name in deeprnn_jax.__all__:
    value = getattr(deeprnn_jax, name)
    home = getattr(value, "__module__", None) or "deeprnn_jax.model.cells"  # CELLS, a dict
    assert home.startswith("deeprnn_jax.") and home.count(".") == 2, name
  assert "train_run" in dir(deeprnn_jax)
  with pytest.raises(AttributeError, match="no_such_name"):
    deeprnn_jax.no_such_name  # noqa: B018


def _devices_after(statement: str) -> int:
  """How many CPU devices JAX has after ``statement`` ran in a fresh process."""
  code = f"import jax; from deeprnn_jax import cli, convert, predict; {statement}; " \
         "print(len(jax.devices()))"
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True)
  return int(out.stdout.strip().splitlines()[-1])


def test_only_commands_that_train_or_predict_claim_the_cpu_cores(tmp_path):
  cores = len(os.sched_getaffinity(0))
  missing = str(tmp_path / "no-run")
  # Each command fails on a missing run (exit 2) after its set-up, which is what is compared.
  assert _devices_after(f"predict.main(['--checkpoint', {missing!r}])") == cores
  assert _devices_after(f"convert.main(['--to-torch', {missing!r}, '--out', 'x.pt'])") == 1
  assert _devices_after("cli.run(lambda argv: 0, [], cpu_cores=False)") == 1
