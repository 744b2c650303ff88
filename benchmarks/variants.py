"""Interleaved A/B timing of training-loop variants, in one process.

    python benchmarks/variants.py scan:1,auto:1,res:1,res:5
    CONFIG=wide R=3 N=1 python benchmarks/variants.py res:1,res:1:bf16,t2d:1:bf16

Each variant is ``kind:unroll[:hi|:bf16]``:

* ``scan``: ``RNNLM(impl="scan")``, the chapter's nn.scan reference;
* ``auto``: layerwise, the recurrence differentiated by XLA (``recurrence.layer_scan_autodiff``);
* ``res``: layerwise, custom VJP keeping the step's vjp residuals (``recurrence.layer_scan``, the
  default);
* ``sliced``: ``res`` with the LSTM/GRU gates as the equations read, σ and tanh on column slices
  of the gate array and differentiated by JAX (``cells.lstm_gates_textbook``), instead of one
  tanh over the whole array with written-out derivatives (``cells.lstm_gates``);
* ``wave``: ``RNNLM(impl="wavefront")``, the layers skewed in time as one recurrence;
* ``cudnn``: ``RNNLM(impl="cudnn")`` (LSTM; cuDNN on a CUDA GPU, unroll ignored);
* ``split``: ``res`` with every minibatch's rows split over the CPU cores, one JAX CPU device
  each (``parallel.batch_devices``; the train CLI's default where ``parallel.auto_shards`` says
  so); ``split`` followed by a number (``split2``) asks for that many shards;
* ``noreduce``: ``split`` without the all-reduce of the gradients (``jax.lax.pmean`` as the
  identity): each shard trains on its own rows, which is not d2l's training; it times what the
  all-reduce, and the shards waiting for each other there, cost the split;
* ``t2d``: ``res`` with the backward's transposed operands as plain 2-D transposes (``a.T``
  behind an optimization barrier, then cast) instead of ``recurrence._t``'s: with ``:bf16``,
  XLA:CPU silently runs those products in float32;
* a trailing ``:hi`` traces the variant under ``jax.default_matmul_precision("highest")`` (full
  float32 products; without it XLA:GPU and cuDNN may use TF32); a trailing ``:bf16`` builds the
  model with ``precision="bfloat16"`` (bfloat16 operands, float32 accumulation).

All run ``training.make_train_epoch`` on the same epoch arrays, in one process, interleaved
(``R`` rounds of ``N`` epochs each), each from the same initial parameters. Printed per variant:
wall time and process CPU time per epoch (on a machine shared with other jobs the CPU time is the
steadier of the two), the first call (trace + compile + one epoch), and the mean loss of the last
epoch (the same number of SGD steps for every variant, so precisions can be compared).
Environment: ``CONFIG`` (a ``benchmarks/throughput.py`` config name) or ``CELL``, ``H``, ``L``,
``B``, ``MAXTOK``; ``R``, ``N``.

The run is recorded in ``benchmarks/results/<device>/variants.json`` (``machine.py``;
``DEVICE_NAME`` overrides the device's name, ``RESULTS_DIR`` the folder, ``JSON`` names another
file), one entry per config and list of variants, replaced when the same comparison is run again,
with its command, date, commit and library versions.
"""

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
from throughput import CLIP, CONFIGS, LR, _data_env  # noqa: E402

from deeprnn_jax.fit import parallel, training
from deeprnn_jax.model import cells, recurrence
from deeprnn_jax.model.models import RNNLM  # noqa: E402
from deeprnn_jax.text import data  # noqa: E402

SLICED = {"lstm_gates": cells.lstm_gates_textbook, "gru_gates": cells.gru_gates_textbook}
SETTINGS = ("CONFIG", "CELL", "H", "L", "B", "MAXTOK", "R", "N")


@contextlib.contextmanager
def patched(kind: str):
  """The library as variant ``kind`` traces it (the functions it swaps are looked up at trace
  time), restored afterwards."""
  with contextlib.ExitStack() as stack:
    if kind == "auto":
      stack.enter_context(mock.patch.object(recurrence, "layer_scan",
                                            recurrence.layer_scan_autodiff))
    if kind == "sliced":
      for name, fn in SLICED.items():
        stack.enter_context(mock.patch.object(cells, name, fn))
    if kind == "t2d":
      stack.enter_context(mock.patch.object(recurrence, "_t", lambda a, precision="float32": (
          jax.lax.optimization_barrier(a.T).astype(recurrence.PRECISIONS[precision]))))
    if kind == "noreduce":
      stack.enter_context(mock.patch.object(jax.lax, "pmean", lambda x, axis_name: x))
    yield


def main():
  _data_env()
  parallel.use_cpu_cores()  # before JAX starts; the other variants run on the first device
  env = lambda k, d: type(d)(os.environ.get(k, d))
  if os.environ.get("CONFIG"):
    cell, L, H, B, T, maxtok, _ = CONFIGS[os.environ["CONFIG"]]
  else:
    cell, H, L, B, T, maxtok = env("CELL", "lstm"), env("H", 256), env("L", 2), env("B", 32), 35, \
        env("MAXTOK", 10000)
  loader, vocab = data.load_data_time_machine(B, T, max_tokens=maxtok)
  Xs, Ys = loader.epoch()
  opt = training.make_optimizer(LR, CLIP)
  variants = {}
  for spec in sys.argv[1].split(","):
    kind, unroll, *prec = spec.split(":")
    context = (lambda: jax.default_matmul_precision("highest")) if prec == ["hi"] else \
        contextlib.nullcontext
    impl = {"scan": "scan", "cudnn": "cudnn", "wave": "wavefront"}.get(kind, "layerwise")
    model = RNNLM(len(vocab), H, L, cell, impl=impl,
                  precision="bfloat16" if prec == ["bf16"] else "float32", unroll=int(unroll))
    try:
      # The precision is part of jit's cache key: every call runs under it; the patches only
      # matter while tracing, which the first call does.
      with patched(kind), context():
        devices = jax.devices()[:1]
        if kind.startswith("split") or kind == "noreduce":
          shards = kind[5:] if kind.startswith("split") else ""
          devices = parallel.batch_devices(B, H, int(shards) if shards else None)
        ts = parallel.replicate(training.init_train_state(model, opt, jax.random.PRNGKey(0)),
                                devices)
        epoch = training.make_train_epoch(model, opt, devices=devices)
        t = time.perf_counter()
        ts, losses = epoch(ts, Xs, Ys, jax.random.PRNGKey(1))
        losses.block_until_ready()
    except Exception as e:  # noqa: BLE001 - report the variant and measure the others
      print(f"{spec}: failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
      continue
    variants[spec] = {"fn": epoch, "ts": ts, "ctx": context, "wall": [], "cpu": [],
                      "first": time.perf_counter() - t}
  N = env("N", 3)
  for _ in range(env("R", 5)):
    for v in variants.values():
      with v["ctx"]():
        t, c = time.perf_counter(), time.process_time()
        for _ in range(N):
          v["ts"], losses = v["fn"](v["ts"], Xs, Ys, jax.random.PRNGKey(1))
        losses.block_until_ready()
      v["wall"].append((time.perf_counter() - t) / N)
      v["cpu"].append((time.process_time() - c) / N)
      v["loss"] = float(np.mean(losses))
  name = os.environ.get("CONFIG") or f"{cell} {L}x{H} B{B}"
  print(f"# {name}: {Xs.size:,} tokens per epoch, device {jax.devices()[0].device_kind}")
  rows = []
  for spec, v in variants.items():
    wall, cpu = np.median(v["wall"]), np.median(v["cpu"])
    print(f"{spec:12s} epoch wall {wall * 1e3:8.2f} ms ({Xs.size / wall:11,.0f} tokens/s)  "
          f"CPU {cpu * 1e3:8.2f} ms  first call {v['first']:5.1f} s  loss {v['loss']:.4f}")
    rows.append({"variant": spec, "wall_s": float(wall), "cpu_s": float(cpu), "walls": v["wall"],
                 "first_call_s": v["first"], "loss": v["loss"]})
  if rows:
    record(name, sys.argv[1], int(Xs.size), rows, env("R", 5), N)


def record(config: str, specs: str, tokens: int, rows: list[dict], rounds: int, epochs: int):
  """Adds this comparison to the device's variants.json, replacing an earlier run of it."""
  command = " ".join([*(f"{k}={os.environ[k]}" for k in SETTINGS if os.environ.get(k)),
                      "python", "benchmarks/variants.py", specs])
  device = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
  base = machine.provenance(command, device)
  device_name = os.environ.get("DEVICE_NAME") or machine.device_slug(base["machine"])
  path = Path(os.environ.get("JSON") or machine.result_path(
      device_name, "variants", os.environ.get("RESULTS_DIR", machine.RESULTS)))
  doc = json.loads(path.read_text()) if path.is_file() else {
      "kind": "variants", "measurement": "variants", "device": device_name, "runs": []}
  run = {"config": config, "variants": specs, **base, "device_kind": jax.devices()[0].device_kind,
         "rounds": rounds, "epochs_per_round": epochs, "tokens_per_epoch": tokens,
         "results": rows}
  doc["runs"] = [r for r in doc["runs"]
                 if (r["config"], r["variants"]) != (config, specs)] + [run]
  machine.write_json(path, doc)
  print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
  main()
