"""The CUDA side of the extension, checked without a GPU.

1. Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90, and ptxas reports no register
   spills in any function (these are memory-bound kernels: a spill is a wasted memory round trip).
2. When the installed extension was built with its CUDA kernels, every op with a CPU kernel has a
   CUDA kernel registered too.
"""

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = ("80", "90")
EXTENSION_OPS = ("q_sample", "sampler_step", "group_norm_silu", "group_norm_silu_backward")


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()


def test_there_are_cuda_sources():
    assert CU_SOURCES, "no csrc/cuda/*.cu found"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cu_compiles_without_spills(source, arch, tmp_path):
    cmd = [NVCC, "-c", source, "-o", str(tmp_path / "out.o"), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
           "-I", os.path.join(ROOT, "csrc", "include"), "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed for sm_{arch}:\n{log}"
    # ptxas prints one "Compiling entry function" / "Function properties" block per function.
    functions = re.findall(r"Function properties for (\S+)", log)
    spill_lines = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert functions, f"ptxas -v printed no function properties:\n{log}"
    assert len(spill_lines) == len(functions), f"one spill report per function expected:\n{log}"
    spilling = [name for name, (stores, loads) in zip(functions, spill_lines) if stores != "0" or loads != "0"]
    assert not spilling, f"register spills on sm_{arch} in: {spilling}\n{log}"


def _extension():
    from ddpm_fast import _ext

    return _ext


@pytest.mark.parametrize("name", EXTENSION_OPS)
def test_every_op_has_cpu_and_cuda_kernels(name):
    ext = _extension()
    if not ext.loaded:
        pytest.skip(f"the C++ extension is not loaded: {ext.reason}")
    if not ext.with_cuda:
        pytest.skip("the C++ extension was built without CUDA kernels (build with DDPM_FAST_BUILD_CUDA=1)")
    qualified = f"ddpm_fast::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"), f"{qualified} has no CPU kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), f"{qualified} has no CUDA kernel"
