"""Where the train command's time goes, from process start to exit.

    python benchmarks/timeline.py                         # the chapter's run, as the CLI runs it
    python benchmarks/timeline.py --num-epochs 50 --json t.json

Runs ``deeprnn_jax.train.main`` in this process with JAX's monitoring listeners and timers around
the run's steps, and prints one table of phases (imports, the backend's start, loading the text,
initialising, compiling the epoch, the epochs, the evaluations and predictions, checkpoints, the
plot) and one of the programs JAX traced, lowered and compiled (or read from the persistent
compilation cache), each with its seconds. The train flags are passed on unchanged; the
compilation cache is the CLI's (``DEEPRNN_JAX_CACHE``: ``none`` for a cold start). ``--json FILE``
also writes both tables. Nothing the run does changes: the timers only wrap its functions.
"""

from __future__ import annotations

import time

T0 = time.time()  # before any import of note: the phases are measured from here

import collections  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)] if str(ROOT) not in sys.path else []

# JAX's events, by the name its dispatch module records them under.
EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "compile"}
CACHE_READ = "/jax/compilation_cache/cache_retrieval_time_sec"


class Timeline:
  """Seconds per phase (wall time inside the wrapped calls; nested calls count in each) and per
  program."""

  def __init__(self):
    self.phases = collections.defaultdict(lambda: [0.0, 0])  # name -> [seconds, calls]
    self.programs = collections.defaultdict(lambda: collections.defaultdict(float))
    self.cache_reads = []

  def add(self, name: str, seconds: float) -> None:
    self.phases[name][0] += seconds
    self.phases[name][1] += 1

  def wrap(self, module, attr: str, name: str) -> None:
    fn = getattr(module, attr)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
      t = time.time()
      try:
        return fn(*args, **kwargs)
      finally:
        self.add(name, time.time() - t)

    setattr(module, attr, timed)

  def on_duration(self, event: str, seconds: float, **kwargs) -> None:
    if event in EVENTS:
      name = re.sub(r"^jit\((.*)\)$", r"\1", kwargs.get("fun_name", "?"))
      self.programs[name][EVENTS[event]] += seconds
    elif event == CACHE_READ:
      self.cache_reads.append(seconds)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  json_path = None
  if "--json" in argv:
    i = argv.index("--json")
    json_path = argv[i + 1]
    del argv[i:i + 2]
  tl = Timeline()
  t = time.time()
  import jax
  from jax import monitoring
  monitoring.register_event_duration_secs_listener(tl.on_duration)

  from deeprnn_jax import checkpoint, generate, parallel, plots, runs, train, training
  tl.add("imports (jax, the library)", time.time() - t)
  t = time.time()
  parallel.use_cpu_cores()  # as the CLI does, before JAX starts
  devices = jax.devices()
  tl.add("backend start (jax.devices)", time.time() - t)
  tl.wrap(runs, "load_text", "load the text")
  tl.wrap(training, "init_train_state", "initialise the model")
  tl.wrap(runs, "compile_epochs", "compile the epoch program(s)")
  tl.wrap(training, "evaluate", "evaluate (validation)")
  tl.wrap(generate, "predict", "predict (generation)")
  tl.wrap(checkpoint, "save_checkpoint", "save checkpoints")
  tl.wrap(plots, "plot_perplexity", "plot")
  out_dir = None
  if "--out" not in argv:
    import tempfile
    out_dir = tempfile.mkdtemp(prefix="deeprnn_timeline_")
    argv += ["--out", out_dir]
  run_dir = Path(argv[argv.index("--out") + 1])
  t = time.time()
  code = train.main(argv)
  run_s = time.time() - t
  total = time.time() - T0
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
          if line.strip()] if (run_dir / "metrics.jsonl").is_file() else []
  epochs_s = sum(r.get("seconds", 0.0) for r in rows)
  tl.add("epochs (metrics.jsonl's seconds)", epochs_s)
  accounted = sum(s for name, (s, _) in tl.phases.items()
                  if not name.startswith(("imports", "backend")))
  tl.add("the rest of the run (host work between epochs, files)", max(run_s - accounted, 0.0))

  print(f"\n{devices[0].platform} {devices[0].device_kind}: exit {code}, {total:.2f} s from this "
        f"script's start (the interpreter's own start not counted)")
  print(f"{'phase':58s} {'seconds':>8s} {'calls':>6s}")
  for name, (s, n) in tl.phases.items():
    print(f"{name:58s} {s:8.2f} {n:6d}")
  print(f"\n{'program':40s} {'trace':>7s} {'lower':>7s} {'compile':>8s}")
  for name, p in sorted(tl.programs.items(), key=lambda kv: -kv[1]["compile"]):
    print(f"{name[:40]:40s} {p['trace']:7.2f} {p['lower']:7.2f} {p['compile']:8.2f}")
  if tl.cache_reads:
    print(f"persistent cache: {len(tl.cache_reads)} programs read in {sum(tl.cache_reads):.2f} s")
  if json_path:
    Path(json_path).write_text(json.dumps({
        "argv": argv, "exit": code, "seconds": total, "device": devices[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cache": os.environ.get("DEEPRNN_JAX_CACHE"),
        "phases": {k: {"seconds": s, "calls": n} for k, (s, n) in tl.phases.items()},
        "programs": {k: dict(v) for k, v in tl.programs.items()},
        "cache_reads": tl.cache_reads}, indent=1))
  if out_dir:
    with contextlib.suppress(OSError):
      import shutil
      shutil.rmtree(out_dir)
  return code


if __name__ == "__main__":
  sys.exit(main())
