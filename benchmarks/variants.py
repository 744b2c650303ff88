"""Interleaved A/B timing of the training-loop variants examined in BENCHMARKS.md.

    PYTHONPATH=. python benchmarks/variants.py scan:1,auto:1,res:1,res:5

Each variant is ``kind:unroll``:

* ``scan``: ``RNNLM(impl="scan")``, the chapter's nn.scan reference;
* ``auto``: layerwise, the recurrence differentiated by XLA (``recurrence.layer_scan_autodiff``);
* ``res``: layerwise, custom VJP keeping the step's vjp residuals (``recurrence.layer_scan``, the
  default). The "products" variant of BENCHMARKS.md was removed from the library after it lost.

All run ``training.make_train_epoch`` on the same epoch arrays, in one process, interleaved
(``R`` rounds of ``N`` epochs each). Wall time and process CPU time per epoch are printed: on a
machine shared with other jobs the CPU time is the steadier of the two.
Environment: ``CELL``, ``H``, ``L``, ``B``, ``MAXTOK``, ``R``, ``N``.
"""

import os
import sys
import time

import jax
import numpy as np

from deeprnn_jax import data, recurrence, training
from deeprnn_jax.models import RNNLM


def main():
  env = lambda k, d: type(d)(os.environ.get(k, d))
  cell, H, L, B = env("CELL", "lstm"), env("H", 256), env("L", 2), env("B", 32)
  loader, vocab = data.load_data_time_machine(B, 35, max_tokens=env("MAXTOK", 10000))
  Xs, Ys = loader.epoch()
  opt = training.make_optimizer(2.0, 1.0)
  layer_scan, variants = recurrence.layer_scan, {}
  for spec in sys.argv[1].split(","):
    kind, unroll = spec.split(":")
    recurrence.layer_scan = layer_scan if kind == "res" else recurrence.layer_scan_autodiff
    os.environ["DEEPRNN_JAX_UNROLL"] = unroll
    model = RNNLM(len(vocab), H, L, cell, impl="scan" if kind == "scan" else "layerwise")
    ts = training.init_train_state(model, opt, jax.random.PRNGKey(0))
    epoch = training.make_train_epoch(model, opt)
    t = time.perf_counter()
    ts, losses = epoch(ts, Xs, Ys, jax.random.PRNGKey(1))  # traced and compiled now
    losses.block_until_ready()
    variants[spec] = {"fn": epoch, "ts": ts, "wall": [], "cpu": [],
                      "compile": time.perf_counter() - t}
  recurrence.layer_scan = layer_scan
  os.environ.pop("DEEPRNN_JAX_UNROLL")
  N = env("N", 3)
  for _ in range(env("R", 5)):
    for v in variants.values():
      t, c = time.perf_counter(), time.process_time()
      for _ in range(N):
        v["ts"], losses = v["fn"](v["ts"], Xs, Ys, jax.random.PRNGKey(1))
      losses.block_until_ready()
      v["wall"].append((time.perf_counter() - t) / N)
      v["cpu"].append((time.process_time() - c) / N)
  for spec, v in variants.items():
    wall, cpu = np.median(v["wall"]), np.median(v["cpu"])
    print(f"{spec:10s} epoch wall {wall * 1e3:7.1f} ms ({Xs.size / wall:8,.0f} tokens/s)  "
          f"CPU {cpu * 1e3:7.1f} ms  first call {v['compile']:.1f} s")


if __name__ == "__main__":
  main()
