"""The predict command as users run it: text streamed in pieces that join into the library's
prediction, Ctrl-C, progress on a terminal, and the inputs it (and the other commands) refuse."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, TIMEOUT

from deeprnn_jax import predict
from deeprnn_jax.model import generate
from deeprnn_jax.model.models import RNNLM
from deeprnn_jax.text import data

PREDICT = [sys.executable, "-m", "deeprnn_jax.predict"]


def _train(out, *flags) -> None:
  """A tiny run of the train command: one epoch of 8 hidden units on The Time Machine's start."""
  result = subprocess.run(
      [sys.executable, "-m", "deeprnn_jax.train", "--num-epochs", "1", "--num-hiddens", "8",
       "--max-tokens", "2000", "--quiet", "--out", str(out), *flags],
      cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory, time_machine_path):
  out = tmp_path_factory.mktemp("predict") / "run"
  _train(out)
  return out


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory, time_machine_path):
  """A run on The Time Machine as it is (``--clean none``)."""
  out = tmp_path_factory.mktemp("predict") / "raw"
  _train(out, "--clean", "none")
  return out


def _predict(run, *flags, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([*PREDICT, "--checkpoint", str(run), *map(str, flags)], cwd=REPO,
                        capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def _library(run, prefix: str, num_preds: int, temperature: float, seed: int) -> str:
  model, params, vocab = predict.load_model(run)
  return generate.predict(prefix, num_preds, params, model, vocab, temperature,
                          jax.random.PRNGKey(seed))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("prefix", ["a", "abcdefghij abcdefghij"])
def test_pieces_join_into_the_unchunked_prediction(temperature, prefix):
  vocab = data.Vocab(list("abcdefghij "))
  model = RNNLM(len(vocab), 16, 2, "lstm")
  params = model.init(jax.random.PRNGKey(2), jnp.zeros((1, 1), jnp.int32))["params"]
  key = jax.random.PRNGKey(9)
  num_preds = 3 * generate.CHUNK + 17
  pieces = list(generate.stream_tokens(model, params, vocab[list(prefix)], num_preds,
                                       temperature, key))
  assert len(pieces) >= 4 and all(0 < len(p) <= generate.CHUNK for p in pieces)
  padded = np.zeros(generate._bucket(len(prefix)), np.int32)
  padded[:len(prefix)] = vocab[list(prefix)]
  whole = generate.generate_tokens(model, params, jnp.asarray(padded), num_preds, temperature,
                                   key, jnp.int32(len(prefix)))
  np.testing.assert_array_equal(np.concatenate(pieces), np.asarray(whole))
  text = "".join(vocab.to_tokens(np.concatenate(pieces).tolist()))
  assert prefix + text == generate.predict(prefix, num_preds, params, model, vocab, temperature,
                                           key)
  # The pieces really sample: another key draws another text.
  if temperature:
    other = generate.predict(prefix, num_preds, params, model, vocab, temperature,
                             jax.random.PRNGKey(10))
    assert other != prefix + text


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_the_command_prints_the_librarys_prediction(run, temperature):
  result = _predict(run, "--prefix", "the time", "--num-preds", 3 * generate.CHUNK + 5,
                    "--temperature", temperature, "--seed", 4)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""  # no progress where stderr is not a terminal
  assert result.stdout == _library(run, "the time", 3 * generate.CHUNK + 5,
                                   float(temperature), 4) + "\n"


def _read_until(stream, count: int, proc, deadline: float) -> bytes:
  """At least ``count`` bytes of ``stream`` as they come, or a failure past ``deadline``."""
  got = b""
  while len(got) < count:
    if not select.select([stream], [], [], max(0.0, deadline - time.monotonic()))[0]:
      proc.kill()
      raise AssertionError(f"{len(got)} bytes of output, not {count}, after the deadline")
    chunk = os.read(stream.fileno(), 65536)
    if not chunk:
      raise AssertionError(f"output ended after {len(got)} bytes (exit {proc.wait()})")
    got += chunk
  return got


def test_ctrl_c_stops_within_a_second_keeping_the_text(run):
  """A text that would take minutes: it streams, and Ctrl-C ends it at once with exit 130, what
  was printed kept and equal to the library's prediction of that length."""
  proc = subprocess.Popen([*PREDICT, "--checkpoint", str(run), "--num-preds", "3000000",
                           "--temperature", "1", "--seed", "7"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    out = _read_until(proc.stdout, 2000, proc, time.monotonic() + 60)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = proc.wait(30)
    waited = time.monotonic() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
  out += proc.stdout.read()
  err = proc.stderr.read().decode()
  assert code == 130, err
  assert waited < 2.0  # a piece takes milliseconds; the rest is the process ending, machine busy
  m = re.fullmatch(r"deeprnn_jax\.predict: SIGINT: stopped after ([\d,]+) of 3,000,000 "
                   r"characters\n", err)
  assert m, err
  done = int(m.group(1).replace(",", ""))
  assert out.decode() == _library(run, "time traveller", done, 1.0, 7) + "\n"


def test_progress_shows_on_a_terminal(run):
  """stderr a terminal, the text going to a pipe: the characters made so far show there."""
  primary, secondary = pty.openpty()
  try:
    proc = subprocess.Popen([*PREDICT, "--checkpoint", str(run), "--num-preds", "40000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    out, _ = proc.communicate(timeout=TIMEOUT)
    shown = b""
    while select.select([primary], [], [], 0)[0]:
      try:
        chunk = os.read(primary, 65536)
      except OSError:  # the terminal's other end is closed: all is read
        break
      if not chunk:
        break
      shown += chunk
  finally:
    os.close(primary)
  assert proc.returncode == 0, shown
  assert re.search(rb"\r[\d,]+ of 40,000 characters \(\d+%\)", shown), shown
  assert out.decode() == _library(run, "time traveller", 40000, 0.0, 0) + "\n"


def test_a_prefix_is_cleaned_as_the_corpus_is(run):
  result = _predict(run, "--prefix", "The Time-Machine!", "--num-preds", 5)
  assert result.returncode == 0 and result.stderr == "", result.stderr
  assert result.stdout == _library(run, "the time machine", 5, 0.0, 0) + "\n"
  result = _predict(run, "--prefix", "1984!", "--num-preds", 5)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr == ("deeprnn_jax.predict: error: the prefix '1984!' has no characters left "
                           "after the corpus's cleaning (--clean d2l: letters only, lower case)\n")


def test_characters_outside_the_vocabulary_are_named(raw_run):
  result = _predict(raw_run, "--prefix", "Time €½", "--num-preds", 5)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ("deeprnn_jax.predict: warning: the vocabulary has no '€', '½': the "
                           "prefix reads each as <unk>\n")
  assert result.stdout == _library(raw_run, "Time €½", 5, 0.0, 0) + "\n"


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_temperature_must_be_finite_and_not_negative(run, value):
  result = _predict(run, "--temperature", value)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr == ("deeprnn_jax.predict: error: temperature must be a finite number >= 0 "
                           f"(0: greedy), got {float(value)}\n")


# The other commands' inputs.


def test_a_corpus_that_is_a_device_is_named_so(tmp_path):
  result = subprocess.run([sys.executable, "-m", "deeprnn_jax.train", "--corpus", "/dev/zero",
                           "--out", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 2
  assert result.stderr == ("deeprnn_jax.train: error: corpus path is a character device, not a "
                           "regular file: /dev/zero\n")


def test_a_file_that_is_no_state_dict_is_not_loaded_unsafely(tmp_path):
  """Torch's advice to load the file with weights_only=False (running the code in it) is not
  passed on."""
  garbage = tmp_path / "model.pt"
  garbage.write_bytes(bytes(range(256)) * 4)
  result = subprocess.run([sys.executable, "-m", "deeprnn_jax.convert", "--from-torch",
                           str(garbage), "--cell", "lstm", "--num-layers", "2", "--out",
                           str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 2
  assert result.stderr == (f"deeprnn_jax.convert: error: cannot read a PyTorch state dict from "
                           f"{garbage}: the file is not a PyTorch state dict "
                           "(torch.save(net.state_dict(), path) writes one)\n")
