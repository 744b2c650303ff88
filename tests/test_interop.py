"""PyTorch and d2l interoperability: the same weights compute the same things in both.

The PyTorch side is d2l's own code (classic edition, ``d2l/torch.py``), in ``references/d2l.py``:
``RNNModel``, ``train_ch8`` and ``predict_ch8``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import cell_cases, cell_names
from references import d2l_en
from references.d2l import RNNModel, load_corpus_time_machine, predict_ch8, train_ch8
from torch import nn

from deeprnn_jax import convert, predict
from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import training
from deeprnn_jax.model import cells, interop, models
from deeprnn_jax.run import checkpoint
from deeprnn_jax.text import data

# The cells with a PyTorch layer (that the default impl runs), with each φ they take.
CASES = cell_cases(fast=True, torch=True)
LAYERS = [1, 2, 3]
V, H, B, T = 10, 8, 3, 5  # Small, so that every case runs in well under a second.


# --------------------------------------------------------------------------------------------
# Helpers.


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
  # These models are tiny: a second intra-op thread only adds spin-waiting, which on a busy
  # 2-core machine made d2l's loop ~40x slower. Numbers are unaffected at these tolerances.
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


# PyTorch's three recurrent layers, written out: the cells that have one are these.
TORCH_LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def torch_layer(cell, activation, vocab_size, num_hiddens, num_layers):
  layer = TORCH_LAYERS[cell]
  nonlinearity = dict(nonlinearity=activation) if layer is nn.RNN else {}  # only nn.RNN takes φ
  return layer(vocab_size, num_hiddens, num_layers, **nonlinearity)


def d2l_model(cell, activation="tanh", num_layers=2, vocab_size=V, num_hiddens=H, seed=0):
  torch.manual_seed(seed)
  return RNNModel(torch_layer(cell, activation, vocab_size, num_hiddens, num_layers), vocab_size)


def random_state(cell, num_layers, seed=1):
  g = torch.Generator().manual_seed(seed)
  make = lambda: 0.5 * torch.randn(num_layers, B, H, generator=g)
  return (make(), make()) if cells.CELLS[cell].pair else make()


def to_jax_state(state):
  if isinstance(state, tuple):
    return tuple(jnp.asarray(s.detach().numpy()) for s in state)
  return jnp.asarray(state.detach().numpy())


def assert_trees_close(actual, expected, atol):
  """Same structure, every leaf within ``atol`` (0: equal)."""
  chex.assert_trees_all_close(actual, expected, rtol=0, atol=atol)


def tokens(seed, shape=(B, T), vocab_size=V):
  return np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)


def lstm_state_dict(num_layers=2):
  return d2l_model("lstm", num_layers=num_layers).state_dict()


# The layout, written out here rather than taken from interop (whose conversions these tests
# check): for each layer k, W_xh is PyTorch's weight_ih_l{k} transposed, W_hh is weight_hh_l{k}
# transposed, b_xh and b_hh are bias_ih_l{k} and bias_hh_l{k}; W_hq is linear.weight transposed
# and b_q is linear.bias. No gate block moves: our cells keep PyTorch's gate order (RNN: h; GRU:
# r, z, n; LSTM: i, f, g, o), so a cell whose order differed would fail here.


def expected_params(state_dict, num_layers, rnn_prefix="rnn."):
  """Our params from a PyTorch state dict of tensors (``rnn_prefix``: d2l 1.0's ``rnn.rnn.``),
  copied: PyTorch may go on to change its tensors in place (clipping its gradients, a step)."""
  t = lambda key: state_dict[key].detach().numpy().copy()
  return {
      "rnn": {f"layer_{k}": {"W_xh": t(f"{rnn_prefix}weight_ih_l{k}").T,
                             "W_hh": t(f"{rnn_prefix}weight_hh_l{k}").T,
                             "b_xh": t(f"{rnn_prefix}bias_ih_l{k}"),
                             "b_hh": t(f"{rnn_prefix}bias_hh_l{k}")}
              for k in range(num_layers)},
      "W_hq": t("linear.weight").T,
      "b_q": t("linear.bias"),
  }


def expected_state_dict(params, num_layers):
  """A d2l ``RNNModel`` state dict (NumPy) from our params."""
  a = lambda x: np.array(x)
  state_dict = {}
  for k in range(num_layers):
    layer = params["rnn"][f"layer_{k}"]
    state_dict.update({f"rnn.weight_ih_l{k}": a(layer["W_xh"]).T,
                       f"rnn.weight_hh_l{k}": a(layer["W_hh"]).T,
                       f"rnn.bias_ih_l{k}": a(layer["b_xh"]),
                       f"rnn.bias_hh_l{k}": a(layer["b_hh"])})
  return {**state_dict, "linear.weight": a(params["W_hq"]).T, "linear.bias": a(params["b_q"])}


# --------------------------------------------------------------------------------------------
# Same outputs, same gradients, same update.


@pytest.mark.parametrize("num_layers", LAYERS)
@pytest.mark.parametrize("cell,activation", CASES)
def test_forward_gradients_and_clipped_sgd_step_match_pytorch(cell, activation, num_layers):
  lr, clip = 0.5, 0.05
  net = d2l_model(cell, activation, num_layers)
  model, params = interop.model_from_torch(net.state_dict(), cell, num_layers, activation)
  assert (model.vocab_size, model.num_hiddens) == (V, H)
  X, Y = tokens(0), tokens(1)
  state0 = random_state(cell, num_layers)  # A nonzero state, as d2l carries between minibatches.

  # PyTorch: forward, autograd, then d2l-style global-norm clipping and one SGD step.
  sgd = torch.optim.SGD(net.parameters(), lr=lr)
  out, state = net(torch.from_numpy(X), state0)
  loss = nn.CrossEntropyLoss()(out, torch.from_numpy(Y).T.reshape(-1).long())
  sgd.zero_grad()
  loss.backward()
  torch_grads = expected_params({name: p.grad for name, p in net.named_parameters()}, num_layers)
  norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
  assert norm > 2 * clip  # The clip really clips.
  sgd.step()

  # Ours, in one compiled call: the same forward and gradients, then our optimizer's step.
  optimizer = training.make_optimizer(lr, clip)

  @jax.jit
  def ours(params, state0):
    def loss_fn(params):
      logits, state = model.apply({"params": params}, X, state0)
      return training.cross_entropy(logits, Y), (logits, state)

    (loss, (logits, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return loss, logits, state, grads, optax.apply_updates(params, updates)

  our_loss, logits, our_state, grads, new_params = ours(params, to_jax_state(state0))
  # PyTorch's rows are time-major [steps * batch, vocab]; ours are [batch, steps, vocab].
  torch_logits = out.detach().numpy().reshape(T, B, V).transpose(1, 0, 2)
  np.testing.assert_allclose(logits, torch_logits, rtol=0, atol=1e-5)
  assert_trees_close(our_state, to_jax_state(state), 1e-5)
  np.testing.assert_allclose(our_loss, loss.item(), rtol=0, atol=1e-5)
  assert_trees_close(grads, torch_grads, 1e-4)
  assert_trees_close(new_params, expected_params(net.state_dict(), num_layers), 1e-5)


@pytest.mark.parametrize("cell,activation", CASES)
def test_scan_impl_logits_and_final_state_match_pytorch(cell, activation):
  net = d2l_model(cell, activation, 2)
  X = tokens(2)
  state0 = random_state(cell, 2)
  out, state = net(torch.from_numpy(X), state0)
  model, params = interop.model_from_torch(net.state_dict(), cell, 2, activation, impl="scan")
  logits, our_state = jax.jit(model.apply)({"params": params}, X, to_jax_state(state0))
  np.testing.assert_allclose(logits, out.detach().numpy().reshape(T, B, V).transpose(1, 0, 2),
                             rtol=0, atol=1e-5)
  assert_trees_close(our_state, to_jax_state(state), 1e-5)


# --------------------------------------------------------------------------------------------
# Conversion is exact both ways.


@pytest.mark.parametrize("num_layers", LAYERS)
@pytest.mark.parametrize("cell,activation", CASES)
def test_params_from_torch_then_params_to_torch_gives_back_the_state_dict_exactly(
    cell, activation, num_layers):
  sd = d2l_model(cell, activation, num_layers).state_dict()
  back = interop.params_to_torch(interop.params_from_torch(sd, cell, num_layers), cell, num_layers)
  assert list(back) == list(sd) == interop.state_dict_keys(num_layers)
  for key, value in sd.items():
    assert back[key].dtype == np.float32 and back[key].flags.c_contiguous
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_prefix_helpers_convert_a_bare_lstm_and_linear_both_ways_exactly():
  lstm, linear = nn.LSTM(V, H, 2), nn.Linear(H, V)
  sd = {**interop.with_prefix(lstm.state_dict(), "rnn."),
        **interop.with_prefix(linear.state_dict(), "linear.")}
  params = interop.params_from_torch(sd, "lstm", 2)
  np.testing.assert_array_equal(params["rnn"]["layer_1"]["W_hh"], lstm.weight_hh_l1.detach().T)
  np.testing.assert_array_equal(params["W_hq"], linear.weight.detach().T)
  assert_trees_close(params, expected_params(sd, 2), 0.0)

  back = interop.params_to_torch(params, "lstm", 2)
  lstm2, linear2 = nn.LSTM(V, H, 2), nn.Linear(H, V)
  lstm2.load_state_dict({k: torch.from_numpy(v) for k, v in
                         interop.strip_prefix(back, "rnn.").items()}, strict=True)
  linear2.load_state_dict({k: torch.from_numpy(v) for k, v in
                           interop.strip_prefix(back, "linear.").items()}, strict=True)
  for a, b in zip(lstm.parameters(), lstm2.parameters()):
    assert torch.equal(a, b)
  assert torch.equal(linear.weight, linear2.weight)


def test_numpy_float64_and_bfloat16_state_dicts_convert_to_float32_params():
  sd = lstm_state_dict()
  expected = expected_params(sd, 2)
  from_tensors = interop.params_from_torch(sd, "lstm", 2)
  assert_trees_close(from_tensors, expected, 0.0)
  from_numpy = interop.params_from_torch({k: v.numpy() for k, v in sd.items()}, "lstm", 2)
  assert_trees_close(from_numpy, expected, 0.0)
  from_f64 = interop.params_from_torch({k: v.double().numpy() for k, v in sd.items()}, "lstm", 2)
  assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(from_f64))
  assert_trees_close(from_f64, expected, 0.0)
  from_bf16 = interop.params_from_torch({k: v.bfloat16() for k, v in sd.items()}, "lstm", 2)
  assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(from_bf16))
  assert_trees_close(from_bf16, expected, 1e-2)


def test_importing_interop_and_convert_does_not_import_torch():
  code = ("import sys; import deeprnn_jax.model.interop, deeprnn_jax.convert; "
          "assert 'torch' not in sys.modules, 'torch was imported'")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# Clear errors.


@pytest.mark.parametrize("cell,pattern", [
    ("gru", r"rnn\.weight_hh_l0 has shape \[32, 8\].*3 gate.*fits lstm"),
    ("rnn", r"rnn\.weight_hh_l0 has shape \[32, 8\].*1 gate.*fits lstm"),
    ("transformer", r"unknown cell 'transformer'"),
])
def test_a_state_dict_of_another_or_unknown_cell_is_refused_naming_the_cell_it_fits(cell, pattern):
  with pytest.raises(UsageError, match=pattern):
    interop.params_from_torch(lstm_state_dict(), cell, 2)


@pytest.mark.parametrize("num_layers,pattern", [
    (3, r"no rnn\.weight_ih_l2 \(and 3 more\); the state dict has 2 layer\(s\), not 3"),
    (1, r"unexpected key rnn\.weight_ih_l1 .*; the state dict has 2 layers, not 1"),
    (0, r"positive integer, got 0"),
])
def test_a_wrong_layer_count_is_refused_naming_the_layers_the_state_dict_has(num_layers, pattern):
  with pytest.raises(UsageError, match=pattern):
    interop.params_from_torch(lstm_state_dict(), "lstm", num_layers)


@pytest.mark.parametrize("key,value,pattern", [
    ("linear.weight", np.zeros((V + 1, H), np.float32),
     r"linear\.weight has shape \[11, 8\]; .* needs \[10, 8\]"),
    ("rnn.bias_hh_l1", np.zeros(4 * H - 1, np.float32),
     r"rnn\.bias_hh_l1 has shape \[31\]; a 2-layer lstm with 8 hidden units .* needs \[32\]"),
    ("rnn.weight_ih_l1", np.zeros((4 * H, V), np.float32),
     r"rnn\.weight_ih_l1 has shape \[32, 10\]; .* needs \[32, 8\]"),
    ("rnn.weight_hh_l0", np.zeros((4 * H, H, 1), np.float32), r"rnn\.weight_hh_l0 has shape"),
    ("linear.bias", np.zeros(V, np.int64), r"linear\.bias has dtype int64"),
])
def test_a_misshapen_or_integer_tensor_is_refused_with_its_key_and_the_shape_needed(
    key, value, pattern):
  sd = dict(lstm_state_dict())
  sd[key] = value
  with pytest.raises(UsageError, match=pattern):
    interop.params_from_torch(sd, "lstm", 2)


def test_a_state_dict_missing_a_key_is_refused_with_the_key_named():
  sd = dict(lstm_state_dict())
  del sd["linear.bias"]
  with pytest.raises(UsageError, match=r"state dict has no linear\.bias$"):
    interop.params_from_torch(sd, "lstm", 2)


@pytest.mark.parametrize("key,pattern", [
    ("rnn.weight_ih_l0_reverse", r"unexpected key rnn\.weight_ih_l0_reverse .*bidirectional"),
    ("rnn.weight_hr_l0", r"unexpected key rnn\.weight_hr_l0 .*proj_size"),
    ("encoder.weight", r"unexpected key encoder\.weight in state dict$"),
])
def test_an_unexpected_key_is_refused_with_the_key_named_and_the_likely_cause(key, pattern):
  sd = dict(lstm_state_dict())
  sd[key] = np.zeros(3, np.float32)
  with pytest.raises(UsageError, match=pattern):
    interop.params_from_torch(sd, "lstm", 2)


def test_a_bare_nn_lstm_state_dict_is_refused_with_a_hint_to_add_the_prefixes():
  with pytest.raises(UsageError, match=r"no rnn\.weight_ih_l0 .*bare nn\.RNN/GRU/LSTM"):
    interop.params_from_torch(nn.LSTM(V, H, 2).state_dict(), "lstm", 2)


def test_params_to_torch_refuses_params_of_another_cell_or_layer_count_or_missing_a_leaf():
  params = interop.params_from_torch(lstm_state_dict(), "lstm", 2)
  with pytest.raises(UsageError, match=r"do not fit a 2-layer gru.*fits lstm"):
    interop.params_to_torch(params, "gru", 2)
  with pytest.raises(UsageError, match=r"unexpected params rnn/layer_1.*more than 1 layer"):
    interop.params_to_torch(params, "lstm", 1)
  with pytest.raises(UsageError, match=r"params have no rnn/layer_2/W_xh"):
    interop.params_to_torch(params, "lstm", 3)
  with pytest.raises(UsageError, match=r"params have no b_q"):
    interop.params_to_torch({"rnn": params["rnn"], "W_hq": params["W_hq"]}, "lstm", 2)


# --------------------------------------------------------------------------------------------
# The command line.

TM_VOCAB = 28  # The Time Machine, d2l-cleaned characters.


def run_convert(capsys, *argv):
  code = convert.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def save_torch(net, path):
  torch.save(net.state_dict(), path)
  return path


@pytest.fixture(scope="module")
def tm_vocab(time_machine_corpus):
  return time_machine_corpus[1]


def test_from_torch_writes_a_run_folder_that_predicts_as_d2l_predict_ch8(
    tmp_path, capsys, time_machine_path):
  _, d2l_vocab = load_corpus_time_machine(time_machine_path)  # d2l's own, from the whole text
  net = d2l_model("lstm", num_layers=2, vocab_size=TM_VOCAB, num_hiddens=16)
  pt = save_torch(net, tmp_path / "model.pt")
  run = tmp_path / "run"
  code, out, err = run_convert(capsys, "--from-torch", pt, "--cell", "lstm", "--num-layers", 2,
                               "--max-tokens", 2000, "--batch-size", 8, "--num-steps", 10,
                               "--out", run)
  assert (code, err) == (0, ""), err
  assert "16 hidden units" in out

  saved = checkpoint.load_checkpoint(run)
  want = TrainConfig(cell="lstm", num_layers=2, num_hiddens=16, max_tokens=2000, batch_size=8,
                     num_steps=10)
  assert saved.config == want and saved.epoch == 0
  # config.json holds every TrainConfig field: the flags given and, for the rest, the declared
  # defaults (those that shape the model or its training also written out here).
  given = dict(cell="lstm", num_layers=2, num_hiddens=16, max_tokens=2000, batch_size=8,
               num_steps=10, activation="tanh", dropout=0.0, optimizer="sgd", lr=2.0, clip=1.0,
               corpus="timemachine.txt", clean="d2l", pipeline="classic")
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  assert json.loads((run / "config.json").read_text()) == {**defaults, **given}
  assert saved.vocab.idx_to_token == d2l_vocab.idx_to_token
  assert_trees_close(saved.params, expected_params(net.state_dict(), 2), 0.0)
  # d2l's optimizer is clipping then plain SGD (optax.sgd: identity, then the rate): no state,
  # an empty entry for each.
  assert saved.opt_state == {"0": {}, "1": {"0": {}, "1": {}}}

  # The run folder predicts what d2l's predict_ch8 predicts with the PyTorch model.
  from deeprnn_jax import predict
  assert predict.main(["--checkpoint", str(run), "--prefix", "time traveller",
                       "--num-preds", "30"]) == 0
  ours = capsys.readouterr().out.strip()
  assert ours == predict_ch8("time traveller", 30, net, d2l_vocab, "cpu")


def test_from_torch_run_folder_resumes_with_its_weights_and_a_fresh_adam_state(
    tmp_path, capsys, time_machine_path):
  # What `deeprnn_jax.train --out RUN --resume` does with a run folder (runs.train_run).
  net = d2l_model("gru", num_layers=1, vocab_size=TM_VOCAB, num_hiddens=H)
  run = tmp_path / "run"
  code, _, err = run_convert(capsys, "--from-torch", save_torch(net, tmp_path / "m.pt"),
                             "--cell", "gru", "--num-layers", 1, "--max-tokens", 300,
                             "--batch-size", 4, "--num-steps", 8, "--optimizer", "adam",
                             "--lr", 0.01, "--out", run)
  assert code == 0, err
  requested = TrainConfig(cell="gru", num_layers=1, num_hiddens=H, max_tokens=300, batch_size=4,
                          num_steps=8, optimizer="adam", lr=0.01)
  saved = checkpoint.load_checkpoint(run)
  checkpoint.check_compatible(saved.config, requested)
  with pytest.raises(checkpoint.CheckpointError, match="batch_size"):
    checkpoint.check_compatible(saved.config, TrainConfig(cell="gru", num_layers=1, num_hiddens=H,
                                                          max_tokens=300, optimizer="adam"))
  model = models.from_config(requested, TM_VOCAB)
  optimizer = training.make_optimizer(requested.lr, requested.clip, requested.optimizer)
  # Shapes only, as predict.load_model does: restoring needs no initialised values.
  fresh = jax.eval_shape(lambda key: training.init_train_state(model, optimizer, key),
                         jax.random.PRNGKey(0))
  params = checkpoint.restore(fresh.params, saved.params)
  opt_state = checkpoint.restore(fresh.opt_state, saved.opt_state)
  assert_trees_close(params, expected_params(net.state_dict(), 1), 0.0)
  # Clipping (no state), then Adam's (count 0, zero moments shaped as the params), then the rate.
  clip_state, (adam_state, rate_state) = opt_state
  assert clip_state == optax.EmptyState() and rate_state == optax.EmptyState()
  assert adam_state.count.dtype == jnp.int32 and int(adam_state.count) == 0
  zeros = jax.tree_util.tree_map(np.zeros_like, expected_params(net.state_dict(), 1))
  assert_trees_close(adam_state.mu, zeros, 0.0)
  assert_trees_close(adam_state.nu, zeros, 0.0)


@pytest.mark.parametrize("cell,activation,num_layers", [  # relu where the cell takes φ
    (cell, "relu" if cells.CELLS[cell].takes_activation else "tanh", 1 + k % 3)
    for k, cell in enumerate(cell_names(fast=True, torch=True))])
def test_to_torch_of_our_init_loads_into_d2l_model_and_gives_the_same_logits(
    tmp_path, capsys, tm_vocab, cell, activation, num_layers):
  cfg = TrainConfig(cell=cell, num_layers=num_layers, num_hiddens=H, activation=activation)
  model = models.from_config(cfg, TM_VOCAB)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 1), jnp.int32))["params"]
  optimizer = training.make_optimizer(cfg.lr, cfg.clip)
  checkpoint.save_checkpoint(tmp_path / "run", params=params, opt_state=optimizer.init(params),
                             epoch=3, vocab=tm_vocab, config=cfg)
  pt = tmp_path / "model.pt"
  code, out, err = run_convert(capsys, "--to-torch", tmp_path / "run", "--out", pt)
  assert (code, err) == (0, ""), err
  module = {"rnn": "nn.RNN", "gru": "nn.GRU", "lstm": "nn.LSTM"}[cell]
  assert f"{module}({TM_VOCAB}, {H}, num_layers={num_layers}" in out
  assert (f"nonlinearity='{activation}'" in out) == (cell == "rnn")

  net = d2l_model(cell, activation, num_layers, TM_VOCAB, H, seed=7)
  result = net.load_state_dict(torch.load(pt, weights_only=True), strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  expected = expected_state_dict(params, num_layers)
  for key, value in net.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)
  # Our init is PyTorch's: U(-1/sqrt(H), 1/sqrt(H)) for every parameter.
  everything = np.abs(np.concatenate([v.ravel() for v in expected.values()]))
  assert 0.95 / np.sqrt(H) < everything.max() <= 1 / np.sqrt(H)
  X = tokens(8, vocab_size=TM_VOCAB)
  out, _ = net(torch.from_numpy(X), net.begin_state("cpu", B))
  logits, _ = jax.jit(model.apply)({"params": params}, X)
  np.testing.assert_allclose(logits, out.detach().numpy().reshape(T, B, -1).transpose(1, 0, 2),
                             rtol=0, atol=1e-5)


def test_from_torch_then_to_torch_is_exact(tmp_path, capsys, time_machine_path):
  net = d2l_model("gru", num_layers=2, vocab_size=TM_VOCAB, num_hiddens=H)
  pt = save_torch(net, tmp_path / "a.pt")
  assert run_convert(capsys, "--from-torch", pt, "--cell", "gru", "--num-layers", 2,
                     "--out", tmp_path / "run")[0] == 0
  assert run_convert(capsys, "--to-torch", tmp_path / "run", "--out", tmp_path / "b.pt")[0] == 0
  back = torch.load(tmp_path / "b.pt", weights_only=True)
  assert list(back) == list(net.state_dict())
  for key, value in net.state_dict().items():
    assert torch.equal(back[key], value), key


def test_convert_refuses_to_overwrite_a_run_folder_or_file_without_force(
    tmp_path, capsys, time_machine_path):
  pt = save_torch(d2l_model("lstm", num_layers=1, vocab_size=TM_VOCAB), tmp_path / "m.pt")
  args = ["--from-torch", pt, "--cell", "lstm", "--num-layers", 1, "--out", tmp_path / "run"]
  assert run_convert(capsys, *args)[0] == 0
  before = (tmp_path / "run" / "checkpoint.msgpack").read_bytes()
  code, _, err = run_convert(capsys, *args)
  assert code == 2 and "exists; pass --force" in err and err.count("\n") == 1
  assert run_convert(capsys, *args, "--force")[0] == 0
  assert (tmp_path / "run" / "checkpoint.msgpack").read_bytes() == before

  out = tmp_path / "back.pt"
  out.write_bytes(b"keep me")
  code, _, err = run_convert(capsys, "--to-torch", tmp_path / "run", "--out", out)
  assert code == 2 and "exists; pass --force" in err
  assert out.read_bytes() == b"keep me"
  assert run_convert(capsys, "--to-torch", tmp_path / "run", "--out", out, "--force")[0] == 0
  assert list(torch.load(out, weights_only=True)) == [
      "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0", "linear.weight",
      "linear.bias"]


def test_a_missing_torch_file_exits_2_with_one_line_and_no_run_folder(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "deeprnn_jax.convert", "--from-torch", str(tmp_path / "nope.pt"),
       "--cell", "lstm", "--num-layers", "2", "--out", str(tmp_path / "run")],
      capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
  assert result.stderr.startswith("deeprnn_jax.convert: error: no such file:")
  assert not (tmp_path / "run").exists()


def write_garbage(path):
  path.write_bytes(b"PK\x03\x04 not really a zip file" * 10)
  return path


def write_list(path):
  torch.save([torch.zeros(2)], path)
  return path


def write_module(path):
  torch.save(nn.Linear(2, 2), path)
  return path


def write_nested(path):
  torch.save({"model": nn.Linear(2, 2).state_dict()}, path)
  return path


@pytest.mark.parametrize("make,pattern", [
    (write_garbage, r"cannot read a PyTorch state dict from .*bad\.pt: "),
    (write_list, r"holds a list, not a state dict of tensors"),
    (write_module, r"cannot read a PyTorch state dict from .*bad\.pt: .*[Ww]eights"),
    (write_nested, r"holds a mapping with keys model, not a state dict of tensors"),
])
def test_an_unreadable_torch_file_exits_2_with_one_line_saying_why(tmp_path, capsys, make, pattern):
  pt = make(tmp_path / "bad.pt")
  code, _, err = run_convert(capsys, "--from-torch", pt, "--cell", "lstm", "--num-layers", 2,
                             "--out", tmp_path / "run")
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith("deeprnn_jax.convert: error: ")
  assert re.search(pattern, err), err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,pattern", [
    (["--cell", "gru", "--num-layers", "2"], r"rnn\.weight_hh_l0 has shape .*fits lstm"),
    (["--cell", "lstm", "--num-layers", "3"], r"no rnn\.weight_ih_l2"),
    (["--cell", "lstm"], r"--from-torch needs --num-layers"),
    (["--cell", "lstm", "--num-layers", "2", "--corpus", "missing.txt"],
     r"corpus file not found: missing\.txt"),
    (["--cell", "lstm", "--num-layers", "2", "--lr", "0"],
     r"learning rate must be a finite number > 0"),
    (["--cell", "lstm", "--num-layers", "2", "--out", "{tmp}/run/checkpoint.msgpack"],
     r"give the run folder, not its checkpoint file"),
])
def test_from_torch_usage_errors_exit_2_with_one_line_and_no_run_folder(
    tmp_path, capsys, argv, pattern):
  _assert_from_torch_usage_error(tmp_path, capsys, argv, pattern)


def test_from_torch_refuses_a_corpus_of_another_width(tmp_path, capsys, time_machine_path):
  """Checked against the corpus the run folder is made for: here 28 tokens d2l-cleaned, more
  with ``--clean none``."""
  _assert_from_torch_usage_error(
      tmp_path, capsys, ["--cell", "lstm", "--num-layers", "2", "--clean", "none"],
      r"input width is 28 but corpus timemachine\.txt \(--clean none\) has \d+ tokens")


def _assert_from_torch_usage_error(tmp_path, capsys, argv, pattern):
  pt = save_torch(d2l_model("lstm", num_layers=2, vocab_size=TM_VOCAB), tmp_path / "m.pt")
  argv = [a.format(tmp=tmp_path) for a in argv]  # A later --out wins.
  code, _, err = run_convert(capsys, "--from-torch", pt, "--out", tmp_path / "run", *argv)
  assert code == 2 and err.count("\n") == 1, err
  assert re.search(pattern, err), err
  assert not (tmp_path / "run").exists()


def test_to_torch_usage_errors_exit_2_with_one_line_and_no_file(tmp_path, capsys):
  code, _, err = run_convert(capsys, "--to-torch", tmp_path / "nope", "--out", tmp_path / "m.pt")
  assert code == 2 and "no checkpoint at" in err and err.count("\n") == 1
  code, _, err = run_convert(capsys, "--to-torch", tmp_path, "--cell", "lstm",
                             "--out", tmp_path / "m.pt")
  assert code == 2 and "--cell is for --from-torch" in err
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoint.msgpack").write_bytes(b"\x00garbage")
  code, _, err = run_convert(capsys, "--to-torch", tmp_path / "run", "--out", tmp_path / "m.pt")
  assert code == 2 and "corrupt or unreadable checkpoint" in err and err.count("\n") == 1
  assert not (tmp_path / "m.pt").exists()
  code, _, err = run_convert(capsys, "--to-torch", tmp_path / "run", "--out", tmp_path)
  assert code == 2 and "is a folder; give a file name" in err


def test_converting_without_torch_installed_exits_2_asking_to_install_it(
    tmp_path, capsys, monkeypatch):
  pt = save_torch(d2l_model("lstm", num_layers=2, vocab_size=TM_VOCAB), tmp_path / "m.pt")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  code, _, err = run_convert(capsys, "--from-torch", pt, "--cell", "lstm", "--num-layers", 2,
                             "--out", tmp_path / "run")
  assert code == 2 and err.count("\n") == 1 and "needs torch" in err and "pip install torch" in err
  code, _, err = run_convert(capsys, "--to-torch", tmp_path / "run", "--out", tmp_path / "b.pt")
  assert code == 2 and "needs torch" in err
  assert not (tmp_path / "run").exists() and not (tmp_path / "b.pt").exists()


# --------------------------------------------------------------------------------------------
# d2l 1.0's RNNLM (the English edition): keys rnn.rnn.*, a LazyLinear head, a sorted vocabulary.


def d2l_en_model(num_hiddens=H, seed=0):
  torch.manual_seed(seed)
  net = d2l_en.RNNLM(d2l_en.GRU(TM_VOCAB, num_hiddens, 2), TM_VOCAB)
  net(torch.zeros((1, 1), dtype=torch.int64))  # the LazyLinear takes its shape
  return net


def test_d2l_en_checkpoint_converts_both_ways_exactly(tmp_path, capsys, time_machine_path):
  net = d2l_en_model()
  sd = net.state_dict()
  assert list(sd)[:2] == ["rnn.rnn.weight_ih_l0", "rnn.rnn.weight_hh_l0"]
  run = tmp_path / "run"
  code, out, err = run_convert(capsys, "--from-torch", save_torch(net, tmp_path / "a.pt"),
                               "--preset", "d2l-en", "--out", run)
  assert (code, err) == (0, ""), err
  saved = checkpoint.load_checkpoint(run)
  # d2l 1.0's section: TimeMachine(batch_size=1024, num_steps=32) (10000 training windows, 5000
  # validation ones), a 2-layer GRU, RNNLM(lr=2), Trainer(max_epochs=100, gradient_clip_val=1);
  # the width is the file's.
  assert saved.config == TrainConfig(pipeline="windows", cell="gru", num_layers=2, num_hiddens=H,
                                     batch_size=1024, num_steps=32, lr=2.0, clip=1.0,
                                     num_epochs=100, max_tokens=-1, num_train=10000, num_val=5000)
  reference = d2l_en.TimeMachine(time_machine_path.read_text(), 1024, 32)  # d2l 1.0's own
  assert saved.vocab.idx_to_token == reference.vocab.idx_to_token
  assert saved.vocab.idx_to_token[:2] == [" ", "<unk>"]
  assert_trees_close(saved.params, expected_params(sd, 2, rnn_prefix="rnn.rnn."), 0.0)

  # The run folder predicts what d2l 1.0's RNNLM.predict predicts with the PyTorch model.
  assert predict.main(["--checkpoint", str(run), "--prefix", "it has", "--num-preds", "20"]) == 0
  ours = capsys.readouterr().out.rstrip("\n")
  assert ours == net.predict("it has", 20, reference.vocab)
  assert predict.main(["--checkpoint", str(run), "--num-preds", "20"]) == 0  # d2l 1.0's prefix
  assert capsys.readouterr().out.rstrip("\n") == ours

  code, out, err = run_convert(capsys, "--to-torch", run, "--out", tmp_path / "b.pt")
  assert (code, err) == (0, ""), err
  assert f"d2l.GRU({TM_VOCAB}, {H}, 2)" in out
  back = torch.load(tmp_path / "b.pt", weights_only=True)
  assert list(back) == list(sd)
  for key, value in sd.items():
    assert torch.equal(back[key], value), key
  fresh = d2l_en.RNNLM(d2l_en.GRU(TM_VOCAB, H, 2), TM_VOCAB)
  assert not fresh.load_state_dict(back, strict=True).missing_keys  # into an unshaped LazyLinear


def test_d2l_en_layout_without_its_preset_or_the_preset_without_its_layout_is_refused(
    tmp_path, capsys, time_machine_path):
  pt = save_torch(d2l_en_model(), tmp_path / "en.pt")
  code, _, err = run_convert(capsys, "--from-torch", pt, "--cell", "gru", "--num-layers", 2,
                             "--out", tmp_path / "run")
  assert code == 2 and "pass --preset d2l-en" in err and err.count("\n") == 1
  classic = save_torch(d2l_model("gru", num_layers=2, vocab_size=TM_VOCAB), tmp_path / "c.pt")
  code, _, err = run_convert(capsys, "--from-torch", classic, "--preset", "d2l-en",
                             "--out", tmp_path / "run")
  assert code == 2 and "not d2l 1.0's RNNLM" in err and err.count("\n") == 1
  with pytest.raises(UsageError, match="d2l 1.0's RNNLM layout"):
    interop.params_from_torch(torch.load(pt, weights_only=True), "gru", 2)
  assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# The strongest evidence: d2l's PyTorch training and ours, from the same weights on the same
# minibatches, report the same perplexity every epoch.


@pytest.mark.parametrize("cell,use_random_iter", [("lstm", False), ("gru", True)])
def test_training_reports_d2l_train_ch8_perplexity_every_epoch_and_ends_at_its_weights(
    cell, use_random_iter, time_machine_path):
  num_layers, num_hiddens, batch_size, num_steps, lr, num_epochs = 2, 32, 8, 10, 2.0, 5
  corpus, vocab = data.load_corpus_time_machine(max_tokens=2000)
  epoch_fn = data.random_epoch if use_random_iter else data.sequential_epoch
  epochs = [epoch_fn(corpus, batch_size, num_steps, seed) for seed in range(num_epochs)]

  net = d2l_model(cell, "tanh", num_layers, len(vocab), num_hiddens, seed=0)
  model, params = interop.model_from_torch(net.state_dict(), cell, num_layers)
  optimizer = training.make_optimizer(lr, 1.0)
  ts = training.TrainState(jax.tree_util.tree_map(jnp.asarray, params),
                           optimizer.init(params))
  train_epoch = training.make_train_epoch(model, optimizer, use_random_iter)

  torch_ppl = train_ch8(net, [[(torch.from_numpy(X), torch.from_numpy(Y)) for X, Y in zip(Xs, Ys)]
                             for Xs, Ys in epochs], lr, "cpu", use_random_iter)
  our_ppl = []
  for Xs, Ys in epochs:
    ts, losses = train_epoch(ts, Xs, Ys, jax.random.PRNGKey(0))
    losses = np.asarray(losses, np.float64)
    numel = Ys[0].size  # Every minibatch has the same number of targets.
    our_ppl.append(math.exp(float((losses * numel).sum() / (numel * len(losses)))))

  # It learned something (uniform guessing scores len(vocab) = 28), so agreeing means something.
  assert torch_ppl[-1] < min(torch_ppl[0], 0.75 * len(vocab))
  start = expected_params(d2l_model(cell, "tanh", num_layers, len(vocab), num_hiddens,
                                     seed=0).state_dict(), num_layers)
  assert max(float(np.abs(np.asarray(a) - b).max()) for a, b in
             zip(jax.tree_util.tree_leaves(ts.params), jax.tree_util.tree_leaves(start))) > 0.1
  np.testing.assert_allclose(our_ppl, torch_ppl, rtol=1e-3)
  assert_trees_close(ts.params, expected_params(net.state_dict(), num_layers), 1e-3)
