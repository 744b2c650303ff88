"""How the package is layered: plain data and checks below JAX, the CLI above the library."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import deeprnn_jax

PACKAGE = Path(deeprnn_jax.__file__).parent
COMMANDS = {"cli", "train", "predict", "convert"}


def _imports(path: Path) -> set[str]:
  """The deeprnn_jax modules ``path`` imports, by their short names."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deeprnn_jax"):
      if node.module == "deeprnn_jax":
        names |= {alias.name for alias in node.names}
      else:
        names.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("deeprnn_jax.")}
  return names


def test_library_modules_do_not_import_the_command_line_layer():
  library = [p for p in PACKAGE.glob("*.py") if p.stem not in COMMANDS | {"__init__"}]
  assert len(library) > 10
  offenders = {p.stem: _imports(p) & COMMANDS for p in library if _imports(p) & COMMANDS}
  assert offenders == {}


def test_config_and_validate_import_no_jax():
  code = ("import sys; import deeprnn_jax.config, deeprnn_jax.validate, deeprnn_jax.errors; "
          "print(sorted(m for m in ('jax', 'flax', 'optax', 'numpy') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


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
