"""Data parallelism: the split rule, the choice of devices, a split epoch equal to an unsplit one.

``conftest.py`` gives this process two CPU devices, so the split path runs on any machine (on
one whose JAX computes on a GPU, the epoch tests run on its CPU devices); a run over four CPU
devices runs in a subprocess, which can be given them before its JAX starts.
"""

import json

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cell_names

from deeprnn_jax import train
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.fit import parallel, training
from deeprnn_jax.model.models import RNNLM

VOCAB = 11
CPUS = jax.devices("cpu")
ON_CPU = jax.default_backend() == "cpu"


def test_the_test_process_has_two_cpu_devices():
  assert len(CPUS) >= 2


@pytest.mark.parametrize("batch,hiddens,devices,shards", [
    (32, 256, 2, 2),  # the chapter's run: split (measured faster)
    (32, 256, 16, 2),  # more shards were never measured faster
    (32, 256, 1, 1),  # one device: nothing to split over
    (32, 512, 2, 1), (64, 256, 2, 1), (512, 256, 2, 1), (128, 1024, 2, 1),  # measured no faster
    (8, 256, 2, 1),  # shards of 4 rows: not measured
    # The work limit, 16 x 256² = 1,048,576: 8 x 362² = 1,048,352 is under it, 8 x 363² over.
    (16, 362, 2, 2), (16, 363, 2, 1),
    (64, 181, 2, 2), (64, 182, 2, 1),  # 32 x 181² = 1,048,352; 32 x 182² = 1,059,968
    (32, 257, 2, 1),  # 16 x 257² = 1,056,784: just over
    (16, 1, 2, 2), (14, 1, 2, 1), (15, 1, 2, 1),  # 8 rows is the least; 7 rows, an odd batch: no
    (17, 8, 16, 1), (48, 8, 16, 2),  # never more than 2 shards, however many devices
])
def test_auto_shards_splits_only_where_it_was_measured_to_pay(batch, hiddens, devices, shards):
  assert parallel.auto_shards(batch, hiddens, devices) == shards


def test_batch_devices_splits_as_the_rule_says_and_refuses_impossible_counts():
  everywhere = jax.devices()
  n = len(everywhere)  # on a CPU, conftest's 2
  if ON_CPU:
    assert len(parallel.batch_devices(32, 256)) == 2  # the rule: the chapter's run is split
  else:  # a GPU: one device unless asked for more
    assert len(parallel.batch_devices(32, 256)) == 1
  assert list(parallel.batch_devices(32, 256, 1)) == everywhere[:1]
  assert list(parallel.batch_devices(8 * n, 8, n)) == everywhere
  assert list(parallel.batch_devices(8 * n, 8, str(n))) == everywhere  # as --devices gives it
  assert list(parallel.batch_devices(8 * n, 8, "all")) == everywhere
  bad = [(6, 0, "positive integer or all"), (6, 1.5, "positive"),
         (6, "two", "positive integer or all, got two"), (8 * n, n + 1, f"JAX has {n} ")]
  if n > 1:
    bad.append((8 * n + 1, "all", f"does not split into {n} equal shards"))
  for batch, devices, match in bad:
    with pytest.raises(UsageError, match=match):
      parallel.batch_devices(batch, 8, devices)


def test_use_cpu_cores_once_jax_has_started_changes_nothing():
  before = jax.devices("cpu")
  assert parallel.use_cpu_cores(5) is False
  assert jax.devices("cpu") == before
  with pytest.raises(UsageError):
    parallel.use_cpu_cores(0)


def test_replicate_puts_a_copy_on_every_device_and_on_first_reads_one_back():
  tree = {"a": np.arange(6.0), "b": np.ones((2, 3))}
  assert parallel.replicate(tree, CPUS[:1]) is tree and parallel.on_first(tree, CPUS[:1]) is tree
  rep = parallel.replicate(tree, CPUS[:2])
  for leaf in jax.tree.leaves(rep):
    assert leaf.sharding.is_fully_replicated and leaf.sharding.device_set == set(CPUS[:2])
  for leaf in jax.tree.leaves(parallel.on_first(rep, CPUS[:2])):
    assert leaf.sharding.device_set == {CPUS[0]}
  chex.assert_trees_all_equal(parallel.on_first(rep, CPUS[:2]), tree)
  first = parallel.on_first(rep, CPUS[:2])
  jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(rep)  # as an epoch does
  chex.assert_trees_all_equal(first, tree)  # still readable


def test_epoch_inputs_split_the_rows_and_replicate_the_key():
  Xs = np.arange(3 * 6 * 5, dtype=np.int32).reshape(3, 6, 5)
  key = jax.random.PRNGKey(3)
  assert parallel.epoch_inputs(CPUS[:1], Xs, Xs, key) == (Xs, Xs, key)
  X, Y, k = parallel.epoch_inputs(CPUS[:2], Xs, Xs + 1, key)
  assert X.sharding == parallel.rows_sharding(CPUS[:2]) and k.sharding.is_fully_replicated
  assert [s.data.shape for s in X.addressable_shards] == [(3, 3, 5)] * 2
  np.testing.assert_array_equal(X.addressable_shards[1].data, Xs[:, 3:])
  np.testing.assert_array_equal(Y, Xs + 1)


def _epochs(cell, use_random_iter, dropout=0.0, shards=2):
  """One epoch unsplit and split, from the same state; a clip small enough to act every step."""
  model = RNNLM(VOCAB, 16, 2, cell, dropout=dropout)
  opt = training.make_optimizer(1.0, 0.01)
  rng = np.random.default_rng(0)
  Xs, Ys = (rng.integers(0, VOCAB, (3, 6, 5)).astype(np.int32) for _ in range(2))
  out = []
  for devices in (CPUS[:1], CPUS[:shards]):
    with jax.default_device(CPUS[0]):
      ts = parallel.replicate(training.init_train_state(model, opt, jax.random.PRNGKey(0)),
                              devices)
      epoch = training.make_train_epoch(model, opt, use_random_iter, devices)
      out.append(epoch(ts, Xs, Ys, jax.random.PRNGKey(1)))
      epoch(jax.tree.map(jnp.copy, out[-1][0]), Xs, Ys, jax.random.PRNGKey(2))
      assert epoch._cache_size() == 1  # the state comes back placed as it went in
  return out


@pytest.mark.slow
@pytest.mark.parametrize("cell", cell_names(fast=True))
@pytest.mark.parametrize("use_random_iter", [False, True])
def test_a_split_epoch_trains_as_one_device_does(cell, use_random_iter):
  (ts1, losses1), (ts2, losses2) = _epochs(cell, use_random_iter)
  # Every minibatch's mean loss over all rows, and the same clipped SGD steps.
  chex.assert_trees_all_close(losses1, losses2, rtol=1e-5)
  chex.assert_trees_all_close(ts1.params, ts2.params, rtol=1e-5, atol=1e-6)
  assert ts2.params["W_hq"].sharding.is_fully_replicated
  assert len(ts2.params["W_hq"].sharding.device_set) == 2


@pytest.mark.slow
def test_split_shards_draw_their_own_dropout_masks():
  """Both shards get the same rows; their states differ only if their masks do."""
  model = RNNLM(VOCAB, 16, 2, "lstm", dropout=0.5)
  opt = training.make_optimizer(1.0, 1.0)
  with jax.default_device(CPUS[0]):
    ts = training.init_train_state(model, opt, jax.random.PRNGKey(0))
    state = model.begin_state(6)
  step = training.make_train_step(model, opt, axis_name=training.BATCH_AXIS)
  mesh = jax.sharding.Mesh(np.asarray(CPUS[:2]), (training.BATCH_AXIS,))
  P = jax.sharding.PartitionSpec
  rows, state_rows = P(training.BATCH_AXIS), P(None, training.BATCH_AXIS)
  split_step = jax.jit(jax.shard_map(step, mesh=mesh,
                                     in_specs=(P(), state_rows, rows, rows, P()),
                                     out_specs=(P(), state_rows, P()), check_vma=False))
  X = np.tile(np.random.default_rng(0).integers(0, VOCAB, (3, 5)), (2, 1)).astype(np.int32)
  _, (H, C), loss = split_step(ts, state, X, X, jax.random.PRNGKey(2))
  H, C = np.asarray(H), np.asarray(C)
  assert np.isfinite(loss)
  assert not np.allclose(H[1, :3], H[1, 3:])  # layer 2 reads layer 1 through dropout
  np.testing.assert_allclose(H[0, :3], H[0, 3:], rtol=1e-6)  # layer 1 has none before it


SMALL = ["--cell", "gru", "--num-hiddens", "16", "--max-tokens", "1000", "--batch-size", "8",
         "--num-steps", "5", "--valid-fraction", "0.2", "--num-epochs", "3", "--log-every", "1",
         "--quiet"]


@pytest.mark.slow
@pytest.mark.usefixtures("time_machine_path")
def test_a_run_over_four_cpu_devices_trains_as_one_device_does(tmp_path):
  one, four = tmp_path / "one", tmp_path / "four"
  proc = helpers.train([SMALL + ["--devices", "1", "--out", one],
                         SMALL + ["--devices", "4", "--out", four]], devices=4)
  assert proc.returncode == 0, proc.stderr
  assert json.loads((four / "summary.json").read_text())["shards"] == 4
  np.testing.assert_allclose(helpers.perplexities(four), helpers.perplexities(one), rtol=1e-4)


@pytest.mark.parametrize("devices,batch,message", [
    ("3", 8, "3 devices asked for, but JAX has 2 "),  # conftest: 2 CPU devices
    ("2", 5, "batch size 5 does not split into 2 equal shards"),
    ("none", 8, "--devices/--shards must be a positive integer or all, got none"),
])
def test_devices_that_cannot_be_had_are_one_line_and_exit_code_2(devices, batch, message,
                                                                 tmp_path, capsys):
  args = SMALL + ["--devices", devices, "--batch-size", str(batch), "--out", str(tmp_path / "r")]
  assert train.main(args) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and err.startswith("deeprnn_jax.train: error: ")
  if ON_CPU or devices == "none":
    assert message in err
  assert not (tmp_path / "r").exists()
