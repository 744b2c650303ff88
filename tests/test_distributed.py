"""One run over two processes on this machine: JAX's distributed runtime, CPU devices, gloo.

Two real ``python -m deeprnn_jax.train`` processes, two CPU devices each, join through a
coordinator on a free local port and train one model over the four devices, each process feeding
its half of every minibatch's rows. They must train as one process splitting the same global
batch over four CPU devices does, and only process 0 may write the run folder and print.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import perplexities, train, train_processes

from deeprnn_jax import train as train_command
from deeprnn_jax.run import distributed

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
