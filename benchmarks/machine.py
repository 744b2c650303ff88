"""Which machine a benchmark runs on, and where its results go.

Every measurement is written to ``benchmarks/results/<device>/<measurement>.json``, one file per
device and measurement, overwritten when re-measured. ``<device>`` is a slug of the hardware
(:func:`device_slug`): ``cpu-epyc-zen4-2c`` for a 2-core AMD EPYC (Zen 4), ``gpu-h100`` for an
NVIDIA H100. Each file carries what is needed to read and regenerate it (:func:`provenance`): the
command, the date, the commit of this repository, the library versions and the machine.

This module imports neither JAX nor PyTorch.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# (vendor, family, lowest model, highest model) -> microarchitecture, for the x86 server and
# desktop parts a result is likely to come from; anything else is left unnamed.
_MICROARCHITECTURES = [
    ("AuthenticAMD", 0x17, 0x00, 0x2F, "Zen"),
    ("AuthenticAMD", 0x17, 0x30, 0xFF, "Zen 2"),
    ("AuthenticAMD", 0x19, 0x00, 0x0F, "Zen 3"),
    ("AuthenticAMD", 0x19, 0x10, 0x1F, "Zen 4"),
    ("AuthenticAMD", 0x19, 0x20, 0x5F, "Zen 3"),
    ("AuthenticAMD", 0x19, 0x60, 0xAF, "Zen 4"),
    ("AuthenticAMD", 0x1A, 0x00, 0xFF, "Zen 5"),
    ("GenuineIntel", 6, 0x55, 0x55, "Skylake-SP"),
    ("GenuineIntel", 6, 0x6A, 0x6A, "Ice Lake-SP"),
    ("GenuineIntel", 6, 0x6C, 0x6C, "Ice Lake-SP"),
    ("GenuineIntel", 6, 0x8F, 0x8F, "Sapphire Rapids"),
    ("GenuineIntel", 6, 0xCF, 0xCF, "Emerald Rapids"),
    ("GenuineIntel", 6, 0xAD, 0xAE, "Granite Rapids"),
]
# The CPU features that decide this library's speed (bfloat16 products need AVX512-BF16 or AMX).
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# Microarchitectures with AMX: a virtual machine may hide it, and bfloat16 products then run on
# AVX512-BF16 alone, a different machine for this library's purposes.
_HAS_AMX = ("Sapphire Rapids", "Emerald Rapids", "Granite Rapids")
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "numpy",
            "torch")


def microarchitecture(vendor: str, family: int | None, model: int | None) -> str | None:
  for v, f, lo, hi, name in _MICROARCHITECTURES:
    if vendor == v and family == f and model is not None and lo <= model <= hi:
      return name
  return None


def cpu_info(cpuinfo: str | None = None, cores: int | None = None) -> dict:
  """The CPU as ``/proc/cpuinfo`` describes it (or the text given), with the cores this process
  may use."""
  if cpuinfo is None:
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      cpuinfo = ""
  fields = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() not in fields:
      fields[key.strip()] = value.strip()
  if cores is None:
    try:
      cores = len(os.sched_getaffinity(0))
    except AttributeError:
      cores = os.cpu_count() or 1
  number = lambda key: int(fields[key]) if fields.get(key, "").isdigit() else None
  vendor, family, model = fields.get("vendor_id", ""), number("cpu family"), number("model")
  flags = set(fields.get("flags", "").split())
  return {"model": fields.get("model name") or platform.processor() or "unknown",
          "vendor": vendor, "family": family, "model_number": model,
          "microarchitecture": microarchitecture(vendor, family, model),
          "cores": cores, "virtual_machine": "hypervisor" in flags,
          "flags": [f for f in _FLAGS if f in flags]}


def gpu_info() -> dict | None:
  """The first NVIDIA GPU, from ``nvidia-smi`` (None without one)."""
  if not shutil.which("nvidia-smi"):
    return None
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  line = out.strip().splitlines()[0] if out.strip() else ""
  name, _, driver = (s.strip() for s in line.partition(","))
  return {"name": name, "driver": driver} if name else None


def machine(device: str) -> dict:
  """``{"kind": "cpu"|"gpu", "cpu": cpu_info(), "gpu": gpu_info() or None}``; on a GPU the CPU
  is the host's."""
  return {"kind": device, "cpu": cpu_info(), "gpu": gpu_info() if device == "gpu" else None}


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(info: dict) -> str:
  """``cpu-<model>-<microarchitecture>-<cores>c`` or ``gpu-<model>``: ``AMD EPYC`` with 2 cores
  of Zen 4 is ``cpu-epyc-zen4-2c``; ``NVIDIA H100 80GB HBM3`` is ``gpu-h100``. A CPU whose
  microarchitecture has AMX but whose flags lack it (a virtual machine that hides it) is named
  with ``-noamx`` after the microarchitecture: ``cpu-xeon-emerald-rapids-noamx-2c``."""
  if info["kind"] == "gpu":
    if not info.get("gpu"):
      raise RuntimeError("no GPU found (nvidia-smi): name the device with --device-name")
    name = re.sub(r"\b(NVIDIA|Tesla|PCIe|SXM\d*|HBM\d*e?|\d+\s*GB)\b", " ", info["gpu"]["name"],
                  flags=re.I)
    return "gpu-" + _slug(name)
  cpu = info["cpu"]
  name = re.sub(r"\((R|TM)\)|\b(AMD|Intel|Processor|CPU|\d+-Core)\b|@.*$", " ", cpu["model"],
                flags=re.I)
  uarch = re.sub(r" (?=\d)", "", cpu.get("microarchitecture") or "")  # Zen 4 -> zen4
  hidden = "noamx" if uarch in _HAS_AMX and "amx_bf16" not in cpu.get("flags", []) else ""
  return "-".join(p for p in ("cpu", _slug(name), _slug(uarch), hidden, f"{cpu['cores']}c") if p)


def versions() -> dict:
  """Python's and the installed packages' versions (those installed)."""
  out = {"python": platform.python_version()}
  for pkg in PACKAGES:
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  return out


def git_commit() -> dict:
  """The repository's ``HEAD``, and whether tracked files other than results differ from it."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30).stdout.strip()
  try:
    head = git("rev-parse", "HEAD") or None
    changed = [l for l in git("status", "--porcelain", "--untracked-files=no").splitlines()
               if "benchmarks/results/" not in l]
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}
  return {"commit": head, "dirty": bool(changed)}


def provenance(command: str, device: str) -> dict:
  """What every results file records besides its figures."""
  return {"command": command, "date": datetime.date.today().isoformat(), **git_commit(),
          "versions": versions(), "machine": machine(device)}


def result_path(device_name: str, measurement: str, results_dir: str | os.PathLike = RESULTS
                ) -> Path:
  return Path(results_dir) / device_name / f"{measurement}.json"


def write_json(path: str | os.PathLike, payload: dict) -> Path:
  """Writes ``payload`` (indented, keys in order) through a temporary file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  from deeprnn_jax.base.files import dumps  # strict JSON: a non-finite number becomes null + a flag
  tmp.write_text(dumps(payload, indent=1) + "\n")
  os.replace(tmp, path)
  return path
