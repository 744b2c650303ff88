"""Every metrics row passes through the run's sinks: ``metrics.jsonl``, and with ``--tensorboard``
TensorBoard's event files, read back here with TensorBoard's own reader."""

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deeprnn_jax import train

TINY = ["--num-hiddens", "16", "--max-tokens", "2000", "--batch-size", "4", "--num-steps", "5",
        "--num-epochs", "3", "--valid-fraction", "0.2", "--quiet"]


def rows(run):
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(logdir) -> dict:
  """``{tag: {step: value}}`` of the event files in ``logdir``, as TensorBoard reads them."""
  events = EventAccumulator(str(logdir))
  events.Reload()
  return {tag: {e.step: e.value for e in events.Scalars(tag)}
          for tag in events.Tags()["scalars"]}


def settings_text(logdir) -> dict:
  events = EventAccumulator(str(logdir))
  events.Reload()
  text = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
  return json.loads(text.strip("`\n"))


def assert_rows_equal(found: dict, expected: list[dict], lr: float):
  for row in expected:
    epoch = row["epoch"]
    assert found["perplexity/train"][epoch] == pytest.approx(row["train_perplexity"], rel=1e-6)
    assert found["tokens_per_sec"][epoch] == pytest.approx(row["tokens_per_sec"], rel=1e-6)
    assert found["learning_rate"][epoch] == pytest.approx(lr)
  assert sorted(found["perplexity/train"]) == [r["epoch"] for r in expected]
  validated = {r["epoch"]: r["valid_perplexity"] for r in expected
               if r["valid_perplexity"] is not None}  # logged epochs and the last
  assert validated and found["perplexity/valid"] == pytest.approx(validated, rel=1e-6)


@pytest.mark.slow
def test_tensorboard_holds_the_metrics_rows_and_the_settings(tmp_path):
  run = tmp_path / "run"
  assert train.main([*TINY, "--lr", "1.5", "--tensorboard", "--out", str(run)]) == 0
  expected = rows(run)
  assert len(expected) == 3
  assert_rows_equal(scalars(run / "tensorboard"), expected, lr=1.5)
  settings = settings_text(run / "tensorboard")
  assert settings["lr"] == 1.5 and settings["num_hiddens"] == 16


@pytest.mark.slow
def test_several_models_are_a_tensorboard_run_each(tmp_path):
  run = tmp_path / "run"
  assert train.main([*TINY, "--lr", "0.5,2", "--tensorboard", "--out", str(run)]) == 0
  assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["model-0", "model-1"]
  for k, lr in enumerate((0.5, 2.0)):
    logdir = run / "tensorboard" / f"model-{k}"
    assert_rows_equal(scalars(logdir), [r for r in rows(run) if r["model"] == k], lr=lr)
    assert settings_text(logdir)["lr"] == lr


def test_a_run_without_the_flag_writes_no_tensorboard_files(tmp_path):
  run = tmp_path / "run"
  assert train.main([*TINY, "--num-epochs", "1", "--out", str(run)]) == 0
  assert not (run / "tensorboard").exists() and len(rows(run)) == 1


def test_tensorboard_without_tensorboardx_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
  assert train.main([*TINY, "--tensorboard", "--out", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert "pip install 'deeprnn-jax[tensorboard]'" in err and "Traceback" not in err
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tensorboard_follows_the_learning_rate_schedule(tmp_path):
  """The rate of each epoch's last step: with 2 warmup epochs of n steps, lr (n - 1) / 2n, then
  lr (2n - 1) / 2n, then lr. The tiny run's epochs take n = 79 steps (1,600 training tokens in 4
  rows of 399 tokens, 5 steps a minibatch, at most)."""
  run, n = tmp_path / "run", 79
  assert train.main([*TINY, "--lr", "1.5", "--warmup-epochs", "2", "--tensorboard",
                     "--out", str(run)]) == 0
  rates = scalars(run / "tensorboard")["learning_rate"]
  assert rates == pytest.approx({1: 1.5 * (n - 1) / (2 * n), 2: 1.5 * (2 * n - 1) / (2 * n),
                                 3: 1.5}, rel=1e-6)
