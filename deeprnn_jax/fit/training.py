"""Loss, optimiser, jitted train step and whole-epoch training (d2l's ``train_epoch_ch8``).

The hot path is :func:`make_train_epoch`: one jitted call runs every minibatch of an epoch under
``lax.scan`` with the parameters and optimiser state donated, and returns the per-minibatch losses
with no host sync in between (:mod:`deeprnn_jax.fit.dispatch` runs such epochs back to back).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deeprnn_jax.base import validate
from deeprnn_jax.base.validate import Optimizer, Schedule
from deeprnn_jax.fit import scoring
from deeprnn_jax.fit.parallel import BATCH_AXIS, batch_mesh
from deeprnn_jax.model.models import RNNLM

Array = jax.Array


def lr_factor(schedule: Schedule, num_epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
              min_factor: float = 0.0) -> optax.Schedule | None:
  """The learning rate's multiplier at each optimiser step, or ``None`` for d2l's constant rate.

  The first ``warmup_epochs`` raise it linearly from 0 to 1; then ``"constant"`` keeps it at 1
  and ``"cosine"`` lowers it along half a cosine to ``min_factor`` at the end of epoch
  ``num_epochs``, where it stays. An epoch counts ``steps_per_epoch`` steps: its loader's
  ``max_batches``.
  """
  validate.schedule(schedule, warmup_epochs, min_factor, num_epochs)
  validate.positive_int("steps per epoch", steps_per_epoch)
  if schedule == "constant" and not warmup_epochs:
    return None
  warmup, total = warmup_epochs * steps_per_epoch, num_epochs * steps_per_epoch
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total, end_value=min_factor)
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup),
                               optax.constant_schedule(1.0)], [warmup])


def config_lr_factor(config, steps_per_epoch: int) -> optax.Schedule | None:
  """:func:`lr_factor` of a :class:`~deeprnn_jax.base.config.TrainConfig`."""
  return lr_factor(config.lr_schedule, config.num_epochs, steps_per_epoch, config.warmup_epochs,
                   config.lr_min_factor)


def make_optimizer(lr: float, clip_norm: float, name: Optimizer = "sgd",
                   schedule: optax.Schedule | None = None, weight_decay: float = 0.0,
                   ema: float = 0.0) -> optax.GradientTransformation:
  """Global-norm clipping (d2l's ``grad_clipping``), then plain SGD (d2l) or Adam, at learning
  rate ``lr``, times ``schedule(step)`` where there is one (:func:`lr_factor`).

  ``weight_decay`` (decoupled from the gradient's scale): SGD steps by ``-lr (g + wd w)`` after
  clipping ``g``; Adam is AdamW, ``-lr (adam(g) + wd w)``. With 0, neither is in the chain.
  ``ema`` > 0: the state also keeps a moving average of the parameters with that decay
  (:func:`average_params`), which :func:`evaluated_params` returns."""
  validate.optimizer(lr, clip_norm, name, weight_decay, ema)
  return _clipped(lr, clip_norm, name, schedule, weight_decay, ema)


def config_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """:func:`make_optimizer` of a :class:`~deeprnn_jax.base.config.TrainConfig` whose epochs
  count ``steps_per_epoch`` steps."""
  return make_optimizer(config.lr, config.clip, config.optimizer,
                        config_lr_factor(config, steps_per_epoch), config.weight_decay,
                        config.ema)


def _clipped(learning_rate, max_norm, name: Optimizer, schedule: optax.Schedule | None = None,
             weight_decay=0.0, ema: float = 0.0,
             decays: bool | None = None) -> optax.GradientTransformation:
  """``decays``: whether the chain decays weights (``None``: where ``weight_decay`` is not 0);
  a swept ``weight_decay`` is an array, and 0 in a chain that decays changes nothing."""
  decays = bool(weight_decay) if decays is None else decays
  chain = _stepped(learning_rate, max_norm, name, schedule, weight_decay, decays)
  return optax.chain(chain, average_params(ema)) if ema else chain


def _stepped(learning_rate, max_norm, name: Optimizer, schedule: optax.Schedule | None,
             weight_decay, decays: bool) -> optax.GradientTransformation:
  if name == "sgd":
    opt = optax.sgd(learning_rate)
    if decays:
      opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
  elif decays:
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
  else:
    opt = optax.adam(learning_rate)
  if schedule is None:
    return optax.chain(optax.clip_by_global_norm(max_norm), opt)
  # Both end by scaling with the rate, so scaling after them is the rate times the factor.
  return optax.chain(optax.clip_by_global_norm(max_norm), opt, optax.scale_by_schedule(schedule))


def make_sweep_optimizer(name: Optimizer = "sgd", schedule: optax.Schedule | None = None,
                         weight_decay: float = 0.0,
                         ema: float = 0.0) -> optax.GradientTransformation:
  """:func:`make_optimizer`'s transformation reading its learning rate, clip norm and weight
  decay from its state (``optax.inject_hyperparams``), so that they are data: each of the models
  trained in one vmapped program has its own (:func:`init_train_states` sets them). The chain
  decays weights where ``weight_decay`` (the largest of the models') is not 0. ``schedule`` and
  ``ema`` are the same for all of them, each following the schedule with its own step count."""
  validate.optimizer(1.0, 1.0, name, weight_decay, ema)
  inner = functools.partial(_clipped, name=name, schedule=schedule, ema=ema,
                            decays=bool(weight_decay))
  return optax.inject_hyperparams(inner, static_args=("name", "schedule", "ema", "decays"))(
      learning_rate=1.0, max_norm=1.0, weight_decay=float(weight_decay))


class ParamsAverage(NamedTuple):
  """:func:`average_params`' state: the steps taken, and the average of the parameters."""

  count: Array  # <int32>[]
  ema: dict


def average_params(decay: float) -> optax.GradientTransformation:
  """An exponential moving average of the parameters, kept in the optimiser's state (so a
  checkpoint holds it and ``--resume`` continues it exactly): after step ``t`` (0, 1, ...),
  ``ema <- d ema + (1 - d) params`` with ``d = min(decay, (1 + t) / (10 + t))``, the parameters
  as that step left them. The smaller early decay (TensorFlow's ``ExponentialMovingAverage``
  with ``num_updates``) keeps the initial weights from lingering in the average. The updates
  pass unchanged; it must come last in a chain, where the updates are final."""

  def init(params):
    return ParamsAverage(jnp.zeros([], jnp.int32), jax.tree.map(jnp.copy, params))

  def update(updates, state, params):
    t = state.count.astype(jnp.float32)
    d = jnp.minimum(decay, (1 + t) / (10 + t))
    stepped = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, stepped)
    return updates, ParamsAverage(optax.safe_increment(state.count), ema)

  return optax.GradientTransformation(init, update)


def evaluated_params(ts: TrainState) -> dict:
  """The parameters a run evaluates, predicts with and keeps as its best model: the average
  where the optimiser keeps one (:func:`average_params`), else the parameters themselves."""
  ema = optax.tree_utils.tree_get(ts.opt_state, "ema")
  return ts.params if ema is None else ema


def cross_entropy(logits: Array, Y: Array) -> Array:
  """Mean per-token softmax cross-entropy: ``logits <float32>[..., vocab]``, ``Y <int32>[...]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def masked_cross_entropy(logits: Array, Y: Array, axis_name: str | None = None) -> Array:
  """:func:`cross_entropy` over the tokens whose label is >= 0: a negative label marks padding
  (``deeprnn_jax.text.windows.PAD``). Under ``shard_map`` over ``axis_name``, scaled so that the
  mean over the shards (:func:`make_train_step`'s ``pmean``) is the mean over every shard's
  tokens."""
  real = Y >= 0
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(real, Y, 0))
  count = jnp.sum(real)
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name) / jax.lax.psum(1, axis_name)
  return jnp.sum(jnp.where(real, nll, 0.0)) / count


def perplexity(mean_loss) -> float:
  """``exp(mean loss)``; ``inf`` where that overflows, ``nan`` for a ``nan`` loss."""
  try:
    return math.exp(float(mean_loss))
  except OverflowError:
    return math.inf


class TrainState(NamedTuple):
  params: dict
  opt_state: optax.OptState


def init_train_state(model: RNNLM, optimizer, key: Array, batch_size: int = 1,
                     num_steps: int = 1) -> TrainState:
  X = jnp.zeros((batch_size, num_steps), jnp.int32)

  def init(key):
    params = model.init(key, X)["params"]
    return TrainState(params, optimizer.init(params))

  # One compiled program: op by op, a GPU compiles a kernel for every operation of the model.
  return jax.jit(init)(key)


def init_train_states(model: RNNLM, optimizer, keys: Array, lrs, clip_norms,
                      weight_decays=None) -> TrainState:
  """``K`` train states stacked on a leading axis, initialised in one vmapped program.

  Model ``k`` is initialised from ``keys[k]`` as :func:`init_train_state` would, and trains with
  learning rate ``lrs[k]``, clip norm ``clip_norms[k]`` and weight decay ``weight_decays[k]``.

  Args:
    optimizer: from :func:`make_sweep_optimizer`.
    keys: ``<key>[K]`` PRNG keys (``<uint32>[K, 2]``).
    lrs, clip_norms, weight_decays: ``<float32>[K]`` (``weight_decays`` ``None``: the
      optimizer's for every model).
  """
  X = jnp.zeros((1, 1), jnp.int32)

  def init(key, lr, clip_norm, weight_decay):
    params = model.init(key, X)["params"]
    opt_state = optimizer.init(params)
    hyperparams = dict(opt_state.hyperparams, learning_rate=lr, max_norm=clip_norm,
                       weight_decay=weight_decay)
    return TrainState(params, opt_state._replace(hyperparams=hyperparams))

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if weight_decays is None:
    weight_decays = [float(optimizer.init({}).hyperparams["weight_decay"])] * len(lrs)
  return jax.jit(jax.vmap(init))(keys, f32(lrs), f32(clip_norms), f32(weight_decays))


def make_train_step(model: RNNLM, optimizer, axis_name: str | None = None,
                    masked: bool = False) -> Callable:
  """``(train_state, state, X, Y, key) -> (train_state, state, loss)`` for one minibatch.

  ``X`` and ``Y`` are ``<int32>[batch, steps]``; ``state`` is the model state entering the
  minibatch. The returned state is detached (``stop_gradient``), as d2l's ``state.detach_()``.
  Under ``shard_map`` over ``axis_name`` each device holds a shard of the rows: the loss and the
  gradients are averaged over the shards (equal shards, so the mean over all tokens), and each
  shard draws its own dropout masks. ``masked``: padding labels are left out
  (:func:`masked_cross_entropy`).
  """

  def loss_fn(params, state, X, Y, key):
    logits, state = model.apply({"params": params}, X, state, deterministic=not model.stochastic,
                                rngs={"dropout": key})
    if masked:
      return masked_cross_entropy(logits, Y, axis_name), state
    return cross_entropy(logits, Y), state

  def train_step(ts: TrainState, state, X, Y, key):
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts.params, state, X, Y, key)
    if axis_name is not None:
      loss, grads = jax.lax.pmean((loss, grads), axis_name)
    updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    return TrainState(params, opt_state), jax.lax.stop_gradient(state), loss

  return train_step


# Divergence. The host reads an epoch's losses anyway; they alone tell it whether the epoch
# diverged, with no other transfer and no per-step sync.

MAX_LOG_PERPLEXITY = math.log(sys.float_info.max)  # a mean loss above it: perplexity overflows


def all_finite(tree) -> Array:
  """Whether every floating-point value in ``tree`` is finite (a scalar; under ``vmap``, one
  per model: it reduces over each model's own arrays)."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def mark_nonfinite_state(ts: TrainState, losses: Array) -> Array:
  """``losses`` with the last one made NaN where the train state after the epoch is not finite.

  An update can blow the parameters up after the last loss was computed (the last minibatch's
  loss is finite, the parameters it produces are not): marking that loss makes the host see it,
  so such a state is never saved as good.
  """
  return losses.at[-1].set(jnp.where(all_finite(ts), losses[-1], jnp.nan))


def diverged(losses) -> np.ndarray:
  """Whether an epoch diverged, from its ``losses <float>[..., num_batches]`` (one answer per
  leading index: per model): a non-finite loss (or state, :func:`mark_nonfinite_state`), or a
  mean loss whose perplexity overflows."""
  losses = np.asarray(losses, np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    return ~np.isfinite(losses).all(axis=-1) | ~(losses.mean(axis=-1) <= MAX_LOG_PERPLEXITY)


def make_train_epoch(model: RNNLM, optimizer, use_random_iter: bool = False,
                     devices: Sequence[jax.Device] | None = None,
                     masked: bool = False) -> Callable:
  """A jitted ``(train_state, Xs, Ys, key) -> (train_state, losses <float32>[num_batches])``.

  ``Xs`` and ``Ys`` are ``<int32>[num_batches, batch, steps]``. A train state left non-finite by
  the epoch makes its last loss NaN (:func:`mark_nonfinite_state`). Sequential partitioning starts
  the epoch from a zero state and carries it across minibatches; random partitioning starts every
  minibatch from zeros. The train state's buffers are donated. With several ``devices``
  (:func:`deeprnn_jax.fit.parallel.batch_devices`) every minibatch's rows are split across them, and
  the train state is replicated on each: place it so (:func:`deeprnn_jax.fit.parallel.replicate`)
  before the first call, or the second call compiles again. ``masked``: padding labels are left
  out of the loss (:func:`masked_cross_entropy`).
  """
  sharded = devices is not None and len(devices) > 1
  train_step = make_train_step(model, optimizer, axis_name=BATCH_AXIS if sharded else None,
                               masked=masked)

  def epoch(ts: TrainState, Xs, Ys, key):
    zeros = model.begin_state(Xs.shape[1])

    def body(carry, batch):
      ts, state = carry
      X, Y, k = batch
      if use_random_iter:
        state = zeros
      ts, state, loss = train_step(ts, state, X, Y, k)
      return (ts, state), loss

    keys = jax.random.split(key, Xs.shape[0])
    (ts, _), losses = jax.lax.scan(body, (ts, zeros), (Xs, Ys, keys))
    return ts, mark_nonfinite_state(ts, losses)

  if sharded:
    mesh, rows = batch_mesh(devices), P(None, BATCH_AXIS)
    epoch = jax.shard_map(epoch, mesh=mesh,
                          in_specs=(P(), rows, rows, P()), out_specs=(P(), P()),
                          # Gradients are taken within each shard, never through a collective,
                          # so JAX's check of per-shard variance (which the recurrence's custom
                          # VJPs would have to annotate) guards nothing here.
                          check_vma=False)
    # Placements stated, not left to the compiler: the compiled epoch then takes the arrays
    # parallel.replicate and parallel.epoch_inputs make, on one process or several.
    on = lambda spec: NamedSharding(mesh, spec)
    return jax.jit(epoch, donate_argnums=0, in_shardings=(on(P()), on(rows), on(rows), on(P())),
                   out_shardings=(on(P()), on(P())))
  return jax.jit(epoch, donate_argnums=0)


class Models(NamedTuple):
  """The state of ``K`` models trained together: their train states, every leaf with a leading
  ``[K]`` axis, and which of them still train (a model that diverged stops, at its last finite
  state)."""

  train_state: TrainState
  alive: Array  # <bool>[K]


def make_models_epoch(model: RNNLM, optimizer, use_random_iter: bool = False) -> Callable:
  """``K`` models' epochs in one jitted program: :func:`make_train_epoch`'s epoch under
  ``jax.vmap``.

  Returns ``(models, Xs, Ys, keys, num_batches) -> (models, losses <float32>[K, max_batches])``:

  * ``models``: :class:`Models` (donated);
  * ``Xs``, ``Ys``: ``<int32>[K, max_batches, batch, steps]``, model ``k``'s own minibatches (its
    data order and partition offset), padded to a common count;
  * ``keys``: ``<key>[K]``, each model's epoch key (its dropout masks);
  * ``num_batches``: ``<int32>[K]``, how many of model ``k``'s minibatches are real.

  Model ``k`` trains exactly as one model would on its own minibatches: padding minibatches leave
  its state as it was. A model whose epoch diverges (:func:`diverged`: a non-finite loss or
  parameter, or a perplexity that overflows) goes back to its state before the epoch and stops
  (``alive`` false): its losses are NaN for that epoch and zero from then on, and it does not
  change again. The others are not touched by it.
  """
  train_step = make_train_step(model, optimizer)

  def select(flag, new, old):
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)

  def epoch(models: Models, Xs, Ys, key, num_batches):
    zeros = model.begin_state(Xs.shape[1])

    def body(carry, batch):
      ts, state = carry
      X, Y, k, real = batch
      if use_random_iter:
        state = zeros
      new_ts, new_state, loss = train_step(ts, state, X, Y, k)
      return (select(real, new_ts, ts), select(real, new_state, state)), jnp.where(real, loss, 0.)

    index = jnp.arange(Xs.shape[0])
    real = (index < num_batches) & models.alive
    keys = jax.random.split(key, Xs.shape[0])
    (ts, _), losses = jax.lax.scan(body, (models.train_state, zeros), (Xs, Ys, keys, real))
    mean_loss = jnp.sum(losses) / jnp.maximum(jnp.sum(real), 1)
    ok = all_finite(ts) & jnp.all(jnp.isfinite(losses)) & (mean_loss <= MAX_LOG_PERPLEXITY)
    alive = models.alive & ok
    return (Models(select(ok, ts, models.train_state), alive),
            jnp.where(ok, losses, jnp.nan))

  return jax.jit(jax.vmap(epoch), donate_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _mean_loss(model: RNNLM, params, X, Y):
  logits, _ = model.apply({"params": params}, X)
  return cross_entropy(logits, Y)


def evaluate(model: RNNLM, params, corpus, num_rows: int = 1) -> float:
  """Perplexity of ``corpus <int32>[n]`` (n >= 2), reading it from a zero state.

  The text is cut into ``num_rows`` contiguous rows read in parallel, each carrying its state
  through to its end (:func:`deeprnn_jax.fit.scoring.stream_rows`); with one row (the default)
  every token after the first is predicted with all the context before it. Tokens past the last
  full row are left out.
  """
  return perplexity(_mean_loss(model, params, *scoring.stream_rows(corpus, num_rows)))


def compile_evaluate(model: RNNLM, params, num_tokens: int, num_rows: int = 1) -> None:
  """Compiles what :func:`evaluate` runs on a corpus of ``num_tokens`` (>= 2), without running
  it. ``params``: the model's parameters, or only their shapes (``jax.ShapeDtypeStruct``)."""
  num_rows, n = scoring.row_layout(num_tokens, num_rows)
  rows = jax.ShapeDtypeStruct((num_rows, n // num_rows), jnp.int32)
  _mean_loss.lower(model, params, rows, rows).compile()
