"""Where the train command's time goes, from process start to exit.

    python benchmarks/timeline.py                         # the chapter's run, as the CLI runs it
    python benchmarks/timeline.py --num-epochs 50
    python benchmarks/timeline.py --name cold --results-dir benchmarks/results

Runs ``deeprnn_jax.train.main`` in this process with JAX's monitoring listeners and timers around
the run's steps, and prints one table of phases (imports, the backend's start, loading the text,
initialising, waiting for the compiled programs, the epochs, the evaluations and predictions,
checkpoints, the plot; indented: the compilations in helper threads, which overlap the rest) and
one of the programs JAX traced, lowered and compiled (or read from the persistent compilation
cache), each with its seconds. The train flags are passed on unchanged; the compilation cache is
the CLI's (``DEEPRNN_JAX_CACHE``: ``none`` for a cold start). Nothing the run does changes: the
timers only wrap its functions.

``--name NAME --results-dir DIR`` also records the run as entry NAME of
``DIR/<device>/startup.json`` (other entries are kept), with the process's wall time from its
start to the end of the run, its flags, ``XLA_FLAGS`` and the cache it used.
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


def process_seconds() -> float | None:
  """Seconds since this process started, by the kernel's clock (Linux), else ``None``."""
  try:
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
  except (OSError, ValueError, IndexError):
    return None
  return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _take(argv: list[str], flag: str) -> str | None:
  """Removes ``flag VALUE`` from ``argv``; its value, or ``None`` where absent."""
  if flag not in argv:
    return None
  i = argv.index(flag)
  value = argv[i + 1]
  del argv[i:i + 2]
  return value


def record(name: str, results_dir: str, entry: dict, platform: str) -> Path:
  """Entry ``name`` of ``<results_dir>/<device>/startup.json``, the file's other entries kept."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import machine
  kind = "gpu" if platform == "gpu" else "cpu"
  base = machine.provenance("python benchmarks/timeline.py", kind)
  device = machine.device_slug(base["machine"])
  path = machine.result_path(device, "startup", results_dir)
  old = json.loads(path.read_text()) if path.is_file() else {}
  runs = {k: v for k, v in old.get("results", {}).items() if k != name}
  runs[name] = entry
  return machine.write_json(path, {"kind": "startup", "measurement": "startup", "device": device,
                                   **base, "settings": {}, "results": runs})


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  name, results_dir = _take(argv, "--name"), _take(argv, "--results-dir")
  tl = Timeline()
  t = time.time()
  import jax
  from jax import monitoring
  monitoring.register_event_duration_secs_listener(tl.on_duration)

  from deeprnn_jax import train
  from deeprnn_jax.fit import parallel, training
  from deeprnn_jax.model import generate
  from deeprnn_jax.run import checkpoint, plots, runs
  tl.add("imports (jax, the library)", time.time() - t)
  t = time.time()
  parallel.use_cpu_cores()  # as the CLI does, before JAX starts
  devices = jax.devices()
  tl.add("backend start (jax.devices)", time.time() - t)
  tl.wrap(runs, "load_text", "load the text")
  tl.wrap(training, "init_train_state", "initialise the model")
  # The programs compile in helper threads beside the rest (runs.compile_ahead): their own
  # seconds overlap; the run waits for them only where it needs the epoch.
  tl.wrap(runs, "compile_epochs", "  compile the epoch program(s) (a helper thread)")
  tl.wrap(generate, "compile_predict", "  compile a prediction (a helper thread)")
  tl.wrap(training, "compile_evaluate", "  compile an evaluation (a helper thread)")
  tl.wrap(runs.Programs, "result", "wait for the compiled programs")
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
  process = process_seconds()
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
          if line.strip()] if (run_dir / "metrics.jsonl").is_file() else []
  epochs_s = sum(r.get("seconds", 0.0) for r in rows)
  tl.add("epochs (metrics.jsonl's seconds)", epochs_s)
  accounted = sum(s for name, (s, _) in tl.phases.items()
                  if not name.startswith(("imports", "backend", " ")))
  tl.add("the rest of the run (host work between epochs, files)", max(run_s - accounted, 0.0))

  print(f"\n{devices[0].platform} {devices[0].device_kind}: exit {code}, {total:.2f} s from this "
        f"script's start" + (f", {process:.2f} s from the process's" if process else ""))
  print(f"{'phase':58s} {'seconds':>8s} {'calls':>6s}")
  for phase, (s, n) in tl.phases.items():
    print(f"{phase:58s} {s:8.2f} {n:6d}")
  print(f"\n{'program':40s} {'trace':>7s} {'lower':>7s} {'compile':>8s}")
  for program, p in sorted(tl.programs.items(), key=lambda kv: -kv[1]["compile"]):
    print(f"{program[:40]:40s} {p['trace']:7.2f} {p['lower']:7.2f} {p['compile']:8.2f}")
  if tl.cache_reads:
    print(f"persistent cache: {len(tl.cache_reads)} programs read in {sum(tl.cache_reads):.2f} s")
  if name and results_dir:
    summary = run_dir / "summary.json"
    cache = os.environ.get("DEEPRNN_JAX_CACHE")
    path = record(name, results_dir, {
        "flags": [a for a in argv if a not in ("--out", str(run_dir))],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cache": "none" if cache and cache.strip().lower() == "none" else "a folder",
        "exit": code, "process_s": process, "script_s": total,
        "phases": {k: {"seconds": s, "calls": n} for k, (s, n) in tl.phases.items()},
        "programs": {k: dict(v) for k, v in tl.programs.items()},
        "cache_reads": tl.cache_reads,
        "summary": json.loads(summary.read_text()) if summary.is_file() else None},
        devices[0].platform)
    print(f"wrote {os.path.relpath(path)}")
  if out_dir:
    with contextlib.suppress(OSError):
      import shutil
      shutil.rmtree(out_dir)
  return code


if __name__ == "__main__":
  sys.exit(main())
