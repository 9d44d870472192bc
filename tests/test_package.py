"""Packaging: the extension loads when it was built, falls back cleanly when it cannot."""

import importlib.metadata
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import ddpm_fast
from ddpm_fast import _ext


def _run_python(code, **env):
    # From a neutral directory: `python -c` puts the working directory first on sys.path, and the
    # source tree there would shadow the installed package.
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300, cwd=tempfile.gettempdir())


def test_extension_is_loaded_when_it_was_built():
    from ddpm_fast import _build_info

    if not _build_info.EXTENSION:
        pytest.skip(f"installed without the extension: {_build_info.REASON}")
    assert _ext.loaded, f"the extension was built but is not used: {_ext.reason}"
    for name in ("q_sample", "sampler_step", "group_norm_silu", "group_norm_silu_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_fast::{name}", "CPU"), name


def test_triton_kernels_are_a_subpackage_not_a_top_level_module():
    assert ddpm_fast.kernels.__name__ == "ddpm_fast.kernels"
    try:
        files = importlib.metadata.files("ddpm_fast") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ddpm_fast is not installed as a distribution")
    top_level = {f.parts[0] for f in files if f.suffix == ".py"}
    assert "kernels" not in top_level


def test_import_falls_back_when_the_extension_was_built_for_another_torch():
    result = _run_python("""
        import warnings, torch
        torch.__version__ = "1.0.0+other"      # as if another torch were running
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import ddpm_fast
        from ddpm_fast import _ext, backends, GaussianDiffusion
        messages = [str(w.message) for w in caught if "C++ extension is not used" in str(w.message)]
        assert len(messages) == 1, messages
        assert not _ext.loaded
        d = GaussianDiffusion(num_timesteps=10)
        x = torch.randn(2, 3, 4, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = d.p_sample(lambda x, t: x, x, torch.tensor([3, 0]))
        assert out.shape == x.shape
        print("fallback ok:", messages[0])
    """, DDPM_FAST_BACKEND="")
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
    from ddpm_fast import _build_info

    if _build_info.EXTENSION:
        assert "built against torch" in result.stdout


def test_explicit_cpu_backend_without_extension_says_why():
    result = _run_python("""
        import torch, warnings
        warnings.simplefilter("ignore")
        from ddpm_fast import GaussianDiffusion
        try:
            GaussianDiffusion(backend="cpu").q_sample(torch.randn(2, 3), torch.tensor([0, 1]))
        except RuntimeError as error:
            print("raised:", error)
    """, DDPM_FAST_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "raised: backend='cpu' cannot run on cpu tensors: the C++ extension is not loaded: " \
           "DDPM_FAST_NO_EXTENSION=1 is set" in result.stdout


def test_info_reports_versions_and_backends():
    result = subprocess.run([sys.executable, "-m", "ddpm_fast.info"], capture_output=True, text=True, timeout=300,
                            cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr
    assert torch.__version__ in result.stdout
    for backend in ("torch", "triton", "cuda", "cpu"):
        assert backend in result.stdout


def test_extension_without_every_op_is_not_used():
    """An extension built from an older source (some ops missing) is refused as a whole."""
    result = _run_python("""
        import warnings
        warnings.simplefilter("ignore")
        from ddpm_fast import _build_info, _ext
        if not _build_info.EXTENSION:
            print("no extension")
            raise SystemExit
        _ext.OPS = _ext.OPS + ("no_such_op",)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _ext._load()
        assert not _ext.loaded, "an extension lacking an op must not be used"
        print(_ext.reason, "|", caught[0].message)
    """)
    assert result.returncode == 0, result.stderr
    if "no extension" not in result.stdout:
        assert "it lacks the ops no_such_op" in result.stdout
