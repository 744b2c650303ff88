"""Runs that survive faults: real signals, divergence, two writers, damaged folders (docs/runs.md).

The signal and lock tests run ``python -m deeprnn_jax.train`` as a subprocess and send it real
signals; each waits for observable progress (a file, a metrics row, a line on stderr) before it
signals, never for a time, so that a loaded machine only makes them slower. Fault tests use a tiny
model and corpus (99 minibatches of 4 x 5 tokens, ~10 ms an epoch).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import FOREVER, REPO, TIMEOUT, Train, complete_rows, metrics, snapshot, strict_json

from deeprnn_jax import predict, train
from deeprnn_jax.base import files
from deeprnn_jax.fit import dispatch, training
from deeprnn_jax.run import checkpoint, plots, stopping

TINY = ["--num-hiddens", "16", "--max-tokens", "2000", "--batch-size", "4", "--num-steps", "5"]
BATCHES = 99  # minibatches in each of TINY's epochs
EPOCHS = 400  # the reference run's length: a few seconds


# Tests that read no corpus; every other one gets The Time Machine through conftest's fixture
# (offline with no copy of it, those fail in one line that says how to provide it).
CORPUS_FREE = {
    "test_an_ignored_sighup_stays_ignored_and_a_nested_watch_shares_the_flag",
    "test_an_epoch_that_never_finishes_is_abandoned_after_a_stop",
    "test_the_epoch_marks_its_last_loss_when_it_leaves_the_parameters_non_finite",
    "test_an_unwritable_output_is_named_not_its_temporary_file",
    "test_json_is_strict_and_plots_skip_non_finite_points",
}


@pytest.fixture(autouse=True)
def _corpus(request):
  if request.node.originalname not in CORPUS_FREE:
    request.getfixturevalue("time_machine_path")


# ----------------------------------------------------------------------------------------------
# Helpers.










def assert_strict_json_files(run: Path) -> None:
  for path in run.iterdir():
    if path.suffix == ".json":
      strict_json(path.read_text())
    elif path.suffix == ".jsonl":
      for line in path.read_text().splitlines():
        strict_json(line)






def run_train(tmp_path, name, args, **kwargs) -> Train:
  t = Train(tmp_path, name, args, **kwargs)
  t.wait()
  return t


def in_process(args, capsys) -> tuple[int, str, str]:
  code = train.main(TINY + list(map(str, args)))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run every interrupted-and-resumed one must end equal to."""
  tmp = tmp_path_factory.mktemp("reference")
  t = run_train(tmp, "reference", TINY + ["--num-epochs", EPOCHS, "--out", tmp / "run"])
  assert t.proc.returncode == 0, t.err
  return tmp / "run"


def assert_same_run(run: Path, reference: Path) -> None:
  """Rows 1..N exactly once, the same perplexities and the same final parameters."""
  rows, want = metrics(run), metrics(reference)
  assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
  np.testing.assert_allclose([r["train_perplexity"] for r in rows],
                             [r["train_perplexity"] for r in want], rtol=1e-5)
  final, want_final = (strict_json((p / "summary.json").read_text())["train_perplexity"]
                       for p in (run, reference))
  assert final == pytest.approx(want_final, rel=1e-6)
  a, b = checkpoint.load_checkpoint(run), checkpoint.load_checkpoint(reference)
  assert a.epoch == b.epoch == EPOCHS
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                         a.params, b.params)
  assert_strict_json_files(run)


# ----------------------------------------------------------------------------------------------
# Ctrl-C, SIGTERM, SIGHUP.


@pytest.mark.slow
@pytest.mark.parametrize("signame,moment,rows", [
    ("SIGINT", "while it compiles", None),  # config.json written: compiling or in epoch 1-2
    ("SIGINT", "after the first epochs", 1),
    ("SIGTERM", "past the first checkpoint", 60),  # the default --checkpoint-every is 50
    ("SIGHUP", "late in the run", 150),
])
def test_a_signal_saves_the_newest_epoch_and_resuming_ends_as_an_uninterrupted_run(
    signame, moment, rows, reference, tmp_path):
  signum = getattr(signal, signame)
  run = tmp_path / "run"
  t = Train(tmp_path, "interrupted", TINY + ["--num-epochs", FOREVER, "--out", run])
  if rows is None:
    t.wait_for(lambda: (run / "config.json").exists(), "config.json")
  else:
    t.wait_for(lambda: complete_rows(run) >= rows, f"{rows} metrics rows")
  t.signal(signum)
  assert t.wait() == 128 + signum, t.err
  err = t.err
  assert "Traceback" not in err and "Exception ignored" not in err, err
  assert f"{signame}: finishing the epoch in progress" in err
  # The newest finished epoch is checkpointed with its rows, whatever checkpoint-every says.
  saved_rows = metrics(run)
  assert [r["epoch"] for r in saved_rows] == list(range(1, len(saved_rows) + 1))
  if saved_rows:
    assert checkpoint.load_checkpoint(run).epoch == len(saved_rows)
    assert f"stopped by {signame} after epoch {len(saved_rows)}" in err
  else:  # stopped before the first epoch: nothing to save, and the folder resumes from epoch 0
    assert not checkpoint.checkpoint_files(run)
  if rows is not None:
    assert len(saved_rows) >= rows
  assert f"python -m deeprnn_jax.train --resume --out {run}" in err
  assert not list(run.glob(".*.tmp"))

  # Resumed (to the reference's length: the number of epochs changes nothing before the last).
  resumed = run_train(tmp_path, "resumed", ["--resume", "--out", run, "--num-epochs", EPOCHS])
  assert resumed.proc.returncode == 0, resumed.err
  assert_same_run(run, reference)


@pytest.mark.slow
def test_a_scheduled_run_stopped_and_resumed_keeps_to_its_schedule(reference, tmp_path):
  """The learning rate's step count lives in the optimiser's state: a run with a cosine schedule
  and warmup, stopped by SIGTERM past its warmup and resumed bare, ends as one never stopped;
  and the schedule is not silently changed on resume."""
  scheduled = TINY + ["--num-epochs", EPOCHS, "--lr-schedule", "cosine", "--warmup-epochs", 20,
                      "--lr-min-factor", 0.05]
  straight = run_train(tmp_path, "straight", scheduled + ["--out", tmp_path / "straight"])
  assert straight.proc.returncode == 0, straight.err
  run = tmp_path / "run"
  t = Train(tmp_path, "interrupted", scheduled + ["--out", run])
  t.wait_for(lambda: complete_rows(run) >= 30, "30 metrics rows")
  t.signal(signal.SIGTERM)
  assert t.wait() == 128 + signal.SIGTERM, t.err
  assert 30 <= checkpoint.load_checkpoint(run).epoch < EPOCHS
  before = snapshot(run)
  refused = run_train(tmp_path, "refused", ["--resume", "--out", run, "--lr-schedule", "constant"])
  assert refused.proc.returncode == 2 and "lr_schedule: checkpoint 'cosine'" in refused.err
  assert len(refused.err.strip().splitlines()) == 1 and snapshot(run) == before
  resumed = run_train(tmp_path, "resumed", ["--resume", "--out", run])
  assert resumed.proc.returncode == 0, resumed.err
  assert_same_run(run, tmp_path / "straight")
  # The schedule is felt: the same run at a constant rate ends elsewhere.
  final = lambda folder: strict_json((folder / "summary.json").read_text())["train_perplexity"]
  assert final(run) != pytest.approx(final(reference), rel=1e-3)
  # Lengthened, the schedule is laid over the new length, and the run says so.
  longer = run_train(tmp_path, "longer", ["--resume", "--out", run, "--num-epochs", EPOCHS + 2])
  assert longer.proc.returncode == 0, longer.err
  assert (f"the cosine learning-rate schedule is laid anew (epochs {EPOCHS} -> {EPOCHS + 2}): "
          f"from epoch {EPOCHS + 1}") in longer.err


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(tmp_path):
  """Epochs of ~6 s or more (the whole book, one token per minibatch): the second Ctrl-C comes
  while the run waits for the epoch in progress, and ends the process there."""
  run = tmp_path / "run"
  slow = ["--num-hiddens", "64", "--max-tokens", "-1", "--batch-size", "1", "--num-steps", "1",
          "--num-epochs", "50", "--checkpoint-every", "1", "--out", run]
  t = Train(tmp_path, "slow", slow)
  t.wait_for(lambda: checkpoint.checkpoint_files(run) and complete_rows(run) >= 1,
             "the first checkpoint")
  t.signal(signal.SIGINT)
  t.wait_for(lambda: "finishing the epoch in progress" in t.err, "the first Ctrl-C's message")
  saved = checkpoint.load_checkpoint(run)
  t.signal(signal.SIGINT)
  start = time.monotonic()
  code = t.wait()
  waited = time.monotonic() - start
  # Killed by the signal, as an unhandled Ctrl-C kills a process (the shell shows 130), before
  # the epoch in progress finished.
  assert code == -signal.SIGINT, (code, t.err)
  assert "Traceback" not in t.err
  kept = checkpoint.load_checkpoint(run)
  assert kept.epoch == saved.epoch, f"{waited:.1f} s"
  # The folder resumes, as after any stop.
  resumed = run_train(tmp_path, "resumed", ["--resume", "--out", run,
                                            "--num-epochs", saved.epoch + 1])
  assert resumed.proc.returncode == 0, resumed.err
  assert [r["epoch"] for r in metrics(run)] == list(range(1, saved.epoch + 2))


@pytest.mark.slow
def test_closing_the_terminal_saves_the_newest_epoch(tmp_path):
  """The run's terminal (a pseudo-terminal here, with the progress bar on) goes away: writing to
  it fails (EIO) and SIGHUP comes. The run stops printing, not training: it saves its newest
  epoch and exits 129."""
  import pty
  import select
  import threading

  master, slave = pty.openpty()
  run = tmp_path / "run"
  args = [*TINY, "--num-epochs", FOREVER, "--log-every", 1, "--out", run]
  proc = subprocess.Popen([*Train.COMMAND, *map(str, args)],
                          stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                          start_new_session=True)
  os.close(slave)
  hang_up, seen = threading.Event(), []

  def terminal():  # reads what the run prints, until the terminal is closed
    while not hang_up.is_set():
      if select.select([master], [], [], 0.05)[0]:
        try:
          seen.append(os.read(master, 65536))
        except OSError:
          break
    os.close(master)

  thread = threading.Thread(target=terminal)
  thread.start()
  try:
    deadline = time.monotonic() + TIMEOUT
    while complete_rows(run) < 3 and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
  finally:
    hang_up.set()
    thread.join()
  assert proc.poll() is None, b"".join(seen).decode(errors="replace")
  assert b"epoch 1, perplexity" in b"".join(seen)
  time.sleep(0.5)  # a few epochs print into the closed terminal
  proc.send_signal(signal.SIGHUP)
  assert proc.wait(TIMEOUT) == 129
  rows = metrics(run)
  assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
  assert checkpoint.load_checkpoint(run).epoch == len(rows) > 3


@pytest.mark.slow
def test_the_library_run_stops_on_a_real_signal_and_gives_the_handlers_back(tmp_path, capsys):
  """train_run from Python: SIGTERM while it trains raises Interrupted (a KeyboardInterrupt) after
  saving; the handlers are the caller's again afterwards; no handler is installed on import."""
  import threading

  from deeprnn_jax.base import config, errors
  from deeprnn_jax.run import runs
  cfg = config.TrainConfig(num_hiddens=16, max_tokens=2000, batch_size=4, num_steps=5,
                           num_epochs=100_000)
  run = tmp_path / "run"
  before = {s: signal.getsignal(s) for s in stopping.SIGNALS}

  def signal_after_a_row():
    deadline = time.monotonic() + TIMEOUT
    while complete_rows(run) < 3 and time.monotonic() < deadline:
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

  thread = threading.Thread(target=signal_after_a_row)
  thread.start()
  with pytest.raises(errors.Interrupted) as info:
    runs.train_run(cfg, run, options=runs.RunOptions(quiet=True))
  thread.join()
  assert info.value.exit_code == 143 and isinstance(info.value, KeyboardInterrupt)
  assert {s: signal.getsignal(s) for s in stopping.SIGNALS} == before
  saved = checkpoint.load_checkpoint(run)
  assert saved.epoch == len(metrics(run)) >= 3
  assert f"stopped by SIGTERM after epoch {saved.epoch}" in str(info.value)

  probe = ("import signal; s = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP); "
           "h = [signal.getsignal(x) for x in s]; "
           "import deeprnn_jax.run.runs, deeprnn_jax.train, deeprnn_jax.cli; "
           "import deeprnn_jax.run.stopping; "
           "assert [signal.getsignal(x) for x in s] == h, 'a handler was installed on import'")
  proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def test_an_ignored_sighup_stays_ignored_and_a_nested_watch_shares_the_flag():
  previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
  try:
    with stopping.watch() as outer:
      assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
      with stopping.watch() as inner:
        assert inner is outer
      os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: only the flag is set
      deadline = time.monotonic() + 10
      while not outer.requested and time.monotonic() < deadline:
        time.sleep(0.01)
      assert outer.name == "SIGINT"
      # The first signal gave Ctrl-C back to Python: a second one raises as usual.
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGHUP, previous)


def test_an_epoch_that_never_finishes_is_abandoned_after_a_stop():
  class Stuck:  # a device computation that never completes (a hung accelerator)
    def is_ready(self):
      return False

  stop = stopping.StopRequest()
  pipe = dispatch.EpochPipeline(lambda state, Xs, Ys, key: (state, Stuck()),
                                should_abandon=lambda: stop.waited_more_than(0.2))
  run = pipe.run(jnp.zeros(()), ((k, None, None, k) for k in range(3)))
  stop.request(signal.SIGTERM)
  start = time.monotonic()
  with pytest.raises(dispatch.EpochAbandoned):
    next(run)
  assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------------------------
# One writer per folder; SIGKILL.


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_pid_and_sigkill_leaves_no_stale_lock(
    reference, tmp_path):
  run = tmp_path / "run"
  first = Train(tmp_path, "first", TINY + ["--num-epochs", FOREVER, "--out", run])
  first.wait_for(lambda: complete_rows(run) >= 1, "a metrics row")
  for name, args in (("fresh", TINY + ["--num-epochs", EPOCHS, "--seed", 3, "--out", run]),
                     ("resume", ["--resume", "--out", run])):
    second = run_train(tmp_path, name, args)
    assert second.proc.returncode == 2, second.err
    assert second.err.strip().splitlines() == [
        f"deeprnn_jax.train: error: {run} is in use by another run (PID {first.proc.pid}); "
        "wait for it to end or stop it, or choose another --out"]
    assert first.proc.poll() is None  # still training
  first.signal(signal.SIGTERM)
  assert first.wait() == 143, first.err
  # The folder is the first run's alone: its config, its rows once each, its checkpoint.
  assert strict_json((run / "config.json").read_text())["num_epochs"] == FOREVER
  rows = metrics(run)
  assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
  assert checkpoint.load_checkpoint(run).epoch == len(rows)

  # SIGKILL: no chance to save, but no stale lock and no dead end either.
  killed = tmp_path / "killed"
  t = Train(tmp_path, "killed", TINY + ["--num-epochs", FOREVER, "--out", killed])
  t.wait_for(lambda: complete_rows(killed) >= 5, "5 metrics rows")
  t.signal(signal.SIGKILL)
  assert t.wait() == -signal.SIGKILL
  resumed = run_train(tmp_path, "resumed", ["--resume", "--out", killed, "--num-epochs", EPOCHS])
  assert resumed.proc.returncode == 0, resumed.err
  assert_same_run(killed, reference)


# ----------------------------------------------------------------------------------------------
# Divergence.


def _nan_update_at(step: int) -> optax.GradientTransformation:
  """NaN updates at the ``step``-th update (0-based), as a blow-up would give."""
  def init(params):
    return jnp.zeros([], jnp.int32)

  def update(updates, count, params=None):
    updates = jax.tree_util.tree_map(lambda u: jnp.where(count == step, jnp.nan, u), updates)
    return updates, count + 1

  return optax.GradientTransformation(init, update)


def test_a_nan_on_the_last_minibatch_of_an_epoch_is_divergence_and_never_saved(
    tmp_path, capsys, monkeypatch):
  """Epoch 2's losses are all finite (each computed before its update), but its last update makes
  the parameters NaN: exit 3, and the checkpoint kept is epoch 1's, which predict and --resume
  accept."""
  real, calls = training.make_optimizer, []

  def make_optimizer(lr, clip, name="sgd", schedule=None, weight_decay=0.0, ema=0.0):
    calls.append(lr)  # the first run's blows up; a resumed one's does not
    step = 2 * BATCHES - 1 if len(calls) == 1 else -1
    return optax.chain(real(lr, clip, name, schedule, weight_decay, ema), _nan_update_at(step))

  monkeypatch.setattr(training, "make_optimizer", make_optimizer)
  run = tmp_path / "run"
  code, _, err = in_process(["--num-epochs", 4, "--checkpoint-every", 1, "--quiet",
                             "--out", run], capsys)
  assert code == 3, err
  assert len(err.strip().splitlines()) == 1
  assert "non-finite loss at epoch 2" in err and "--lr" in err and "--clip" in err
  assert "the checkpoint of epoch 1 is kept" in err
  saved = checkpoint.load_checkpoint(run)
  assert saved.epoch == 1
  assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(saved.params))
  assert [r["epoch"] for r in metrics(run)] == [1]
  assert_strict_json_files(run)
  assert predict.main(["--checkpoint", str(run), "--num-preds", "20"]) == 0
  assert "<unk>" not in capsys.readouterr().out
  # Resumed (with an optimiser of the same state, a step count, that no longer blows up).
  code, _, err = in_process(["--resume", "--out", run, "--num-epochs", 3, "--quiet"], capsys)
  assert code == 0, err
  assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]


def test_the_epoch_marks_its_last_loss_when_it_leaves_the_parameters_non_finite():
  from deeprnn_jax.model.models import RNNLM
  model = RNNLM(11, 8, 1, "gru")
  opt = optax.chain(training.make_optimizer(1.0, 1.0), _nan_update_at(3))
  epoch = training.make_train_epoch(model, opt)
  Xs = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 2, 5)), jnp.int32)
  state = training.init_train_state(model, opt, jax.random.PRNGKey(0))
  state, losses = epoch(state, Xs, Xs, jax.random.PRNGKey(1))
  losses = np.asarray(losses)
  assert np.isfinite(losses[:3]).all() and np.isnan(losses[3])
  assert training.diverged(losses)
  assert not training.diverged(np.ones(4)) and training.diverged(np.full(4, 800.0))  # overflow
  per_model = training.diverged(np.array([[1.0, 2.0], [1.0, np.nan], [900.0, 900.0]]))
  assert per_model.tolist() == [False, True, True]


@pytest.mark.parametrize("lr", ["1e30", "1e4"])
def test_an_overflowing_perplexity_is_divergence_and_the_folder_restarts(lr, tmp_path, capsys):
  run = tmp_path / "run"
  code, _, err = in_process(["--num-epochs", 3, "--lr", lr, "--out", run], capsys)
  assert code == 3, err
  assert len(err.strip().splitlines()) == 1 and "diverged" in err and "--lr" in err
  assert not checkpoint.checkpoint_files(run)
  assert "no checkpoint had been saved" in err
  assert "metrics of the epochs before" not in err  # it diverged in its first epoch
  assert_strict_json_files(run)
  # Not a dead end: --resume starts it again from epoch 0, here with a sane rate.
  code, _, err = in_process(["--resume", "--out", run, "--lr", "1", "--quiet"], capsys)
  assert code == 0, err
  assert "starts again from epoch 0" in err
  assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]
  assert strict_json((run / "config.json").read_text())["lr"] == 1.0


def test_a_checkpoint_holding_nans_is_refused_or_skipped_for_an_older_one(tmp_path, capsys):
  """Checkpoints written before parameters were checked can hold NaNs: predict refuses them, and a
  folder that keeps an older checkpoint falls back to it."""
  run = tmp_path / "run"
  assert in_process(["--num-epochs", 2, "--checkpoint-every", 1, "--keep-checkpoints", 2,
                     "--quiet", "--out", run], capsys)[0] == 0
  saved = checkpoint.load_checkpoint(run)
  nan_params = jax.tree_util.tree_map(lambda a: np.full_like(a, np.nan), saved.params)
  checkpoint.save_checkpoint(run, params=nan_params, opt_state=saved.opt_state, epoch=3,
                             vocab=saved.vocab, config=saved.config, keep=2)
  assert predict.main(["--checkpoint", str(run / "checkpoint.msgpack")]) == 2
  assert "non-finite" in capsys.readouterr().err
  assert predict.main(["--checkpoint", str(run), "--num-preds", "5"]) == 0
  err = capsys.readouterr().err
  assert "non-finite" in err and "using checkpoint-2.msgpack (epoch 2)" in err


# ----------------------------------------------------------------------------------------------
# Checkpoints kept; corrupt checkpoints; a full disk.


def test_keep_checkpoints_keeps_the_newest_k_and_a_corrupt_newest_falls_back(tmp_path, capsys):
  run = tmp_path / "run"
  assert in_process(["--num-epochs", 3, "--checkpoint-every", 1, "--keep-checkpoints", 2,
                     "--quiet", "--out", run], capsys)[0] == 0
  assert [p.name for p in checkpoint.checkpoint_files(run)] == [
      "checkpoint.msgpack", "checkpoint-2.msgpack"]
  assert checkpoint.load_checkpoint(run).epoch == 3
  newest = run / "checkpoint.msgpack"
  newest.write_bytes(newest.read_bytes()[:1000])  # cut short
  code, _, err = in_process(["--resume", "--out", run, "--num-epochs", 4, "--quiet",
                             "--checkpoint-every", 1, "--keep-checkpoints", 2], capsys)
  assert code == 0, err
  assert "corrupt" in err and "using checkpoint-2.msgpack (epoch 2)" in err
  assert "dropped the rows of epochs 3-3" in err
  assert [r["epoch"] for r in metrics(run)] == [1, 2, 3, 4]
  assert [checkpoint.read_checkpoint_file(p).epoch for p in checkpoint.checkpoint_files(run)] == [
      4, 3]
  # A bare --resume keeps the run's --keep-checkpoints 2 (and --checkpoint-every 1)...
  assert in_process(["--resume", "--out", run, "--num-epochs", 5, "--quiet"], capsys)[0] == 0
  assert [checkpoint.read_checkpoint_file(p).epoch for p in checkpoint.checkpoint_files(run)] == [
      5, 4]
  # ...and --keep-checkpoints 1 passed again lets the older ones go.
  assert in_process(["--resume", "--out", run, "--num-epochs", 6, "--quiet",
                     "--keep-checkpoints", "1"], capsys)[0] == 0
  assert [p.name for p in checkpoint.checkpoint_files(run)] == ["checkpoint.msgpack"]
  # With nothing older to fall back on, a corrupt checkpoint is one line, exit 2, and says how
  # to start again.
  newest.write_bytes(b"\x93garbage")
  code, _, err = in_process(["--resume", "--out", run, "--num-epochs", 7], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "corrupt" in err and "move them away" in err


def _with_file_size_limit(limit: int) -> list[str]:
  """The train command with writes limited to ``limit`` bytes a file (Python ignores SIGXFSZ, so
  a write past it fails with EFBIG)."""
  code = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, "
          f"{limit})); sys.argv[0] = 'train'; runpy.run_module('deeprnn_jax.train', "
          "run_name='__main__', alter_sys=True)")
  return [sys.executable, "-c", code]


def test_a_full_disk_keeps_the_last_checkpoint_and_names_the_real_file(tmp_path, capsys):
  """A file-size limit makes every write past 12 kB fail (EFBIG, as a full disk fails with
  ENOSPC): the checkpoint (~25 kB) cannot be saved, the one before stays, the error names it."""
  run = tmp_path / "run"
  assert in_process(["--num-epochs", 1, "--quiet", "--out", run], capsys)[0] == 0
  before = (run / "checkpoint.msgpack").read_bytes()
  assert len(before) > 12_000
  t = run_train(tmp_path, "full", ["--resume", "--out", run, "--num-epochs", 3,
                                   "--checkpoint-every", 1],
                command=_with_file_size_limit(12_000))
  assert t.proc.returncode == 2, t.err
  assert t.err.strip().splitlines() == [
      f"deeprnn_jax.train: error: File too large: {run / 'checkpoint.msgpack'}"]
  assert (run / "checkpoint.msgpack").read_bytes() == before
  assert not list(run.glob(".*.tmp"))
  assert_strict_json_files(run)
  # With room again, it resumes from the checkpoint that was kept.
  assert in_process(["--resume", "--out", run, "--num-epochs", 3, "--quiet"], capsys)[0] == 0
  assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]


def test_an_unwritable_output_is_named_not_its_temporary_file(tmp_path):
  target = tmp_path / "summary.json"
  target.mkdir()  # a folder where the file should go: the rename fails
  with pytest.raises(OSError) as info:
    files.atomic_write_json(target, {"a": 1})
  assert info.value.filename == str(target)
  assert not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------
# Resuming a damaged folder.


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
  """A finished 2-epoch run (checkpoint at epoch 2) to damage."""
  run = tmp_path_factory.mktemp("two") / "run"
  assert train.main(TINY + ["--num-epochs", "2", "--quiet", "--out", str(run)]) == 0
  return run


ROW = ('{"epoch": %d, "train_perplexity": 20.0, "valid_perplexity": null, "tokens_per_sec": 1.0, '
       '"seconds": 1.0}')


def _damage(run: Path, case: str) -> None:
  path = run / "metrics.jsonl"
  lines = path.read_bytes().splitlines(keepends=True)
  damaged = {
      "rows_after_checkpoint": lambda: lines + [(ROW % e + "\n").encode() for e in (3, 4)],
      "torn_last_row": lambda: lines + [(ROW % 3)[:30].encode()],
      "torn_checkpoint_row": lambda: lines[:1] + [lines[1][:25]],
      "old_infinity": lambda: [b'{"epoch": 1, "train_perplexity": Infinity, "valid_perplexity": '
                               b'NaN, "tokens_per_sec": 1.0, "seconds": 1.0}\n'] + lines[1:],
      "non_utf8": lambda: [b"\xff\xfe{}\n"] + lines[1:],
      "not_json": lambda: [b"{epoch: 1\n"] + lines[1:],
      "not_an_object": lambda: [b"[1, 2]\n"] + lines[1:],
      "no_epoch": lambda: [b'{"train_perplexity": 20.0}\n'] + lines[1:],
      "epoch_twice": lambda: lines + lines[:1],
  }
  if case == "missing":
    path.unlink()
  else:
    path.write_bytes(b"".join(damaged[case]()))


@pytest.mark.parametrize("case,note,rows", [
    ("rows_after_checkpoint", "dropped the rows of epochs 3-4", [1, 2, 3]),
    ("torn_last_row", "cut short", [1, 2, 3]),
    ("torn_checkpoint_row", "no rows for epochs 2", [1, 3]),
    ("old_infinity", None, [1, 2, 3]),
    ("missing", "is missing", [3]),
])
def test_resume_reconciles_metrics_with_the_checkpoint(case, note, rows, two_epochs, tmp_path,
                                                       capsys):
  run = tmp_path / "run"
  shutil.copytree(two_epochs, run)
  _damage(run, case)
  code, _, err = in_process(["--resume", "--out", run, "--num-epochs", 3, "--quiet"], capsys)
  assert code == 0, err
  if note:
    assert note in err
  else:
    assert err == ""
  got = metrics(run)  # strict: the old Infinity row is rewritten as null plus a flag
  assert [r["epoch"] for r in got] == rows
  if case == "old_infinity":
    assert got[0]["train_perplexity"] is None
    assert got[0]["nonfinite"] == {"train_perplexity": "inf", "valid_perplexity": "nan"}
  assert_strict_json_files(run)


@pytest.mark.parametrize("case,message", [
    ("non_utf8", "line 1 is unreadable (not UTF-8)"),
    ("not_json", "line 1 is unreadable (not JSON)"),
    ("not_an_object", "line 1 is not a metrics row"),
    ("no_epoch", "line 1 is not a metrics row"),
    ("epoch_twice", "epoch 1 twice (lines 1 and 3)"),
    ("checkpoint_of_another_model", "not of the run config.json describes"),
    ("unreadable_config", "config.json is unreadable"),
])
def test_a_damaged_folder_is_one_line_exit_2_and_nothing_is_written(case, message, two_epochs,
                                                                    tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(two_epochs, run)
  if case == "checkpoint_of_another_model":
    other = tmp_path / "other"
    assert in_process(["--num-epochs", 1, "--quiet", "--num-hiddens", 8, "--out", other],
                      capsys)[0] == 0
    shutil.copy(other / "checkpoint.msgpack", run / "checkpoint.msgpack")
  elif case == "unreadable_config":
    (run / "config.json").write_text('{"cell": "lstm", ')
  else:
    _damage(run, case)
  before = snapshot(run)
  code, _, err = in_process(["--resume", "--out", run, "--num-epochs", 3], capsys)
  assert code == 2, err
  assert len(err.strip().splitlines()) == 1 and message in err, err
  assert snapshot(run) == before


def test_a_folder_without_a_checkpoint_is_no_dead_end(tmp_path, capsys):
  """Config and metrics but no checkpoint (stopped before the first): a fresh run is refused with
  the way out, and --resume starts it again from epoch 0 with its settings."""
  run = tmp_path / "run"
  assert in_process(["--num-epochs", 3, "--seed", 5, "--quiet", "--out", run], capsys)[0] == 0
  (run / "checkpoint.msgpack").unlink()
  (run / ".checkpoint.msgpack.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # a save cut short
  (run / ".notes.tmp").write_text("not the run's")
  code, _, err = in_process(["--num-epochs", 3, "--out", run], capsys)
  assert code == 2 and "--resume starts it again from epoch 0" in err
  code, _, err = in_process(["--resume", "--out", run, "--quiet"], capsys)  # TINY as started
  assert code == 0, err
  assert "starts again from epoch 0" in err
  assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]
  assert strict_json((run / "config.json").read_text())["seed"] == 5
  assert [p.name for p in run.glob(".*.tmp")] == [".notes.tmp"]  # the run's own are cleared


# ----------------------------------------------------------------------------------------------
# Strict JSON, plots, and the smaller fixes.


def test_json_is_strict_and_plots_skip_non_finite_points(tmp_path):
  row = {"epoch": 3, "train_perplexity": float("inf"), "valid_perplexity": float("nan"),
         "tokens_per_sec": 5.0, "list": [1.0, float("-inf")]}
  text = files.dumps(row)
  assert strict_json(text) == {"epoch": 3, "train_perplexity": None, "valid_perplexity": None,
                               "tokens_per_sec": 5.0, "list": [1.0, None],
                               "nonfinite": {"train_perplexity": "inf",
                                             "valid_perplexity": "nan"}}
  rows = [{"epoch": 1, "train_perplexity": 10.0, "valid_perplexity": None},
          {"epoch": 2, "train_perplexity": float("inf"), "valid_perplexity": float("nan")},
          {"epoch": 3, "train_perplexity": None, "valid_perplexity": 8.0},
          {"epoch": 4, "train_perplexity": 6.0, "valid_perplexity": 7.0}]
  assert plots.finite_points(rows, "train_perplexity") == [(1, 10.0), (4, 6.0)]
  assert plots.finite_points(rows, "valid_perplexity") == [(3, 8.0), (4, 7.0)]
  paths = plots.plot_perplexity(rows, tmp_path / "p")
  assert [p.stat().st_size > 0 for p in paths] == [True, True]


def test_a_folder_as_corpus_or_zero_max_tokens_is_refused_writing_nothing(tmp_path, capsys):
  code, _, err = in_process(["--corpus", tmp_path, "--out", tmp_path / "r"], capsys)
  assert code == 2 and "is a directory" in err
  code, _, err = in_process(["--max-tokens", 0, "--out", tmp_path / "r"], capsys)
  assert code == 2 and "max tokens must be a positive integer, or -1" in err
  assert not (tmp_path / "r").exists()


def one_epoch_on(tmp_path: Path, capsys, name: str, text: str) -> tuple[Path, Path]:
  """``(corpus, run)``: a run of one epoch on ``text`` (UTF-8, ``--clean none``)."""
  corpus, run = tmp_path / name, tmp_path / "run"
  corpus.write_text(text, encoding="utf-8")
  assert in_process(["--corpus", corpus, "--clean", "none", "--max-tokens", 1500, "--num-epochs",
                     1, "--quiet", "--out", run], capsys)[0] == 0
  return corpus, run


def test_predict_prints_on_an_ascii_only_terminal(tmp_path, capsys):
  _, run = one_epoch_on(tmp_path, capsys, "café.txt", "le café était très bon, très très bon " * 40)
  proc = subprocess.run(
      [sys.executable, "-m", "deeprnn_jax.predict", "--checkpoint", str(run), "--prefix", "très",
       "--num-preds", "5"],
      cwd=REPO, capture_output=True, env=dict(os.environ, PYTHONIOENCODING="ascii"))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(b"tr\\xe8s")
  assert b"Traceback" not in proc.stderr


def test_predict_continues_the_runs_own_prefix_by_default(tmp_path, capsys):
  corpus, run = one_epoch_on(tmp_path, capsys, "play.txt", "my lord, the king is come. " * 60)
  assert predict.main(["--checkpoint", str(run), "--num-preds", "4"]) == 0
  out = capsys.readouterr().out.rstrip("\n")
  assert out.startswith("my lord,") and len(out) == len("my lord,") + 4
  corpus.unlink()  # its first words are the default: without it, --prefix is needed
  assert predict.main(["--checkpoint", str(run)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no --prefix given" in err[0] and "play.txt" in err[0]
  assert predict.main(["--checkpoint", str(run), "--prefix", "the", "--num-preds", "2"]) == 0
  assert capsys.readouterr().out.startswith("the")


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [4, 16])  # one device; rows split over two
def test_a_run_compiles_its_prediction_and_evaluation_before_its_first_epoch(tmp_path,
                                                                             batch_size):
  """The epoch, a prediction and an evaluation compile ahead (runs.compile_ahead), each once:
  a logged epoch then compiles nothing, and the run's own predictions and evaluations are the
  programs compiled ahead, not new ones."""
  from jax import monitoring
  from jax._src import monitoring as jax_monitoring  # unregistering has no public name

  from deeprnn_jax.base import config
  from deeprnn_jax.run import reporting, runs
  # Compiled anew in this process: nothing from earlier tests, nor from the persistent cache.
  jax.clear_caches()
  cache_was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compiled = []

  def listen(event, seconds, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append((kw.get("fun_name"), time.monotonic()))

  monitoring.register_event_duration_secs_listener(listen)
  first_epoch = []
  measure = reporting.Report.measure
  cfg = config.TrainConfig(num_hiddens=16, max_tokens=2000, batch_size=batch_size, num_steps=5,
                           num_epochs=3, valid_fraction=0.2)

  def measured(self, done):
    first_epoch.append(time.monotonic())
    return measure(self, done)

  reporting.Report.measure = measured
  try:
    summary = runs.train_run(cfg, tmp_path / "run", options=runs.RunOptions(log_every=1),
                             out=open(os.devnull, "w"))
  finally:
    reporting.Report.measure = measure
    jax.config.update("jax_enable_compilation_cache", cache_was)
    jax_monitoring.unregister_event_duration_listener(listen)
  names = [name for name, _ in compiled]
  assert names.count("jit(generate_tokens)") == 1 and names.count("jit(_mean_loss)") == 1
  assert names.count("jit(epoch)") == 1
  late = [name for name, t in compiled if t > first_epoch[0] and "threefry" not in name]
  assert all(name not in ("jit(generate_tokens)", "jit(_mean_loss)", "jit(epoch)")
             for name in late), late
  assert math.isfinite(summary["valid_perplexity"])
  assert summary["shards"] == (2 if batch_size == 16 else 1)


def test_a_background_call_returns_its_value_or_raises_its_error():
  assert stopping.Background(lambda: 41 + 1).result() == 42

  def fails():
    raise ValueError("in the helper thread")

  with pytest.raises(ValueError, match="in the helper thread"):
    stopping.Background(fails).result()
