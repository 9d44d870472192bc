import os

# The Triton kernels run on CPU tensors through the interpreter; it must be set before triton
# is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import ddpm_fast  # noqa: E402
from ddpm_fast import backends  # noqa: E402

try:  # the suite must run against a complete package, not a source tree missing ddpm_fast.kernels
    import ddpm_fast.kernels  # noqa: F401
except ImportError as error:
    raise RuntimeError(f"ddpm_fast was imported from {ddpm_fast.__file__} without ddpm_fast.kernels: "
                       "install it (`pip install .`) and run pytest from a directory where the source "
                       "tree does not shadow the installed package") from error

@pytest.fixture
def poisoned_outputs():
    """torch.empty / empty_like (Python and C++) return NaN-filled memory while this is on."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params(include_torch=True):
    """(backend, device) pairs for parametrisation; unavailable ones skip with the reason."""
    names = (["torch"] if include_torch else []) + ["cpu", "triton", "cuda"]
    params = []
    for name in names:
        device = "cuda" if name == "cuda" else ("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")
        why = backends.unavailable_reason(name, device)
        marks = [pytest.mark.skip(reason=f"{name} backend unavailable: {why}")] if why else []
        params.append(pytest.param(name, device, id=name, marks=marks))
    return params


def randomize_weights(model, seed=0):
    """Random weights everywhere (norm scales around 1), so no parameter is trivially 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model
