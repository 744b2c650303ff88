"""The train and predict commands end to end: output lines, run-folder artifacts, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from deeprnn_jax import predict, train
from deeprnn_jax.run import checkpoint

SMALL = ["--num-hiddens", "16", "--num-layers", "2", "--max-tokens", "3000", "--batch-size", "8",
         "--num-steps", "10"]


def run_train(args, capsys):
  code = train.main(SMALL + list(args))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_end_to_end_run_prints_d2l_lines_and_writes_every_artifact(tmp_path, capsys):
  run = tmp_path / "run"
  code, out, err = run_train(["--num-epochs", "6", "--log-every", "3", "--valid-fraction", "0.1",
                              "--checkpoint-every", "2", "--out", str(run)], capsys)
  assert code == 0, err
  lines = out.splitlines()
  assert len(lines) == 6
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  summary = json.loads((run / "summary.json").read_text())
  # Each printed figure parses and is the recorded one rounded to one decimal.
  for line, epoch in zip(lines[:2], (3, 6)):
    m = re.fullmatch(rf"epoch {epoch}, perplexity (\d+\.\d), valid perplexity (\d+\.\d): "
                     r"time traveller(.{50})", line)
    assert m, line
    assert float(m.group(1)) == round(rows[epoch - 1]["train_perplexity"], 1)
    assert float(m.group(2)) == round(rows[epoch - 1]["valid_perplexity"], 1)
  m = re.fullmatch(r"compile time (\d+\.\d) sec", lines[2])
  assert m, lines[2]
  assert float(m.group(1)) == round(summary["compile_seconds"], 1)
  m = re.fullmatch(r"perplexity (\d+\.\d), (\d+\.\d) tokens/sec on (cpu|cuda:\d+)", lines[3])
  assert m, lines[3]
  assert float(m.group(1)) == round(rows[-1]["train_perplexity"], 1)
  assert float(m.group(2)) == round(summary["tokens_per_sec"], 1)
  assert lines[4].startswith("time traveller") and len(lines[4]) == len("time traveller") + 50
  assert lines[5].startswith("traveller") and len(lines[5]) == len("traveller") + 50

  assert {p.name for p in run.iterdir()} == {
      "config.json", "metrics.jsonl", "summary.json", "perplexity.png", "perplexity.svg",
      "checkpoint.msgpack", "best.msgpack", "run.lock"}
  config = json.loads((run / "config.json").read_text())
  assert config["num_hiddens"] == 16 and config["valid_fraction"] == 0.1
  assert [r["epoch"] for r in rows] == list(range(1, 7))
  assert set(rows[0]) == {"epoch", "train_perplexity", "valid_perplexity", "tokens_per_sec",
                          "seconds"}
  assert [r["valid_perplexity"] is not None for r in rows] == [False, False, True] * 2
  assert all(r["tokens_per_sec"] > 0 and r["seconds"] > 0 for r in rows)
  assert set(summary) == {"train_perplexity", "valid_perplexity", "tokens_per_sec",
                          "compile_seconds", "wall_seconds", "device", "shards", "precision",
                          "epochs", "stopped_early", "best_epoch", "best_valid_perplexity"}
  assert summary["epochs"] == 6 and summary["device"] == m.group(3)
  assert summary["stopped_early"] is False
  best = min((r["valid_perplexity"], r["epoch"]) for r in rows if r["valid_perplexity"])
  assert (summary["best_valid_perplexity"], summary["best_epoch"]) == best
  assert summary["precision"] == "float32"
  assert float(m.group(1)) == round(summary["train_perplexity"], 1)
  assert summary["train_perplexity"] == pytest.approx(rows[-1]["train_perplexity"])
  assert summary["valid_perplexity"] == pytest.approx(rows[-1]["valid_perplexity"])
  assert summary["wall_seconds"] > summary["compile_seconds"] > 0
  assert (run / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "<svg" in (run / "perplexity.svg").read_text()
  saved = checkpoint.load_checkpoint(run)
  assert saved.epoch == 6 and len(saved.vocab) == 28 and saved.config.num_hiddens == 16


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, capsys):
  straight, split = tmp_path / "a", tmp_path / "b"
  assert run_train(["--num-epochs", "4", "--quiet", "--out", str(straight)], capsys)[0] == 0
  assert run_train(["--num-epochs", "2", "--quiet", "--out", str(split)], capsys)[0] == 0
  code, out, _ = run_train(["--num-epochs", "4", "--quiet", "--resume", "--out", str(split)],
                           capsys)
  assert code == 0
  a = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
  b = [json.loads(l) for l in (split / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in b] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["train_perplexity"] for r in b],
                             [r["train_perplexity"] for r in a], rtol=1e-5)
  pa = checkpoint.load_checkpoint(straight).params
  pb = checkpoint.load_checkpoint(split).params
  np.testing.assert_allclose(pa["W_hq"], pb["W_hq"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_predict_continues_a_prefix_by_num_preds_characters_and_a_seeded_sample_repeats(
    tmp_path, capsys):
  run = tmp_path / "run"
  assert run_train(["--num-epochs", "2", "--quiet", "--out", str(run)], capsys)[0] == 0
  assert predict.main(["--checkpoint", str(run), "--prefix", "the time", "--num-preds", "7"]) == 0
  out = capsys.readouterr().out.rstrip("\n")
  assert out.startswith("the time") and len(out) == len("the time") + 7
  assert predict.main(["--checkpoint", str(run), "--num-preds", "3"]) == 0  # d2l's prefix
  out = capsys.readouterr().out.rstrip("\n")
  assert out.startswith("time traveller") and len(out) == len("time traveller") + 3
  assert predict.main(["--checkpoint", str(run), "--prefix", "the", "--num-preds", "30",
                       "--temperature", "1.0", "--seed", "3"]) == 0
  sampled = capsys.readouterr().out.rstrip("\n")
  assert predict.main(["--checkpoint", str(run), "--prefix", "the", "--num-preds", "30",
                       "--temperature", "1.0", "--seed", "3"]) == 0
  assert capsys.readouterr().out.rstrip("\n") == sampled


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_divergence_exits_3_and_keeps_last_good_checkpoint_and_metrics(tmp_path, capsys):
  run = tmp_path / "run"
  assert run_train(["--num-epochs", "2", "--quiet", "--out", str(run)], capsys)[0] == 0
  before = checkpoint.checkpoint_path(run).read_bytes()
  code, out, err = run_train(["--num-epochs", "5", "--lr", "1e38", "--resume", "--out", str(run),
                              "--checkpoint-every", "1"], capsys)
  assert code == 3
  assert "non-finite loss at epoch 3" in err and len(err.strip().splitlines()) == 1
  assert f"metrics of the epochs before are in {run / 'metrics.jsonl'}" in err
  assert checkpoint.checkpoint_path(run).read_bytes() == before
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2]


def _write(tmp_path, name, payload: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(payload)
  return str(path)


@pytest.mark.parametrize("case", [
    "missing", "directory", "empty", "nothing_left", "non_utf8", "too_short", "layers", "hiddens",
    "batch", "steps", "lr", "clip", "dropout_high", "dropout_negative", "cell", "activation",
    "optimizer", "resume_without_checkpoint", "resume_without_out", "impl", "valid_fraction",
    "epochs", "seed", "lstm_activation", "out_is_file", "out_is_msgpack", "out_under_file",
    "shards_zero", "shards_uneven", "shards_too_many"])
def test_bad_input_exits_2_with_one_line_and_writes_no_checkpoint(case, tmp_path, capsys, request):
  out_dir = str(tmp_path / "run")
  if case == "out_under_file":  # refused where the run folder is made, after reading the corpus
    request.getfixturevalue("time_machine_path")
  args = {
      "missing": ["--corpus", str(tmp_path / "nope.txt")],
      "directory": ["--corpus", str(tmp_path)],
      "empty": ["--corpus", _write(tmp_path, "e.txt", b"")],
      "nothing_left": ["--corpus", _write(tmp_path, "n.txt", b"123 !!\n4 5 6\n")],
      "non_utf8": ["--corpus", _write(tmp_path, "b.txt", b"abc\xff\xfedef")],
      "too_short": ["--corpus", _write(tmp_path, "s.txt", b"hello world\n" * 5)],
      "layers": ["--num-layers", "0"],
      "hiddens": ["--num-hiddens", "0"],
      "batch": ["--batch-size", "0"],
      "steps": ["--num-steps", "-1"],
      "lr": ["--lr", "0"],
      "clip": ["--clip", "-1"],
      "dropout_high": ["--dropout", "1.0"],
      "dropout_negative": ["--dropout", "-0.1"],
      "cell": ["--cell", "transformer"],
      "activation": ["--cell", "rnn", "--activation", "sigmoid"],
      "optimizer": ["--optimizer", "lbfgs"],
      "resume_without_checkpoint": ["--resume"],
      "resume_without_out": ["--resume"],
      "impl": ["--impl", "cudnn9"],
      "valid_fraction": ["--valid-fraction", "1.5"],
      "epochs": ["--num-epochs", "0"],
      "seed": ["--seed", "-1"],
      "lstm_activation": ["--cell", "lstm", "--activation", "relu"],
      "out_is_file": ["--out", _write(tmp_path, "f.txt", b"keep me")],
      "out_is_msgpack": ["--out", str(tmp_path / "run.msgpack")],
      "out_under_file": ["--out", str(tmp_path / "g.txt" / "run")],
      "shards_zero": ["--shards", "0"],
      "shards_uneven": ["--batch-size", "9", "--shards", "2"],
      "shards_too_many": ["--shards", "8"],  # conftest: 2 CPU devices
  }[case]
  if case == "out_under_file":
    _write(tmp_path, "g.txt", b"keep me")
  if case not in ("resume_without_out", "out_is_file", "out_is_msgpack", "out_under_file"):
    args += ["--out", out_dir]
  code = train.main(SMALL + ["--num-epochs", "1"] + args if case != "epochs" else SMALL + args)
  out, err = capsys.readouterr()
  assert code == 2, (out, err)
  assert len(err.strip().splitlines()) == 1 and err.startswith("deeprnn_jax.train: error: ")
  assert "Traceback" not in err
  if case == "non_utf8":
    assert "b.txt" in err and "offset 3" in err
  if case == "too_short":
    assert re.search(r"at least \d+ are needed", err)
  shards_error = {"shards_zero": "--shards must be a positive integer",
                  "shards_uneven": "does not split into 2",
                  "shards_too_many": "JAX has 2 CPU devices"}
  if case in shards_error and jax.default_backend() == "cpu":
    assert shards_error[case] in err
  assert not os.path.exists(os.path.join(out_dir, "checkpoint.msgpack"))
  for name in ("f.txt", "g.txt"):
    if (tmp_path / name).exists():
      assert (tmp_path / name).read_bytes() == b"keep me"


def test_cudnn_impl_without_gpu_or_for_gru_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
  from deeprnn_jax.model import cudnn
  monkeypatch.setattr(cudnn, "has_gpu", lambda: False)  # as on a machine without CUDA
  code, _, err = run_train(["--impl", "cudnn", "--out", str(tmp_path / "a")], capsys)
  assert code == 2 and "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
  code, _, err = run_train(["--impl", "cudnn", "--cell", "gru", "--out", str(tmp_path / "b")],
                           capsys)
  assert code == 2 and "LSTMs without dropout" in err
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_existing_run_is_never_overwritten_and_other_config_is_refused(tmp_path, capsys):
  run = tmp_path / "run"
  assert run_train(["--num-epochs", "1", "--quiet", "--out", str(run)], capsys)[0] == 0
  before = {p.name: p.read_bytes() for p in run.iterdir()}
  code, _, err = run_train(["--num-epochs", "1", "--out", str(run)], capsys)
  assert code == 2 and "--resume" in err
  code, _, err = run_train(["--num-epochs", "3", "--cell", "gru", "--resume", "--out", str(run)],
                           capsys)
  assert code == 2 and "another configuration" in err and "cell" in err
  assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_corrupt_checkpoint_is_one_line_exit_2(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  (run / "checkpoint.msgpack").write_bytes(b"\x93not a checkpoint")
  assert predict.main(["--checkpoint", str(run)]) == 2
  err = capsys.readouterr().err
  assert "corrupt" in err and len(err.strip().splitlines()) == 1
  code, _, err = run_train(["--resume", "--out", str(run)], capsys)
  assert code == 2 and "corrupt" in err
  assert predict.main(["--checkpoint", str(tmp_path / "none")]) == 2
  assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_a_run_split_over_two_cpu_devices_trains_as_one_device_does(tmp_path, capsys):
  if len(jax.devices()) < 2:  # JAX computes on one GPU: a split is refused
    code, _, err = run_train(["--shards", "2", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "2 devices asked for, but JAX has 1 GPU devices" in err
    return
  rows = {}
  for shards in (1, 2):  # with what reads the replicated parameters: evaluation, predictions
    run = tmp_path / str(shards)
    code, out, err = run_train(["--num-epochs", "3", "--log-every", "1", "--valid-fraction", "0.2",
                                "--shards", str(shards), "--out", str(run)], capsys)
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["shards"] == shards
    rows[shards] = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    rows[shards].append(out.splitlines()[:3])  # the epochs' lines with their predictions
  for key in ("train_perplexity", "valid_perplexity"):
    np.testing.assert_allclose([r[key] for r in rows[1][:3]], [r[key] for r in rows[2][:3]],
                               rtol=1e-4)
  assert rows[1][3] == rows[2][3]
  # A split run resumes from its checkpoint.
  code, _, err = run_train(["--resume", "--num-epochs", "4", "--quiet", "--out",
                            str(tmp_path / "2")], capsys)
  assert code == 0, err
  assert len((tmp_path / "2" / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_the_cli_splits_a_16_row_batch_over_2_cpu_cores_but_not_over_1_given_device(tmp_path):
  """A fresh process: the command, not conftest, sets the CPU devices up, one per core it may use.

  16 rows of 16 hidden units split in 2 by the rule (parallel.auto_shards): 8 rows a shard, at
  least MIN_SHARD_ROWS = 8, and 8 x 16² = 2,048 at most MAX_SHARD_WORK = 16 x 256² = 1,048,576;
  never more than MAX_AUTO_SHARDS = 2, and never more than the devices (a core each)."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  args = ["--num-hiddens", "16", "--batch-size", "16", "--num-steps", "10", "--max-tokens", "2000"]
  proc = subprocess.run(
      [sys.executable, "-m", "deeprnn_jax.train", *args, "--num-epochs", "1", "--quiet",
       "--out", str(tmp_path / "run")],
      capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  # The child may run on the cores this process may (Linux: its affinity, which it inherits).
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1)
  if summary["device"] == "cpu":
    assert summary["shards"] == (2 if cores >= 2 else 1)
  else:  # one GPU device: no split
    assert summary["shards"] == 1
  # A count the user gave JAX is left as it is.
  proc = subprocess.run(
      [sys.executable, "-m", "deeprnn_jax.train", *args, "--num-epochs", "1", "--quiet",
       "--out", str(tmp_path / "one")],
      capture_output=True, text=True, env=dict(env, JAX_NUM_CPU_DEVICES="1"),
      cwd=Path(__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stderr
  assert json.loads((tmp_path / "one" / "summary.json").read_text())["shards"] == 1


def test_a_train_subprocess_error_is_one_line_naming_the_missing_corpus(tmp_path):
  env = dict(os.environ)
  proc = subprocess.run(
      [sys.executable, "-m", "deeprnn_jax.train", "--corpus", str(tmp_path / "missing.txt"),
       "--out", str(tmp_path / "run")],
      capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"deeprnn_jax.train: error: corpus file not found: {tmp_path / 'missing.txt'}"]


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_compile_cache_is_filled_and_reused_with_the_same_results(tmp_path):
  """The CLI fills $DEEPRNN_JAX_CACHE, and a second run over the filled cache trains the same."""
  cache = tmp_path / "cache"
  env = dict(os.environ, DEEPRNN_JAX_CACHE=str(cache))
  perplexities = []
  for name in ("cold", "warm"):
    proc = subprocess.run(
        [sys.executable, "-m", "deeprnn_jax.train", *SMALL, "--num-epochs", "2", "--quiet",
         "--out", str(tmp_path / name)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert any(p.name.startswith("jit_epoch") for p in cache.iterdir())
    rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    perplexities.append([json.loads(r)["train_perplexity"] for r in rows])
  assert perplexities[0] == perplexities[1]


def test_compile_cache_is_under_xdg_cache_home_and_off_for_empty_none_or_off(monkeypatch, tmp_path):
  from deeprnn_jax import cli
  monkeypatch.delenv("DEEPRNN_JAX_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert cli.compile_cache_dir() == tmp_path / "deeprnn_jax" / "xla"
  for off in ("", "none", "OFF"):
    monkeypatch.setenv("DEEPRNN_JAX_CACHE", off)
    assert cli.compile_cache_dir() is None


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_bare_resume_keeps_the_saved_settings_and_flags_override_them(tmp_path, capsys):
  run = tmp_path / "run"
  assert run_train(["--num-epochs", "1", "--quiet", "--lr", "1.5", "--seed", "7",
                    "--out", str(run)], capsys)[0] == 0
  assert train.main(["--resume", "--out", str(run), "--num-epochs", "2", "--quiet"]) == 0
  config = json.loads((run / "config.json").read_text())
  assert (config["lr"], config["seed"], config["num_hiddens"], config["num_epochs"]) == (
      1.5, 7, 16, 2)
  assert train.main(["--resume", "--out", str(run), "--num-epochs", "3", "--lr", "2",
                     "--quiet"]) == 0
  assert json.loads((run / "config.json").read_text())["lr"] == 2.0
  assert checkpoint.load_checkpoint(run).epoch == 3


@pytest.mark.usefixtures("time_machine_path")
def test_a_folder_with_metrics_but_no_checkpoint_is_not_overwritten(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
  code, _, err = run_train(["--num-epochs", "1", "--out", str(run)], capsys)
  assert code == 2 and "already holds a run" in err
  assert (run / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_run_files_are_written_0644_under_umask_022(tmp_path, capsys):
  run = tmp_path / "run"
  old = os.umask(0o022)
  try:
    assert run_train(["--num-epochs", "1", "--quiet", "--out", str(run)], capsys)[0] == 0
  finally:
    os.umask(old)
  for name in ("checkpoint.msgpack", "config.json", "metrics.jsonl", "summary.json"):
    assert (run / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_an_interrupt_before_the_first_epoch_exits_130_and_saves_no_checkpoint(
    tmp_path, monkeypatch, capsys):
  from deeprnn_jax.fit import dispatch

  def interrupt(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(dispatch.EpochPipeline, "run", interrupt)
  code = train.main(SMALL + ["--num-epochs", "3", "--quiet", "--out", str(tmp_path / "run")])
  assert code == 130
  assert not (tmp_path / "run" / "checkpoint.msgpack").exists()


def test_os_errors_are_one_line_exit_2(capsys):
  from deeprnn_jax import cli

  def fails(argv):
    raise PermissionError(13, "Permission denied", "/root/x")

  assert cli.run(fails, [], prog="p") == 2
  assert capsys.readouterr().err.strip() == "p: error: Permission denied: /root/x"


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_a_corpus_giving_two_epoch_shapes_compiles_both_before_training(tmp_path, capsys):
  """2,966 tokens in rows of 8 give 37 minibatches of 10 steps for offsets 0-5, 36 for 6-10
  ones: both programs are compiled up front (the pipeline looks one epoch ahead, and a program
  missing from the run's table would stop it)."""
  args = SMALL + ["--max-tokens", "2966"]  # the later flag wins
  run = tmp_path / "run"
  code, _, err = run_train(args + ["--num-epochs", "12", "--quiet", "--out", str(run)], capsys)
  assert code == 0, err
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == list(range(1, 13))
  sizes = {round(r["tokens_per_sec"] * r["seconds"]) for r in rows}
  assert sizes == {36 * 8 * 10, 37 * 8 * 10}  # both shapes trained on
