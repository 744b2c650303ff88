"""``impl="onednn"``: oneDNN's fused LSTM, compiled on first use, as users meet it.

Its numbers are held to the references with the other implementations (``test_implementations``,
``test_regularisers``, ``test_precision``); here: the kernel is built once and kept, the train
command runs on it and lands where ``layerwise`` does, and what it needs but lacks (a compiler,
the extra, a CPU) is said in one line with exit code 2, creating nothing.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, cpu_env, metrics

from deeprnn_jax import train
from deeprnn_jax.base.errors import UsageError
from deeprnn_jax.model import onednn

# The extra's wheels are built for Linux x86-64 only; elsewhere check_available says so.
pytestmark = pytest.mark.skipif(not onednn.SUPPORTED, reason="oneDNN's wheels: Linux x86-64")

SMALL = ["--num-hiddens", "16", "--num-layers", "2", "--max-tokens", "3000", "--batch-size", "8",
         "--num-steps", "10"]


def _python(code: str, cache, **env) -> subprocess.CompletedProcess:
  """``code`` in a fresh process whose kernel cache is ``cache`` (none built there yet)."""
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                        env=dict(cpu_env(1), XDG_CACHE_HOME=str(cache), **env), timeout=600)


def test_the_kernel_is_compiled_once_into_the_cache_and_then_reused(tmp_path):
  code = ("from deeprnn_jax.model import onednn; onednn.check_available('onednn'); "
          "print(onednn._kernel().deeprnn_onednn_lstm_workspace_bytes(3, 2, 5, 4, 0, 1))")
  first = _python(code, tmp_path)
  assert first.returncode == 0, first.stderr
  built = list((tmp_path / "deeprnn_jax").glob("onednn_lstm-*.so"))
  assert len(built) == 1 and int(first.stdout) > 0
  stamp = built[0].stat().st_mtime_ns
  # No compiler now: the second process must load the kept library, not build one.
  second = _python(code, tmp_path, CXX=str(tmp_path / "no-compiler"))
  assert second.returncode == 0, second.stderr
  assert second.stdout == first.stdout and built[0].stat().st_mtime_ns == stamp
  assert list((tmp_path / "deeprnn_jax").iterdir()) == built  # no temporary left behind


def test_train_without_a_compiler_exits_2_with_one_line_and_creates_nothing(tmp_path,
                                                                            time_machine_path):
  run = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, "-m", "deeprnn_jax.train", *SMALL, "--impl", "onednn", "--num-epochs", "1",
       "--out", str(run)], capture_output=True, text=True, cwd=REPO, timeout=600,
      env=dict(cpu_env(1), XDG_CACHE_HOME=str(tmp_path / "cache"), CXX="no-such-compiler++"))
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip().splitlines() == [
      "deeprnn_jax.train: error: impl 'onednn' compiles its kernel on first use and needs a C++ "
      "compiler (no-such-compiler++ not found; set CXX)"]
  assert not run.exists()


def test_a_missing_wheel_is_named_with_the_install_command():
  message = r"pip install -e \"\.\[onednn\]\" \(no no-such-wheel here\)"
  with pytest.raises(UsageError, match=message):
    onednn._installed_file("no-such-wheel", "libdnnl.so.3")


def test_the_kernel_refuses_a_shape_onednn_cannot_run():
  assert onednn._workspace_bytes(3, 2, 3, 4, False, 1) > 0
  with pytest.raises(UsageError, match="oneDNN has no LSTM for steps 3, batch 2, inputs 3, "
                                       "hiddens 0"):
    onednn._workspace_bytes(3, 2, 3, 0, False, 1)


def test_a_layer_equals_its_equations_with_gradients_through_the_final_state():
  """One layer alone, time first, every output used (``hs``, ``h_T``, ``c_T``), both biases."""
  T, N, I, H = 6, 3, 4, 5
  k = jax.random.split(jax.random.PRNGKey(2), 7)
  args = (jax.random.normal(k[0], (T, N, I)), jax.random.normal(k[1], (N, H)),
          jax.random.normal(k[2], (N, H)), 0.4 * jax.random.normal(k[3], (I, 4 * H)),
          0.4 * jax.random.normal(k[4], (H, 4 * H)), 0.1 * jax.random.normal(k[5], (4 * H,)),
          0.1 * jax.random.normal(k[6], (4 * H,)))

  def equations(x, h, c, W_xh, W_hh, b_xh, b_hh):
    hs = []
    for t in range(T):
      i, f, g, o = jnp.split(x[t] @ W_xh + b_xh + h @ W_hh + b_hh, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      hs.append(h)
    return jnp.stack(hs), h, c

  def loss(layer):
    return lambda *a: sum(jnp.sum(jnp.sin(w * out)) for w, out in zip((1.0, 2.0, 3.0), layer(*a)))

  got = jax.jit(onednn.lstm_layer)(*args)
  want = equations(*args)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  grads = jax.grad(loss(onednn.lstm_layer), argnums=tuple(range(7)))(*args)
  expected = jax.grad(loss(equations), argnums=tuple(range(7)))(*args)
  for a, b in zip(grads, expected):
    assert np.abs(np.asarray(b)).max() > 1e-3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_train_command_on_onednn_lands_where_layerwise_does(tmp_path, time_machine_path):
  runs = {impl: tmp_path / impl for impl in ("layerwise", "onednn")}
  for impl, run in runs.items():
    assert train.main(SMALL + ["--impl", impl, "--num-epochs", "3", "--quiet",
                               "--out", str(run)]) == 0
  got, want = ([row["train_perplexity"] for row in metrics(runs[impl])]
               for impl in ("onednn", "layerwise"))
  assert len(got) == 3 and got[-1] < got[0]  # it trained
  np.testing.assert_allclose(got, want, rtol=1e-4)
