"""The one place that decides which backend computes a fused op.

Backends: ``"torch"`` (the pure-PyTorch reference, always available), ``"triton"`` (kernels/,
on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1``), ``"cuda"`` and ``"cpu"``
(the C++ extension's kernels for CUDA and CPU tensors). ``"auto"`` picks the fastest available
for the tensors' device: triton, then cuda, then torch on a GPU; cpu, then torch on the CPU.

An explicitly requested backend that cannot run raises :class:`BackendUnavailableError` saying
why; ``"auto"`` falling back to plain PyTorch warns once. The environment variable
``DDPM_FAST_BACKEND`` replaces ``"auto"`` (an explicit argument still wins), so a script can be
switched without editing it.
"""

import functools
import os
import warnings

import torch

from . import _ext

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
ENV_VAR = "DDPM_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


def check_name(backend, argument="backend"):
    """Validates a backend name (the constructor-time check); returns it."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {backend!r}")
    return backend


def requested(backend):
    """The backend asked for, with the environment override applied to "auto"."""
    check_name(backend)
    if backend == "auto" and os.environ.get(ENV_VAR):
        return check_name(os.environ[ENV_VAR], argument=f"environment variable {ENV_VAR}")
    return backend


@functools.lru_cache(maxsize=None)
def _triton_import_error():
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
    except Exception as error:  # ImportError, or a broken triton install
        return f"triton cannot be imported ({type(error).__name__}: {error})"
    return None


def unavailable_reason(backend, device_type):
    """None when ``backend`` can run on tensors of ``device_type``; else the reason."""
    if backend == "torch":
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error:
            return error
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return None
            return "Triton needs CUDA tensors (CPU tensors run only with TRITON_INTERPRET=1 set before import)"
        return f"Triton does not run on {device_type} tensors"
    if backend in ("cpu", "cuda"):
        if not _ext.loaded:
            return f"the C++ extension is not loaded: {_ext.reason}"
        if backend == "cuda" and not _ext.with_cuda:
            return "the C++ extension was built without CUDA kernels (rebuild with DDPM_FAST_BUILD_CUDA=1)"
        if device_type != backend:
            return f"the {backend} backend takes {backend.upper()} tensors, got {device_type} tensors"
        if backend == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


@functools.lru_cache(maxsize=None)
def _resolve(backend, device_type):
    if backend != "auto":
        why = unavailable_reason(backend, device_type)
        if why is not None:
            raise BackendUnavailableError(f"backend={backend!r} cannot run on {device_type} tensors: {why}")
        return backend
    reasons = []
    for candidate in _AUTO_ORDER.get(device_type, ()):
        why = unavailable_reason(candidate, device_type)
        if why is None:
            return candidate
        reasons.append(f"{candidate}: {why}")
    if reasons:
        warnings.warn(f"ddpm_fast: no fused backend for {device_type} tensors ({'; '.join(reasons)}); "
                      "using plain PyTorch", RuntimeWarning, stacklevel=4)
    return "torch"


def resolve(backend, device):
    """The backend that runs for tensors on ``device`` when ``backend`` is requested."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _resolve(requested(backend), device_type)


def report():
    """{backend: None or reason} for CPU and CUDA tensors, for `ddpm-fast info`."""
    return {
        device_type: {name: unavailable_reason(name, device_type) for name in BACKENDS if name != "auto"}
        for device_type in ("cpu", "cuda")
    }
