"""diffusers models, schedulers and pipeline folders <-> ddpm_fast, split by what they map.

- :mod:`.unet`: ``UNet2DModel`` configs, weights and folders <-> :class:`ddpm_fast.nn.UNet`;
- :mod:`.scheduler`: DDPM / DDIM / DPM-Solver++ schedulers <-> :class:`ddpm_fast.GaussianDiffusion`;
- :mod:`.pipeline`: whole ``DDPMPipeline`` folders.

Reading needs json and safetensors only; diffusers is imported only when a diffusers object is
passed in. The core (``diffusion``, ``nn``, ``ops``, ``samplers``) never imports this package.
"""

from ._files import DiffusersFormatError  # noqa: F401
from .pipeline import (PIPELINE_CLASSES, PIPELINE_INDEX_NAME, SCHEDULER_FOLDER, UNET_FOLDER,  # noqa: F401
                       load_diffusers_pipeline, read_pipeline_folder, save_diffusers_pipeline)
from .scheduler import (DEFAULT_SCHEDULER, SCHEDULER_CONFIG_NAME, SCHEDULER_DEFAULTS,  # noqa: F401
                        diffusion_config_from_diffusers, diffusion_from_diffusers, scheduler_config_to_diffusers)
from .unet import (BIN_WEIGHTS_NAME, CLASS_NAME, CONFIG_NAME, DIFFUSERS_DEFAULTS, WEIGHTS_NAME,  # noqa: F401
                   load_unet, read_unet_folder, save_unet, unet_config_from_diffusers, unet_config_to_diffusers,
                   unet_state_dict_from_diffusers, unet_state_dict_to_diffusers)
from ...diffusion import GaussianDiffusion
from ...nn.unet import UNet


# The classmethods users know. They are attached here, where diffusers is mapped, so that the
# core modules never import interop (one direction of imports, no circle).
def _unet_from_diffusers(cls, model_or_path, fused=True, backend="auto"):
    """The network of a diffusers ``UNet2DModel`` with its weights (float32, CPU, eval mode).

    ``model_or_path``: a UNet2DModel object, or the path of its ``save_pretrained`` folder
    (config.json + diffusion_pytorch_model.safetensors or .bin; reading one needs no
    diffusers). Configs outside the DDPM family raise a ValueError naming the field. Same as
    :func:`ddpm_fast.interop.diffusers.load_unet`.
    """
    return load_unet(model_or_path, fused=fused, backend=backend)


def _diffusion_from_diffusers(cls, scheduler_or_config, **overrides):
    """The diffusion of a diffusers scheduler (object, config dict or scheduler_config.json path).

    ``overrides``: ``backend``, ``device``, ``sampler_defaults``. Every scheduler key is mapped,
    inert or rejected by name (see :func:`diffusion_config_from_diffusers`). Same as
    :func:`ddpm_fast.interop.diffusers.diffusion_from_diffusers`.
    """
    return diffusion_from_diffusers(scheduler_or_config, **overrides)


UNet.from_diffusers = classmethod(_unet_from_diffusers)
GaussianDiffusion.from_diffusers = classmethod(_diffusion_from_diffusers)
