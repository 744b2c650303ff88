"""Training library: loss, clipping, the jitted epoch, evaluation and generation."""

import math
import re
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import cell_names
from references import d2l
from references.numpy_model import reference_forward

from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import dispatch, training
from deeprnn_jax.model import generate
from deeprnn_jax.model.models import RNNLM
from deeprnn_jax.text import data

VOCAB = 11


def _setup(cell="lstm", layers=2, hiddens=16, lr=1.0, clip=1.0, name="sgd", dropout=0.0):
  model = RNNLM(VOCAB, hiddens, layers, cell, dropout=dropout)
  opt = training.make_optimizer(lr, clip, name)
  ts = training.init_train_state(model, opt, jax.random.PRNGKey(0))
  return model, opt, ts


def _corpus(n=700, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int32)


def test_cross_entropy_is_mean_per_token_nll():
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 4, VOCAB))
  Y = jax.random.randint(jax.random.PRNGKey(1), (3, 4), 0, VOCAB)
  logp = jax.nn.log_softmax(logits)
  expected = -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(Y)[..., None], -1))
  np.testing.assert_allclose(training.cross_entropy(logits, Y), expected, rtol=1e-6)


def test_uniform_model_perplexity_equals_vocab_size():
  model, _, ts = _setup()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, ts.params)
  ppl = training.evaluate(model, zeros, _corpus(200))
  assert ppl == pytest.approx(VOCAB, rel=1e-5)


@pytest.mark.parametrize("norm_scale", [0.1, 5.0])  # norms 0.77 and 38
def test_clipping_matches_d2l_grad_clipping(norm_scale):
  grads = {"a": jnp.arange(6.0).reshape(2, 3) * norm_scale, "b": jnp.ones(4) * norm_scale}
  theta = 1.0
  # d2l's grad_clipping on its from-scratch model's parameter list, holding these gradients.
  params = [torch.zeros(g.shape, requires_grad=True) for g in grads.values()]
  for p, g in zip(params, grads.values()):
    p.grad = torch.from_numpy(np.array(g))
  d2l.grad_clipping(types.SimpleNamespace(params=params), theta)
  clipped = {k: p.grad.numpy() for k, p in zip(grads, params)}
  norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in grads.values()))
  assert (norm > theta) == (norm_scale > 1)  # One case clips, the other does not.
  opt = training.make_optimizer(lr=1.0, clip_norm=theta)
  updates, _ = opt.update(grads, opt.init(grads))
  # SGD with lr 1: the update is minus the clipped gradient.
  chex.assert_trees_all_close(jax.tree.map(jnp.negative, updates), clipped, rtol=1e-6)
  if norm > theta:
    np.testing.assert_allclose(
        math.sqrt(sum(float(np.sum(g**2)) for g in clipped.values())), theta, rtol=1e-6)


@pytest.mark.parametrize("lr,clip,name", [(0, 1, "sgd"), (-1, 1, "sgd"), (1, 0, "sgd"),
                                          (1, 1, "rmsprop")])
def test_make_optimizer_rejects_bad_settings(lr, clip, name):
  with pytest.raises(UsageError):
    training.make_optimizer(lr, clip, name)


# (update count, factor) over 10 epochs of 7 steps; cos(0.2 pi) = 0.809017, so 0.5 (1 + it) =
# 0.904508; with warmup 2 (14 steps) and floor 0.1, halfway through the cosine (count 42) is 0.55.
@pytest.mark.parametrize("schedule,warmup,floor,points", [
    ("cosine", 0, 0.0, [(0, 1.0), (14, 0.904508), (35, 0.5), (70, 0.0), (75, 0.0)]),
    ("cosine", 2, 0.1, [(0, 0.0), (7, 0.5), (14, 1.0), (42, 0.55), (70, 0.1), (75, 0.1)]),
    ("constant", 3, 0.0, [(0, 0.0), (7, 1 / 3), (21, 1.0), (70, 1.0), (75, 1.0)]),
])
def test_lr_factor_warms_up_linearly_then_follows_half_a_cosine(schedule, warmup, floor, points):
  factor = training.lr_factor(schedule, 10, 7, warmup, floor)
  counts, want = zip(*points)
  np.testing.assert_allclose([float(factor(c)) for c in counts], want, atol=1e-6)
  values = [float(factor(c)) for c in range(76)]
  peak = warmup * 7
  assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))  # rises through warmup
  assert all(a >= b - 1e-7 for a, b in zip(values[peak:], values[peak + 1:]))  # then never rises


def test_the_constant_schedule_without_warmup_is_d2ls_optimizer_unchanged():
  # No schedule at all: the state (what checkpoints hold) and the step are clipping then SGD's.
  factor = training.lr_factor("constant", 500, 8)
  assert factor is None
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.array([3.0, -4.0, 0.0])}
  ours = training.make_optimizer(2.0, 1.0, "sgd", factor)
  state = ours.init(params)
  # d2l's grad_clipping: norm 5 > 1, so g * 1/5 = (0.6, -0.8, 0); its sgd: w -= lr * g.
  updates, state = ours.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], [-1.2, 1.6, 0.0], rtol=1e-6)
  small = {"w": jnp.array([0.3, 0.4, 0.0])}  # norm 0.5 <= 1: left as it is
  np.testing.assert_allclose(ours.update(small, state, params)[0]["w"], [-0.6, -0.8, 0.0],
                             rtol=1e-6)
  # Nothing but the clip and the rate: no step count or moment a checkpoint would carry.
  assert jax.tree_util.tree_leaves(state) == []


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_scheduled_optimizer_steps_at_the_rate_times_the_factor(name):
  lr, clip, steps = 0.3, 1.0, 6
  factor = training.lr_factor("cosine", 3, 2, warmup_epochs=1, min_factor=0.2)
  rate = lambda count: lr * factor(count)
  # optax's own: the optimiser given the scheduled rate itself.
  want_opt = optax.chain(optax.clip_by_global_norm(clip),
                         optax.sgd(rate) if name == "sgd" else optax.adam(rate))
  grads = [{"a": jax.random.normal(jax.random.PRNGKey(i), (4, 3)) * (i + 1)}
           for i in range(steps)]
  params = {"a": jnp.zeros((4, 3))}
  single = training.make_optimizer(lr, clip, name, factor)
  sweep = training.make_sweep_optimizer(name, factor)
  sweep_state = sweep.init(params)
  sweep_state.hyperparams.update(learning_rate=jnp.float32(lr), max_norm=jnp.float32(clip))
  states = [want_opt.init(params), single.init(params), sweep_state]
  for g in grads:
    results = [opt.update(g, state, params) for opt, state in
               zip((want_opt, single, sweep), states)]
    states = [state for _, state in results]
    for updates, _ in results[1:]:
      chex.assert_trees_all_close(updates, results[0][0], rtol=1e-5, atol=1e-7)
  assert float(factor(0)) == 0.0  # the warmup's first step does not move: compared above too


@pytest.mark.parametrize("schedule,warmup,floor,epochs,message", [
    ("linear", 0, 0.0, 10, "unknown learning-rate schedule"),
    ("cosine", 10, 0.0, 10, "fewer than the run's 10 epochs"),
    ("cosine", -1, 0.0, 10, "warmup epochs must be an integer >= 0"),
    ("cosine", 0, 1.5, 10, "lr min factor must be in [0, 1]"),
])
def test_lr_factor_rejects_impossible_schedules(schedule, warmup, floor, epochs, message):
  with pytest.raises(UsageError, match=re.escape(message)):
    training.lr_factor(schedule, epochs, 5, warmup, floor)


@pytest.mark.slow
@pytest.mark.parametrize("use_random_iter", [False, True])
@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_jitted_epoch_equals_python_loop_of_steps(use_random_iter, cell):
  model, opt, ts = _setup(cell)
  fn = data.random_epoch if use_random_iter else data.sequential_epoch
  Xs, Ys = fn(_corpus(), 4, 7, seed=3)
  key = jax.random.PRNGKey(5)
  step = jax.jit(training.make_train_step(model, opt))
  # The loop, d2l style: state from zeros, detached between minibatches or fresh each time.
  loop_ts = ts
  state, losses = None, []
  for X, Y, k in zip(Xs, Ys, jax.random.split(key, len(Xs))):
    if state is None or use_random_iter:
      state = model.begin_state(X.shape[0])
    loop_ts, state, loss = step(loop_ts, state, X, Y, k)
    losses.append(float(loss))
  epoch = training.make_train_epoch(model, opt, use_random_iter)
  ts_copy = jax.tree_util.tree_map(jnp.copy, ts)  # The epoch donates its input.
  new_ts, epoch_losses = epoch(ts_copy, Xs, Ys, key)
  chex.assert_shape(epoch_losses, (len(Xs),))
  np.testing.assert_allclose(epoch_losses, losses, rtol=2e-5, atol=1e-6)
  chex.assert_trees_all_close(new_ts.params, loop_ts.params, rtol=1e-4, atol=1e-6)


def _epoch_items(n, log=None):
  loader = data.SeqDataLoader(_corpus(900), 4, 7, use_random_iter=False, seed=3)
  for i in range(n):
    Xs, Ys = loader.epoch()
    if log is not None:
      log.append(i)
    yield i, Xs, Ys, jax.random.PRNGKey(i)


@pytest.mark.slow
def test_epoch_pipeline_equals_a_plain_loop_and_keeps_only_the_states_asked_for():
  model, opt, ts = _setup(cell="gru")
  epoch_fn = training.make_train_epoch(model, opt)
  state, expected = training.init_train_state(model, opt, jax.random.PRNGKey(0)), []
  for _, Xs, Ys, key in _epoch_items(5):
    state, losses = epoch_fn(state, Xs, Ys, key)
    expected.append((np.asarray(losses), jax.device_get(state.params)))

  pipe = dispatch.EpochPipeline(epoch_fn, needs_state=lambda tag: tag == 2)
  done = list(pipe.run(ts, _epoch_items(5)))
  assert [f.tag for f in done] == [0, 1, 2, 3, 4]
  for f, (losses, _) in zip(done, expected):
    np.testing.assert_array_equal(f.losses, losses)
    assert f.seconds > 0
  # Epoch 2 was asked for and the last one is not donated to anything; the others were.
  assert [f.state is not None for f in done] == [False, False, True, False, True]
  chex.assert_trees_all_equal(jax.device_get(done[4].state.params), expected[4][1])
  assert dispatch._deleted(done[2].state)  # handed on to epoch 3 once the caller moved on


@pytest.mark.slow
def test_epoch_pipeline_reads_one_item_ahead_unless_the_state_is_needed():
  model, opt, ts = _setup(layers=1)
  epoch_fn = training.make_train_epoch(model, opt)
  produced = []
  pipe = dispatch.EpochPipeline(epoch_fn, needs_state=lambda tag: tag == 1)
  seen = []
  for f in pipe.run(ts, _epoch_items(4, log=produced)):
    seen.append((f.tag, len(produced)))
    if f.tag == 1:
      chex.assert_tree_all_finite(f.state.params)  # usable before the next epoch starts
  # Epoch 0 is handed out with epoch 1 already dispatched; epoch 1's state is kept, so epoch 2
  # is only read after the caller is done with it.
  assert seen == [(0, 2), (1, 2), (2, 4), (3, 4)]


@pytest.mark.slow
def test_epoch_pipeline_drain_returns_the_epoch_in_flight_with_its_state():
  model, opt, ts = _setup(layers=1)
  pipe = dispatch.EpochPipeline(training.make_train_epoch(model, opt))
  run = pipe.run(ts, _epoch_items(3))
  first = next(run)  # epoch 1 is in flight now, holding the state
  assert first.tag == 0 and first.state is None
  drained = pipe.drain()
  assert [f.tag for f in drained] == [0, 1]
  assert drained[0].state is None and drained[1].state is not None
  chex.assert_tree_all_finite(drained[1].state.params)
  assert pipe.drain() == [drained[0]]  # nothing in flight any more


class _Losses:
  """Device losses stand-in whose read-back is interrupted (Ctrl-C) the first time, if asked."""

  def __init__(self, value, interrupt):
    self.value, self.interrupt = value, interrupt

  def __array__(self, dtype=None, copy=None):
    if self.interrupt:
      self.interrupt = False
      raise KeyboardInterrupt
    return np.full(3, self.value, np.float32)


@pytest.mark.parametrize("kept", [None, 2])
def test_epoch_pipeline_interrupted_while_waiting_loses_no_epoch(kept):
  def epoch_fn(state, Xs, Ys, key):  # a state whose value counts the epochs run on it
    return state + 1, _Losses(float(key), interrupt=key == 2)

  items = ((k, None, None, k) for k in range(6))
  pipe = dispatch.EpochPipeline(epoch_fn, needs_state=lambda tag: tag == kept)
  handed = []
  with pytest.raises(KeyboardInterrupt):
    for f in pipe.run(jnp.zeros(()), items):
      handed.append(f.tag)
  assert handed == [0, 1]
  drained = pipe.drain()
  tags = [f.tag for f in drained]
  assert tags == ([1, 2] if kept == 2 else [1, 2, 3])  # epoch 2 kept: nothing dispatched after
  assert [float(f.losses[0]) for f in drained] == tags
  assert drained[-1].state is not None and int(drained[-1].state) == tags[-1] + 1
  assert all(f.state is None for f in drained[:-1])
  assert [f.tag for f in pipe.drain()] == [1]  # nothing left in flight


@pytest.mark.slow
def test_sequential_epoch_carries_state_and_random_does_not():
  model, opt, ts = _setup("gru")
  Xs, Ys = data.sequential_epoch(_corpus(), 4, 7, seed=1)
  seq = training.make_train_epoch(model, opt, use_random_iter=False)
  rnd = training.make_train_epoch(model, opt, use_random_iter=True)
  key = jax.random.PRNGKey(0)
  _, l_seq = seq(jax.tree_util.tree_map(jnp.copy, ts), Xs, Ys, key)
  _, l_rnd = rnd(jax.tree_util.tree_map(jnp.copy, ts), Xs, Ys, key)
  assert l_seq[0] == pytest.approx(float(l_rnd[0]), rel=1e-6)  # Both start from zeros.
  assert not np.allclose(l_seq[1:], l_rnd[1:])  # Then only one carries the state.


@pytest.mark.slow
def test_training_lowers_loss_with_adam_and_dropout():
  model, opt, ts = _setup("lstm", lr=0.01, name="adam", dropout=0.2)
  corpus = np.tile(np.arange(VOCAB, dtype=np.int32), 80)  # A perfectly predictable text.
  epoch = training.make_train_epoch(model, opt)
  first = last = None
  for e in range(15):
    Xs, Ys = data.sequential_epoch(corpus, 8, 10, seed=e)
    ts, losses = epoch(ts, Xs, Ys, jax.random.PRNGKey(e))
    first = float(losses.mean()) if first is None else first
    last = float(losses.mean())
  assert last < 0.5 * first


def _reference_nll(params, X, Y) -> np.ndarray:
  """Per-token negative log-likelihood ``<float64>[batch, steps]`` of ``Y`` after ``X``, from the
  NumPy model read from a zero state."""
  logits, _ = reference_forward(params, np.asarray(X), None, "lstm")
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, np.asarray(Y)[..., None], -1)[..., 0]


@pytest.mark.slow
def test_evaluate_reads_the_text_whole_or_as_rows_from_zeros_and_refuses_one_token():
  model, _, ts = _setup()
  corpus = _corpus(301)
  one = training.evaluate(model, ts.params, corpus)
  expected = math.exp(_reference_nll(ts.params, corpus[None, :-1], corpus[None, 1:]).mean())
  assert one == pytest.approx(expected, rel=1e-5)
  three = training.evaluate(model, ts.params, corpus, num_rows=3)
  rows = _reference_nll(ts.params, corpus[:300].reshape(3, 100), corpus[1:301].reshape(3, 100))
  assert three == pytest.approx(math.exp(rows.mean()), rel=1e-5)
  assert three != pytest.approx(one, rel=1e-5)  # three fresh starts: a different figure
  with pytest.raises(UsageError):
    training.evaluate(model, ts.params, corpus[:1])


def test_perplexity_overflow_is_inf():
  assert training.perplexity(1e6) == math.inf
  assert training.perplexity(0.0) == 1.0


@pytest.mark.parametrize("cell", cell_names(fast=True))
def test_greedy_prediction_matches_d2l_loop_and_is_deterministic(cell):
  vocab = data.Vocab(list("abcdefghij "))
  model = RNNLM(len(vocab), 16, 2, cell)
  params = model.init(jax.random.PRNGKey(2), jnp.zeros((1, 1), jnp.int32))["params"]
  ours = generate.predict("abc", 12, params, model, vocab)
  assert ours == d2l.predict_ch8_flax("abc", 12, model, params, vocab)
  assert ours == generate.predict("abc", 12, params, model, vocab)
  assert len(ours) == 3 + 12 and ours.startswith("abc")


def test_sampling_depends_on_key_and_validates_input():
  vocab = data.Vocab(list("abcdefghij "))
  model = RNNLM(len(vocab), 16, 1, "gru")
  params = model.init(jax.random.PRNGKey(2), jnp.zeros((1, 1), jnp.int32))["params"]
  a = generate.predict("a", 40, params, model, vocab, 1.0, jax.random.PRNGKey(0))
  b = generate.predict("a", 40, params, model, vocab, 1.0, jax.random.PRNGKey(1))
  assert a == generate.predict("a", 40, params, model, vocab, 1.0, jax.random.PRNGKey(0))
  assert a != b
  assert generate.predict("a", 0, params, model, vocab) == "a"
  for bad in [dict(prefix=""), dict(num_preds=-1), dict(temperature=-1.0)]:
    kwargs = dict(prefix="a", num_preds=3, temperature=0.0) | bad
    with pytest.raises(UsageError):
      generate.predict(kwargs["prefix"], kwargs["num_preds"], params, model, vocab,
                       kwargs["temperature"])


def test_unroll_is_a_model_attribute_with_the_backends_default():
  from deeprnn_jax.model import recurrence
  for bad in (0, -1, 2.5, "fast"):
    with pytest.raises(UsageError, match="unroll"):
      RNNLM(11, 8, 1, "lstm", unroll=bad)
  # Measured fastest (BENCHMARKS.md): no unrolling on a CPU, 8 steps on a GPU.
  assert recurrence.default_unroll() == {"cpu": 1, "gpu": 8}[jax.default_backend()]
  # Unrolling changes the program, never the numbers.
  X = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 11
  models = [RNNLM(11, 8, 2, "gru", unroll=u) for u in (None, 1, 4)]
  params = models[0].init(jax.random.PRNGKey(0), X)["params"]
  outs = [m.apply({"params": params}, X)[0] for m in models]
  chex.assert_trees_all_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(outs[2], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["a", "abcdefghij abcd", "abcdefghij abcde", "abcdefghij abcdef",
                                    "j" * 40])
def test_padded_prefixes_of_any_length_match_d2l_loop(prefix):
  vocab = data.Vocab(list("abcdefghij "))
  model = RNNLM(len(vocab), 16, 2, "lstm")
  params = model.init(jax.random.PRNGKey(4), jnp.zeros((1, 1), jnp.int32))["params"]
  assert generate.predict(prefix, 9, params, model, vocab) == d2l.predict_ch8_flax(
      prefix, 9, model, params, vocab)
