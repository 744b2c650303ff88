"""d2l 1.0's run (``--preset d2l-en``): its pipeline, loss, training loop and figures against
d2l 1.0's own code (``d2l_en.py``)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from references import d2l_en as d2l

from deeprnn_jax import train
from deeprnn_jax.base import presets
from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import DataError
from deeprnn_jax.fit import training
from deeprnn_jax.model import generate, interop, models
from deeprnn_jax.run import checkpoint
from deeprnn_jax.text import corpora, editions, windows
from deeprnn_jax.text.vocab import Vocab


@pytest.fixture(scope="module")
def reference(time_machine_path):
  """d2l 1.0's ``TimeMachine(batch_size=1024, num_steps=32)`` over the same file."""
  return d2l.TimeMachine(corpora.read_text(time_machine_path), 1024, 32)


def test_pipeline_matches_d2l_1_0(reference):
  corpus, vocab = windows.load_corpus("timemachine.txt")
  assert vocab.idx_to_token == reference.vocab.idx_to_token
  assert vocab.idx_to_token[:3] == [" ", "<unk>", "a"] and len(vocab) == 28
  assert vocab.unk == reference.vocab.unk == 1 and vocab["é"] == 1
  assert vocab.token_freqs == reference.vocab.token_freqs
  np.testing.assert_array_equal(corpus, reference.corpus)
  assert len(corpus) == 173428  # the classic edition's line-by-line cleaning leaves 170580

  train, valid = windows.split(corpus, 32, 10000, 5000)
  assert len(windows.windows(corpus, 32)) == len(reference.X) == len(corpus) - 32
  for rows, (X, Y) in ((train, reference.tensors(True)), (valid, reference.tensors(False))):
    np.testing.assert_array_equal(rows[:, :-1], X.numpy())
    np.testing.assert_array_equal(rows[:, 1:], Y.numpy())
  assert train.shape == (10000, 33) and valid.shape == (5000, 33)


def test_loader_shuffles_every_window_once_per_epoch_and_pads_the_last_batch():
  rows = windows.windows(np.arange(2600, dtype=np.int32) % 28, 5)[:1000]
  loader = windows.WindowLoader(rows, 256, seed=3)
  assert loader.epoch_shapes() == [(4, 256, 5)]
  state = loader.rng_state
  first, second = loader.epoch(), loader.epoch()
  for Xs, Ys in (first, second):
    assert Xs.shape == Ys.shape == (4, 256, 5)
    real = Ys.reshape(-1, 5)[:1000]
    assert (Ys.reshape(-1, 5)[1000:] == windows.PAD).all() and (real >= 0).all()
    got = np.concatenate([Xs.reshape(-1, 5)[:1000], real[:, -1:]], axis=1)
    assert sorted(map(tuple, got)) == sorted(map(tuple, rows))  # every window exactly once
  assert not np.array_equal(first[0], second[0])  # reshuffled
  rng = np.random.default_rng(3)  # the order is the generator's permutation, as documented
  np.testing.assert_array_equal(first[0], windows.batches(rows[rng.permutation(1000)], 256)[0])
  loader.rng_state = state
  np.testing.assert_array_equal(loader.epoch()[1], first[1])


def test_masked_loss_is_the_mean_over_the_real_rows():
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 7))
  Y = jax.random.randint(jax.random.PRNGKey(1), (6, 4), 0, 7)
  padded = Y.at[4:].set(windows.PAD)
  np.testing.assert_allclose(training.masked_cross_entropy(logits, padded),
                             training.cross_entropy(logits[:4], Y[:4]), rtol=1e-6)
  np.testing.assert_allclose(training.masked_cross_entropy(logits, Y),
                             training.cross_entropy(logits, Y), rtol=1e-6)


def test_the_d2l_en_preset_holds_d2l_1_0s_settings_and_flags_override_it():
  config = presets.preset("d2l-en")
  assert (config.pipeline, config.cell, config.num_layers, config.num_hiddens) == \
      ("windows", "gru", 2, 32)
  assert (config.batch_size, config.num_steps, config.lr, config.clip, config.num_epochs) == \
      (1024, 32, 2.0, 1.0, 100)
  assert (config.num_train, config.num_val, config.max_tokens) == (10000, 5000, -1)
  assert presets.preset("classic") == TrainConfig()
  assert presets.preset("d2l-en", num_hiddens=64).num_hiddens == 64
  old = TrainConfig().to_json()
  for field in ("pipeline", "num_train", "num_val"):
    del old[field]
  assert TrainConfig.from_json(old) == TrainConfig()  # configs saved before the field load


@pytest.mark.parametrize("argv,pattern", [
    (["--preset", "d2l-en", "--random-iter"], "random partitioning is for the classic"),
    (["--preset", "d2l-en", "--valid-fraction", "0.1"], "valid fraction is for the classic"),
    (["--pipeline", "windows", "--num-train", "0"], "number of training windows must be"),
    (["--preset", "d2l-en", "--num-train", "200000"], "too few for 200000 training"),
    (["--pipeline", "sideways"], "unknown pipeline 'sideways'"),
    (["--preset", "d2l-zh"], "unknown preset 'd2l-zh'; choose one of classic, d2l-en"),
    (["--preset", "d2l-en", "--resume"], "--preset starts a run; --resume continues one"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, time_machine_path, argv, pattern):
  assert train.main([*argv, "--out", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert pattern in err and err.count("\n") == 1 and "Traceback" not in err


def test_training_matches_d2l_1_0_trainer(tmp_path, capsys, time_machine_path):
  """Three epochs of ``--preset d2l-en`` (smaller: 4 minibatches of 256, the last of 232, split
  over 2 CPU devices; stopped after 2 and resumed) and of d2l 1.0's ``Trainer.fit`` from the same
  weights, same orders."""
  run = tmp_path / "run"
  assert train.main(["--preset", "d2l-en", "--num-train", "1000", "--num-val", "600",
                     "--batch-size", "256", "--num-steps", "8", "--num-epochs", "2",
                     "--log-every", "1", "--out", str(run)]) == 0
  assert train.main(["--resume", "--num-epochs", "3", "--out", str(run)]) == 0
  out = capsys.readouterr().out.splitlines()
  config = TrainConfig.from_json(json.loads((run / "config.json").read_text()))
  assert config == presets.preset("d2l-en", num_train=1000, num_val=600, batch_size=256,
                                  num_steps=8, num_epochs=3)
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

  # The run's first weights and orders of the windows, rebuilt as the run builds them.
  corpus, vocab = windows.load_corpus("timemachine.txt")
  model = models.from_config(config, len(vocab))
  optimizer = training.make_optimizer(config.lr, config.clip)
  init_key, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  start = training.init_train_state(model, optimizer, init_key).params
  rng = np.random.default_rng(config.seed)
  orders = [rng.permutation(1000) for _ in range(3)]

  net = d2l.RNNLM(d2l.GRU(len(vocab), 32, 2), len(vocab))
  torch_start = interop.to_d2l_en(interop.params_to_torch(start, "gru", 2))
  net.load_state_dict({k: torch.from_numpy(v) for k, v in torch_start.items()}, strict=True)
  data = d2l.TimeMachine(corpora.read_text(time_machine_path), 256, 8, 1000, 600)
  train_line, val_line = d2l.fit(net, data, lr=2.0, gradient_clip_val=1.0, orders=orders)

  assert len(train_line) == 6 and len(val_line) == 3  # the board: two points an epoch, and one
  torch_train = np.asarray(train_line).reshape(3, 2).mean(axis=1)
  ours_train = [row["train_perplexity"] for row in rows]
  ours_valid = [row["valid_perplexity"] for row in rows]
  assert val_line[-1] < val_line[0] < 0.75 * len(vocab)  # it learned: agreeing means something
  np.testing.assert_allclose(ours_train, torch_train, rtol=2e-5)
  np.testing.assert_allclose(ours_valid, val_line, rtol=2e-5)

  saved = checkpoint.load_checkpoint(run)
  assert saved.epoch == 3 and saved.vocab.idx_to_token == vocab.idx_to_token
  trained = interop.from_d2l_en(net.state_dict())
  for key, value in interop.params_to_torch(saved.params, "gru", 2).items():
    np.testing.assert_allclose(value, trained[key].numpy(), atol=2e-5, err_msg=key)

  # The printed lines: one per epoch with both perplexities, and d2l 1.0's prediction.
  assert out[0].startswith(f"epoch 1, perplexity {torch_train[0]:.1f}, valid perplexity "
                           f"{val_line[0]:.1f}: it has")  # d2l 1.0's figures, as we print them
  params = jax.tree_util.tree_map(jnp.asarray, saved.params)
  ours = generate.predict("it has", 20, params, model, vocab)
  same = interop.to_d2l_en(interop.params_to_torch(saved.params, "gru", 2))
  net.load_state_dict({k: torch.from_numpy(v) for k, v in same.items()})
  assert out[-1] == ours == net.predict("it has", 20, data.vocab) and len(ours) == 26


def test_validation_perplexity_is_the_mean_over_minibatches():
  model = models.RNNLM(5, 4, 1, "gru")
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  rows = windows.windows(np.arange(40, dtype=np.int32) % 5, 3)[:10]  # batches of 4, 4, 2
  logits, _ = jax.jit(model.apply)({"params": params}, rows[:, :-1])  # each row from zeros
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), rows[:, 1:, None], -1)
  per_batch = [nll[i:i + 4].mean() for i in (0, 4, 8)]
  np.testing.assert_allclose(editions.evaluate_windows(model, params, rows, 4),
                             np.mean(np.exp(per_batch)), rtol=1e-6)


def test_alphabetical_vocabulary_round_trips_through_a_checkpoint_list():
  vocab = Vocab.alphabetical(list("hello world"))
  assert vocab.idx_to_token == [" ", "<unk>", "d", "e", "h", "l", "o", "r", "w"]
  again = Vocab.from_tokens_list(vocab.to_json())
  assert again.idx_to_token == vocab.idx_to_token and again["?"] == 1
  with pytest.raises(DataError, match="must hold '<unk>'"):
    Vocab.from_tokens_list(["a", "b"])
