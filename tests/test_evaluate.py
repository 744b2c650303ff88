"""The evaluate command and what it scores with (deeprnn_jax/evaluate.py, fit/scoring.py)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, TIMEOUT, cpu_env, metrics

from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.fit import scoring, training
from deeprnn_jax.model.models import RNNLM
from deeprnn_jax.text import editions

TINY = ["--num-hiddens", "16", "--num-layers", "1", "--max-tokens", "3000",
        "--valid-fraction", "0.2", "--num-epochs", "2"]


def _run(module: str, args, cwd=REPO) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"deeprnn_jax.{module}", *map(str, args)],
                        capture_output=True, text=True, env=cpu_env(1), cwd=cwd, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A trained run of one model and one of four (two learning rates, two seeds)."""
  root = tmp_path_factory.mktemp("runs")
  for name, extra in (("one", []), ("four", ["--lr", "1,2", "--num-seeds", "2"])):
    proc = _run("train", [*TINY, *extra, "--out", root / name])
    assert proc.returncode == 0, proc.stderr
  return root


def _model_and_params(seed: int, vocab: int = 7, hiddens: int = 8):
  model = RNNLM(vocab, hiddens, 2, "lstm")
  return model, model.init(jax.random.PRNGKey(seed), np.zeros((1, 1), np.int32))["params"]


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_the_held_out_perplexity_is_the_one_the_run_recorded(runs):
  proc = _run("evaluate", ["--checkpoint", runs / "one", "--json"])
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  assert result["epoch"] == 2 and result["models"] == [0] and result["static"]["tokens"] == 599
  recorded = metrics(runs / "one")[-1]["valid_perplexity"]
  assert result["static"]["perplexity"] == pytest.approx(recorded, rel=1e-5)
  assert result["static"]["bits"] == pytest.approx(result["static"]["nats"] / np.log(2))
  assert "dynamic" not in result


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_one_model_of_a_sweep_scores_what_the_run_recorded_for_it(runs):
  rows = {row["model"]: row["valid_perplexity"] for row in metrics(runs / "four")
          if row["epoch"] == 2}
  for k in (1, 3):
    proc = _run("evaluate", ["--checkpoint", runs / "four", "--model", k, "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["static"]["perplexity"] == pytest.approx(rows[k], rel=1e-5)
  best = json.loads(_run("evaluate", ["--checkpoint", runs / "four", "--json"]).stdout)
  assert best["models"] == [min(rows, key=rows.get)]


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_the_ensemble_and_dynamic_evaluation_are_reported_apart_from_the_static_score(runs):
  proc = _run("evaluate", ["--checkpoint", runs / "four", "--ensemble"])
  assert proc.returncode == 0, proc.stderr
  assert "ensemble of models [0, 1, 2, 3] at epoch 2" in proc.stdout
  proc = _run("evaluate", ["--checkpoint", runs / "one", "--dynamic-lr", "1"])
  assert proc.returncode == 0, proc.stderr
  static, dynamic = proc.stdout.splitlines()[1:]
  assert static.startswith("static: ") and dynamic.startswith("dynamic (lr 1, segments of 35): ")
  assert static.split(": ")[1] != dynamic.split(": ")[1]


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  cases = [
      (["--checkpoint", tmp_path / "nothing"], "no checkpoint at"),
      (["--checkpoint", runs / "one", "--text", empty], "has no characters left after cleaning"),
      (["--checkpoint", runs / "one", "--text", tmp_path / "missing.txt"], "not found"),
      (["--checkpoint", runs / "one", "--ensemble"], "holds one model"),
      (["--checkpoint", runs / "one", "--dynamic-lr", "nan"], "--dynamic-lr must be"),
      (["--checkpoint", runs / "one", "--rows", "0"], "--rows must be a positive integer"),
  ]
  for args, message in cases:
    proc = _run("evaluate", args)
    assert proc.returncode == 2, (args, proc.stderr)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_characters_outside_the_vocabulary_are_named_not_scored_as_unknown(tmp_path):
  corpus, text = tmp_path / "corpus.txt", tmp_path / "other.txt"
  corpus.write_text("abc cab bca " * 400)
  text.write_text("abc xyz!")
  train = _run("train", ["--corpus", corpus, "--clean", "none", "--num-hiddens", "8",
                         "--num-epochs", "1", "--out", tmp_path / "run"])
  assert train.returncode == 0, train.stderr
  proc = _run("evaluate", ["--checkpoint", tmp_path / "run", "--text", text])
  assert proc.returncode == 2
  assert "holds 4 characters the run's vocabulary lacks: '!xyz'" in proc.stderr


def test_a_run_without_held_out_text_asks_for_a_file():
  with pytest.raises(editions.UsageError, match="pass --text FILE"):
    editions.Classic().held_out(editions.Text(np.arange(5), None, np.arange(5), np.arange(0)))


def test_the_windows_held_out_stream_is_the_text_its_windows_cover():
  corpus = np.arange(40, dtype=np.int32)
  config = TrainConfig(pipeline="windows", num_steps=5, num_train=10, num_val=8)
  _, valid = editions.windows.split(corpus, config.num_steps, config.num_train, config.num_val)
  text = editions.Text(corpus, None, None, valid)
  np.testing.assert_array_equal(editions.D2L10().held_out(text), np.arange(10, 10 + 8 + 5))


def test_stream_rows_cut_the_text_into_contiguous_rows_of_inputs_and_next_tokens():
  X, Y = scoring.stream_rows(np.arange(10), 3)
  np.testing.assert_array_equal(X, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
  np.testing.assert_array_equal(Y, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
  with pytest.raises(scoring.UsageError, match="at least 2 tokens"):
    scoring.stream_rows(np.arange(1))


def test_one_model_scores_as_training_evaluates():
  model, params = _model_and_params(0)
  tokens = np.random.default_rng(0).integers(0, 7, 301)
  for rows in (1, 3):
    result = scoring.summary(scoring.token_nll(model, params, *scoring.stream_rows(tokens, rows)))
    assert result["perplexity"] == pytest.approx(training.evaluate(model, params, tokens, rows),
                                                 rel=1e-5)
    assert result["tokens"] == 300


def test_an_ensemble_of_copies_of_one_model_scores_that_model():
  model, params = _model_and_params(0)
  X, Y = scoring.stream_rows(np.random.default_rng(1).integers(0, 7, 121), 2)
  copies = jax.tree_util.tree_map(lambda a: np.stack([a] * 3), params)
  np.testing.assert_allclose(scoring.ensemble_nll(model, copies, X, Y),
                             scoring.token_nll(model, params, X, Y), rtol=1e-6, atol=1e-6)


def test_an_ensemble_averages_the_models_probabilities():
  model, a = _model_and_params(0)
  _, b = _model_and_params(1)
  X, Y = scoring.stream_rows(np.random.default_rng(2).integers(0, 7, 61), 1)
  pa = np.exp(-np.asarray(scoring.token_nll(model, a, X, Y), np.float64))
  pb = np.exp(-np.asarray(scoring.token_nll(model, b, X, Y), np.float64))
  both = jax.tree_util.tree_map(lambda x, y: np.stack([x, y]), a, b)
  np.testing.assert_allclose(scoring.ensemble_nll(model, both, X, Y), -np.log((pa + pb) / 2),
                             rtol=1e-5)


@pytest.mark.parametrize("segment", [7, 10, 60])
def test_dynamic_evaluation_at_rate_0_is_static_evaluation(segment):
  model, params = _model_and_params(0)
  X, Y = scoring.stream_rows(np.random.default_rng(3).integers(0, 7, 121), 2)  # 60 steps
  np.testing.assert_allclose(scoring.dynamic_nll(model, params, X, Y, segment, 0.0, 1.0),
                             scoring.token_nll(model, params, X, Y), rtol=1e-5, atol=1e-6)


def test_dynamic_evaluation_scores_each_segment_before_adapting_to_it():
  model, params = _model_and_params(0)
  X, Y = scoring.stream_rows(np.full(121, 3), 1)  # one character again and again: easy to learn
  static = np.asarray(scoring.token_nll(model, params, X, Y))
  dynamic = np.asarray(scoring.dynamic_nll(model, params, X, Y, 10, 1.0, 1.0))
  np.testing.assert_allclose(dynamic[:, :10], static[:, :10], rtol=1e-5)  # nothing seen yet
  assert static[:, 10:].mean() > 2.0 and dynamic[:, 10:].mean() < 0.5
