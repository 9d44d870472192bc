"""Loads the compiled extension ``ddpm_fast._C`` when it fits this torch and this CPU.

When it does not (missing, built against another torch or from an older source without all
of ``OPS``, a CPU without the instructions it was compiled for, or ``DDPM_FAST_NO_EXTENSION=1``),
``import ddpm_fast`` still works: this
module warns once and the backend choice falls back to Triton or plain PyTorch.
"""

import os
import warnings

import torch

# The ops every build of the extension registers (torch.ops.ddpm_fast.*).
OPS = ("q_sample", "sampler_step", "group_norm_silu", "group_norm_silu_backward")

loaded = False
with_cuda = False
reason = None  # why the extension is not used; None when it is


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _why_not(info):
    if info is None:
        return "ddpm_fast was installed without its build record (reinstall with `pip install .`)"
    if not info.EXTENSION:
        return f"it was not built ({info.REASON})"
    if info.TORCH_VERSION != torch.__version__:
        return (f"it was built against torch {info.TORCH_VERSION} but torch {torch.__version__} "
                "is running (reinstall ddpm_fast with `pip install --no-build-isolation .`)")
    flags = _cpu_flags()
    if info.AVX2 and flags is not None and not {"avx2", "fma", "f16c"} <= flags:
        return "it was compiled for AVX2, FMA and F16C, which this CPU lacks (rebuild with DDPM_FAST_NO_AVX2=1)"
    return None


def _load():
    global loaded, with_cuda, reason
    loaded, with_cuda = False, False
    if os.environ.get("DDPM_FAST_NO_EXTENSION") == "1":
        reason = "DDPM_FAST_NO_EXTENSION=1 is set"
        return
    try:
        from . import _build_info as info
    except ImportError:
        info = None
    reason = _why_not(info)
    if reason is None:
        try:
            from . import _C  # noqa: F401  (registers torch.ops.ddpm_fast.*)
        except (ImportError, OSError) as error:
            reason = f"it failed to load: {error}"
    if reason is None:
        missing = [name for name in OPS if not hasattr(torch.ops.ddpm_fast, name)]
        if missing:
            reason = (f"it lacks the ops {', '.join(missing)} (built from an older ddpm_fast; "
                      "reinstall with `pip install --no-build-isolation .`)")
    if reason is None:
        loaded, with_cuda = True, bool(info.WITH_CUDA)
    else:
        warnings.warn(f"ddpm_fast: the C++ extension is not used: {reason}. "
                      "Falling back to the Triton and PyTorch backends.", RuntimeWarning, stacklevel=3)


_load()
