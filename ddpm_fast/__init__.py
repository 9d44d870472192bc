"""ddpm_fast: fast DDPM training and sampling with fused kernels.

``GaussianDiffusion`` is a drop-in for the classic reference class; the hot paths run in fused
kernels (Triton, CUDA, C++ CPU) chosen by ``ddpm_fast.backends``.
"""

__version__ = "0.1.0"

from . import _ext, backends  # noqa: E402,F401  (loads the extension, warns once if unusable)
from .diffusion import GaussianDiffusion, SamplerDefaults  # noqa: E402,F401
from .interop.diffusers import load_diffusers_pipeline, save_diffusers_pipeline  # noqa: E402,F401
