"""The benchmark's constants are the train CLI's defaults (it keeps its own literals so that the
PyTorch workers, which import it, do not import JAX)."""

import importlib.util
from pathlib import Path

from deeprnn_jax import recurrence
from deeprnn_jax.config import TrainConfig
from deeprnn_jax.runs import RunOptions


def _throughput():
  path = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
  spec = importlib.util.spec_from_file_location("throughput", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_throughput_benchmark_runs_the_cli_defaults():
  tb, d = _throughput(), TrainConfig()
  assert (tb.LR, tb.CLIP, tb.LOG_EVERY) == (d.lr, d.clip, RunOptions().log_every)
  cell, layers, hiddens, batch, steps, max_tokens, _ = tb.CONFIGS["seed"]
  assert (cell, layers, hiddens, batch, steps, max_tokens) == (
      d.cell, d.num_layers, d.num_hiddens, d.batch_size, d.num_steps, d.max_tokens)


def test_an_implementation_may_name_its_precision():
  tb = _throughput()
  assert tb.PRECISIONS == tuple(recurrence.PRECISIONS)
  assert tb.split_impl("layerwise:bfloat16") == ("layerwise", "bfloat16")
  assert tb.split_impl("wavefront") == ("wavefront", "float32")
  assert tb.runnable("seed", "layerwise:bfloat16") and tb.runnable("seed", "wavefront:bfloat16")
  assert not tb.runnable("seed", "scan:bfloat16")  # the reference runs float32 only
  assert not tb.runnable("seed", "layerwise:float16")
