"""The benchmark scripts: their constants are the train CLI's defaults (throughput.py keeps its own
literals so that the PyTorch workers, which import it, do not import JAX), and every measurement
has its results file, named after the device."""

import importlib.util
from pathlib import Path

import pytest

from deeprnn_jax.base.config import TrainConfig
from deeprnn_jax.model import recurrence
from deeprnn_jax.run.runs import RunOptions


def _throughput():
  path = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
  spec = importlib.util.spec_from_file_location("throughput", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_throughput_benchmark_runs_the_cli_defaults():
  tb, d = _throughput(), TrainConfig()
  assert (tb.LR, tb.CLIP, tb.LOG_EVERY) == (d.lr, d.clip, RunOptions().log_every)
  assert tb.FULL_RUN_FLAGS == {"impl": d.impl, "precision": d.precision}
  cell, layers, hiddens, batch, steps, max_tokens, _ = tb.CONFIGS["seed"]
  assert (cell, layers, hiddens, batch, steps, max_tokens) == (
      d.cell, d.num_layers, d.num_hiddens, d.batch_size, d.num_steps, d.max_tokens)


def test_an_implementation_may_name_its_precision():
  tb = _throughput()
  assert tb.PRECISIONS == tuple(recurrence.PRECISIONS)
  assert tb.split_impl("layerwise:bfloat16") == ("layerwise", "bfloat16")
  assert tb.split_impl("wavefront") == ("wavefront", "float32")
  assert tb.runnable("seed", "layerwise:bfloat16") and tb.runnable("seed", "wavefront:bfloat16")
  assert not tb.runnable("seed", "scan:bfloat16")  # the reference runs float32 only
  assert not tb.runnable("seed", "layerwise:float16")


def test_an_implementation_may_name_a_set_of_xla_flags():
  tb = _throughput()
  assert tb.split_impl("layerwise:bfloat16@notriton") == ("layerwise", "bfloat16")
  assert tb.split_impl("cudnn@graphs") == ("cudnn", "float32")
  assert tb.xla_flags("layerwise@notriton") == "--xla_gpu_enable_triton_gemm=false"
  assert tb.xla_flags("layerwise:bfloat16") is None
  with pytest.raises(ValueError, match="unknown XLA flag set 'fast'"):
    tb.xla_flags("layerwise@fast")


def test_each_measurement_has_its_results_file():
  tb = _throughput()
  names = lambda argv: tb.measurement_names(tb.parser().parse_args(argv))
  assert names([]) == {"throughput": "throughput"}
  assert names(["--torch-precision", "bfloat16"]) == {"throughput": "throughput_autocast"}
  assert names(["--product-limit"]) == {"throughput": "throughput_product_limit"}
  assert names(["--hugepages", "--torch-precision", "bfloat16"]) == {
      "throughput": "throughput_autocast_hugepages"}
  assert names(["--repeats", "0", "--generation"]) == {"generation": "generation"}
  assert names(["--repeats", "0", "--full-run", "--full-run-precision", "bfloat16"]) == {
      "full_run": "full_run_bfloat16"}
  assert names(["--repeats", "0", "--full-run", "--full-run-impl", "onednn"]) == {
      "full_run": "full_run_onednn"}
  assert names(["--repeats", "0", "--full-run", "--full-run-impl", "onednn",
                "--full-run-precision", "bfloat16"]) == {"full_run": "full_run_onednn_bfloat16"}
  assert tb.machine.result_path("cpu-x-2c", "throughput", "r").as_posix() == \
      "r/cpu-x-2c/throughput.json"


def test_a_device_is_named_after_its_hardware():
  machine = _throughput().machine
  cpuinfo = ("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
             "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16 hypervisor\n")
  cpu = machine.cpu_info(cpuinfo, cores=2)
  assert (cpu["microarchitecture"], cpu["virtual_machine"]) == ("Zen 4", True)
  assert cpu["flags"] == ["avx2", "avx512f", "avx512_bf16"]
  assert machine.device_slug({"kind": "cpu", "cpu": cpu}) == "cpu-epyc-zen4-2c"
  xeon = lambda flags: machine.cpu_info(
      "vendor_id : GenuineIntel\ncpu family : 6\nmodel : 207\n"
      f"model name : Intel(R) Xeon(R) Processor\nflags : {flags}\n", cores=16)
  assert (machine.device_slug({"kind": "cpu", "cpu": xeon("avx512f avx512_bf16 amx_bf16")})
          == "cpu-xeon-emerald-rapids-16c")
  # A virtual machine that hides AMX from an Emerald Rapids is a machine of its own.
  assert (machine.device_slug({"kind": "cpu", "cpu": xeon("avx512f avx512_bf16")})
          == "cpu-xeon-emerald-rapids-noamx-16c")
  gpu = lambda name: machine.device_slug({"kind": "gpu", "gpu": {"name": name}})
  assert gpu("NVIDIA H100 80GB HBM3") == "gpu-h100"
  assert gpu("NVIDIA A100-SXM4-40GB") == "gpu-a100"


def test_the_product_limit_runs_a_minibatch_s_products_and_nothing_else():
  import numpy as np
  tb = _throughput()
  # The chapter's LSTM on one core's 16 rows: per layer and step [16, 256] x [256, 1024] and
  # back; dW_hh of both layers and dW_xh of the second over all 35 x 16 rows; the second layer's
  # input product and its dX; the output layer's three (28 characters).
  assert tb.products("seed", 16) == [
      (70, 16, 256, 1024), (70, 16, 1024, 256), (3, 256, 560, 1024), (1, 560, 256, 1024),
      (1, 560, 1024, 256), (1, 560, 256, 28), (1, 560, 28, 256), (1, 256, 560, 28)]
  assert tb.products("rnn", 32)[:3] == [(70, 32, 256, 256), (70, 32, 256, 256),
                                        (3, 256, 1120, 256)]
  assert tb.product_flops("seed") == 2 * sum(c * m * k * n for c, m, k, n in
                                             tb.products("seed", 32))
  xla = tb.XlaProductsRunner(tb.CONFIGS["seed"], "cpu")
  xla.minibatch()
  xla.sync()
  for (A, B), c in zip(xla.ops, xla.out):  # every product computed: Σ_i A_i B per kind
    expected = np.einsum("sikm,smn->skn", np.asarray(A), np.asarray(B))
    np.testing.assert_allclose(np.asarray(c), expected, rtol=1e-4, atol=1e-2)
  torch = tb.TorchProductsRunner(tb.CONFIGS["seed"], "cpu")
  Xs, _ = tb._ProductsRunner(tb.CONFIGS["seed"]).loader.epoch()
  assert torch.run(1) == Xs.size  # an epoch's tokens, as the training workers count them


def test_variants_time_the_split_with_and_without_its_all_reduce(tmp_path):
  import json
  import os
  import subprocess
  import sys
  root = Path(__file__).resolve().parent.parent
  out = tmp_path / "variants.json"
  env = dict(os.environ, CELL="lstm", H="16", L="1", B="32", MAXTOK="4000", R="1", N="1",
             JSON=str(out))
  subprocess.run([sys.executable, "benchmarks/variants.py", "res:1,split:1,noreduce:1"], cwd=root,
                 env=env, check=True, capture_output=True, timeout=300)
  (run,) = json.loads(out.read_text())["runs"]
  loss = {r["variant"]: r["loss"] for r in run["results"]}
  assert set(loss) == {"res:1", "split:1", "noreduce:1"}
  # The split trains as one device does; without the all-reduce each shard trains on its own
  # rows, so the models part.
  assert loss["split:1"] == pytest.approx(loss["res:1"], rel=1e-5)
  if len(os.sched_getaffinity(0)) >= 2:  # the rows split over two devices (16 each)
    assert loss["noreduce:1"] != pytest.approx(loss["res:1"], rel=1e-5)


def test_huge_pages_join_the_glibc_tunables_a_user_set():
  tb = _throughput()
  assert tb.with_hugepages("") == "glibc.malloc.hugetlb=1"
  assert tb.with_hugepages("glibc.malloc.trim_threshold=1:glibc.malloc.hugetlb=0") == \
      "glibc.malloc.trim_threshold=1:glibc.malloc.hugetlb=1"
