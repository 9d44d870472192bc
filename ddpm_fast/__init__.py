"""ddpm_fast: fast DDPM training and sampling with fused kernels.

``GaussianDiffusion`` is a drop-in for the classic reference class; the hot paths run in fused
kernels (Triton, CUDA, C++ CPU) chosen by ``ddpm_fast.backends``.
"""

__version__ = "0.1.0"

from . import _ext, backends  # noqa: E402,F401  (loads the extension, warns once if unusable)
from .diffusion import GaussianDiffusion, SamplerDefaults  # noqa: E402,F401
# diffusers interop: the package-level entry points (interop imports the core, never the reverse;
# importing it also gives UNet and GaussianDiffusion their from_diffusers classmethods).
from .interop.diffusers import (diffusion_from_diffusers, load_diffusers_pipeline,  # noqa: E402,F401
                                load_unet as unet_from_diffusers, save_diffusers_pipeline)
