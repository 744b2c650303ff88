"""K models in one program against K runs one after another, and the memory K models take.

    python benchmarks/sweep.py                      # K = 8 seeds, 30 epochs, 2 interleaved repeats
    python benchmarks/sweep.py --memory 1,8,32      # peak memory only

Both sides are the train command as a user runs it, each in its own process with no compilation
cache (``--cache``: a fresh one for each side, as the CLI keeps by default, so that the K runs
one after the other compile once): ``python -m deeprnn_jax.train --seed k`` for k = 0 .. K-1 one
after the other (K seeds without ``--num-seeds``), against
``python -m deeprnn_jax.train --num-seeds K`` (one vmapped program). The
chapter's model and data, ``--epochs`` epochs each, ``--quiet``. Recorded per repeat, the two
interleaved: the throughput of all the models together once compiled (tokens/s, from each run's
summary.json: K sequential runs together train at the harmonic mean of their rates) and the wall
time from the first process's start to the last one's exit (start-up and compiling included).
``--more 64``: also ``--num-seeds 64`` alone, once, its tokens/s against the sequential runs'.

Memory: the peak resident set (host) of ``--num-seeds K`` for each K of ``--memory`` (K = 1 is a
plain run), and on a GPU the peak device memory JAX reports. Written to
``benchmarks/results/<device>/sweep.json``; ``python benchmarks/report.py`` renders it.
"""

from __future__ import annotations

import argparse
import json
import os
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

# Run inside the child: the train command, then the device's peak memory where JAX reports it.
CHILD = """
import json, sys
from deeprnn_jax import train
code = train.main(sys.argv[1:])
import jax
stats = jax.devices()[0].memory_stats() or {}
print("DEVICE_PEAK_BYTES", json.dumps(stats.get("peak_bytes_in_use")))
sys.exit(code)
"""


def _env(cache: Path | None = None) -> dict:
  return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
              DEEPRNN_JAX_CACHE=str(cache) if cache else "none")


def train(flags: list[str], out_dir: Path, cache: Path | None = None) -> dict:
  """One train command in a fresh process: its wall time, summary and peak device memory."""
  env = _env(cache)
  t = time.perf_counter()
  p = subprocess.run([sys.executable, "-c", CHILD, *flags, "--quiet", "--out", str(out_dir)],
                     env=env, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t
  if p.returncode != 0:
    raise RuntimeError(f"train {' '.join(flags)} exited {p.returncode}: {p.stderr[-2000:]}")
  peak = next((json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines()
               if line.startswith("DEVICE_PEAK_BYTES")), None)
  return {"wall_s": wall, "summary": json.loads((out_dir / "summary.json").read_text()),
          "device_peak_mib": None if peak is None else peak / 2**20}


def sequential(k: int, epochs: int, tmp: Path, cache: bool = False) -> dict:
  runs = [train(["--seed", str(s), "--num-epochs", str(epochs)], tmp / f"seq{s}",
                tmp / "xla_cache" if cache else None)
          for s in range(k)]
  rates = [r["summary"]["tokens_per_sec"] for r in runs]
  return {"tokens_per_s": statistics.harmonic_mean(rates), "wall_s": sum(r["wall_s"] for r in runs),
          "each_tokens_per_s": rates,
          "final_perplexity": [r["summary"]["train_perplexity"] for r in runs]}


def together(k: int, epochs: int, tmp: Path, cache: bool = False) -> dict:
  r = train(["--num-seeds", str(k), "--num-epochs", str(epochs)], tmp / "sweep",
            tmp / "xla_cache" if cache else None)
  return {"tokens_per_s": r["summary"]["tokens_per_sec"], "wall_s": r["wall_s"],
          "compile_s": r["summary"]["compile_seconds"], "devices": r["summary"]["devices"],
          "final_perplexity": r["summary"]["train_perplexity"],
          "device_peak_mib": r["device_peak_mib"]}


def peak_memory(k: int, tmp: Path) -> dict:
  """Peak RSS of one ``--num-seeds k`` run of 2 epochs, in a process of its own: measured by a
  fresh interpreter that runs only that command (RUSAGE_CHILDREN is a maximum over children)."""
  code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
  flags = ["--num-epochs", "2", "--quiet", "--out", str(tmp / f"mem{k}")]
  flags += ["--num-seeds", str(k)] if k > 1 else []
  p = subprocess.run([sys.executable, "-c", code, sys.executable, "-c", CHILD, *flags],
                     env=_env(), cwd=ROOT, capture_output=True, text=True)
  if p.returncode != 0:
    raise RuntimeError(f"--num-seeds {k} exited {p.returncode}: {p.stderr[-2000:]}")
  lines = p.stdout.strip().splitlines()
  device_peak = next((json.loads(line.split(" ", 1)[1]) for line in lines
                      if line.startswith("DEVICE_PEAK_BYTES")), None)
  return {"num_models": k, "peak_rss_mib": int(lines[-1]) / 1024,
          "device_peak_mib": None if device_peak is None else device_peak / 2**20}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num-models", type=int, default=8)
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--repeats", type=int, default=2, help="0: memory only")
  p.add_argument("--memory", default="1,8,32", help="K values for peak memory; empty: none")
  p.add_argument("--cache", action="store_true",
                 help="a compilation cache for each side, fresh each repeat (the CLI's default)")
  p.add_argument("--more", default="",
                 help="K values trained together once more each, against the sequential rate")
  p.add_argument("--device-name", default=None, help="results folder name (default: the slug)")
  p.add_argument("--results-dir", default=str(machine.RESULTS))
  args = p.parse_args(argv)
  import jax
  kind = "gpu" if jax.devices()[0].platform == "gpu" else "cpu"
  device = args.device_name or machine.device_slug(machine.machine(kind))
  command = "python benchmarks/sweep.py" + "".join(f" {shlex.quote(a)}" for a in (argv or
                                                                                   sys.argv[1:]))
  repeats = []
  with tempfile.TemporaryDirectory(prefix="deeprnn_sweep_") as tmp:
    tmp = Path(tmp)
    for r in range(args.repeats):
      # Interleaved, the order alternating: neither side always runs on a warmer machine.
      order = ("sequential", "together") if r % 2 == 0 else ("together", "sequential")
      result = {}
      for side in order:
        fn = sequential if side == "sequential" else together
        result[side] = fn(args.num_models, args.epochs, tmp / f"{side}{r}", args.cache)
      result["ratio_tokens_per_s"] = (result["together"]["tokens_per_s"]
                                      / result["sequential"]["tokens_per_s"])
      result["ratio_wall"] = result["sequential"]["wall_s"] / result["together"]["wall_s"]
      print(f"repeat {r}: together {result['together']['tokens_per_s']:,.0f} tok/s, "
            f"sequential {result['sequential']['tokens_per_s']:,.0f} tok/s: "
            f"{result['ratio_tokens_per_s']:.2f}x; wall {result['together']['wall_s']:.1f} s vs "
            f"{result['sequential']['wall_s']:.1f} s: {result['ratio_wall']:.2f}x", flush=True)
      repeats.append(result)
    more = []
    sequential_rate = statistics.median(r["sequential"]["tokens_per_s"] for r in repeats) \
        if repeats else None
    for k in [int(v) for v in args.more.split(",") if v.strip()]:
      more.append({"num_models": k, **together(k, args.epochs, tmp / f"more{k}", args.cache)})
      if sequential_rate:
        more[-1]["ratio_tokens_per_s"] = more[-1]["tokens_per_s"] / sequential_rate
      print(f"K = {k} together: {more[-1]['tokens_per_s']:,.0f} tok/s"
            + (f" ({more[-1]['ratio_tokens_per_s']:.2f}x the sequential runs)"
               if sequential_rate else ""), flush=True)
    memory = []
    for k in [int(v) for v in args.memory.split(",") if v.strip()]:
      memory.append(peak_memory(k, tmp))
      print(f"K = {k}: peak RSS {memory[-1]['peak_rss_mib']:.0f} MiB", flush=True)
  doc = {"kind": "sweep", "measurement": "sweep", "device": device,
         **machine.provenance(command, kind),
         "settings": {"num_models": args.num_models, "epochs": args.epochs,
                      "repeats": args.repeats, "config": "the chapter's (2 x 256 LSTM)",
                      "cache": args.cache},
         "results": {"repeats": repeats, "memory": memory, "more": more}}
  if repeats:
    doc["results"]["median_ratio_tokens_per_s"] = statistics.median(
        r["ratio_tokens_per_s"] for r in repeats)
    doc["results"]["median_ratio_wall"] = statistics.median(r["ratio_wall"] for r in repeats)
  path = machine.write_json(machine.result_path(device, "sweep", args.results_dir), doc)
  print(f"wrote {os.path.relpath(path)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
