"""Renders BENCHMARKS.md, and the measured passages of README.md, from benchmarks/results/.

    python benchmarks/report.py            # rewrite BENCHMARKS.md and README.md's passages
    python benchmarks/report.py --check    # exit 1, naming the file, if either is out of date

BENCHMARKS.md is ``benchmarks/BENCHMARKS.template.md`` (the prose, written by hand) with every
line ``<!-- render KIND -->`` replaced by the tables of that kind, one per device and measurement,
from ``benchmarks/results/<device>/<measurement>.json``: ``machines``, ``throughput``,
``full_run``, ``startup``, ``generation``, ``variants``, ``sweep``. A results file of a kind the
template does not render is an error, so that no measurement is left out silently. In README.md,
the text between
``<!-- report NAME key=value... -->`` and ``<!-- /report -->`` is replaced (``chapter-run``: the
chapter's run as printed, ``performance``: the short table). Nothing here measures anything.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import CONFIGS, split_impl  # noqa: E402  (a module that imports neither JAX nor PyTorch)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATE = ROOT / "benchmarks" / "BENCHMARKS.template.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"
README = ROOT / "README.md"
KINDS = ("machines", "throughput", "full_run", "startup", "generation", "variants", "sweep")
GENERATED = ("<!-- Rendered by `python benchmarks/report.py` from "
             "benchmarks/BENCHMARKS.template.md and benchmarks/results/: edit those, not this "
             "file. -->")


def load_results(results_dir: str | Path = RESULTS) -> list[dict]:
  """Every results file, CPUs before GPUs, then by device and measurement; each with ``path``
  (relative to the repository) added."""
  out = []
  for path in sorted(Path(results_dir).glob("*/*.json")):
    doc = json.loads(path.read_text())
    try:
      doc["path"] = path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
      doc["path"] = path.as_posix()
    out.append(doc)
  return sorted(out, key=lambda d: (not d["device"].startswith("cpu"), d["device"],
                                    d["measurement"]))


# ---------------------------------------------------------------------------------------------
# Formatting.


def _n(x) -> str:
  return "—" if x is None else f"{x:,.0f}"


def _x(x) -> str:
  return "—" if x is None else f"{x:.0f}×" if x >= 20 else f"{x:.2f}×"


def _s(x) -> str:
  return "—" if x is None else f"{x:.0f} s" if x >= 100 else f"{x:.1f} s"


def _ms(x) -> str:
  return "—" if x is None else f"{x * 1e3:,.1f} ms"


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
  """A markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default ``l``)."""
  align = align.ljust(len(header), "l")
  return ["| " + " | ".join(header) + " |",
          "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
          *("| " + " | ".join(r) + " |" for r in rows)]


def command_block(command: str) -> list[str]:
  return ["```bash", *command.splitlines(), "```"]


def source_line(*docs: dict) -> str:
  dates = sorted({r["date"] for d in docs for r in d.get("runs", [d])})
  files = [f"[`{d['path']}`]({d['path']})" for d in docs]
  files = ", ".join(files[:-1]) + " and " + files[-1] if len(files) > 1 else files[0]
  return (f"Measured {', '.join(dates)}; the figures, the library versions and the commit are in "
          f"{files}.")


def model(config: str) -> str:
  cell, layers, hiddens, batch, _, max_tokens, _ = CONFIGS[config]
  name = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN (tanh)"}[cell]
  return f"{name} {layers}×{hiddens}, batch {batch}" + (", whole corpus" if max_tokens < 0 else "")


def impl_name(impl: str) -> str:
  name, _, precision = impl.partition(":")
  label = {"layerwise": "ours", "scan": "`scan`", "wavefront": "`wavefront`",
           "cudnn": "`cudnn`"}.get(name, f"`{name}`")
  return label + (f", {precision}" if precision and precision != "float32" else "")


def torch_name(doc: dict) -> str:
  s = doc.get("settings", {})
  name = "PyTorch" + (f", autocast {s['torch_precision']}"
                      if s.get("torch_precision", "float32") != "float32" else "")
  return name + (f" ({s['torch_threads']} threads)" if s.get("torch_threads") else "")


# ---------------------------------------------------------------------------------------------
# The tables, one function per kind.


def _hardware(m: dict) -> str:
  cpu = m["cpu"]
  ident = [f"family {cpu['family']}, model {cpu['model_number']}"] if cpu.get("family") else []
  uarch = f", {cpu['microarchitecture']}" if cpu.get("microarchitecture") else ""
  flags = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16",
           "amx_bf16": "AMX-BF16"}
  text = (f"{_plain(cpu['model'])}{uarch}" + (f" ({ident[0]})" if ident else "")
          + f", {cpu['cores']} cores" + (", virtual machine" if cpu.get("virtual_machine") else "")
          + ("; " + ", ".join(flags[f] for f in cpu["flags"]) if cpu.get("flags") else ""))
  if m.get("gpu"):
    g = m["gpu"]
    extra = ", ".join(f"{k} {g[k]}" for k in ("driver", "cuda") if g.get(k))
    text = f"{g['name']}" + (f" ({extra.replace('cuda', 'CUDA')})" if extra else "") + \
        f"; host: {text}"
  return text


def _versions(v: dict) -> str:
  return ", ".join(f"{'Python' if k == 'python' else k} {v[k]}" for k in v)


def render_machines(docs: list[dict]) -> list[str]:
  entries = {}  # device -> [(date, machine, versions, measurement)]
  for doc in docs:
    for run in doc.get("runs", [doc]):
      entries.setdefault(doc["device"], []).append((run.get("date", doc.get("date", "")),
                                                    run["machine"], run["versions"],
                                                    doc["measurement"]))
  rows = []
  for device, items in entries.items():
    # One device name is one kind of hardware (machine.py derives it from the hardware); where
    # records describe it differently, an older one detected fewer of its features.
    hardware = _hardware(max(items, key=lambda item: item[0])[1])
    software = {}
    for _, _, v, meas in items:
      software.setdefault(_versions(v), []).append(meas)
    soft = "; ".join(text + (f" ({', '.join(sorted(set(ms)))})" if len(software) > 1 else "")
                     for text, ms in software.items())
    rows.append([f"`{device}`", hardware, soft])
  return table(["device", "hardware", "software"], rows)


def render_throughput(doc: dict) -> list[str]:
  rows_in = doc["results"]
  impls = list(dict.fromkeys(r["impl"] for r in rows_in))
  configs = list(dict.fromkeys(r["config"] for r in rows_in))
  by = {(r["config"], r["impl"]): r for r in rows_in}
  # With the product limit: the float32 products alone, and each float32 impl's share of it.
  limited = [i for i in impls if split_impl(i)[1] == "float32"] \
      if any("limit" in r for r in rows_in) else []
  header = ["config", "model", *(impl_name(i) for i in impls), torch_name(doc),
            *(f"{impl_name(i)} / PyTorch" for i in impls),
            *(["float32 products alone"] if limited else []),
            *(f"{impl_name(i)} / products alone" for i in limited)]
  rows = []
  for c in configs:
    first = next(by[(c, i)] for i in impls if (c, i) in by)
    shards = first["jax"].get("shards", 1)
    rows.append([f"`{c}`", model(c) + (f"; split over {shards} cores" if shards > 1 else ""),
                 *(_n(by[(c, i)]["jax"]["tokens_per_s"]) if (c, i) in by else "—" for i in impls),
                 _n(first["torch"]["tokens_per_s"]),
                 *(_x(by[(c, i)]["ratio"]) if (c, i) in by else "—" for i in impls),
                 *([_n(first["limit"]["tokens_per_s"])] if limited else []),
                 *(f"{by[(c, i)]['ratio_limit']:.0%}" if (c, i) in by else "—"
                   for i in limited)])
  repeats = sorted({r["repeats"] for r in rows_in})
  title = f"### `{doc['device']}`: against {torch_name(doc)}" + \
      (", both in huge pages" if doc.get("settings", {}).get("hugepages") else "") + \
      (" and the float32 product limit" if limited else "")
  out = [title, "", *command_block(doc["command"]), "",
         *table(header, rows, "ll" + "r" * (len(header) - 2)), "",
         f"Tokens/s of training, medians of {'/'.join(map(str, repeats))} interleaved repeats. "
         + ("\"float32 products alone\" is the faster of XLA and PyTorch running only the matrix "
            "products of a training minibatch, as tokens/s (`--product-limit`). " if limited
            else "") + source_line(doc)]
  if not doc.get("complete", True):
    out[-1] += " The run stopped before every config was measured."
  return out + [""]


def _run_label(run: dict) -> str:
  flags = run["argv"][3:]
  env = " ".join(f"{k}={v}" for k, v in run.get("env", {}).items()
                 if k != "DEEPRNN_JAX_CACHE")
  return " ".join(filter(None, [env, " ".join(flags)]))


def render_full_run(docs: list[dict]) -> list[str]:
  out = []
  for device in dict.fromkeys(d["device"] for d in docs):
    mine = [d for d in docs if d["device"] == device]
    rows = []
    for doc in mine:
      torch = doc["results"].get("torch")
      for run in doc["results"]["runs"]:
        s = run.get("summary") or {}
        ours, theirs = run.get("wall_s"), torch["wall_s"] if torch else None
        label = _run_label(run)
        rows.append([f"`{label}`" if label else "(defaults)", _n(s.get("tokens_per_sec")),
                     _s(s.get("compile_seconds")), _s(s.get("wall_seconds")),
                     _s(ours), _s(theirs),
                     _x(ours / theirs) if ours and theirs else "—",
                     "—" if s.get("train_perplexity") is None else
                     f"{s['train_perplexity']:.4f}"])
    out += [f"### `{device}`", "",
            *table(["train flags", "tokens/s", "compile", "training", "process", "PyTorch process",
                    "ours / PyTorch", "final perplexity"], rows, "lrrrrrrr"), "",
            "Commands, in the order of the rows:", ""]
    for doc in mine:
      out += [*command_block(doc["command"]), ""]
    out += [source_line(*mine), ""]
  return out


def render_generation(docs: list[dict]) -> list[str]:
  rows = []
  for doc in docs:
    g = doc["results"]
    rows.append([f"`{doc['device']}`", _ms(g["compiled_s"]), _ms(g["python_loop_s"]),
                 _s(g["eager_loop_s"]), _x(g["speedup"]), _x(g["speedup_eager"]),
                 _s(g["compile_s"])])
  out = [*table(["device", "compiled", "loop over jitted `apply`", "loop over `apply`",
                 "speed-up over the jitted loop", "over the `apply` loop", "compile"], rows,
                "lrrrrrr"), ""]
  for doc in docs:
    out += [f"`{doc['device']}`:", "", *command_block(doc["command"]), "", source_line(doc), ""]
  return out


VARIANT_KINDS = {
    "scan": "`nn.scan` reference", "auto": "layerwise, XLA's autodiff of the scan",
    "res": "layerwise, custom VJP", "sliced": "custom VJP, gates on column slices",
    "wave": "wavefront", "cudnn": "cuDNN", "split": "custom VJP, batch split over the cores",
    "t2d": "custom VJP, plain 2-D transposes",
    "noreduce": "batch split, no all-reduce of the gradients (timing only)"}


def describe_variant(spec: str) -> str:
  kind, unroll, *extra = spec.split(":")
  base = kind.rstrip("0123456789")  # split2: split over 2 devices
  text = VARIANT_KINDS.get(base, base)
  if kind != base:
    text += f" ({kind[len(base):]} shards)"
  if base != "cudnn":
    text += f", unroll {unroll}"
  return text + {"hi": ", full float32", "bf16": ", bfloat16 products"}.get(
      extra[0] if extra else "", "")


def render_variants(docs: list[dict]) -> list[str]:
  out = []
  for doc in docs:
    rows, commands = [], []
    for n, run in enumerate(doc["runs"], 1):
      first = run["results"][0]["wall_s"]
      for r in run["results"]:
        rows.append([str(n), f"`{run['config']}`", f"`{r['variant']}`",
                     describe_variant(r["variant"]), _ms(r["wall_s"]),
                     _n(run["tokens_per_epoch"] / r["wall_s"]), _ms(r["cpu_s"]),
                     _x(first / r["wall_s"]), _s(r["first_call_s"]), f"{r['loss']:.4f}"])
      commands.append(f"{n}. `{run['command']}`")
    out += [f"### `{doc['device']}`", "",
            *table(["#", "config", "variant", "what", "epoch", "tokens/s", "CPU time / epoch",
                    "speed vs the run's first", "first call", "last loss"], rows,
                   "llllrrrrrr"), "", *commands, "", source_line(doc), ""]
  return out


def render_sweep(docs: list[dict]) -> list[str]:
  out = []
  for doc in docs:
    settings, results = doc["settings"], doc["results"]
    k = settings["num_models"]
    rows = []
    for n, r in enumerate(results["repeats"], 1):
      seq, tog = r["sequential"], r["together"]
      rows.append([str(n), _n(tog["tokens_per_s"]), _n(seq["tokens_per_s"]),
                   _x(r["ratio_tokens_per_s"]), _s(tog["wall_s"]), _s(seq["wall_s"]),
                   _x(r["ratio_wall"]), str(tog["devices"])])
    memory = [[str(m["num_models"]), f"{m['peak_rss_mib']:,.0f} MiB",
               "—" if m["device_peak_mib"] is None else f"{m['device_peak_mib']:,.0f} MiB"]
              for m in results["memory"]]
    more = [[str(m["num_models"]), _n(m["tokens_per_s"]), _x(m.get("ratio_tokens_per_s")),
             _s(m["wall_s"]),
             "—" if m.get("device_peak_mib") is None else f"{m['device_peak_mib']:,.0f} MiB"]
            for m in results.get("more", [])]
    out += [f"### `{doc['device']}`", ""]
    if rows:
      cache = (" Each side has a compilation cache of its own, as the train command keeps by "
               "default, so the runs one after another compile once." if settings.get("cache")
               else "")
      out += [f"{k} models of {settings['config']}, {settings['epochs']} epochs each.{cache}", "",
              *table(["repeat", f"`--num-seeds {k}` tokens/s", f"{k} runs tokens/s", "ratio",
                      f"`--num-seeds {k}` process", f"{k} processes", "ratio",
                      "devices the models are spread over"], rows, "lrrrrrrr"), ""]
    if more:
      out += [*table(["`--num-seeds`", "tokens/s", "vs the runs one after another", "process",
                      "peak device memory"], more, "lrrrr"), ""]
    if memory:
      out += [*table(["models", "peak resident memory", "peak device memory"], memory, "lrr"),
              ""]
    out += [*command_block(doc["command"]), "", source_line(doc), ""]
  return out


# The run's steps as benchmarks/timeline.py names them, in the table's order and words.
STARTUP_PHASES = [
    ("imports (jax, the library)", "imports"),
    ("backend start (jax.devices)", "backend"),
    ("initialise the model", "initialise"),
    ("wait for the compiled programs", "wait for compiling"),
    ("epochs (metrics.jsonl's seconds)", "epochs"),
    ("predict (generation)", "predictions"),
]


def render_startup(docs: list[dict]) -> list[str]:
  out = []
  for doc in docs:
    rows = []
    for name, r in doc["results"].items():
      phases = {k: v["seconds"] for k, v in r["phases"].items()}
      shown = sum(phases.get(k, 0.0) for k, _ in STARTUP_PHASES)
      what = " ".join(f"`{f}`" for f in [" ".join(r["flags"])] if f) or "(defaults)"
      if r["xla_flags"]:
        what += f", `XLA_FLAGS={r['xla_flags']}`"
      summary = r.get("summary") or {}
      epoch = r["programs"].get("epoch", {})
      cache = ("none" if r["cache"] == "none" else
               f"{len(r['cache_reads'])} programs read" if r["cache_reads"] else "empty")
      rows.append([name, what, cache,
                   _s(r["process_s"]),
                   *(_s(phases.get(k)) for k, _ in STARTUP_PHASES),
                   _s(max(r["script_s"] - shown, 0.0)), _s(epoch.get("compile")),
                   _n(summary.get("tokens_per_sec")),
                   f"{summary['train_perplexity']:.4f}" if summary else "—"])
    out += [f"### `{doc['device']}`", "",
            *table(["run", "train flags", "compilation cache", "process",
                    *(label for _, label in STARTUP_PHASES), "the rest", "epoch compile",
                    "tokens/s", "final perplexity"], rows, "lllrrrrrrrrrrr"),
            "", source_line(doc), ""]
  return out


def render_kind(kind: str, docs: list[dict]) -> list[str]:
  mine = [d for d in docs if d["kind"] == kind]
  if kind == "machines":
    return render_machines(docs)
  if kind == "throughput":
    return [line for d in mine for line in render_throughput(d)]
  return {"full_run": render_full_run, "generation": render_generation,
          "variants": render_variants, "sweep": render_sweep,
          "startup": render_startup}[kind](mine)


def render_benchmarks(docs: list[dict], template: str) -> str:
  out, rendered = [GENERATED, ""], set()
  for line in template.splitlines():
    m = re.fullmatch(r"<!-- render (\w+) -->", line.strip())
    if not m:
      out.append(line)
      continue
    if m.group(1) not in KINDS:
      raise ValueError(f"unknown kind in the template: {line.strip()}")
    rendered.add(m.group(1))
    out += render_kind(m.group(1), docs)
  left = sorted({d["kind"] for d in docs} - rendered)
  if left:
    raise ValueError(f"results of kind {left} are not rendered by the template")
  text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))  # one blank line between blocks
  return text.strip() + "\n"


# ---------------------------------------------------------------------------------------------
# README.md's passages.


def _find(docs, device, measurement):
  return next((d for d in docs if d["device"] == device and d["measurement"] == measurement), None)


def _plain(name: str) -> str:
  return re.sub(r"\s*\((R|TM)\)", "", name)


def _cpu_words(doc) -> str:
  cpu = doc["machine"]["cpu"]
  uarch = f" ({cpu['microarchitecture']})" if cpu.get("microarchitecture") else ""
  return f"a {cpu['cores']}-core {_plain(cpu['model'])}{uarch}"


def readme_chapter_run(docs, device) -> list[str]:
  doc = _find(docs, device, "full_run")
  run = doc["results"]["runs"][0]
  s, torch = run["summary"], doc["results"]["torch"]
  shown = [*run.get("head", [])[:1], "…", *run["tail"][-5:]]
  lines = ["```console", "$ python -m deeprnn_jax.train", *(line.rstrip() for line in shown),
           "```", "",
           f"On `{device}`, {_cpu_words(doc)}, the {s['epochs']} epochs took "
           f"{run['wall_s']:.0f} s from start to exit, compiling included "
           f"({s['compile_seconds']:.1f} s), to a final training perplexity of "
           f"{s['train_perplexity']:.3f}; d2l's loop in PyTorch took "
           f"{torch['wall_s']:.0f} s."]
  bf16 = _find(docs, device, "full_run_bfloat16")
  if bf16:
    r, t = bf16["results"]["runs"][0], bf16["results"]["torch"]
    lines[-1] += (f" With `--precision bfloat16` it took {r['wall_s']:.0f} s (PyTorch, run "
                  f"beside it: {t['wall_s']:.0f} s), ending at "
                  f"{r['summary']['train_perplexity']:.3f} with the same predictions."
                  if r["tail"][-2:] == run["tail"][-2:] else
                  f" With `--precision bfloat16` it took {r['wall_s']:.0f} s (PyTorch, run "
                  f"beside it: {t['wall_s']:.0f} s), ending at "
                  f"{r['summary']['train_perplexity']:.3f}.")
  return lines


PERFORMANCE_ROWS = [  # (device key, config, impl), as far as the results have them
    ("cpu", "seed", "layerwise"), ("cpu", "seed", "layerwise:bfloat16"),
    ("cpu", "wide", "layerwise"), ("cpu", "wide", "layerwise:bfloat16"),
    ("gpu", "seed", "layerwise"), ("gpu", "wide", "cudnn"), ("gpu", "big-batch", "wavefront")]


def readme_performance(docs, cpu, gpu) -> list[str]:
  devices = {"cpu": cpu, "gpu": gpu}
  rows = []
  for key, config, impl in PERFORMANCE_ROWS:
    doc = _find(docs, devices[key], "throughput")
    r = next((r for r in doc["results"] if (r["config"], r["impl"]) == (config, impl)), None) \
        if doc else None
    if r:
      name, _, precision = impl.partition(":")
      flags = " ".join(filter(None, [f"`--impl {name}`" if name != "layerwise" else "",
                                     f"`--precision {precision}`" if precision else ""]))
      rows.append([key.upper(), f"{model(config)}" + (f", {flags}" if flags else ""),
                   _n(r["jax"]["tokens_per_s"]), _n(r["torch"]["tokens_per_s"]), _x(r["ratio"])])
  for meas, flags in (("full_run", ""), ("full_run_bfloat16", ", `--precision bfloat16`")):
    doc = _find(docs, cpu, meas)
    if doc and doc["results"].get("torch"):
      run, t = doc["results"]["runs"][0], doc["results"]["torch"]
      rows.append(["CPU", f"the chapter's 500-epoch run{flags}", _s(run["wall_s"]),
                   _s(t["wall_s"]), _x(run["wall_s"] / t["wall_s"])])
  gpu_doc = _find(docs, gpu, "throughput")
  return [*table(["", "model", "ours", "PyTorch", "ours / PyTorch"], rows, "llrrr"), "",
          f"Tokens/s of training, or seconds from start to exit, against d2l's loop in PyTorch "
          f"run beside ours. CPU: `{cpu}`, {_cpu_words(_find(docs, cpu, 'throughput'))}; GPU: "
          f"`{gpu}`, {gpu_doc['machine']['gpu']['name']}."]


def render_readme(docs: list[dict], readme: str) -> str:
  def block(m):
    name, args = m.group(1), dict(a.split("=", 1) for a in m.group(2).split())
    body = {"chapter-run": lambda: readme_chapter_run(docs, args["device"]),
            "performance": lambda: readme_performance(docs, args["cpu"], args["gpu"])}[name]()
    return f"{m.group(0).splitlines()[0]}\n" + "\n".join(body) + "\n<!-- /report -->"
  return re.sub(r"<!-- report ([\w-]+)((?: [\w-]+=\S+)*) -->\n.*?<!-- /report -->", block,
                readme, flags=re.S)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true", help="change nothing; exit 1 if out of date")
  p.add_argument("--results-dir", default=str(RESULTS))
  args = p.parse_args(argv)
  docs = load_results(args.results_dir)
  wanted = {BENCHMARKS: render_benchmarks(docs, TEMPLATE.read_text()),
            README: render_readme(docs, README.read_text())}
  stale = [path for path, text in wanted.items() if path.read_text() != text]
  for path in stale:
    if args.check:
      diff = difflib.unified_diff(path.read_text().splitlines(), wanted[path].splitlines(),
                                  str(path.name), f"{path.name} (rendered)", lineterm="", n=1)
      print("\n".join(list(diff)[:40]))
      print(f"{path.name} is out of date: run python benchmarks/report.py", file=sys.stderr)
    else:
      path.write_text(wanted[path])
      print(f"wrote {path.relative_to(ROOT)}")
  return 1 if args.check and stale else 0


if __name__ == "__main__":
  sys.exit(main())
