"""One run over two processes on this machine: JAX's distributed runtime, CPU devices, gloo.

Two real ``python -m deeprnn_jax.train`` processes, one CPU device each, join through a
coordinator on a free local port and train one model, each process feeding its half of every
minibatch's rows. They must train as one process splitting the same global batch over its own two
CPU devices (this test process, which conftest gives two) does, and only process 0 may write the
run folder and print.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deeprnn_jax import train

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--cell", "rnn", "--num-hiddens", "16", "--max-tokens", "1000", "--batch-size", "8",
         "--num-steps", "5", "--valid-fraction", "0.2", "--log-every", "1", "--quiet"]
TIMEOUT = 300  # seconds for the pair of processes, however loaded the machine


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(cpu_devices: int) -> dict:
  """This environment, with JAX given ``cpu_devices`` CPU devices and the code under test first
  on the path (not an installed copy)."""
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  path = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
  return dict(e, JAX_NUM_CPU_DEVICES=str(cpu_devices), PYTHONPATH=path)


def run_processes(tmp_path: Path, name: str, args: list[str], n: int = 2) -> list[dict]:
  """``n`` train processes joined on a free port; each one's exit code, stdout and stderr."""
  port, procs = free_port(), []
  try:
    for i in range(n):
      out, err = (open(tmp_path / f"{name}-{i}.{s}", "w") for s in ("out", "err"))
      with out, err:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "deeprnn_jax.train", *SMALL, *args,
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
             "--process-id", str(i)],
            stdout=out, stderr=err, cwd=REPO, env=env(1)))
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
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  return np.array([[r["epoch"], r["train_perplexity"], r["valid_perplexity"]] for r in rows])


def run_lines(stdout: str) -> list[str]:
  """The run's own lines (gloo announces its connections on stdout too)."""
  return [line for line in stdout.splitlines() if not line.startswith("[Gloo]")]


@pytest.mark.usefixtures("time_machine_path")
def test_two_processes_train_as_one_process_with_as_many_devices(tmp_path, capsys):
  ref, run = tmp_path / "one", tmp_path / "two"
  assert train.main(SMALL + ["--num-epochs", "3", "--devices", "2", "--out", str(ref)]) == 0
  ref_out = capsys.readouterr().out.splitlines()
  first, second = run_processes(tmp_path, "fresh", ["--num-epochs", "2", "--out", str(run)])
  assert first["code"] == 0 and second["code"] == 0, (first["err"], second["err"])
  np.testing.assert_allclose(perplexities(run), perplexities(ref)[:2], rtol=1e-4)
  assert json.loads((run / "summary.json").read_text())["shards"] == 2  # one device a process
  # Process 0 alone prints d2l's final lines and writes the folder (it held its lock); the
  # other is silent.
  lines = run_lines(first["out"])
  assert len(lines) == len(ref_out) == 4 and lines[1].startswith("perplexity ")
  assert run_lines(second["out"]) == [] and "error" not in second["err"]
  assert (run / "run.lock").read_text().strip() == str(first["pid"])

  # Both resume from process 0's checkpoint and go on as the uninterrupted run.
  first, second = run_processes(tmp_path, "resumed",
                                ["--num-epochs", "3", "--resume", "--out", str(run)])
  assert first["code"] == 0 and second["code"] == 0, (first["err"], second["err"])
  np.testing.assert_allclose(perplexities(run), perplexities(ref), rtol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--coordinator", "nowhere"], "--coordinator must be HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "0"], "--num-processes must be"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in 0 .. --num-processes - 1"),
])
def test_bad_process_flags_are_one_line_and_exit_code_2(args, message, tmp_path, capsys):
  assert train.main(SMALL + args + ["--out", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()
