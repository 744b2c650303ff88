"""The train command in fresh processes on CPU devices: as many as a test asks for, given to JAX
before it starts (this test process's JAX keeps the two conftest gives it), on any machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one command (or a group of them), however loaded the machine


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
                        env=cpu_env(devices), cwd=REPO, timeout=TIMEOUT)


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
      p.wait(TIMEOUT)
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
