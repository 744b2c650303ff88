"""The LSTM stack on the CPU as oneDNN's fused LSTM, a call per layer and pass (impl ``"onednn"``).

oneDNN's LSTM primitive is the kernel PyTorch's ``nn.LSTM`` runs on a CPU. ``onednn_lstm.cc``
beside this file hands it to XLA as two FFI custom calls (a layer's forward pass over all steps,
which keeps oneDNN's workspace, and its backward pass); :func:`lstm_layer` joins them as a
``jax.custom_vjp``. Our parameters need no repacking: ``W_xh <float32>[in, 4H]`` and ``W_hh`` are
oneDNN's ``ldigo`` layout and its gate order is ours (i, f, g, o); the two biases are summed, and
their gradient is that sum's. Checkpoints do not depend on the implementation that wrote them.

The kernel is compiled on first use, with the C++ compiler (``$CXX``, else ``g++``), against the
oneDNN of the ``onednn`` extra (``pip install -e ".[onednn]"``: the wheels
``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``, oneDNN 3.2 on GNU OpenMP) and the FFI headers
that jaxlib ships; the library is kept in ``$XDG_CACHE_HOME/deeprnn_jax`` (``~/.cache``), one per
source, jaxlib and oneDNN. :func:`check_available` says in one line what is missing.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn_jax.base.cores import usable_cores
from deeprnn_jax.base.errors import UsageError

Array = jax.Array

SOURCE = Path(__file__).with_name("onednn_lstm.cc")
# Where the extra's wheels exist.
SUPPORTED = sys.platform == "linux" and platform.machine() == "x86_64"
_FORWARD, _BACKWARD = "deeprnn_onednn_lstm_forward", "deeprnn_onednn_lstm_backward"
# The wheels of the ``onednn`` extra: the library and its headers.
_LIBRARY_WHEEL, _HEADERS_WHEEL = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"


def _installed_file(wheel: str, suffix: str) -> Path:
  """The file of an installed wheel whose path ends with ``suffix`` (wheels install oneDNN as
  data files, outside site-packages)."""
  try:
    dist = importlib.metadata.distribution(wheel)
  except importlib.metadata.PackageNotFoundError:
    raise UsageError(f"impl 'onednn' needs oneDNN: pip install -e \".[onednn]\" (no {wheel} "
                     "here)") from None
  for f in dist.files or ():
    if str(f).endswith(suffix):
      return Path(dist.locate_file(f)).resolve()
  raise UsageError(f"impl 'onednn': the installed {wheel} has no {suffix}; reinstall it")


def _cache_dir() -> Path:
  root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(root) / "deeprnn_jax"


def _build(library: Path, headers: Path) -> Path:
  """Compiles ``onednn_lstm.cc`` once per source, jaxlib and oneDNN; returns the shared object."""
  key = hashlib.sha1(SOURCE.read_bytes())
  key.update(f"{jax.__version__} {library} {os.path.getmtime(library)}".encode())
  target = _cache_dir() / f"onednn_lstm-{key.hexdigest()[:16]}.so"
  if target.exists():
    return target
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    raise UsageError("impl 'onednn' compiles its kernel on first use and needs a C++ compiler "
                     f"({os.environ.get('CXX', 'g++')} not found; set CXX)")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = Path(tmp) / target.name
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{headers}",
           f"-I{jax.ffi.include_dir()}", str(SOURCE), f"-L{library.parent}", f"-l:{library.name}",
           "-lgomp", f"-Wl,-rpath,{library.parent}", "-o", str(built)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
      raise UsageError(f"impl 'onednn': compiling its kernel failed: {last}")
    os.replace(built, target)  # atomic: a concurrent build finds a whole file or none
  return target


@functools.cache
def _kernel() -> ctypes.CDLL:
  """Builds (once) and loads the kernel, and registers its two calls with XLA."""
  library = _installed_file(_LIBRARY_WHEEL, "libdnnl.so.3")
  headers = _installed_file(_HEADERS_WHEEL, "oneapi/dnnl/dnnl.hpp").parents[2]
  try:
    lib = ctypes.CDLL(str(_build(library, headers)))
  except OSError as e:
    raise UsageError(f"impl 'onednn': its kernel does not load: {e}") from None
  lib.deeprnn_onednn_lstm_workspace_bytes.restype = ctypes.c_int64
  lib.deeprnn_onednn_lstm_workspace_bytes.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int] * 2
  jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.DeeprnnOnednnLstmForward), "cpu")
  jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.DeeprnnOnednnLstmBackward), "cpu")
  return lib


def check_available(impl: str) -> None:
  """Raises :class:`UsageError` (one line: what is missing) where ``impl="onednn"`` cannot run:
  off the CPU, without the ``onednn`` extra, without a compiler."""
  if impl != "onednn":
    return
  if not SUPPORTED:
    raise UsageError(f"impl 'onednn' runs on Linux x86-64 (this is {sys.platform} "
                     f"{platform.machine()}); use impl 'layerwise'")
  if jax.default_backend() != "cpu":
    raise UsageError(f"impl 'onednn' runs on the CPU (JAX's backend here is "
                     f"{jax.default_backend()}); use impl 'cudnn' or 'layerwise'")
  _kernel()


def _threads() -> int:
  """OpenMP threads for one call: the usable cores, shared among the devices of the ``shard_map``
  being traced (each runs its own call at the same time; the batch split on a CPU)."""
  mesh = jax.sharding.get_abstract_mesh()
  devices = 1 if mesh.empty else math.prod(mesh.shape[a] for a in mesh.manual_axes)
  return max(1, usable_cores() // devices)


def _workspace_bytes(T: int, N: int, I: int, H: int, bf16: bool, threads: int) -> int:
  size = _kernel().deeprnn_onednn_lstm_workspace_bytes(T, N, I, H, int(bf16), threads)
  if size < 0:
    raise UsageError(f"impl 'onednn': oneDNN has no LSTM for steps {T}, batch {N}, inputs {I}, "
                     f"hiddens {H}")
  return size


def _forward(x, h0, c0, W_xh, W_hh, b, bf16):
  T, N, I = x.shape
  H = h0.shape[-1]
  threads = _threads()
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out = (f32(T, N, H), f32(N, H), f32(N, H),
         jax.ShapeDtypeStruct((_workspace_bytes(T, N, I, H, bf16, threads),), jnp.uint8))
  return jax.ffi.ffi_call(_FORWARD, out, vmap_method="sequential")(
      x, h0, c0, W_xh, W_hh, b, bf16=np.int32(bf16), threads=np.int32(threads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def lstm_layer(x: Array, h0: Array, c0: Array, W_xh: Array, W_hh: Array, b_xh: Array,
               b_hh: Array, bf16: bool = False):
  """One LSTM layer over all steps, oneDNN's kernel forward and backward.

  Args:
    x: ``<float32>[steps, batch, in]`` (time first).
    h0, c0: ``<float32>[batch, H]``.
    W_xh, W_hh, b_xh, b_hh: the layer's parameters (``cells`` layout).
    bf16: oneDNN's bfloat16 LSTM (products of bfloat16 ``x``, ``H`` and weights accumulated in
      float32; ``C`` float32); every array in and out stays float32.

  Returns:
    ``(hs <float32>[steps, batch, H], h_T, c_T)``.
  """
  return _forward(x, h0, c0, W_xh, W_hh, b_xh + b_hh, bf16)[:3]


def _lstm_layer_fwd(x, h0, c0, W_xh, W_hh, b_xh, b_hh, bf16):
  b = b_xh + b_hh
  y, hT, cT, workspace = _forward(x, h0, c0, W_xh, W_hh, b, bf16)
  return (y, hT, cT), (x, h0, c0, W_xh, W_hh, b, y, hT, cT, workspace)


def _lstm_layer_bwd(bf16, saved, grads):
  out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in saved[:6])
  dx, dh0, dc0, dW_xh, dW_hh, db = jax.ffi.ffi_call(_BACKWARD, out, vmap_method="sequential")(
      *saved, *grads, bf16=np.int32(bf16), threads=np.int32(_threads()))
  return dx, dh0, dc0, dW_xh, dW_hh, db, db


lstm_layer.defvjp(_lstm_layer_fwd, _lstm_layer_bwd)


def lstm_stack(layers: Sequence[dict], x: Array, h0: Array, c0: Array, bf16: bool = False):
  """Runs L stacked LSTM layers over all steps, one oneDNN call per layer and pass.

  Args:
    layers: one ``{W_xh, W_hh, b_xh, b_hh}`` per layer (``cells`` layout).
    x: ``<float32>[steps, batch, num_inputs]`` (time first).
    h0, c0: ``<float32>[num_layers, batch, num_hiddens]``.
    bf16: oneDNN's bfloat16 LSTM (:func:`lstm_layer`).

  Returns:
    ``(hs <float32>[steps, batch, num_hiddens], h_n, c_n)``, ``h_n`` and ``c_n`` shaped as ``h0``.
  """
  hs, c = [], []
  for l, p in enumerate(layers):
    x, h_T, c_T = lstm_layer(x, h0[l], c0[l], p["W_xh"], p["W_hh"], p["b_xh"], p["b_hh"], bf16)
    hs.append(h_T)
    c.append(c_T)
  return x, jnp.stack(hs), jnp.stack(c)
