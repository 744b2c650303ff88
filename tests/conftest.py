"""Test setup: two CPU devices, a compilation cache of the test session's own, and the corpora
found as the library does.

The commands keep compiled programs in a cache by default (``$DEEPRNN_JAX_CACHE``), so a user's
second run of a program loads what the first compiled. The tests do the same, in-process and in
the commands they start, but in a temporary folder of their own (one per pytest process, removed
at its end), never the user's: the first test to compile a program fills it, later ones read it.

A test that reads a corpus asks for it through a fixture (``time_machine_path``,
``time_machine_corpus`` or ``data_dir``; a test that only runs a command reading it uses
``@pytest.mark.usefixtures("time_machine_path")``). The fixture finds it once per session with
``deeprnn_jax.text.corpora.resolve_corpus``, as a user's run does: ``$DEEPRNN_JAX_DATA/<name>``
when the variable is set (a relative value is taken against the directory pytest starts in), else
``data/<name>`` under that directory, else a download into ``data/`` checked against its SHA-1.
Then ``$DEEPRNN_JAX_DATA`` names the folder it was found in, so that tests which change directory,
and the processes they start, find it too.

Where it cannot be had (offline, no copy anywhere), each test that needs it fails with one line
saying how to fix that, and the tests that need no corpus run as usual.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from deeprnn_jax import cli
from deeprnn_jax.base.errors import DataError
from deeprnn_jax.fit import parallel
from deeprnn_jax.text import corpora, data

DATA_ENV = corpora.DATA_ENV
# Before JAX compiles anything: a cache set later is not read.
os.environ[cli.CACHE_ENV] = tempfile.mkdtemp(prefix="deeprnn-jax-test-xla-")
atexit.register(shutil.rmtree, os.environ[cli.CACHE_ENV], ignore_errors=True)
cli.enable_compile_cache()
# Two CPU devices whatever the machine, so that the batch-split path is tested everywhere (a
# count set in JAX_NUM_CPU_DEVICES or XLA_FLAGS is left alone; the split tests need 2).
parallel.use_cpu_cores(2)

if os.environ.get(DATA_ENV):  # CI sets it, perhaps relative to the repository root.
  os.environ[DATA_ENV] = str(Path(os.environ[DATA_ENV]).resolve())


def pytest_xdist_auto_num_workers(config) -> int:
  """``-n auto``: a worker per core, at most 8 (each holds its own JAX, PyTorch and cache)."""
  return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1))


@functools.cache
def _resolve(name: str) -> Path | str:
  """The absolute path of corpus ``name``, or why it cannot be had (one line, with the fix)."""
  try:
    return corpora.resolve_corpus(name).resolve()
  except DataError as e:
    dataset = corpora.DATASETS[name]
    reason = str(e).split(";")[0]  # the library's message goes on with the ways to provide it
    where = os.environ.get(DATA_ENV)
    looked = f"not in ${DATA_ENV} ({where})" if where else f"${DATA_ENV} is not set"
    return (f"{name} is needed by this test: {looked}, no data/{name} under {Path.cwd()}, and "
            f"{reason}. Set {DATA_ENV} to a folder holding {name}, or place it at "
            f"data/{name} (from {dataset.url}, SHA-1 {dataset.sha1}).")


def corpus_path(name: str) -> Path:
  """Corpus ``name``, found or downloaded; fails the calling test (one line) where it cannot be.

  Once found, ``$DEEPRNN_JAX_DATA`` names its folder (absolute) for the rest of the session.
  """
  path = _resolve(name)
  if isinstance(path, str):
    pytest.fail(path, pytrace=False)
  os.environ[DATA_ENV] = str(path.parent)
  return path


@pytest.fixture(scope="session")
def time_machine_path() -> Path:
  """The Time Machine's file (absolute); ``$DEEPRNN_JAX_DATA`` names its folder."""
  return corpus_path("timemachine.txt")


@pytest.fixture(scope="session")
def data_dir(time_machine_path) -> Path:
  """The folder holding the corpora (absolute), which ``$DEEPRNN_JAX_DATA`` names."""
  return time_machine_path.parent


@pytest.fixture(scope="session")
def time_machine_corpus(time_machine_path):
  """``(corpus <int32>[170580], vocab)`` of The Time Machine, loaded once."""
  return data.load_corpus_time_machine()
