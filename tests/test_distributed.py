"""One run over two processes on this machine: JAX's distributed runtime, CPU devices, gloo.

Two real ``python -m deeprnn_jax.train`` processes, two CPU devices each, join through a
coordinator on a free local port and train one model over the four devices, each process feeding
its half of every minibatch's rows. They must train as one process splitting the same global
batch over four CPU devices does, and only process 0 may write the run folder and print.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import (
  CPU_RUN_TIMEOUT,
  FOREVER,
  REPO,
  complete_rows,
  cpu_env,
  free_port,
  perplexities,
  train,
  train_processes,
)

from deeprnn_jax import train as train_command
from deeprnn_jax.base.errors import EXIT_PEER_LOST
from deeprnn_jax.run import checkpoint, distributed

SMALL = ["--cell", "rnn", "--num-hiddens", "16", "--max-tokens", "1000", "--batch-size", "8",
         "--num-steps", "5", "--valid-fraction", "0.2", "--log-every", "1", "--quiet"]


def run_lines(stdout: str) -> list[str]:
  """The run's own lines, from its first (``compile time``) on: gloo announces its connections
  on stdout before them, from C++, in lines that another write may cut in two."""
  lines = stdout.splitlines()
  first = next((i for i, line in enumerate(lines) if line.startswith("compile time")), len(lines))
  return lines[first:]


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_two_processes_train_as_one_process_with_as_many_devices(tmp_path):
  ref, run = tmp_path / "one", tmp_path / "two"
  one = train([SMALL + ["--num-epochs", "3", "--devices", "4", "--out", ref]], devices=4)
  assert one.returncode == 0, one.stderr
  first, second = train_processes(tmp_path, "fresh", SMALL + ["--num-epochs", "2", "--out", run],
                                  devices=2)
  assert first["code"] == 0 and second["code"] == 0, (first["err"], second["err"])
  np.testing.assert_allclose(perplexities(run), perplexities(ref)[:2], rtol=1e-4)
  assert json.loads((run / "summary.json").read_text())["shards"] == 4  # every process's
  # Process 0 alone prints d2l's final lines and writes the folder (it held its lock); the
  # other is silent.
  lines = run_lines(first["out"])
  assert len(lines) == len(one.stdout.splitlines()) == 4 and lines[1].startswith("perplexity ")
  assert run_lines(second["out"]) == [] and "error" not in second["err"]
  assert (run / "run.lock").read_text().strip() == str(first["pid"])

  # Both resume from process 0's checkpoint and go on as the uninterrupted run.
  first, second = train_processes(tmp_path, "resumed",
                                  SMALL + ["--num-epochs", "3", "--resume", "--out", run],
                                  devices=2)
  assert first["code"] == 0 and second["code"] == 0, (first["err"], second["err"])
  np.testing.assert_allclose(perplexities(run), perplexities(ref), rtol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--coordinator", "nowhere"], "--coordinator must be HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "0"], "--num-processes must be"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in 0 .. --num-processes - 1"),
])
def test_bad_process_flags_are_one_line_and_exit_code_2(args, message, tmp_path, capsys):
  assert train_command.main(SMALL + args + ["--out", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


def test_the_coordinator_may_come_from_jax_own_variable(monkeypatch):
  monkeypatch.delenv(distributed.COORDINATOR_ENV, raising=False)
  assert not distributed.requested(None, None, None)
  assert distributed.requested(None, 2, None)
  monkeypatch.setenv(distributed.COORDINATOR_ENV, "10.0.0.1:1234")
  assert distributed.requested(None, None, None)


def test_a_follower_trains_in_a_scratch_copy_and_prints_nothing(tmp_path, monkeypatch):
  run = tmp_path / "run"
  run.mkdir()
  for name, text in [("config.json", "{}"), ("run.lock", "123\n"), ("checkpoint.msgpack", "c")]:
    (run / name).write_text(text)
  with distributed.outputs(run, copy_from=run) as (where, out, err):
    assert (where, out, err) == (run, None, None)  # process 0 (this one): the folder itself
  monkeypatch.setattr(distributed, "is_writer", lambda: False)
  with distributed.outputs(run, copy_from=run) as (where, out, err):
    assert where != run and sorted(p.name for p in where.iterdir()) == [
        "checkpoint.msgpack", "config.json"]  # what a resume reads; not the writer's lock
    print("a line", file=out)
    (where / "metrics.jsonl").write_text("")
  assert not where.exists() and out.closed
  assert sorted(p.name for p in run.iterdir()) == ["checkpoint.msgpack", "config.json", "run.lock"]
  with distributed.outputs(tmp_path / "new", copy_from=None) as (where, _, _):
    assert not where.exists()  # a fresh run: nothing to copy


# A process that is lost, or never comes: the others end with one line, never JAX's C++ abort.

LOST_AFTER = "3"  # $DEEPRNN_JAX_PEER_TIMEOUT: seconds without a sign of a peer (10 by default)
NO_CRASH = ("Traceback", "Check failure", "terminate called", "Aborted")


def start_processes(tmp_path, name: str, args: list[str], ids=(0, 1), n: int = 2, env=None):
  """``python -m deeprnn_jax.train ARGS`` as the processes ``ids`` of ``n`` on a free local port,
  one CPU device each, not waited for; their outputs in ``tmp_path/NAME-I.{out,err}``."""
  port, procs = free_port(), {}
  for i in ids:
    with open(tmp_path / f"{name}-{i}.out", "w") as out, \
         open(tmp_path / f"{name}-{i}.err", "w") as err:
      procs[i] = subprocess.Popen(
          [sys.executable, "-m", "deeprnn_jax.train", *map(str, args),
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)],
          stdout=out, stderr=err, cwd=REPO,
          env=dict(cpu_env(1), DEEPRNN_JAX_PEER_TIMEOUT=LOST_AFTER, **(env or {})))
  return procs


def ended(proc, seconds: float) -> tuple[int, float]:
  """``proc``'s exit code and how long it took to end; kills it (and fails) past ``seconds``."""
  t = time.monotonic()
  try:
    code = proc.wait(seconds)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise AssertionError(f"still running after {seconds} s") from None
  return code, time.monotonic() - t


def error_lines(err: str) -> list[str]:
  """stderr's lines but the one saying that the process waits for the others to join."""
  return [line for line in err.splitlines() if " waiting for all " not in line]


def until_rows(run, rows: int, procs) -> None:
  deadline = time.monotonic() + CPU_RUN_TIMEOUT
  while complete_rows(run) < rows:
    assert all(p.poll() is None for p in procs.values()), "a process ended first"
    assert time.monotonic() < deadline, f"no {rows} rows in {run}"
    time.sleep(0.05)


@pytest.mark.slow
def test_one_process_of_two_is_refused_after_the_join_timeout(tmp_path):
  run = tmp_path / "run"
  procs = start_processes(tmp_path, "alone", SMALL + ["--out", run, "--join-timeout", "4"],
                          ids=(0,))
  code, seconds = ended(procs[0], 60)
  err = (tmp_path / "alone-0.err").read_text()
  assert code == 2 and seconds < 30, err
  assert "waiting for all 2 processes to join at 127.0.0.1:" in err  # it said so meanwhile
  lines = error_lines(err)
  assert len(lines) == 1 and "not all 2 processes joined" in lines[0], err
  assert "--join-timeout 4 s" in lines[0] and not any(s in err for s in NO_CRASH)
  assert not run.exists()


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_a_lost_process_ends_the_others_with_one_line_and_the_run_resumes(tmp_path):
  run, scratch = tmp_path / "run", tmp_path / "tmp"
  scratch.mkdir()
  args = SMALL + ["--num-epochs", FOREVER, "--checkpoint-every", "1", "--out", run]

  # The follower killed: process 0 names it, keeps its checkpoint and says how to resume.
  procs = start_processes(tmp_path, "follower-killed", args)
  until_rows(run, 2, procs)
  procs[1].kill()
  procs[1].wait()
  code, seconds = ended(procs[0], 60)
  err = (tmp_path / "follower-killed-0.err").read_text()
  assert code == EXIT_PEER_LOST, err
  assert seconds < float(LOST_AFTER) + 10, seconds
  lines = error_lines(err)
  assert len(lines) == 1 and "process 1 of 2 was lost" in lines[0], err
  assert not any(s in err for s in NO_CRASH)
  epoch = int(re.search(r"the checkpoint of epoch (\d+) is kept", lines[0]).group(1))
  assert f"resume with every process: python -m deeprnn_jax.train --resume --out {run}" in lines[0]
  assert checkpoint.load_checkpoint(run).epoch == epoch >= 2  # whole, the newest one

  # Process 0 killed: the follower names it and leaves no scratch folder behind.
  procs = start_processes(tmp_path, "coordinator-killed", args + ["--resume"],
                          env={"TMPDIR": str(scratch)})
  until_rows(run, epoch + 2, procs)
  assert list(scratch.iterdir())  # the follower's, while it trains
  procs[0].kill()
  procs[0].wait()
  code, seconds = ended(procs[1], 60)
  err = (tmp_path / "coordinator-killed-1.err").read_text()
  assert code == EXIT_PEER_LOST, err
  assert seconds < float(LOST_AFTER) + 10, seconds
  lines = error_lines(err)
  assert len(lines) == 1 and "process 0 of 2 was lost" in lines[0], err
  assert not any(s in err for s in NO_CRASH)
  assert list(scratch.iterdir()) == []

  # Both again: the run goes on from process 0's checkpoint and ends as an uninterrupted one.
  last = checkpoint.load_checkpoint(run).epoch + 2
  first, second = train_processes(tmp_path, "resumed",
                                  SMALL + ["--num-epochs", str(last), "--resume", "--out", run])
  assert first["code"] == 0 and second["code"] == 0, (first["err"], second["err"])
  ref = tmp_path / "one"
  one = train([SMALL + ["--num-epochs", last, "--devices", "2", "--out", ref]], devices=2)
  assert one.returncode == 0, one.stderr
  np.testing.assert_allclose(perplexities(run), perplexities(ref), rtol=1e-4)
