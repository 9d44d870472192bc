"""Whole diffusers pipeline folders (``DDPMPipeline.save_pretrained``: model_index.json, unet/, scheduler/)."""

import os

from ...diffusion import GaussianDiffusion
from ...nn.unet import UNet
from ...validation import describe
from ._files import DiffusersFormatError, _existing_folder, _read_json, _write_json
from .scheduler import DEFAULT_SCHEDULER, SCHEDULER_CONFIG_NAME, SCHEDULER_DEFAULTS, diffusion_config_from_diffusers, \
    scheduler_config_to_diffusers
from .unet import CLASS_NAME, CONFIG_NAME, _build_unet, read_unet_folder, save_unet, unet_config_to_diffusers

# ----------------------------------------------------------------------------- pipelines

PIPELINE_INDEX_NAME = "model_index.json"
PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")  # a UNet2DModel and a scheduler, nothing else
UNET_FOLDER, SCHEDULER_FOLDER = "unet", "scheduler"


def _component_class(index, name, path, expected):
    """The class a model_index.json names for a component (["diffusers", class]), checked."""
    entry = index.get(name)
    if entry is None:
        raise DiffusersFormatError(f"{path!r} names no {name!r} component; a DDPMPipeline has a {UNET_FOLDER!r} "
                                   f"and a {SCHEDULER_FOLDER!r}")
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] in expected):
        raise DiffusersFormatError(f"{path!r}: {name}={entry!r} is not supported (ddpm_fast reads "
                                   f"{' or '.join(repr(['diffusers', cls]) for cls in expected)})")
    return entry[1]


def read_pipeline_folder(folder):
    """(UNet2DModel config, its state_dict in diffusers' names, scheduler class, scheduler config) of a
    ``DDPMPipeline.save_pretrained`` folder; json and weights-only reads, no diffusers."""
    folder = _existing_folder("path", folder, "a pipeline folder")
    index_path = os.path.join(folder, PIPELINE_INDEX_NAME)
    if not os.path.isfile(index_path):
        hint = ""
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            hint = " (it looks like a UNet2DModel folder: load that with UNet.from_diffusers)"
        elif os.path.isfile(os.path.join(folder, SCHEDULER_CONFIG_NAME)):
            hint = " (it looks like a scheduler folder: load that with GaussianDiffusion.from_diffusers)"
        raise DiffusersFormatError(f"{folder!r} is not a diffusers pipeline folder: it holds no {PIPELINE_INDEX_NAME} "
                                   f"(DDPMPipeline.save_pretrained writes {PIPELINE_INDEX_NAME}, {UNET_FOLDER}/ and "
                                   f"{SCHEDULER_FOLDER}/){hint}")
    index = _read_json(index_path)
    pipeline_class = index.get("_class_name")
    if pipeline_class not in PIPELINE_CLASSES:
        raise DiffusersFormatError(f"{index_path!r}: _class_name={pipeline_class!r} is not supported (ddpm_fast reads "
                                   f"{', '.join(PIPELINE_CLASSES)}: a UNet2DModel and a scheduler)")
    extra = [key for key in index if not key.startswith("_") and key not in (UNET_FOLDER, SCHEDULER_FOLDER)]
    if extra:
        raise DiffusersFormatError(f"{index_path!r} names a component {extra[0]!r} that a {pipeline_class} does not "
                                   f"have")
    _component_class(index, UNET_FOLDER, index_path, (CLASS_NAME,))
    scheduler_class = _component_class(index, SCHEDULER_FOLDER, index_path, tuple(SCHEDULER_DEFAULTS))
    for name, file in ((UNET_FOLDER, CONFIG_NAME), (SCHEDULER_FOLDER, SCHEDULER_CONFIG_NAME)):
        if not os.path.isfile(os.path.join(folder, name, file)):
            raise DiffusersFormatError(f"pipeline folder {folder!r} has no {name}/{file} ({PIPELINE_INDEX_NAME} "
                                       f"names a {name} component)")
    unet_config, state_dict = read_unet_folder(os.path.join(folder, UNET_FOLDER))
    scheduler_config = _read_json(os.path.join(folder, SCHEDULER_FOLDER, SCHEDULER_CONFIG_NAME))
    return unet_config, state_dict, scheduler_class, scheduler_config


def _check_output_channels(config, what):
    """A DDPM pipeline's model predicts one value per input value (no learned variance)."""
    inputs, outputs = config["in_channels"], config["out_channels"]
    if outputs != inputs:
        learned = " (a model that also predicts its variance)" if outputs == 2 * inputs else ""
        raise DiffusersFormatError(f"{what} has out_channels={config['out_channels']} for in_channels="
                                   f"{config['in_channels']}{learned}; a DDPM pipeline's model outputs one value per "
                                   f"input value")


def load_diffusers_pipeline(path, fused=True, backend="auto"):
    """``(unet, diffusion)`` of a ``DDPMPipeline.save_pretrained`` (or DDIMPipeline) folder.

    The folder holds model_index.json, unet/ (config.json and diffusion_pytorch_model.safetensors or
    .bin) and scheduler/scheduler_config.json; it is read with json, safetensors and weights-only
    ``torch.load``: diffusers is not needed and nothing is fetched from a network. ``unet`` is a
    :class:`UNet` (float32, CPU, eval mode; ``fused``/``backend`` as for UNet); ``diffusion`` the
    :class:`GaussianDiffusion` of the scheduler (see :func:`diffusion_from_diffusers`), on
    ``backend``. A folder that is not such a pipeline raises DiffusersFormatError saying what is
    missing or not supported.
    """
    unet_config, state_dict, scheduler_class, scheduler_config = read_pipeline_folder(path)
    folder = os.fspath(path)
    try:
        unet = _build_unet(unet_config, state_dict, repr(os.path.join(folder, UNET_FOLDER)), fused, backend)
        _check_output_channels(unet.config, "its UNet")
    except (TypeError, ValueError) as error:  # a value in the folder's files: say which folder
        raise DiffusersFormatError(f"pipeline {folder!r}, {UNET_FOLDER}: {error}") from None
    try:
        diffusion = GaussianDiffusion(**diffusion_config_from_diffusers(scheduler_config, scheduler_class),
                                      backend=backend)
    except (TypeError, ValueError) as error:
        raise DiffusersFormatError(f"pipeline {folder!r}, {SCHEDULER_FOLDER}: {error}") from None
    return unet, diffusion


def save_diffusers_pipeline(unet, diffusion, path):
    """Writes ``unet`` and ``diffusion`` as a DDPMPipeline folder; returns its path.

    model_index.json (a DDPMPipeline), unet/ (see :func:`save_unet`) and
    scheduler/scheduler_config.json (a DDPMScheduler, see :func:`scheduler_config_to_diffusers`),
    which ``diffusers.DDPMPipeline.from_pretrained(path)`` loads. Everything is checked before
    anything is written: a model diffusers cannot express raises DiffusersFormatError. Files are
    written to temporary names and renamed; model_index.json last.
    """
    if not isinstance(unet, UNet):
        raise TypeError(f"unet must be a ddpm_fast UNet, got {describe(unet)}")
    scheduler_config = scheduler_config_to_diffusers(diffusion)
    unet_config_to_diffusers(unet)  # raises for a network UNet2DModel cannot express
    _check_output_channels(unet.config, "the UNet")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {describe(path)}")
    folder = os.fspath(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DiffusersFormatError(f"{folder!r} exists and is not a folder")
    save_unet(unet, os.path.join(folder, UNET_FOLDER))
    _write_json(os.path.join(folder, SCHEDULER_FOLDER, SCHEDULER_CONFIG_NAME), scheduler_config)
    _write_json(os.path.join(folder, PIPELINE_INDEX_NAME),
                {"_class_name": "DDPMPipeline", UNET_FOLDER: ["diffusers", CLASS_NAME],
                 SCHEDULER_FOLDER: ["diffusers", DEFAULT_SCHEDULER]})
    return folder
