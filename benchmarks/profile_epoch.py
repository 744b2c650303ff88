"""Where a training epoch's time goes, op by op (XLA:CPU or GPU), from a JAX profiler trace.

    PYTHONPATH=. python benchmarks/profile_epoch.py            # the seed config
    CONFIG=gru TOP=20 PYTHONPATH=. python benchmarks/profile_epoch.py

Runs ``training.make_train_epoch`` for ``N`` epochs (after two warm-up epochs) under
``jax.profiler`` with XLA:CPU's per-op trace events on, and prints the ``TOP`` events by total
time per epoch, with how often each ran per epoch and, for XLA ops, the HLO line that names it
(``while/body`` in the source path marks the per-time-step ops). Per-op times are inflated by the
tracing itself; compare them with each other, not with the untraced epoch time it also prints.
The batch is split over the CPU cores as the train CLI splits it (``parallel.batch_devices``;
``SHARDS=1`` for one device); with a split, the times are summed over the shards.
``PRECISION=bfloat16`` profiles the model with bfloat16 products; ``IMPL=onednn`` (any ``impl``)
another implementation than ``layerwise``.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import CLIP, CONFIGS, LR, _data_env  # noqa: E402

from deeprnn_jax.fit import parallel, training
from deeprnn_jax.model.models import RNNLM  # noqa: E402
from deeprnn_jax.text import data  # noqa: E402


def main():
  _data_env()
  parallel.use_cpu_cores()
  name, N, top = os.environ.get("CONFIG", "seed"), int(os.environ.get("N", 3)), \
      int(os.environ.get("TOP", 30))
  cell, layers, hiddens, batch, steps, max_tokens, _ = CONFIGS[name]
  loader, vocab = data.load_data_time_machine(batch, steps, max_tokens=max_tokens, seed=0)
  Xs, Ys = loader.epoch()
  model = RNNLM(len(vocab), hiddens, layers, cell,
                precision=os.environ.get("PRECISION", "float32"),
                impl=os.environ.get("IMPL", "layerwise"))
  opt = training.make_optimizer(LR, CLIP)
  shards = int(os.environ["SHARDS"]) if os.environ.get("SHARDS") else None
  devices = parallel.batch_devices(batch, hiddens, shards)
  ts = parallel.replicate(training.init_train_state(model, opt, jax.random.PRNGKey(0)), devices)
  epoch = training.make_train_epoch(model, opt, devices=devices)
  key = jax.random.PRNGKey(1)
  hlo = epoch.lower(ts, Xs, Ys, key).compile().as_text()
  for _ in range(2):
    ts, losses = epoch(ts, Xs, Ys, key)
  losses.block_until_ready()
  t = time.perf_counter()
  for _ in range(N):
    ts, losses = epoch(ts, Xs, Ys, key)
  losses.block_until_ready()
  untraced = (time.perf_counter() - t) / N

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(N):
      ts, losses = epoch(ts, Xs, Ys, key)
    losses.block_until_ready()
    jax.profiler.stop_trace()
    path = glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      total[e["name"]] += e.get("dur", 0)
      count[e["name"]] += 1

  print(f"config {name} ({cell}, {layers}x{hiddens}, batch {batch}), {jax.devices()[0]}, "
        f"{len(devices)} shard(s): untraced epoch {untraced * 1e3:.1f} ms; per epoch under "
        f"tracing{', summed over the shards' if len(devices) > 1 else ''}:")
  for op, us in total.most_common(top):
    line = re.search(rf"^\s*(?:ROOT )?%{re.escape(op)} = (\S+) .*$", hlo, re.M)
    what = ""
    if line:
      source = re.search(r'op_name="([^"]*)"', line.group(0))
      what = f"{line.group(1)}  {source.group(1)[-60:] if source else ''}"
    print(f"{us / N / 1e3:9.2f} ms {count[op] / N:7.0f}x  {op[:32]:32s} {what}")

if __name__ == "__main__":
  main()
