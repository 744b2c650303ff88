"""Test setup: where the corpora are.

``$DEEPRNN_JAX_DATA`` defaults to ``<repo>/../shared/data``. A relative value (CI sets
``../shared/data``, relative to the repository root it runs from) is made absolute here, against
the working directory pytest starts in, so that tests which change directory still find it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deeprnn_jax import parallel

DATA_ENV = "DEEPRNN_JAX_DATA"
# The CLIs called in-process must not fill the user's compilation cache (test_cli checks it).
os.environ["DEEPRNN_JAX_CACHE"] = "none"
REPO = Path(__file__).resolve().parent.parent
# Two CPU devices whatever the machine, so that the batch-split path is tested everywhere (a
# count set in JAX_NUM_CPU_DEVICES or XLA_FLAGS is left alone; the split tests need 2).
parallel.use_cpu_cores(2)

if os.environ.get(DATA_ENV):
  os.environ[DATA_ENV] = str(Path(os.environ[DATA_ENV]).resolve())
else:
  os.environ[DATA_ENV] = str((REPO.parent / "shared" / "data").resolve())


@pytest.fixture(scope="session")
def data_dir() -> Path:
  """The directory ``$DEEPRNN_JAX_DATA`` names (absolute)."""
  return Path(os.environ[DATA_ENV])


@pytest.fixture(scope="session")
def time_machine_path(data_dir) -> Path:
  path = data_dir / "timemachine.txt"
  assert path.is_file(), f"The Time Machine is not at {path}; set ${DATA_ENV}"
  return path


@pytest.fixture(scope="session")
def time_machine_corpus(time_machine_path):
  """``(corpus <int32>[170580], vocab)`` of The Time Machine, loaded once."""
  from deeprnn_jax import data

  return data.load_corpus_time_machine()
