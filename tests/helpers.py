"""What the tests share: the cells and implementations to run, random states and parameters in
the documented layouts, the train command as a subprocess (and in fresh processes on CPU devices),
and readers of a run folder's files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from references.numpy_model import NUM_GATES

from deeprnn_jax.base import validate
from deeprnn_jax.model import cells, onednn
from deeprnn_jax.model.models import RNNLM

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 agreement of two computations of the same numbers
CPU_RUN_TIMEOUT = 300  # seconds for one command (or a group of them) of cpu_env's processes


def cell_names(fast: bool = False, torch: bool = False) -> list[str]:
  """The registered cells (``cells.CELLS``); ``fast``: those the fast kernels run
  (``CellSpec.fits_kernels``); ``torch``: those with a PyTorch layer (``CellSpec.torch_module``)."""
  return [name for name, spec in cells.CELLS.items()
          if (spec.fits_kernels or not fast) and (spec.torch_module or not torch)]


def cell_cases(fast: bool = False, torch: bool = False) -> list[tuple[str, str]]:
  """``(cell, activation)`` for :func:`cell_names`: every φ of a cell that takes one (the RNN's
  tanh and relu), tanh for the others."""
  return [(name, activation) for name in cell_names(fast, torch)
          for activation in (validate.ACTIVATIONS if cells.CELLS[name].takes_activation
                             else ("tanh",))]


def impls_for(cell: str) -> tuple[str, ...]:
  """The implementations that run ``cell``: ``scan`` always, the fast ones where it fits their
  kernels, ``cudnn`` and ``onednn`` where the vendors have its fused kernel (the LSTM's; oneDNN's
  on Linux x86-64, where its wheels exist)."""
  spec = cells.CELLS[cell]
  fused = [i for i in validate.FUSED_IMPLS if i != "onednn" or onednn.SUPPORTED]
  return ("scan",) + (("layerwise", "wavefront") if spec.fits_kernels else ()) + (
      tuple(fused) if spec.fits_kernels and spec.fused else ())


def random_state(key, cell: str, num_layers: int, batch: int, hiddens: int):
  """A nonzero initial state in d2l layout."""
  kh, kc = jax.random.split(key)
  h = 0.5 * jax.random.normal(kh, (num_layers, batch, hiddens), jnp.float32)
  if cells.CELLS[cell].pair:
    return h, 0.5 * jax.random.normal(kc, (num_layers, batch, hiddens), jnp.float32)
  return h


def random_tokens(key, batch: int, steps: int, vocab: int):
  return jax.random.randint(key, (batch, steps), 0, vocab, jnp.int32)


def assert_state(state, cell: str, num_layers: int, batch: int, hiddens: int):
  if cells.CELLS[cell].pair:
    assert isinstance(state, tuple) and len(state) == 2
    chex.assert_shape(state, (num_layers, batch, hiddens))
  else:
    chex.assert_shape(state, (num_layers, batch, hiddens))
  chex.assert_type(state, jnp.float32)


def assert_state_close(state, ref_state, cell: str):
  pair = cells.CELLS[cell].pair
  chex.assert_trees_all_close(tuple(state) if pair else state,
                              tuple(ref_state) if pair else ref_state, **TOL)


def layout_params(seed: int, vocab: int, hiddens: int, num_layers: int, cell: str,
                  scale: float = 0.6) -> dict:
  """Random float32 parameters built from the documented layout alone (no ``init``).

  ``rnn/layer_{l}/{W_xh, W_hh, b_xh, b_hh}`` with G fused gates, ``W_hq``, ``b_q``; uniform on
  ``[-scale, scale]``, wider than the initialisation so the nonlinearities are exercised.
  """
  rng = np.random.default_rng(seed)
  G = NUM_GATES[cell]
  u = lambda *shape: rng.uniform(-scale, scale, shape).astype(np.float32)
  params = {"rnn": {}, "W_hq": u(hiddens, vocab), "b_q": u(vocab)}
  for l in range(num_layers):
    params["rnn"][f"layer_{l}"] = {
        "W_xh": u(vocab if l == 0 else hiddens, G * hiddens),
        "W_hh": u(hiddens, G * hiddens),
        "b_xh": u(G * hiddens),
        "b_hh": u(G * hiddens),
    }
  return jax.tree_util.tree_map(jnp.asarray, params)


def random_like(key, tree, scale=1.0):
  """A tree of normal draws shaped as ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def projected_loss(model: RNNLM):
  """``(params, state, X, R, S) -> (loss, (logits, state))``: the logits and the final state
  projected on random directions ``R`` and ``S``, so that every output's gradient is checked."""

  def loss(params, state, X, R, S):
    logits, new_state = model.apply({"params": params}, X, state)
    value = jnp.sum(logits * R) + sum(jnp.sum(a * b) for a, b in
                                      zip(jax.tree.leaves(new_state), jax.tree.leaves(S)))
    return value, (logits, new_state)

  return loss


REPO = Path(__file__).resolve().parents[1]


FOREVER = 1_000_000  # the length of a run that is to be stopped: it cannot end first


TIMEOUT = 900  # seconds any one subprocess may take on a loaded machine


def _reject(constant):
  raise ValueError(f"non-standard JSON constant {constant}")


def strict_json(text: str):
  """``json.loads`` as a strict parser reads JSON: no NaN, Infinity or -Infinity."""
  return json.loads(text, parse_constant=_reject)


def metrics(run: Path) -> list[dict]:
  return [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def complete_rows(run: Path) -> int:
  try:
    return (run / "metrics.jsonl").read_bytes().count(b"\n")
  except FileNotFoundError:
    return 0


def snapshot(run: Path) -> dict:
  """Every file of a run folder but its lock, by name: what a refused resume must not change."""
  return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.name != "run.lock"}


class Train:
  """``python -m deeprnn_jax.train`` in a subprocess, its output in files."""

  COMMAND = [sys.executable, "-m", "deeprnn_jax.train"]

  def __init__(self, tmp_path: Path, name: str, args, command=COMMAND):
    self.out_path, self.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.proc = subprocess.Popen([*command, *map(str, args)], stdout=out, stderr=err, cwd=REPO)

  @property
  def err(self) -> str:
    return self.err_path.read_text()

  @property
  def out(self) -> str:
    return self.out_path.read_text()

  def wait_for(self, condition, what: str) -> None:
    """Waits until ``condition()``; fails if the process ends first or it takes TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f"the run ended (exit {self.proc.returncode}) before {what}:\n"
                             f"{self.err}")
      if time.monotonic() > deadline:
        self.proc.kill()
        raise AssertionError(f"timed out waiting for {what}")
      time.sleep(0.02)

  def signal(self, signum) -> None:
    self.proc.send_signal(signum)

  def wait(self) -> int:
    try:
      return self.proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise


# The train command in fresh processes on CPU devices: as many as a test asks for, given to JAX
# before it starts (this test process's JAX keeps the two conftest gives it), on any machine.


def cpu_env(devices: int) -> dict:
  """This environment, with JAX on ``devices`` CPU devices and the code under test first on the
  path (not an installed copy)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  return dict(env, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONPATH=path)


def train(runs: list[list[str]], devices: int) -> subprocess.CompletedProcess:
  """``train.main(args)`` for each of ``runs`` in turn, in one process on ``devices`` CPU
  devices (one start-up for all); its exit code is the largest of theirs."""
  code = (f"import sys; from deeprnn_jax import train; "
          f"sys.exit(max(train.main(a) for a in {[list(map(str, r)) for r in runs]!r}))")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=cpu_env(devices), cwd=REPO, timeout=CPU_RUN_TIMEOUT)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_processes(tmp_path: Path, name: str, args: list[str], n: int = 2,
                    devices: int = 1) -> list[dict]:
  """``python -m deeprnn_jax.train ARGS`` as ``n`` processes of ``devices`` CPU devices each,
  joined on a free local port; each one's exit code, PID, stdout and stderr."""
  port, procs = free_port(), []
  try:
    for i in range(n):
      out, err = (open(tmp_path / f"{name}-{i}.{s}", "w") for s in ("out", "err"))
      with out, err:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "deeprnn_jax.train", *args,
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
             "--process-id", str(i)],
            stdout=out, stderr=err, cwd=REPO, env=cpu_env(devices)))
    for p in procs:
      p.wait(CPU_RUN_TIMEOUT)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [{"code": p.returncode, "pid": p.pid,
           "out": (tmp_path / f"{name}-{i}.out").read_text(),
           "err": (tmp_path / f"{name}-{i}.err").read_text()} for i, p in enumerate(procs)]


def perplexities(run: Path) -> np.ndarray:
  """``<float64>[epochs, 3]``: each metrics row's epoch, train and validation perplexity."""
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  return np.array([[r["epoch"], r["train_perplexity"], r["valid_perplexity"]] for r in rows])
