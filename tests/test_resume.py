"""What ``--resume`` and ``--out`` keep and refuse (docs/runs.md): a folder that holds no run is
never written over, a resumed run keeps every setting its run was started with, the folder
records a flag passed on ``--resume`` only with a checkpoint trained under it, and default run
folders are never shared.

Each test runs ``python -m deeprnn_jax.train`` as a subprocess, with a tiny model (99 minibatches
of 4 x 5 tokens an epoch), and signals it only after observable progress (metrics rows).
"""

from __future__ import annotations

import datetime
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import FOREVER, TIMEOUT, Train, complete_rows, metrics, strict_json

from deeprnn_jax.run import checkpoint

pytestmark = pytest.mark.usefixtures("time_machine_path")

TINY = ["--num-hiddens", "8", "--max-tokens", "2000", "--batch-size", "4", "--num-steps", "5"]
PROG = "deeprnn_jax.train: "


def run_train(tmp_path: Path, name: str, args) -> Train:
  t = Train(tmp_path, name, args)
  t.wait()
  return t


def listing(folder: Path) -> dict:
  """Every file of ``folder``, its lock included, by name."""
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_error_line(t: Train) -> str:
  lines = t.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(PROG + "error: "), t.err
  return lines[0]


def checkpoint_epochs(run: Path) -> list[int]:
  return sorted(checkpoint.read_checkpoint_file(p).epoch for p in checkpoint.checkpoint_files(run))


def test_a_folder_that_holds_no_run_is_never_written_over(tmp_path):
  """Files named as a run's, in a folder whose files say no run (no checkpoint, no config.json
  of a run's settings): a new run and --resume are both refused, naming them, and the folder is
  left exactly as it was (no lock file either); an empty --out is refused too."""
  folder = tmp_path / "U"
  folder.mkdir()
  (folder / "metrics.jsonl").write_text('{"my": 1}\n')
  (folder / "summary.json").write_text("mine\n")
  before = listing(folder)
  fresh = run_train(tmp_path, "fresh", TINY + ["--num-epochs", 2, "--out", folder])
  assert fresh.proc.returncode == 2
  line = one_error_line(fresh)
  assert "metrics.jsonl, summary.json" in line and "--resume" not in line
  assert listing(folder) == before
  resumed = run_train(tmp_path, "resumed", ["--resume", "--out", folder, "--num-epochs", 2])
  assert resumed.proc.returncode == 2
  assert "metrics.jsonl, summary.json" in one_error_line(resumed)
  assert listing(folder) == before

  proc = subprocess.run([*Train.COMMAND, *TINY, "--num-epochs", "1", "--out", ""], cwd=tmp_path,
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [PROG + "error: --out is empty: give the run folder "
                                              "(without --out, a new one under runs/)"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["U", "fresh.err", "fresh.out",
                                                       "resumed.err", "resumed.out"]


def test_the_printed_resume_command_keeps_every_setting_of_the_run(tmp_path):
  """A run with --checkpoint-every 2 --keep-checkpoints 3 --log-every 3, stopped by Ctrl-C and
  resumed with the command it prints, then with a bare --resume, saves, keeps and logs as it was
  started to."""
  run = tmp_path / "run"
  t = Train(tmp_path, "first", TINY + ["--num-epochs", FOREVER, "--checkpoint-every", 2,
                                       "--keep-checkpoints", 3, "--log-every", 3, "--out", run])
  t.wait_for(lambda: complete_rows(run) >= 5, "5 metrics rows")
  t.signal(signal.SIGINT)
  assert t.wait() == 130, t.err
  stopped = checkpoint.load_checkpoint(run).epoch
  kept = checkpoint_epochs(run)
  assert len(kept) == 3 and kept[-1] == stopped
  command = shlex.split(t.err.split("resume with: ", 1)[1].strip())
  assert command[:5] == ["python", "-m", "deeprnn_jax.train", "--resume", "--out"], command

  for name, args, end in (("printed", command[3:], stopped + 5),
                          ("bare", ["--resume", "--out", run], stopped + 9)):
    start = kept[-1]
    resumed = run_train(tmp_path, name, [*args, "--num-epochs", end])
    assert resumed.proc.returncode == 0, resumed.err
    saved = [e for e in range(start + 1, end + 1) if e % 2 == 0 or e == end]
    kept = sorted(kept + saved)[-3:]
    assert checkpoint_epochs(run) == kept, name
    logged = [int(line.split(",")[0].split()[1]) for line in resumed.out.splitlines()
              if line.startswith("epoch ")]
    assert logged == [e for e in range(start + 1, end + 1) if e % 3 == 0 or e == end], name
  assert [r["epoch"] for r in metrics(run)] == list(range(1, stopped + 10))


def test_a_resumed_run_records_its_flags_only_with_a_checkpoint_and_refuses_a_new_seed(tmp_path):
  """--resume --lr 1e6 diverges before its first checkpoint: config.json keeps the checkpoint's
  lr. --resume --seed 5 of a run initialised with seed 0 is refused in one line, the folder left
  as it was. A resumed run says where it starts."""
  run = tmp_path / "run"
  first = run_train(tmp_path, "first", TINY + ["--num-epochs", 2, "--lr", 3, "--quiet",
                                               "--out", run])
  assert first.proc.returncode == 0, first.err
  diverged = run_train(tmp_path, "diverged", ["--resume", "--out", run, "--num-epochs", 10,
                                              "--lr", "1e6"])
  assert diverged.proc.returncode == 3, diverged.err
  assert strict_json((run / "config.json").read_text())["lr"] == 3.0
  assert checkpoint.load_checkpoint(run).config.lr == 3.0

  (run / "run.lock").unlink()  # a folder copied without it: a refusal makes none
  before = listing(run)
  seed = run_train(tmp_path, "seed", ["--resume", "--out", run, "--num-epochs", 10, "--seed", 5])
  assert seed.proc.returncode == 2
  line = one_error_line(seed)
  assert "--seed 5 cannot apply to a resumed run" in line and "seed 0" in line
  assert listing(run) == before

  resumed = run_train(tmp_path, "resumed", ["--resume", "--out", run, "--num-epochs", 4])
  assert resumed.proc.returncode == 0, resumed.err
  assert resumed.out.splitlines()[0] == (f"resuming {run} at epoch 3 of 4 (its checkpoint of "
                                         "epoch 2)")
  assert strict_json((run / "config.json").read_text())["num_epochs"] == 4
  assert [r["epoch"] for r in metrics(run)] == [1, 2, 3, 4]


def test_two_runs_started_in_the_same_second_get_a_folder_each(tmp_path):
  """Without --out, a run makes its own folder runs/<timestamp>[-N] and says which, at start.
  Every timestamp folder of the next minutes is taken here (an empty folder is one another run
  has just made): two runs started together each get a new one, and touch none of the others."""
  now = datetime.datetime.now()
  taken = [tmp_path / "runs" / f"{now + datetime.timedelta(seconds=s):%Y%m%d-%H%M%S}"
           for s in range(-2, 900)]
  for path in taken:
    path.mkdir(parents=True)
  procs = [subprocess.Popen([*Train.COMMAND, *TINY, "--num-epochs", "1", "--quiet"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  results = [p.communicate(timeout=TIMEOUT) for p in procs]
  folders = []
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err
    assert err.startswith("run folder: runs/"), err
    folder = tmp_path / err.splitlines()[0].removeprefix("run folder: ")
    assert folder.parent == tmp_path / "runs" and folder not in taken
    assert [r["epoch"] for r in metrics(folder)] == [1]
    folders.append(folder)
  assert folders[0] != folders[1]
  assert all(not any(path.iterdir()) for path in taken)


def test_a_sweep_left_with_one_model_says_model(tmp_path):
  run = tmp_path / "run"
  t = run_train(tmp_path, "sweep", TINY + ["--num-epochs", 2, "--log-every", 1, "--lr", "1,1e30",
                                           "--clip", "1e30", "--out", run])
  assert t.proc.returncode == 3, t.err
  assert "(1 model): " in t.out and " over 1 model, " in t.out
  assert "1 models" not in t.out

