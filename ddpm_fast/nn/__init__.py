"""Models: the DDPM UNet built on the fused GroupNormSiLU, and the seed's SimpleUNet."""

from .group_norm_silu import GroupNormSiLU  # noqa: F401
from .simple_unet import SimpleUNet  # noqa: F401
from .unet import UNet  # noqa: F401

__all__ = ["GroupNormSiLU", "SimpleUNet", "UNet"]
