"""Several models in one program (deeprnn_jax/run/sweeps.py): each equals its single run.

Model ``k`` of a sweep trains as a single run of ``sweep.members(config)[k]`` would: the same
initialisation, data order, partition offsets, dropout masks, learning rate and clip norm. The
library test compares jitted epochs; the command tests compare run folders, written by
``python -m deeprnn_jax.train`` with and without ``--num-seeds``/``--lr`` lists (in process, and in
a subprocess for the signal test).
"""

from __future__ import annotations

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import FOREVER, Train, complete_rows, metrics, snapshot, strict_json

from deeprnn_jax import convert, predict, train
from deeprnn_jax.base.config import Sweep, TrainConfig
from deeprnn_jax.base.errors import EXIT_DIVERGED, EXIT_TERMINATED, EXIT_USAGE
from deeprnn_jax.fit import training
from deeprnn_jax.model import models
from deeprnn_jax.run import checkpoint, sweeps
from deeprnn_jax.text import data

# 2 x 16 GRU with dropout on 2,000 characters: every per-model path (dropout masks, clipping).
SMALL = ["--cell", "gru", "--num-hiddens", "16", "--max-tokens", "2000", "--batch-size", "4",
         "--num-steps", "10", "--dropout", "0.2", "--valid-fraction", "0.1", "--log-every", "2"]


# ----------------------------------------------------------------------------------------------
# The library: one vmapped epoch against K single epochs.


def single_epochs(model, corpus, member, epochs):
  """Per-epoch mean losses and the final parameters of one model trained alone."""
  loader = data.SeqDataLoader(corpus, member.batch_size, member.num_steps,
                              member.use_random_iter, seed=member.seed)
  optimizer = training.config_optimizer(member, loader.max_batches)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(member.seed))
  ts = training.init_train_state(model, optimizer, init_key)
  epoch_fn = training.make_train_epoch(model, optimizer, member.use_random_iter)
  means = []
  for epoch in range(1, epochs + 1):
    Xs, Ys = loader.epoch()
    ts, losses = epoch_fn(ts, Xs, Ys, jax.random.fold_in(train_key, epoch))
    means.append(np.asarray(losses).mean())
  return np.asarray(means), training.evaluated_params(ts)


def models_epochs(model, corpus, members, epochs):
  """The same models trained together: per-epoch mean losses ``[epochs, K]``, the final state
  and every epoch's minibatch counts."""
  loaders = [data.SeqDataLoader(corpus, m.batch_size, m.num_steps, m.use_random_iter,
                                seed=m.seed) for m in members]
  max_batches = loaders[0].max_batches
  optimizer = training.make_sweep_optimizer(
      members[0].optimizer, training.config_lr_factor(members[0], max_batches),
      max(m.weight_decay for m in members), members[0].ema)
  init_keys, train_keys = sweeps.model_keys([m.seed for m in members])
  state = training.Models(
      training.init_train_states(model, optimizer, init_keys, [m.lr for m in members],
                                 [m.clip for m in members], [m.weight_decay for m in members]),
      jnp.ones(len(members), bool))
  epoch_fn = training.make_models_epoch(model, optimizer, members[0].use_random_iter)
  means, counts, all_losses = [], [], []
  for epoch in range(1, epochs + 1):
    b = sweeps.stack_epochs(loaders, max_batches)
    keys = jax.vmap(jax.random.fold_in, (0, None))(jnp.asarray(train_keys), epoch)
    state, losses = epoch_fn(state, b.Xs, b.Ys, keys, b.num_batches)
    losses = np.asarray(losses)
    all_losses.append(losses)
    means.append([losses[k, :n].mean() for k, n in enumerate(b.num_batches)])
    counts.append(b.num_batches)
  return np.asarray(means), state, np.asarray(counts), all_losses


@pytest.mark.parametrize("random_iter,schedule", [
    (False, dict(lr_schedule="cosine", warmup_epochs=1, lr_min_factor=0.1)), (True, {}),
    (False, dict(optimizer="adam", ema=0.9)),
])
def test_k_models_in_one_program_equal_their_single_runs(random_iter, schedule):
  # 806 tokens in rows of 4 x 10: an epoch has 20 or 19 minibatches depending on its offset, so
  # the models' epochs differ in length and the padding is exercised (a padded minibatch must
  # not advance a model's learning-rate schedule either).
  corpus = np.random.default_rng(0).integers(0, 20, 806).astype(np.int32)
  model = models.RNNLM(20, 16, 2, "gru", dropout=0.3)
  base = TrainConfig(cell="gru", num_hiddens=16, batch_size=4, num_steps=10, dropout=0.3,
                     use_random_iter=random_iter, num_epochs=3, **schedule)
  # Each with its own learning rate, clip norm and weight decay (0 among them: no decay).
  adam = schedule.get("optimizer") == "adam"
  members = [TrainConfig(**{**base.to_json(), "seed": s, "lr": lr / 100 if adam else lr,
                            "clip": c, "weight_decay": wd})
             for s, lr, c, wd in [(0, 1.0, 1.0, 0.0), (1, 2.0, 0.2, 0.1), (5, 0.5, 1.0, 0.05)]]
  means, state, counts, _ = models_epochs(model, corpus, members, epochs=3)
  if not random_iter:
    assert len(set(counts.ravel())) > 1, "the models' epochs should differ in length"
  assert np.asarray(state.alive).all()
  for k, member in enumerate(members):
    want, params = single_epochs(model, corpus, member, epochs=3)
    np.testing.assert_allclose(means[:, k], want, rtol=1e-5)
    # The parameters as evaluated: the moving average where --ema keeps one.
    got = jax.tree_util.tree_map(lambda a: a[k], training.evaluated_params(state.train_state))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           got, params)


def test_a_model_that_diverges_stops_alone_at_its_last_finite_state():
  corpus = np.random.default_rng(1).integers(0, 20, 806).astype(np.int32)
  model = models.RNNLM(20, 16, 2, "gru")
  base = TrainConfig(cell="gru", num_hiddens=16, batch_size=4, num_steps=10)
  members = [TrainConfig(**{**base.to_json(), "seed": 0, "lr": 1.0}),
             TrainConfig(**{**base.to_json(), "seed": 0, "lr": 1e30, "clip": 1e30})]
  means, state, _, losses = models_epochs(model, corpus, members, epochs=3)
  assert list(np.asarray(state.alive)) == [True, False]
  assert np.isnan(losses[0][1]).all()  # its first epoch: every loss NaN
  assert (losses[1][1] == 0).all() and (losses[2][1] == 0).all()  # then it no longer trains
  # It keeps its state from before the epoch it diverged in: its initialisation.
  init = training.init_train_state(model, training.make_optimizer(1.0, 1.0),
                                   jax.random.split(jax.random.PRNGKey(0))[0])
  kept = jax.tree_util.tree_map(lambda a: a[1], state.train_state.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, kept, init.params)
  want, _ = single_epochs(model, corpus, members[0], epochs=3)
  np.testing.assert_allclose(means[:, 0], want, rtol=1e-5)


def test_sweep_members_cross_learning_rates_clips_and_seeds():
  config = TrainConfig(seed=7)
  members = Sweep(num_seeds=2, lrs=(0.5, 1.0), clips=(1.0, 5.0)).members(config)
  assert [(m.lr, m.clip, m.seed) for m in members] == [
      (0.5, 1.0, 7), (0.5, 1.0, 8), (0.5, 5.0, 7), (0.5, 5.0, 8),
      (1.0, 1.0, 7), (1.0, 1.0, 8), (1.0, 5.0, 7), (1.0, 5.0, 8)]
  assert Sweep().single and Sweep(lrs=(2.0,)).single and not Sweep(num_seeds=2).single
  assert not Sweep(weight_decays=(0.0, 0.1)).single


def test_weight_decays_cross_inside_clips_and_outside_seeds():
  config = TrainConfig(seed=3, lr=0.5, weight_decay=0.2)
  members = Sweep(num_seeds=2, weight_decays=(0.0, 0.1)).members(config)
  assert [(m.lr, m.clip, m.weight_decay, m.seed) for m in members] == [
      (0.5, 1.0, 0.0, 3), (0.5, 1.0, 0.0, 4), (0.5, 1.0, 0.1, 3), (0.5, 1.0, 0.1, 4)]
  assert [m.weight_decay for m in Sweep(num_seeds=2).members(config)] == [0.2, 0.2]
  restored = Sweep.from_json(Sweep(1, (1.0, 2.0), (), (0.0, 0.1)).to_json())
  assert restored == Sweep(1, (1.0, 2.0), (), (0.0, 0.1))
  # A sweep.json that names no weight decays: every model the config's.
  assert Sweep.from_json({"num_seeds": 2, "lrs": [], "clips": []}) == Sweep(2)


# ----------------------------------------------------------------------------------------------
# The command, on The Time Machine (offline with no copy of it, each fails in one line).

command = pytest.mark.usefixtures("time_machine_path")


def train_main(args) -> int:
  return train.main([str(a) for a in args])


def rows_of(run, model=None):
  return [r for r in metrics(run) if model is None or r.get("model") == model]


def assert_model_equals_single(run, k, single):
  """Model ``k``'s rows of a sweep folder match a single run's rows, epoch by epoch."""
  got, want = rows_of(run, k), rows_of(single)
  assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
  for key in ("train_perplexity", "valid_perplexity"):
    a, b = [r[key] for r in got], [r[key] for r in want]
    assert [x is None for x in a] == [x is None for x in b]
    np.testing.assert_allclose([x for x in a if x is not None], [x for x in b if x is not None],
                               rtol=1e-5)


@command
def test_the_command_trains_a_grid_and_each_model_equals_its_single_run(tmp_path, capsys):
  run = tmp_path / "sweep"
  code = train_main(SMALL + ["--num-epochs", "4", "--num-seeds", "2", "--lr", "1,2",
                             "--out", run])
  out, err = capsys.readouterr()
  assert code == 0, err
  # d2l's lines, with the spread over the models; a line per model; the best one's predictions.
  assert "epoch 4, perplexity " in out and "± " in out and "(4 models)" in out
  for k, (seed, lr) in enumerate([(0, 1), (1, 1), (0, 2), (1, 2)]):
    assert f"model {k} (seed {seed}, lr {lr}, clip 1): perplexity " in out
  assert "over 4 models" in out and "tokens/sec on cpu" in out
  rows = metrics(run)
  assert len(rows) == 4 * 4
  assert {(r["epoch"], r["model"]) for r in rows} == {(e, k) for e in range(1, 5)
                                                      for k in range(4)}
  assert all(r["diverged"] is False for r in rows)
  summary = strict_json((run / "summary.json").read_text())
  assert summary["num_models"] == 4 and len(summary["train_perplexity"]) == 4
  assert summary["train_perplexity_mean"] == pytest.approx(np.mean(summary["train_perplexity"]))
  assert summary["diverged"] == []
  valid = summary["valid_perplexity"]
  assert summary["best_model"] == int(np.argmin(valid))
  assert (run / "perplexity.png").stat().st_size > 0
  assert json.loads((run / "sweep.json").read_text())["lrs"] == [1.0, 2.0]

  # Models 1 (seed 1, lr 1) and 2 (seed 0, lr 2) against their single runs.
  for k, seed, lr in [(1, 1, "1"), (2, 0, "2")]:
    single = tmp_path / f"single{k}"
    assert train_main(SMALL + ["--num-epochs", "4", "--seed", str(seed), "--lr", lr,
                               "--shards", "1", "--out", single]) == 0
    capsys.readouterr()
    assert_model_equals_single(run, k, single)
    _, params, _ = predict.load_model(run, k)
    _, want, _ = predict.load_model(single)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           params, want)

  # predict: the best model by default, any model by --model, one line for a model not there.
  assert predict.main(["--checkpoint", str(run), "--prefix", "time", "--num-preds", "5"]) == 0
  assert predict.main(["--checkpoint", str(run), "--model", "4"]) == EXIT_USAGE
  assert "holds models 0 to 3" in capsys.readouterr().err
  # convert --to-torch: one model, as its single run's folder converts.
  assert convert.main(["--to-torch", str(run), "--model", "1", "--out",
                       str(tmp_path / "a.pt")]) == 0
  assert convert.main(["--to-torch", str(tmp_path / "single1"), "--out",
                       str(tmp_path / "b.pt")]) == 0
  a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
  assert list(a) == list(b)
  for key in a:
    np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-4, atol=1e-6)


@command
def test_a_sweep_resumes_as_if_never_stopped(tmp_path, capsys):
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  grid = ["--num-seeds", "2", "--clip", "0.5,1", "--weight-decay", "0,0.01"]
  assert train_main(SMALL + grid + ["--num-epochs", "4", "--out", whole]) == 0
  assert train_main(SMALL + grid + ["--num-epochs", "2", "--out", parts]) == 0
  saved = checkpoint.load_checkpoint(parts)
  assert saved.epoch == 2 and [m["clip"] for m in saved.models] == [0.5] * 4 + [1.0] * 4
  assert [m["weight_decay"] for m in saved.models] == [0.0, 0.0, 0.01, 0.01] * 2
  assert {np.shape(a)[0] for a in jax.tree_util.tree_leaves(saved.params)} == {8}
  before = snapshot(parts)
  # Other models than the checkpoint's: one line, nothing changed.
  for other in (["--lr", "1,3"], ["--weight-decay", "0,0.02"]):
    assert train_main(["--resume", "--out", str(parts), *other]) == EXIT_USAGE
    assert "checkpoint" in capsys.readouterr().err and snapshot(parts) == before
  # A bare --resume continues the same models.
  assert train_main(["--resume", "--out", str(parts), "--num-epochs", "4"]) == 0
  capsys.readouterr()
  got, want = metrics(parts), metrics(whole)
  assert [(r["epoch"], r["model"]) for r in got] == [(r["epoch"], r["model"]) for r in want]
  np.testing.assert_allclose([r["train_perplexity"] for r in got],
                             [r["train_perplexity"] for r in want], rtol=1e-5)


@command
def test_a_model_whose_validation_is_not_finite_trains_no_more(tmp_path, capsys, monkeypatch):
  """Only the host sees validation perplexities: a model it finds diverged there (forced here at
  model 1's epoch 2) reads no more minibatches, so the checkpoint keeps its epoch-2 parameters,
  and the other model trains on."""
  args = SMALL + ["--num-seeds", "2", "--log-every", "1"]
  assert train_main(args + ["--num-epochs", "2", "--out", tmp_path / "two"]) == 0
  assert train_main(args + ["--num-epochs", "4", "--out", tmp_path / "four"]) == 0
  real, calls = training.evaluate, []

  def evaluate(*a, **k):  # epoch 1: models 0, 1; epoch 2: models 0, 1 (the fourth call)
    calls.append(1)
    return float("inf") if len(calls) == 4 else real(*a, **k)

  monkeypatch.setattr(training, "evaluate", evaluate)
  run = tmp_path / "run"
  assert train_main(args + ["--num-epochs", "4", "--out", run]) == EXIT_DIVERGED
  capsys.readouterr()
  assert [r["diverged"] for r in rows_of(run, 1)] == [False, True, True, True]
  for k, same_as in ((1, tmp_path / "two"), (0, tmp_path / "four")):
    _, got, _ = predict.load_model(run, k)
    _, want, _ = predict.load_model(same_as, k)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  assert "or epoch 2's where only its validation perplexity" in capsys.readouterr().err


@command
def test_one_diverging_model_leaves_the_others_and_the_exit_code_says_so(tmp_path, capsys):
  run = tmp_path / "run"
  code = train_main(SMALL + ["--num-epochs", "3", "--lr", "1,1e30", "--clip", "1e30",
                             "--out", run])
  out, err = capsys.readouterr()
  assert code == EXIT_DIVERGED
  assert "model 1 (seed 0, lr 1e+30, clip 1e+30) diverged at epoch 1" in out
  assert "some models diverged: model 1" in err
  assert "model 0 (seed 0, lr 1, clip 1e+30): perplexity " in out
  summary = strict_json((run / "summary.json").read_text())
  assert summary["diverged"] == [1] and summary["models"][1]["diverged_epoch"] == 1
  assert summary["train_perplexity"][1] is None and summary["train_perplexity"][0] > 1
  assert [r["diverged"] for r in rows_of(run, 1)] == [True] * 3
  assert all(r["train_perplexity"] is None for r in rows_of(run, 1))
  assert all(r["train_perplexity"] > 1 for r in rows_of(run, 0))
  saved = checkpoint.load_checkpoint(run)  # finite: the diverged model kept its last good state
  assert saved.epoch == 3 and saved.models[1]["diverged_epoch"] == 1
  # Every model diverged: the run stops there.
  code = train_main(SMALL + ["--num-epochs", "3", "--lr", "1e30,1e29", "--clip", "1e30",
                             "--out", tmp_path / "all"])
  assert code == EXIT_DIVERGED
  assert "every model diverged" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--num-seeds", "0"], "number of seeds must be a positive integer"),
    (["--lr", "1,x"], "--lr takes numbers separated by commas"),
    (["--lr", "1,-2"], "learning rate must be a finite number > 0, got -2.0"),
    (["--clip", "1,1"], "a value twice"),
    (["--num-seeds", "3", "--devices", "2"], "3 models do not spread evenly over 2 devices"),
    (["--num-seeds", "2", "--devices", "5"], "--devices 5: JAX has 2 CPU device(s)"),
    (["--num-seeds", "2", "--preset", "d2l-en"], "several models train on the classic"),
])
@command
def test_bad_sweeps_are_one_line_errors(tmp_path, capsys, flags, message):
  small = [] if "--preset" in flags else SMALL
  assert train_main(small + flags + ["--out", str(tmp_path / "run")]) == EXIT_USAGE
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


@command
@pytest.mark.slow
def test_sigterm_saves_every_model_and_resume_continues(tmp_path):
  run = tmp_path / "run"
  args = SMALL + ["--num-seeds", "3", "--checkpoint-every", "1000", "--out", run]
  t = Train(tmp_path, "sweep", args + ["--num-epochs", FOREVER])
  t.wait_for(lambda: complete_rows(run) >= 3 * 3, "three epochs of rows")
  t.signal(signal.SIGTERM)
  assert t.wait() == EXIT_TERMINATED, t.err
  assert "resume with: python -m deeprnn_jax.train --resume" in t.err
  saved = checkpoint.load_checkpoint(run)
  last = max(r["epoch"] for r in metrics(run))
  assert saved.epoch == last and len(saved.models) == 3
  assert len(metrics(run)) == 3 * last  # every model's row of every finished epoch
  t = Train(tmp_path, "resume", ["--resume", "--out", run, "--num-epochs", last + 2])
  assert t.wait() == 0, t.err
  assert [r["epoch"] for r in metrics(run)] == [e for e in range(1, last + 3) for _ in range(3)]


def test_predict_chooses_the_best_model_that_did_not_diverge():
  described = [
      {"model": 0, "train_perplexity": 3.0, "valid_perplexity": 5.0, "diverged_epoch": None},
      {"model": 1, "train_perplexity": None, "valid_perplexity": None, "diverged_epoch": 2},
      {"model": 2, "train_perplexity": 2.0, "valid_perplexity": 4.0, "diverged_epoch": None},
      {"model": 3, "train_perplexity": 1.5, "valid_perplexity": 4.5, "diverged_epoch": None},
  ]
  assert checkpoint.choose_model(described, None, "run") == 2  # by validation perplexity
  no_valid = [dict(d, valid_perplexity=None) for d in described]
  assert checkpoint.choose_model(no_valid, None, "run") == 3  # else by training perplexity
  assert checkpoint.choose_model(described, 1, "run") == 1  # asked for: even a diverged one
