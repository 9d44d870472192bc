"""Build of ddpm_fast.

The C++ extension ``ddpm_fast._C`` is built whenever torch is importable at build time:
its CPU kernels always, its CUDA kernels when torch has CUDA and nvcc is found, or when
``DDPM_FAST_BUILD_CUDA=1`` asks for them (``=0`` turns them off). The ``.cu`` files include
no torch header, so nvcc compiles them on their own and they are linked into the extension
with the static CUDA runtime: this works with a CPU-only torch too.

Without torch at build time, or with ``DDPM_FAST_NO_EXTENSION=1``, a pure-Python package is
installed; ``import ddpm_fast`` then falls back to the Triton and PyTorch backends.
"""

import glob
import os
import platform
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")

PACKAGES = ["ddpm_fast", "ddpm_fast.ops", "ddpm_fast.nn", "ddpm_fast.samplers", "ddpm_fast.interop",
            "ddpm_fast.interop.diffusers", "ddpm_fast.kernels", "ddpm_fast.metrics"]
PACKAGE_DIR = {"ddpm_fast": "ddpm_fast", "ddpm_fast.kernels": "kernels"}


def _env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 1 or 0 (or unset), got {value!r}")


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _nvcc(cuda_home):
    path = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if path and os.path.exists(path):
        return path
    return shutil.which("nvcc")


def _x86_simd_flags():
    # The CPU kernels use ATen's Vectorized<float> (SLEEF log/sin/cos) at AVX2 width.
    # ddpm_fast/_ext.py refuses to load the extension on a CPU without AVX2, FMA and F16C.
    if platform.machine().lower() in ("x86_64", "amd64") and _env_flag("DDPM_FAST_NO_AVX2") is not True:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"], True
    return [], False


def _write_build_info(**info):
    lines = ['"""Written by setup.py: how the extension in this install was built."""']
    lines += [f"{key.upper()} = {value!r}" for key, value in info.items()]
    with open(os.path.join(ROOT, "ddpm_fast", "_build_info.py"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _extension_setup():
    if _env_flag("DDPM_FAST_NO_EXTENSION"):
        _write_build_info(extension=False, reason="DDPM_FAST_NO_EXTENSION=1 at build time")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("ddpm_fast: torch is not importable at build time; installing without the C++ extension")
        _write_build_info(extension=False, reason="torch was not importable at build time")
        return {}

    cuda_home = _find_cuda_home()
    nvcc = _nvcc(cuda_home)
    want_cuda = _env_flag("DDPM_FAST_BUILD_CUDA")
    if want_cuda is None:
        with_cuda = torch.version.cuda is not None and nvcc is not None
    elif want_cuda and nvcc is None:
        raise SystemExit("DDPM_FAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    else:
        with_cuda = want_cuda
    cuda_archs = os.environ.get("DDPM_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")

    simd_flags, avx2 = _x86_simd_flags()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) if with_cuda else []
    defines = ["-DDDPM_FAST_WITH_CUDA"] if with_cuda else []
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 in
    # current releases; a C++17 flag here breaks the build against torch 2.14).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"] + simd_flags + defines
    link_flags = ["-fopenmp"]
    if with_cuda:
        link_flags += [f"-L{os.path.join(cuda_home, 'lib64')}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]

    extension = CppExtension(
        "ddpm_fast._C",
        sources,
        include_dirs=[os.path.join(CSRC, "include")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

    class BuildWithNvcc(BuildExtension):
        """Compiles the torch-free .cu files with nvcc, then links them into the extension."""

        def build_extensions(self):
            objects = []
            for cu in cu_sources:
                obj = os.path.join(self.build_temp, "cuda", os.path.basename(cu) + ".o")
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                cmd = [nvcc, "-c", cu, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       "-I", os.path.join(CSRC, "include")]
                for arch in cuda_archs:
                    cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
                cmd += ["-gencode", f"arch=compute_{cuda_archs[-1]},code=compute_{cuda_archs[-1]}"]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                objects.append(obj)
            for ext in self.extensions:
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extensions()

    _write_build_info(
        extension=True,
        torch_version=torch.__version__,
        with_cuda=with_cuda,
        cuda_archs=cuda_archs if with_cuda else [],
        avx2=avx2,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildWithNvcc.with_options(use_ninja=True)}}


class BuildPyWithSources(build_py):
    """Installs csrc/ as ddpm_fast/_csrc too: ddpm_fast.testing builds the test-only CUDA
    emulation from it (a checkout uses its csrc/ directly)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            target = os.path.join(self.build_lib, "ddpm_fast", "_csrc")
            shutil.copytree(CSRC, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.o"))


extension = _extension_setup()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"ddpm_fast": ["assets/*"]},
    cmdclass={"build_py": BuildPyWithSources, **extension.pop("cmdclass", {})},
    **extension,
)
