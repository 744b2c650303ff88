"""Training throughput of deeprnn_jax against a d2l-style PyTorch loop, side by side.

    python benchmarks/throughput.py --configs seed,gru --repeats 3       # tokens/s of training
    python benchmarks/throughput.py --repeats 0 --generation             # 1,000 compiled characters
    python benchmarks/throughput.py --repeats 0 --full-run               # the chapter's 500 epochs

Each measurement is written to ``benchmarks/results/<device>/<measurement>.json`` (``machine.py``:
``<device>`` names the hardware, ``--device-name`` overrides it), with the command, the date, the
commit and the library versions: ``throughput`` (``throughput_autocast`` with
``--torch-precision bfloat16``, ``throughput_product_limit`` with ``--product-limit``,
``..._hugepages`` with ``--hugepages``),
``generation``, ``full_run`` (``full_run_bfloat16`` with ``--full-run-precision bfloat16``,
``full_run_onednn`` with ``--full-run-impl onednn``).
``--out FILE`` writes everything to one file instead.
``python benchmarks/report.py`` renders BENCHMARKS.md from the results folder.

Each framework runs in its own worker process (so its peak RSS is its own) that builds the model
and data, compiles / warms up, and then waits for commands; the parent interleaves them, ours,
torch, ours, torch..., each repeat timing ``--epochs`` epochs. Recorded: median tokens/s (and
every repeat's), the same per CPU-second, compile time and peak memory, separately.

* ours: exactly what the train CLI runs: ``training.make_train_epoch(model, optimizer)`` on
  ``data.sequential_epoch`` arrays of The Time Machine (a new random offset every epoch), run by
  ``dispatch.EpochPipeline`` (epoch k + 1 dispatched before epoch k's losses are read back; the
  state kept every 10 epochs, where the CLI predicts), each minibatch split over the CPU cores
  where the CLI splits it.
* torch: d2l's ``train_epoch_ch8``: ``nn.LSTM/GRU/RNN`` on one-hot inputs plus ``nn.Linear``,
  state detached between minibatches, ``clip_grad_norm_``, SGD, ``loss.item()`` per minibatch.

An implementation of ours may name a precision, ``layerwise:bfloat16`` (``RNNLM(precision=...)``:
bfloat16 operands, float32 accumulation); ``--torch-precision bfloat16`` runs the PyTorch loop's
forward and loss under ``torch.autocast(dtype=torch.bfloat16)``, PyTorch's own mixed precision.

Both read the same minibatches (same loader, same seed). Tokens/s counts input tokens
(``batch * steps * minibatches``), as d2l does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]
import machine  # noqa: E402  (benchmarks/machine.py)

# name: (cell, layers, hiddens, batch, steps, max_tokens, epochs per repeat on CPU)
CONFIGS = {
    "seed": ("lstm", 2, 256, 32, 35, 10000, 5),
    "gru": ("gru", 2, 256, 32, 35, 10000, 5),
    "rnn": ("rnn", 2, 256, 32, 35, 10000, 5),
    "deep": ("lstm", 4, 256, 32, 35, 10000, 3),
    # 10,000 tokens give only 2 minibatches of 128 x 35.
    "wide": ("lstm", 2, 1024, 128, 35, 10000, 1),
    # 10,000 tokens give no minibatch of 512 x 35: the whole corpus (~170k tokens) is used.
    "big-batch": ("lstm", 2, 256, 512, 35, -1, 1),
}
# Epochs per repeat on a GPU, where an epoch of the small configs takes milliseconds: 20, the
# train CLI's rhythm of two state read-backs (LOG_EVERY) between pipelined epochs.
GPU_EPOCHS = {"seed": 20, "gru": 20, "rnn": 20, "deep": 20, "wide": 2, "big-batch": 2}
# d2l's chapter, as TrainConfig's and RunOptions' defaults; literals so that this module (which the
# PyTorch workers import too) does not import JAX.
LR, CLIP = 2.0, 1.0
LOG_EVERY = 10  # the train CLI's --log-every: where it reads the parameters back
PRECISIONS = ("float32", "bfloat16")  # deeprnn_jax.model.recurrence.PRECISIONS
# The train CLI's flags a full run may change, with their defaults (TrainConfig's).
FULL_RUN_FLAGS = {"impl": "layerwise", "precision": "float32"}


def full_run_changes(impl: str, precision: str) -> dict[str, str]:
  """The full run's flags that differ from :data:`FULL_RUN_FLAGS`, in its order: both the CLI's
  flags and the results file's name."""
  chosen = {"impl": impl, "precision": precision}
  return {k: chosen[k] for k, default in FULL_RUN_FLAGS.items() if chosen[k] != default}


def _data_env():
  if "DEEPRNN_JAX_DATA" not in os.environ:
    for cand in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
      if (cand / "timemachine.txt").exists():
        os.environ["DEEPRNN_JAX_DATA"] = str(cand)
        break


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# Workers: one process per framework, driven over stdin/stdout (one JSON object a line).


# Named sets of XLA flags that an implementation of ours may be measured under
# (``layerwise@notriton``): its worker process starts with them in XLA_FLAGS.
XLA_FLAG_SETS = {
    # XLA's GEMMs from cuBLAS alone: no Triton GEMM kernels to generate and autotune.
    "notriton": "--xla_gpu_enable_triton_gemm=false",
    "autotune0": "--xla_gpu_autotune_level=0",
    # Loops captured whole in CUDA graphs (conditional nodes), not launched step by step.
    "graphs": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",
    # XLA:CPU's products: without YNNPACK's dot fusions (XNNPACK and Eigen take them), through
    # oneDNN, or through XNNPACK's dot fusions.
    "noynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn-noynn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=",
    "xnn": "--xla_cpu_experimental_xnn_fusion_type=dot",
}


# glibc's tunable that backs malloc's memory with transparent huge pages (madvise), read when a
# process starts: fewer page faults on memory mapped afresh, which both frameworks' allocations are.
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def with_hugepages(tunables: str) -> str:
  """``GLIBC_TUNABLES``' value with :data:`HUGEPAGES_TUNABLE` in place of any other hugetlb
  setting, the other tunables kept."""
  kept = [t for t in tunables.split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
  return ":".join([*kept, HUGEPAGES_TUNABLE])


def split_impl(impl: str) -> tuple[str, str]:
  """``"layerwise:bfloat16@notriton"`` -> ``("layerwise", "bfloat16")``; no precision: float32
  (the flag set is :func:`xla_flags`')."""
  name, _, precision = impl.partition("@")[0].partition(":")
  return name, precision or "float32"


def xla_flags(impl: str) -> str | None:
  """The XLA flags that ``impl``'s ``@name`` asks for (``None``: none named)."""
  name = impl.partition("@")[2]
  if name and name not in XLA_FLAG_SETS:
    raise ValueError(f"unknown XLA flag set {name!r}; choose from {list(XLA_FLAG_SETS)}")
  return XLA_FLAG_SETS[name] if name else None


class JaxRunner:

  def __init__(self, cfg, device, impl="layerwise"):
    import jax
    if device == "cpu":
      jax.config.update("jax_platforms", "cpu")
    import numpy as np

    from deeprnn_jax.fit import dispatch, parallel, training
    from deeprnn_jax.model.models import RNNLM
    from deeprnn_jax.text import data
    parallel.use_cpu_cores()  # as the train CLI does, before JAX starts
    self.jax, self.np = jax, np
    self.rss0 = _rss_mb()
    cell, layers, hiddens, batch, steps, max_tokens, _ = cfg
    self.loader, vocab = data.load_data_time_machine(batch, steps, max_tokens=max_tokens, seed=0)
    impl, precision = split_impl(impl)
    model = RNNLM(len(vocab), hiddens, layers, cell, impl=impl, precision=precision)
    opt = training.make_optimizer(LR, CLIP)
    self.devices = parallel.batch_devices(batch, hiddens)  # the CLI's default split
    self.ts = parallel.replicate(training.init_train_state(model, opt, jax.random.PRNGKey(0)),
                                 self.devices)
    self.epoch_fn = training.make_train_epoch(model, opt, use_random_iter=False,
                                              devices=self.devices)
    self.key, self.count = jax.random.PRNGKey(1), 0
    self.training, self.dispatch, self.batch_tokens = training, dispatch, batch * steps

  def run(self, epochs: int) -> int:
    """``epochs`` epochs as the train CLI runs them: through ``dispatch.EpochPipeline``, the
    state kept (not dispatched ahead of) every ``LOG_EVERY`` epochs, where the CLI predicts."""
    def items():
      for _ in range(epochs):
        Xs, Ys = self.loader.epoch()
        self.count += 1
        yield self.count, Xs, Ys, self.jax.random.fold_in(self.key, self.count)

    pipeline = self.dispatch.EpochPipeline(self.epoch_fn, lambda n: n % LOG_EVERY == 0)
    tokens = 0
    for done in pipeline.run(self.ts, items()):
      tokens += done.losses.size * self.batch_tokens
      self.ts = done.state
      self.ppl = self.training.perplexity(done.losses.mean())
    return tokens

  def memory(self) -> dict:
    dev = self.jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    out = {"peak_rss_mb": _maxrss_mb(), "rss_growth_mb": _maxrss_mb() - self.rss0}
    if stats:
      out["device_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    return out

  def info(self) -> dict:
    import flax
    import optax
    return {"jax": self.jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "device": str(self.jax.devices()[0].device_kind), "shards": len(self.devices)}


class TorchRunner:

  def __init__(self, cfg, device, impl=None):
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F

    from deeprnn_jax.text import data
    self.torch, self.np, self.F = torch, np, F
    if os.environ.get("TORCH_THREADS"):
      torch.set_num_threads(int(os.environ["TORCH_THREADS"]))
    self.dev = torch.device("cuda" if device == "gpu" else "cpu")
    self.precision = os.environ.get("TORCH_PRECISION", "float32")
    self.autocast = (lambda: torch.autocast(self.dev.type, dtype=torch.bfloat16)) \
        if self.precision == "bfloat16" else contextlib.nullcontext
    self.rss0 = _rss_mb()
    cell, layers, hiddens, batch, steps, max_tokens, _ = cfg
    self.loader, vocab = data.load_data_time_machine(batch, steps, max_tokens=max_tokens, seed=0)
    V = self.V = len(vocab)
    torch.manual_seed(0)
    rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](V, hiddens, layers)

    class RNNModel(nn.Module):  # d2l's RNNModel
      def __init__(self):
        super().__init__()
        self.rnn, self.linear = rnn, nn.Linear(hiddens, V)

      def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), V).to(torch.float32)
        Y, state = self.rnn(X, state)
        return self.linear(Y.reshape((-1, Y.shape[-1]))), state

    self.net = RNNModel().to(self.dev)
    self.lstm = cell == "lstm"
    self.shape = (layers, batch, hiddens)
    self.opt = torch.optim.SGD(self.net.parameters(), LR)
    self.loss = nn.CrossEntropyLoss()
    if self.dev.type == "cuda":
      torch.cuda.reset_peak_memory_stats()

  def run(self, epochs: int) -> int:
    return sum(self.epoch() for _ in range(epochs))

  def epoch(self) -> int:  # d2l's train_epoch_ch8, sequential partitioning
    torch = self.torch
    Xs, Ys = self.loader.epoch()
    state, total, n = None, 0.0, 0
    for X, Y in zip(Xs, Ys):
      if state is None:
        z = torch.zeros(self.shape, device=self.dev)
        state = (z, z.clone()) if self.lstm else z
      else:
        state = tuple(s.detach() for s in state) if self.lstm else state.detach()
      X = torch.from_numpy(X).to(self.dev)
      y = torch.from_numpy(Y).T.reshape(-1).to(self.dev).long()
      with self.autocast():
        y_hat, state = self.net(X, state)
        l = self.loss(y_hat, y)
      self.opt.zero_grad()
      l.backward()
      torch.nn.utils.clip_grad_norm_(self.net.parameters(), CLIP)
      self.opt.step()
      total += l.item() * y.numel()
      n += y.numel()
    self.ppl = float(self.np.exp(total / n))
    return Xs.size

  def memory(self) -> dict:
    out = {"peak_rss_mb": _maxrss_mb(), "rss_growth_mb": _maxrss_mb() - self.rss0}
    if self.dev.type == "cuda":
      out["device_peak_mb"] = self.torch.cuda.max_memory_allocated() / 2**20
    return out

  def info(self) -> dict:
    torch = self.torch
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_precision": self.precision,
            "device": torch.cuda.get_device_name() if self.dev.type == "cuda" else "cpu"}


# The float32 product limit: the matrix products one training minibatch of ours runs, and nothing
# else. A config's limit in tokens/s is the faster of XLA and PyTorch (MKL / oneDNN) running them.

GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # G: W_hh is [H, G*H]
VOCAB = 28  # The Time Machine's, d2l-cleaned


def products(config: str, rows: int) -> list[tuple[int, int, int, int]]:
  """``(count, M, K, N)`` of every ``[M, K] x [K, N]`` product of one training minibatch of
  ``config`` on ``rows`` rows (a shard's): per time step and layer the recurrent product and its
  backward ``dG W_hhᵀ``; per layer ``dW_hh`` over all steps; per layer above the first the input
  product, its ``dX`` and ``dW_xh`` (the first layer's one-hot input is a gather); the output
  layer's three (``recurrence``'s module docstring)."""
  return _products(CONFIGS[config], rows)


def _products(cfg: tuple, rows: int) -> list[tuple[int, int, int, int]]:
  cell, L, H, _, T, _, _ = cfg
  GH, TB = GATES[cell] * H, T * rows
  out = [(L * T, rows, H, GH), (L * T, rows, GH, H), (2 * L - 1, H, TB, GH)]
  if L > 1:
    out += [(L - 1, TB, H, GH), (L - 1, TB, GH, H)]
  return out + [(1, TB, H, VOCAB), (1, TB, VOCAB, H), (1, H, TB, VOCAB)]


def product_flops(config: str) -> float:
  """FLOPs (2 per multiply-add) of one minibatch's products, all rows."""
  batch = CONFIGS[config][3]
  return sum(2.0 * c * m * k * n for c, m, k, n in products(config, batch))


class _ProductsRunner:
  """Runs one minibatch's :func:`products` as many times as an epoch has minibatches."""

  def __init__(self, cfg):
    from deeprnn_jax.text import data
    _, _, _, batch, steps, max_tokens, _ = cfg
    self.loader, _ = data.load_data_time_machine(batch, steps, max_tokens=max_tokens, seed=0)
    self.cfg, self.ppl = cfg, float("nan")

  def run(self, epochs: int) -> int:
    tokens = 0
    for _ in range(epochs):
      Xs, _ = self.loader.epoch()
      for _ in range(Xs.shape[0]):
        self.minibatch()
      tokens += Xs.size
    self.sync()
    return tokens

  def sync(self):
    pass

  def memory(self) -> dict:
    return {"peak_rss_mb": _maxrss_mb()}


class XlaProductsRunner(_ProductsRunner):
  """The products in one jitted program, each kind in a ``lax.scan`` over its count (``c + A_i B``,
  so that no product is dead), the batch split over the CPU cores as the train CLI splits it:
  each device runs its shard's products."""

  def __init__(self, cfg, device, impl=None):
    import jax
    if device == "cpu":
      jax.config.update("jax_platforms", "cpu")
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from deeprnn_jax.fit import parallel
    parallel.use_cpu_cores()
    super().__init__(cfg)
    self.jax = jax
    devices = parallel.batch_devices(cfg[3], cfg[2])
    S = len(devices)
    mesh = Mesh(np.array(devices), (parallel.BATCH_AXIS,))
    spec = P(parallel.BATCH_AXIS)
    rng = np.random.default_rng(0)
    put = lambda shape: jax.device_put(rng.standard_normal(shape, np.float32),
                                       NamedSharding(mesh, spec))
    self.ops = [(put((S, c, m, k)), put((S, k, n))) for c, m, k, n in
                _products(cfg, cfg[3] // S)]

    def shard(ops):
      def one(A, B):
        A, B = A[0], B[0]
        c, _ = jax.lax.scan(lambda c, a: (c + a @ B, None), A[0] @ B, A[1:])
        return c[None]
      return [one(A, B) for A, B in ops]

    self.fn = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(spec,), out_specs=spec))
    self.out = None

  def minibatch(self):
    self.out = self.fn(self.ops)

  def sync(self):
    self.jax.block_until_ready(self.out)

  def info(self) -> dict:
    return {"jax": self.jax.__version__, "shards": self.ops[0][0].shape[0]}


class TorchProductsRunner(_ProductsRunner):
  """The products by PyTorch (``torch.mm`` into a buffer, MKL / oneDNN), one shard's on one
  thread where the train CLI splits the batch over the cores (the other cores run the other shards
  in parallel, a bound that assumes they scale perfectly), all rows on every thread otherwise."""

  def __init__(self, cfg, device, impl=None):
    import torch

    from deeprnn_jax.fit import parallel
    super().__init__(cfg)
    self.torch = torch
    shards = parallel.auto_shards(cfg[3], cfg[2], parallel.usable_cores())
    if shards > 1:
      torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    self.ops = [(torch.randn(c, m, k, generator=g), torch.randn(k, n, generator=g),
                 torch.empty(m, n)) for c, m, k, n in _products(cfg, cfg[3] // shards)]
    self.shards = shards

  def minibatch(self):
    for A, B, out in self.ops:
      for a in A:
        self.torch.mm(a, B, out=out)

  def info(self) -> dict:
    return {"torch": self.torch.__version__, "torch_threads": self.torch.get_num_threads(),
            "shards": self.shards}


RUNNERS = {"jax": JaxRunner, "torch": TorchRunner, "xla-products": XlaProductsRunner,
           "torch-products": TorchProductsRunner}


def _sync(runner):
  if isinstance(runner, TorchRunner) and runner.dev.type == "cuda":
    runner.torch.cuda.synchronize()


def worker(framework: str, config: str, device: str, impl: str) -> None:
  _data_env()
  t0 = time.perf_counter()
  runner = RUNNERS[framework](CONFIGS[config], device, impl)
  setup = time.perf_counter() - t0
  t = time.perf_counter()
  runner.run(1)  # compiles (jax) / warms up (torch)
  _sync(runner)
  first = time.perf_counter() - t
  t = time.perf_counter()
  runner.run(1)
  _sync(runner)
  second = time.perf_counter() - t
  print(json.dumps({"ready": True, "setup_s": setup, "first_epoch_s": first,
                    "compile_s": max(first - second, 0.0),
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), **runner.info()}),
        flush=True)
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
      t, c = time.perf_counter(), time.process_time()
      tokens = runner.run(cmd["epochs"])
      _sync(runner)
      wall, cpu = time.perf_counter() - t, time.process_time() - c
      print(json.dumps({"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "ppl": runner.ppl}),
            flush=True)
    elif cmd["op"] == "quit":
      print(json.dumps(runner.memory()), flush=True)
      return


class Worker:

  def __init__(self, framework, config, device, impl="layerwise"):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    flags = xla_flags(impl) if framework == "jax" else None
    if flags:
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    self.p = subprocess.Popen(
        [sys.executable, __file__, "--worker", framework, "--configs", config, "--device", device,
         "--impl", impl],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.ready = None  # read by wait_ready(), so that several workers start at once

  def wait_ready(self) -> "Worker":
    self.ready = self._read()
    return self

  def _read(self) -> dict:
    line = self.p.stdout.readline()
    if not line:
      raise RuntimeError(f"worker exited with {self.p.wait()}")
    return json.loads(line)

  def ask(self, **cmd) -> dict:
    self.p.stdin.write(json.dumps(cmd) + "\n")
    self.p.stdin.flush()
    return self._read()

  def close(self) -> dict:
    out = self.ask(op="quit")
    self.p.wait()
    return out


# ---------------------------------------------------------------------------------------------
# Throughput.


def runnable(name: str, impl: str) -> bool:
  """Whether ``impl`` can run config ``name`` (``cudnn`` is for LSTMs only, for one)."""
  from deeprnn_jax.base import validate
  from deeprnn_jax.base.errors import UsageError
  cell, layers, hiddens = CONFIGS[name][:3]
  try:
    validate.model(28, hiddens, layers, cell, "tanh", 0.0, *split_impl(impl))
  except UsageError:
    return False
  return True


def bench_config(name, device, repeats, epochs, impls=("layerwise",), limit=False) -> list[dict]:
  """One row per impl of ours, each against the same PyTorch worker's runs; with ``limit``, also
  the float32 products alone (:func:`products`, by XLA and by PyTorch), interleaved with them."""
  epochs = epochs or (GPU_EPOCHS[name] if device == "gpu" else CONFIGS[name][-1])
  impls = [impl for impl in impls if runnable(name, impl)]
  # On a GPU the workers start and compile at once, as its host has cores to spare; on a CPU one
  # at a time, so that each compile time is its own.
  start = (lambda w: w) if device == "gpu" else (lambda w: w.wait_ready())
  workers = {}
  try:
    for impl in impls:
      workers[impl] = start(Worker("jax", name, device, impl))
    workers["torch"] = start(Worker("torch", name, device))
    for key in ("xla-products", "torch-products") if limit else ():
      workers[key] = start(Worker(key, name, device))
    for key, w in list(workers.items()):
      if w.ready is None:
        try:
          w.wait_ready()
        except RuntimeError as e:  # one of ours that cannot start (a flag this XLA lacks)
          if key not in impls:
            raise
          print(f"{name} ({key}): {e}", file=sys.stderr, flush=True)
          del workers[key]
    impls = [impl for impl in impls if impl in workers]
    runs = {key: [] for key in workers}
    for _ in range(repeats):
      for key, w in workers.items():  # interleaved: ours, torch, ours, torch...
        runs[key].append(w.ask(op="run", epochs=epochs))
    mem = {key: w.close() for key, w in workers.items()}
  finally:
    for w in workers.values():
      if w.p.poll() is None:
        w.p.kill()
  stats = {}
  for key in workers:
    tps = [r["tokens"] / r["wall_s"] for r in runs[key]]
    cps = [r["tokens"] / r["cpu_s"] for r in runs[key]]
    stats[key] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_all": tps,
                  "tokens_per_cpu_s": statistics.median(cps), "final_ppl": runs[key][-1]["ppl"],
                  **workers[key].ready, **mem[key]}
  rows = []
  for impl in impls:
    j, t = stats[impl], stats["torch"]
    rows.append({"config": name, "impl": impl, "epochs_per_repeat": epochs, "repeats": repeats,
                 "jax": j, "torch": t, "ratio": j["tokens_per_s"] / t["tokens_per_s"],
                 "ratio_cpu_time": j["tokens_per_cpu_s"] / t["tokens_per_cpu_s"]})
    if limit:
      best = max(stats["xla-products"]["tokens_per_s"], stats["torch-products"]["tokens_per_s"])
      rows[-1]["limit"] = {"xla": stats["xla-products"], "torch": stats["torch-products"],
                           "tokens_per_s": best, "gflops_per_token": product_flops(name)
                           / (CONFIGS[name][3] * CONFIGS[name][4]) / 1e9}
      rows[-1]["ratio_limit"] = j["tokens_per_s"] / best
  return rows


# ---------------------------------------------------------------------------------------------
# Generation: 1,000 characters compiled vs d2l's predict_ch8 loop, one Python-level call per
# character, over a jitted apply and over plain (eager) model.apply.


def bench_generation(device, num_preds=1000, repeats=3) -> dict:
  import jax
  if device == "cpu":
    jax.config.update("jax_platforms", "cpu")
  import jax.numpy as jnp

  from deeprnn_jax.model import generate
  from deeprnn_jax.model.models import RNNLM
  from deeprnn_jax.text import data
  _, vocab = data.load_data_time_machine(32, 35)
  model = RNNLM(len(vocab), 256, 2, "lstm")
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  prefix = "time traveller"

  def compiled():
    return generate.predict(prefix, num_preds, params, model, vocab)

  def python_loop(apply):  # d2l's predict_ch8, one apply per character
    state = model.begin_state(1)
    outputs = [vocab[prefix[0]]]
    for ch in prefix[1:]:
      _, state = apply({"params": params}, jnp.array([[outputs[-1]]], jnp.int32), state)
      outputs.append(vocab[ch])
    for _ in range(num_preds):
      y, state = apply({"params": params}, jnp.array([[outputs[-1]]], jnp.int32), state)
      outputs.append(int(y[0, -1].argmax()))
    return prefix[0] + "".join(vocab.to_tokens(outputs[1:]))

  jitted = jax.jit(model.apply)
  t = time.perf_counter()
  a = compiled()
  compile_s = time.perf_counter() - t
  assert a == python_loop(jitted) == python_loop(model.apply), "generation paths disagree"
  tc, tl, te = [], [], []
  for _ in range(repeats):
    for times, run in ((tc, compiled), (tl, lambda: python_loop(jitted)),
                       (te, lambda: python_loop(model.apply))):
      t = time.perf_counter()
      run()
      times.append(time.perf_counter() - t)
  c, l, e = statistics.median(tc), statistics.median(tl), statistics.median(te)
  return {"num_preds": num_preds, "compiled_s": c, "python_loop_s": l, "speedup": l / c,
          "eager_loop_s": e, "speedup_eager": e / c, "compile_s": compile_s}


# ---------------------------------------------------------------------------------------------
# The chapter's whole run: 500 epochs, as `python -m deeprnn_jax.train` vs d2l's train_ch8.

TORCH_FULL_RUN = r"""
import sys, time
t0 = time.perf_counter()
sys.argv = ["", "--worker", "torch", "--configs", "seed", "--device", sys.argv[1]]
import benchmarks.throughput as tb
tb._data_env()
r = tb.TorchRunner(tb.CONFIGS["seed"], sys.argv[-1])
for epoch in range(500):
  r.epoch()
  if (epoch + 1) % 10 == 0:  # d2l predicts 50 characters after 'time traveller' every 10
    with r.torch.no_grad():
      prefix = [int(i) for i in r.loader.corpus[:14]]
      z = r.torch.zeros((r.shape[0], 1, r.shape[2]), device=r.dev)
      state, out = ((z, z.clone()) if r.lstm else z), prefix[:1]
      for i in range(1, 14 + 50):
        y, state = r.net(r.torch.tensor([[out[-1]]], device=r.dev), state)
        out.append(prefix[i] if i < 14 else int(y.argmax(dim=1).reshape(1)))
print(f"perplexity {r.ppl:.1f}, wall {time.perf_counter() - t0:.1f} s")
"""


def bench_full_run(device, out_dir=None, precision="float32", impl="layerwise") -> dict:
  """The train CLI as a user runs it (its predictions every 10 epochs included, compiling from
  scratch: no compilation cache) against TORCH_FULL_RUN, one after the other. Returns
  ``{"runs": [ours], "torch": theirs}``, each with its process wall time, exit code and output."""
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
             DEEPRNN_JAX_CACHE="none")
  out_dir = out_dir or tempfile.mkdtemp(prefix="deeprnn_full_run_")
  flags = [a for k, v in full_run_changes(impl, precision).items() for a in (f"--{k}", v)]
  t = time.perf_counter()
  p = subprocess.run([sys.executable, "-m", "deeprnn_jax.train", "--out", str(out_dir), *flags],
                     env=env, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t
  lines = [line.rstrip() for line in p.stdout.strip().splitlines()]
  summary = Path(out_dir) / "summary.json"
  ours = {"name": precision, "argv": ["python", "-m", "deeprnn_jax.train", *flags],
          "env": {"DEEPRNN_JAX_CACHE": "none"}, "wall_s": wall, "rc": p.returncode,
          "head": lines[:3], "tail": lines[-6:], "stderr_tail": p.stderr.strip().splitlines()[-3:],
          "summary": json.loads(summary.read_text()) if summary.is_file() else None}
  t = time.perf_counter()
  p = subprocess.run([sys.executable, "-c", TORCH_FULL_RUN, device], env=env, cwd=ROOT,
                     capture_output=True, text=True)
  torch = {"wall_s": time.perf_counter() - t, "rc": p.returncode,
           "tail": (p.stdout + p.stderr).strip().splitlines()[-3:]}
  return {"runs": [ours], "torch": torch}


# ---------------------------------------------------------------------------------------------


def measurement_names(args) -> dict[str, str]:
  """The results file each measurement of this command goes to, by kind."""
  suffix = ""
  if args.torch_precision != "float32":
    suffix += "_autocast"
  if args.torch_threads:
    suffix += f"_torch_threads_{args.torch_threads}"
  if args.product_limit:
    suffix += "_product_limit"
  if args.hugepages:
    suffix += "_hugepages"
  names = {}
  if args.repeats > 0:
    names["throughput"] = "throughput" + suffix
  if args.generation:
    names["generation"] = "generation"
  if args.full_run:
    names["full_run"] = "full_run" + "".join(
        f"_{v}" for v in full_run_changes(args.full_run_impl, args.full_run_precision).values())
  return names


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="seed", help=f"comma-separated, of {','.join(CONFIGS)}")
  p.add_argument("--repeats", type=int, default=3, help="0: no throughput measurement")
  p.add_argument("--epochs", type=int, default=0, help="epochs per repeat (0: per-config default)")
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--device-name", default=None,
                 help="the results folder's device name (default: from the hardware, e.g. "
                      "cpu-epyc-zen4-2c or gpu-h100)")
  p.add_argument("--results-dir", default=str(machine.RESULTS),
                 help="where the <device>/<measurement>.json files go")
  p.add_argument("--out", default=None,
                 help="write all results to this one JSON file instead of the results folder")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads for the PyTorch loop (0: PyTorch's default)")
  p.add_argument("--torch-precision", default="float32", choices=PRECISIONS,
                 help="bfloat16: the PyTorch loop under torch.autocast (its mixed precision)")
  p.add_argument("--generation", action="store_true", help="also the generation benchmark")
  p.add_argument("--full-run", action="store_true", help="also the 500-epoch chapter run")
  p.add_argument("--full-run-dir", default=None, help="the CLI run's folder (default: a new one)")
  p.add_argument("--full-run-precision", default=FULL_RUN_FLAGS["precision"], choices=PRECISIONS,
                 help="the train CLI's --precision in the full run (PyTorch's stays float32)")
  p.add_argument("--full-run-impl", default=FULL_RUN_FLAGS["impl"],
                 help="the train CLI's --impl in the full run")
  p.add_argument("--impl", default="layerwise",
                 help="our implementation(s), comma-separated: layerwise, scan, wavefront, cudnn, "
                      "onednn, each with an optional :precision (layerwise:bfloat16) and @flags, "
                      f"a named set of XLA flags ({', '.join(XLA_FLAG_SETS)}); one that a config "
                      "cannot run, cudnn for a GRU say, is skipped for it")
  p.add_argument("--product-limit", action="store_true",
                 help="also time the float32 matrix products of a minibatch alone, by XLA and by "
                      "PyTorch, interleaved with the rest: each config's limit, and ours / limit")
  p.add_argument("--hugepages", action="store_true",
                 help="every worker, ours and PyTorch's, with glibc's allocations in transparent "
                      f"huge pages ({HUGEPAGES_TUNABLE} added to GLIBC_TUNABLES; Linux, glibc 2.35 "
                      "or later, where the kernel's THP mode is madvise or always)")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return p


def main(argv=None) -> int:
  p = parser()
  args = p.parse_args(argv)
  if args.worker:
    worker(args.worker, args.configs, args.device, args.impl)
    return 0
  _data_env()
  if args.torch_threads:
    os.environ["TORCH_THREADS"] = str(args.torch_threads)
  os.environ["TORCH_PRECISION"] = args.torch_precision
  if args.hugepages:  # the workers inherit it; this process has started without it
    os.environ["GLIBC_TUNABLES"] = with_hugepages(os.environ.get("GLIBC_TUNABLES", ""))
  names = [c for c in args.configs.split(",") if c]
  unknown = [c for c in names if c not in CONFIGS]
  if unknown:
    p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
  impls = [i for i in args.impl.split(",") if i]
  bad = [i for i in impls if split_impl(i)[1] not in PRECISIONS]
  if bad:
    p.error(f"unknown precision in {bad}; write layerwise:bfloat16")
  try:
    [xla_flags(i) for i in impls]
  except ValueError as e:
    p.error(str(e))
  measurements = measurement_names(args)
  if not measurements:
    p.error("nothing to measure: --repeats 0 without --generation or --full-run")

  argv = sys.argv[1:] if argv is None else list(argv)
  command = shlex.join(["python", "benchmarks/throughput.py", *argv])
  base = machine.provenance(command, args.device)
  device_name = args.device_name or machine.device_slug(base["machine"])
  settings = {"configs": names, "impls": impls, "repeats": args.repeats, "epochs": args.epochs,
              "product_limit": args.product_limit,
              "torch_threads": args.torch_threads or None,
              "torch_precision": args.torch_precision, "hugepages": args.hugepages}
  collected = {}

  def save(kind, results, complete=True):
    """Writes one measurement's file now (throughput after every config, so that a run cut
    short keeps what it measured)."""
    collected[kind] = {"kind": kind, "measurement": measurements[kind], "device": device_name,
                       **base, "settings": settings, "complete": complete, "results": results}
    if args.out:
      machine.write_json(args.out, {"command": command, "measurements": collected})
    else:
      path = machine.write_json(
          machine.result_path(device_name, measurements[kind], args.results_dir),
          collected[kind])
      if complete:
        print(f"wrote {os.path.relpath(path)}", flush=True)

  rows = []
  for name in names if args.repeats > 0 else []:
    try:
      new = bench_config(name, args.device, args.repeats, args.epochs, impls,
                         args.product_limit)
    except RuntimeError as e:  # a worker died (its traceback is on stderr): go on
      print(f"{name}: {e}", file=sys.stderr, flush=True)
      continue
    for r in new:
      print(f"{r['config'] + ' (' + r['impl'] + ')':22s} ours {r['jax']['tokens_per_s']:>12,.0f} "
            f"tok/s   torch {r['torch']['tokens_per_s']:>12,.0f} tok/s   ratio {r['ratio']:.2f}x "
            f"(CPU time {r['ratio_cpu_time']:.2f}x)   compile {r['jax']['compile_s']:.1f}s   ppl "
            f"{r['jax']['final_ppl']:.1f} / {r['torch']['final_ppl']:.1f}"
            + (f"   products alone {r['limit']['tokens_per_s']:,.0f} tok/s (ours "
               f"{r['ratio_limit']:.0%})" if "limit" in r else ""), flush=True)
    rows += new
    save("throughput", rows, complete=False)
  status = 0
  if "throughput" in measurements:
    if rows:
      save("throughput", rows)
    else:  # keep the results file as it was
      print("no config could be measured", file=sys.stderr, flush=True)
      status = 1
  if args.generation:
    g = bench_generation(args.device)
    print(f"generation {g['num_preds']} chars: compiled {g['compiled_s']*1e3:.1f} ms, python loop "
          f"{g['python_loop_s']*1e3:.0f} ms ({g['speedup']:.1f}x), eager loop "
          f"{g['eager_loop_s']:.2f} s ({g['speedup_eager']:.0f}x)", flush=True)
    save("generation", g)
  if args.full_run:
    f = bench_full_run(args.device, args.full_run_dir, args.full_run_precision,
                       args.full_run_impl)
    ours, torch = f["runs"][0], f["torch"]
    print(f"full run: ours {ours['wall_s']:.1f}s (rc {ours['rc']}) torch {torch['wall_s']:.1f}s "
          f"(rc {torch['rc']})\n  ours: {ours['tail'][-3:]}\n  torch: {torch['tail']}", flush=True)
    save("full_run", f)
  return status


if __name__ == "__main__":
  sys.exit(main())
