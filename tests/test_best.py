"""Weight averaging (--ema), the best model by validation (best.msgpack, --best) and early stopping
(--patience)."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deeprnn_jax.evaluate as evaluate  # the command (the package's evaluate is training's)
from deeprnn_jax import convert, predict, train
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import training
from deeprnn_jax.model.models import RNNLM
from deeprnn_jax.run import checkpoint

# A model small enough to overfit 900 characters within a few dozen epochs.
SMALL = ["--num-hiddens", "48", "--batch-size", "8", "--num-steps", "10", "--max-tokens",
         "1000", "--valid-fraction", "0.1", "--optimizer", "adam", "--lr", "0.02", "--quiet"]


def _rows(run) -> list[dict]:
  return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def _evaluate_json(args, capsys) -> dict:
  assert evaluate.main([*args, "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def test_the_average_is_an_ema_of_the_parameters_after_each_step_computed_by_hand():
  model = RNNLM(6, 8, 2, "lstm")
  decay, lr = 0.9, 0.5
  averaging = training.make_optimizer(lr, 1.0, "sgd", ema=decay)
  ts = training.init_train_state(model, averaging, jax.random.PRNGKey(0))
  X = jax.random.randint(jax.random.PRNGKey(1), (3, 2, 5), 0, 6)
  Y = jnp.roll(X, -1, axis=-1)
  # The same three steps with plain SGD, averaged here with the documented decays 0.1, 2/11, 0.25.
  plain = training.make_optimizer(lr, 1.0, "sgd")
  step = jax.jit(training.make_train_step(model, plain))
  by_hand = training.TrainState(ts.params, plain.init(ts.params))
  average = jax.tree.map(np.asarray, ts.params)
  state = model.begin_state(2)
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  for t, d in enumerate([1 / 10, 2 / 11, 3 / 12]):
    by_hand, state, _ = step(by_hand, state, X[t], Y[t], keys[t])
    average = jax.tree.map(lambda a, p, d=d: d * a + (1 - d) * np.asarray(p), average,
                           by_hand.params)
  ts, _ = training.make_train_epoch(model, averaging)(ts, X, Y, jax.random.PRNGKey(2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               training.evaluated_params(ts), average)
  # The average leaves the steps as they were.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ts.params, by_hand.params)


def test_without_an_average_the_evaluated_parameters_are_the_parameters():
  model = RNNLM(5, 4, 1, "gru")
  optimizer = training.make_optimizer(1.0, 1.0)
  ts = training.init_train_state(model, optimizer, jax.random.PRNGKey(0))
  assert training.evaluated_params(ts) is ts.params


def test_the_sweep_optimizer_averages_each_model_on_its_own():
  model = RNNLM(5, 4, 1, "rnn")
  optimizer = training.make_sweep_optimizer("sgd", ema=0.5)
  keys = jnp.stack([jax.random.PRNGKey(0), jax.random.PRNGKey(1)])
  states = training.init_train_states(model, optimizer, keys, [1.0, 0.0001], [1.0, 1.0])
  averaged = training.evaluated_params(states)
  assert averaged["W_hq"].shape == (2, 4, 5)
  np.testing.assert_array_equal(averaged["W_hq"], states.params["W_hq"])  # before any step


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, math.nan])
def test_an_impossible_decay_is_refused(decay):
  with pytest.raises(UsageError, match="ema"):
    training.make_optimizer(1.0, 1.0, ema=decay)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A run that --patience stops: the folder, and its exit code and output."""
  run = tmp_path_factory.mktemp("patience") / "run"
  result = subprocess.run([sys.executable, "-m", "deeprnn_jax.train", *SMALL, "--num-epochs",
                           "200", "--log-every", "2", "--patience", "6", "--ema", "0.5",
                           "--out", str(run)], capture_output=True, text=True)
  return run, result


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_patience_stops_when_validation_has_not_improved_for_n_epochs(stopped):
  run, result = stopped
  assert result.returncode == 0, result.stderr
  rows = _rows(run)
  validated = [(r["valid_perplexity"], r["epoch"]) for r in rows if r["valid_perplexity"]]
  best_value, best_epoch = min(validated)
  last = rows[-1]["epoch"]
  assert last == best_epoch + 6 < 200  # validated every 2 epochs: 6 after the best, and no later
  assert all(v > best_value for v, e in validated if e > best_epoch)
  summary = json.loads((run / "summary.json").read_text())
  assert (summary["epochs"], summary["stopped_early"]) == (last, True)
  assert (summary["best_epoch"], summary["best_valid_perplexity"]) == (best_epoch, best_value)
  assert f"stopped early at epoch {last}" in result.stdout
  assert checkpoint.load_checkpoint(run).epoch == last  # the newest epoch is saved


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_the_best_model_scores_what_the_run_recorded_and_the_newest_its_last_epoch(stopped,
                                                                                   capsys):
  run, _ = stopped
  rows = _rows(run)
  best_value, best_epoch = min((r["valid_perplexity"], r["epoch"]) for r in rows
                               if r["valid_perplexity"])
  best = _evaluate_json(["--checkpoint", str(run), "--best"], capsys)
  assert best["epoch"] == best_epoch
  assert best["static"]["perplexity"] == pytest.approx(best_value, rel=1e-5)
  newest = _evaluate_json(["--checkpoint", str(run)], capsys)
  assert newest["static"]["perplexity"] == pytest.approx(rows[-1]["valid_perplexity"], rel=1e-5)
  assert newest["static"]["perplexity"] > best["static"]["perplexity"]
  # The best file holds the average the run evaluated (--ema), not the raw parameters.
  saved = checkpoint.load_checkpoint(run, best=True)
  assert saved.best == {"valid_perplexity": [best_value], "epochs": [best_epoch]}
  newest_file = checkpoint.load_checkpoint(run)
  assert not np.array_equal(checkpoint.evaluated(newest_file)["W_hq"], newest_file.params["W_hq"])


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_predict_and_convert_read_the_best_model_with_best(stopped, tmp_path, capsys):
  run, _ = stopped
  saved = checkpoint.load_checkpoint(run, best=True)
  vocab = saved.vocab
  best_model, best_params, _ = predict.model_of(saved, None, run)
  assert predict.main(["--checkpoint", str(run), "--best", "--prefix", "the", "--num-preds",
                       "20"]) == 0
  from deeprnn_jax.model import generate
  expected = generate.predict("the", 20, best_params, best_model, vocab)
  assert capsys.readouterr().out.strip() == expected.strip()
  pytest.importorskip("torch")
  assert convert.main(["--to-torch", str(run), "--best", "--out", str(tmp_path / "m.pt")]) == 0
  import torch
  state = torch.load(tmp_path / "m.pt")
  np.testing.assert_allclose(state["linear.weight"].numpy().T, best_params["W_hq"], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_a_run_its_patience_stopped_resumes_only_with_more_patience(stopped, tmp_path):
  run, _ = stopped
  command = [sys.executable, "-m", "deeprnn_jax.train", "--resume", "--out", str(run)]
  refused = subprocess.run(command, capture_output=True, text=True)
  assert refused.returncode == 2
  assert refused.stderr.count("\n") == 1 and "--patience" in refused.stderr
  assert "Traceback" not in refused.stderr


def test_patience_without_held_out_text_is_refused(tmp_path, capsys):
  code = train.main(["--num-hiddens", "8", "--patience", "3", "--out", str(tmp_path / "r")])
  err = capsys.readouterr().err
  assert code == 2 and "--valid-fraction" in err and err.count("\n") == 1
  assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--patience", "0"], "patience"),
    (["--ema", "1"], "ema"),
])
def test_impossible_patience_and_decay_flags_are_refused(args, message, tmp_path, capsys):
  assert train.main([*args, "--out", str(tmp_path / "r")]) == 2
  assert message in capsys.readouterr().err


def test_best_on_a_folder_without_a_best_model_says_so(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert evaluate.main(["--checkpoint", str(tmp_path / "empty"), "--best"]) == 2
  err = capsys.readouterr().err
  assert "no best model in" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_a_sweep_keeps_each_models_best_epoch_and_patience_waits_for_all(tmp_path, capsys):
  run = tmp_path / "sweep"
  assert train.main([*SMALL, "--lr", "0.02,0.004", "--num-epochs", "200", "--log-every", "2",
                     "--patience", "6", "--out", str(run)]) == 0
  capsys.readouterr()
  rows = _rows(run)
  last = rows[-1]["epoch"]
  best = {}
  for k in (0, 1):
    best[k] = min((r["valid_perplexity"], r["epoch"]) for r in rows
                  if r["model"] == k and r["valid_perplexity"])
  assert last == max(e for _, e in best.values()) + 6 < 200
  for k, (value, _) in best.items():
    scored = _evaluate_json(["--checkpoint", str(run), "--best", "--model", str(k)], capsys)
    assert scored["static"]["perplexity"] == pytest.approx(value, rel=1e-5)
  assert checkpoint.load_checkpoint(run, best=True).best["epochs"] == [best[0][1], best[1][1]]
