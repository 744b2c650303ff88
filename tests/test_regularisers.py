"""The AWD-LSTM regularisers: weight drop, locked dropout, weight decay (all off by default)."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import impls_for

from deeprnn_jax import train
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import training
from deeprnn_jax.model import generate
from deeprnn_jax.model.models import RNNLM
from deeprnn_jax.run import checkpoint

V, H = 11, 12


def _init(model: RNNLM, batch: int = 1):
  return model.init(jax.random.PRNGKey(0), jnp.zeros((batch, 1), jnp.int32))["params"]


def _grads(model: RNNLM, params, X, key):
  """The gradient of the summed logits, with dropout and weight drop drawn from ``key``."""

  def loss(params):
    logits, _ = model.apply({"params": params}, X, deterministic=False, rngs={"dropout": key})
    return logits.sum()

  return jax.grad(loss)(params)


def _tokens(batch: int, steps: int, seed: int = 0):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, steps), 0, V)


@pytest.mark.parametrize("impl", impls_for("lstm"))
def test_weight_drop_zeroes_the_same_entries_of_w_hh_at_every_step_of_a_minibatch(impl):
  model = RNNLM(V, H, 2, "lstm", impl=impl, weight_drop=0.5)
  params, X = _init(model), _tokens(3, 20)
  grads = _grads(model, params, X, jax.random.PRNGKey(1))
  for l in (0, 1):
    g = np.asarray(grads["rnn"][f"layer_{l}"]["W_hh"])
    # An entry dropped at one step but used at another would get a gradient: a dropped entry's
    # gradient is exactly zero only where its mask holds for all 20 steps.
    dropped = g == 0.0
    assert 0.35 < dropped.mean() < 0.65
  assert (np.asarray(grads["rnn"]["layer_0"]["W_xh"]) != 0).mean() > 0.2  # not dropped itself


def test_weight_drop_draws_a_new_mask_for_each_minibatch_and_the_same_one_on_every_impl():
  X = _tokens(2, 10)
  zeros = {}
  for impl in impls_for("lstm"):
    model = RNNLM(V, H, 2, "lstm", impl=impl, weight_drop=0.5)
    params = _init(model)
    for key in (1, 2):
      g = _grads(model, params, X, jax.random.PRNGKey(key))["rnn"]["layer_1"]["W_hh"]
      zeros[impl, key] = np.asarray(g) == 0.0
  assert (zeros["scan", 1] != zeros["scan", 2]).mean() > 0.3
  for impl in impls_for("lstm")[1:]:
    np.testing.assert_array_equal(zeros[impl, 1], zeros["scan", 1])
    np.testing.assert_array_equal(zeros[impl, 2], zeros["scan", 2])


@pytest.mark.parametrize("impl", ["scan", "layerwise"])
def test_locked_dropout_drops_a_unit_for_a_whole_sequence_and_per_step_dropout_does_not(impl):
  X = _tokens(1, 24)
  for locked in (True, False):
    model = RNNLM(V, H, 2, "gru", dropout=0.5, impl=impl, locked_dropout=locked)
    grads = _grads(model, _init(model), X, jax.random.PRNGKey(3))
    # Layer 1's W_xh row i is zero only where unit i of its input was dropped at every step;
    # W_hq's row i where the last layer's output unit i was (locked mode only drops it).
    between = (np.abs(np.asarray(grads["rnn"]["layer_1"]["W_xh"])).sum(axis=1) == 0).mean()
    output = (np.abs(np.asarray(grads["W_hq"])).sum(axis=1) == 0).mean()
    if locked:
      assert 0.2 < between < 0.8 and 0.2 < output < 0.8
    else:  # 24 steps: a unit dropped at all of them has probability 2**-24
      assert between == 0.0 and output == 0.0


@pytest.mark.parametrize("impl", ["scan", "layerwise"])
def test_locked_masks_differ_between_the_rows_of_a_minibatch(impl):
  model = RNNLM(V, H, 1, "rnn", dropout=0.5, impl=impl, locked_dropout=True)
  params = _init(model)
  params = dict(params, W_hq=jnp.eye(H, V), b_q=jnp.zeros(V))  # logits = the dropped output
  logits, _ = model.apply({"params": params}, _tokens(4, 9), deterministic=False,
                          rngs={"dropout": jax.random.PRNGKey(5)})
  zero = np.asarray(logits[..., :H]) == 0.0  # [batch, steps, H]
  assert (zero == zero[:, :1]).all()  # the same units at every step
  assert zero.any() and not (zero == zero[:1]).all()  # and not the same in every row


@pytest.mark.parametrize("cell,impl", [(c, i) for c in ("rnn", "lstm") for i in impls_for(c)])
def test_with_rate_0_and_at_evaluation_the_regularised_model_is_the_plain_one(cell, impl):
  plain = RNNLM(V, H, 2, cell, impl=impl)
  params, X = _init(plain), _tokens(2, 7)
  want, _ = plain.apply({"params": params}, X)
  zero = RNNLM(V, H, 2, cell, impl=impl, weight_drop=0.0)
  got, _ = zero.apply({"params": params}, X, deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(got, want)
  dropout = 0.0 if impl in ("wavefront", "cudnn", "onednn") else 0.4
  regularised = RNNLM(V, H, 2, cell, impl=impl, dropout=dropout, weight_drop=0.5,
                      locked_dropout=dropout > 0)
  evaluated, _ = regularised.apply({"params": params}, X)  # deterministic, as evaluation runs
  np.testing.assert_array_equal(evaluated, want)


def test_generation_uses_no_dropout_or_weight_drop():
  plain = RNNLM(V, H, 2, "lstm")
  regularised = RNNLM(V, H, 2, "lstm", dropout=0.5, weight_drop=0.5, locked_dropout=True)
  params, prefix = _init(plain), jnp.array([1, 2, 3], jnp.int32)
  np.testing.assert_array_equal(generate.generate_tokens(regularised, params, prefix, 12),
                                generate.generate_tokens(plain, params, prefix, 12))


@pytest.mark.parametrize("impl", impls_for("lstm"))
def test_an_embedding_feeds_layer_0_and_embedding_dropout_drops_whole_rows(impl):
  model = RNNLM(V, H, 2, "lstm", impl=impl, embed_dim=5, embed_dropout=0.5)
  params = _init(model)
  assert params["embedding"].shape == (V, 5) and params["rnn"]["layer_0"]["W_xh"].shape[0] == 5
  X = jnp.arange(V)[None].repeat(2, 0)  # every token in each row
  g = np.asarray(_grads(model, params, X, jax.random.PRNGKey(2))["embedding"])
  rows = (g == 0.0).all(axis=1)
  assert 0 < rows.sum() < V and ((g == 0.0).any(axis=1) == rows).all()  # whole rows or none
  plain, _ = RNNLM(V, H, 2, "lstm", impl=impl, embed_dim=5).apply({"params": params}, X)
  np.testing.assert_array_equal(model.apply({"params": params}, X)[0], plain)


def test_impossible_regulariser_settings_are_refused():
  with pytest.raises(UsageError, match="weight drop must be in"):
    RNNLM(V, H, 2, weight_drop=1.0)
  with pytest.raises(UsageError, match="impl 'wavefront' runs without dropout"):
    RNNLM(V, H, 1, dropout=0.2, impl="wavefront", locked_dropout=True)
  with pytest.raises(UsageError, match="set an embedding size too"):
    RNNLM(V, H, 2, embed_dropout=0.1)
  with pytest.raises(UsageError, match="weight decay must be a finite number >= 0"):
    training.make_optimizer(1.0, 1.0, "sgd", weight_decay=-0.1)


def test_sgd_weight_decay_steps_by_the_rate_times_gradient_plus_decay_times_weight():
  params, grads = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([0.3, 0.4])}  # norm 0.5: kept
  opt = training.make_optimizer(0.5, 1.0, "sgd", weight_decay=0.1)
  updates, _ = opt.update(grads, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.5 * (0.3 + 0.1), -0.5 * (0.4 + 0.2)], rtol=1e-6)


def test_adam_with_weight_decay_is_adamw():
  params, grads = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([0.3, -0.4])}
  opt = training.make_optimizer(0.5, 1.0, "adam", weight_decay=0.1)
  updates, _ = opt.update(grads, opt.init(params), params)
  # Adam's first step is g / |g| (bias-corrected moments): ±1; AdamW adds wd * w, times the rate.
  np.testing.assert_allclose(updates["w"], [-0.5 * (1 + 0.1), -0.5 * (-1 - 0.2)], rtol=1e-5)


def test_the_sweep_optimizer_decays_weights_as_the_single_one():
  params = {"w": jnp.array([1.0, 2.0])}
  grads = {"w": jnp.array([3.0, -4.0])}
  single = training.make_optimizer(0.5, 1.0, "sgd", weight_decay=0.1)
  sweep = training.make_sweep_optimizer("sgd", weight_decay=0.1)
  state = sweep.init(params)
  state.hyperparams.update(learning_rate=jnp.float32(0.5), max_norm=jnp.float32(1.0))
  chex.assert_trees_all_close(sweep.update(grads, state, params)[0],
                              single.update(grads, single.init(params), params)[0], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_a_resumed_run_with_every_regulariser_on_ends_as_an_uninterrupted_one(tmp_path, capsys):
  small = ["--num-hiddens", "16", "--batch-size", "8", "--num-steps", "10", "--max-tokens",
           "2000", "--quiet", "--dropout", "0.3", "--locked-dropout", "--weight-drop", "0.4",
           "--embed-dim", "6", "--embed-dropout", "0.1", "--weight-decay", "0.01", "--optimizer",
           "adam", "--lr", "0.01", "--ema", "0.8", "--valid-fraction", "0.1", "--patience", "50",
           "--log-every", "1"]
  straight, split = tmp_path / "a", tmp_path / "b"
  assert train.main([*small, "--num-epochs", "4", "--out", str(straight)]) == 0
  assert train.main([*small, "--num-epochs", "2", "--out", str(split)]) == 0
  assert train.main([*small, "--num-epochs", "4", "--resume", "--out", str(split)]) == 0
  capsys.readouterr()
  rows = [[(r["train_perplexity"], r["valid_perplexity"]) for r in map(json.loads, run.joinpath(
      "metrics.jsonl").open())] for run in (straight, split)]
  np.testing.assert_allclose(rows[1], rows[0], rtol=1e-5)
  saved, uninterrupted = checkpoint.load_checkpoint(split), checkpoint.load_checkpoint(straight)
  assert (saved.config.weight_drop, saved.config.locked_dropout, saved.config.ema) == (
      0.4, True, 0.8)
  # The parameters, the optimiser's state with its average, and the best model.
  chex.assert_trees_all_close((saved.params, saved.opt_state),
                              (uninterrupted.params, uninterrupted.opt_state),
                              rtol=1e-5, atol=1e-7)
  best = [checkpoint.load_checkpoint(run, best=True) for run in (split, straight)]
  assert best[0].best["epochs"] == best[1].best["epochs"]
  chex.assert_trees_all_close(best[0].params, best[1].params, rtol=1e-5, atol=1e-7)
