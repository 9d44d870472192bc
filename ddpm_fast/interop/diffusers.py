"""diffusers' ``UNet2DModel`` <-> :class:`ddpm_fast.nn.UNet`: configs, weights and model folders.

The DDPM family of ``UNet2DModel`` (the converted original checkpoints google/ddpm-cifar10-32,
ddpm-celebahq-256, ddpm-church-256, ddpm-bedroom-256, ddpm-cat-256, and what
``UNet2DModel(...)`` builds from DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D and
the middle block) is the network of :class:`UNet`, module for module:

    ddpm_fast                       diffusers
    time_embed.0 / .2               time_embedding.linear_1 / linear_2
    down.i.blocks.j                 down_blocks.i.resnets.j      (temb_proj: time_emb_proj,
    up.i.blocks.j                   up_blocks.i.resnets.j         shortcut: conv_shortcut)
    down.i.attns.j, up.i.attns.j    down_blocks.i.attentions.j, up_blocks.i.attentions.j
    mid.0, mid.1, mid.2             mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    down.i.downsample.conv          down_blocks.i.downsamplers.0.conv
    up.i.upsample.conv              up_blocks.i.upsamplers.0.conv
    norm_out                        conv_norm_out

An attention block's ``norm`` is diffusers' ``group_norm``, its 1x1 convolution ``qkv``
[3C, C, 1, 1] is the three Linear layers ``to_q``, ``to_k``, ``to_v`` [C, C] stacked, and
``proj_out`` is ``to_out.0``. The names diffusers used before its Attention class (``query``,
``key``, ``value``, ``proj_attn``) are read too.

Reading a folder needs json and safetensors (or ``torch.load(weights_only=True)`` for a .bin)
only; diffusers is imported only when a diffusers object is passed. A config outside the family
raises :class:`DiffusersFormatError` (a ValueError) naming the field and its value.

Schedulers (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler) <-> GaussianDiffusion,
and whole pipeline folders (``DDPMPipeline.save_pretrained``: model_index.json, unet/,
scheduler/) are in the second half of this module: :func:`diffusion_from_diffusers`,
:func:`scheduler_config_to_diffusers`, :func:`load_diffusers_pipeline`,
:func:`save_diffusers_pipeline`.
"""

import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import torch

from .. import schedules
from ..diffusion import GaussianDiffusion, SamplerDefaults
from ..images import atomic_write
from ..nn.unet import UNet
from ..validation import check_bool, check_int, check_number, describe

CLASS_NAME = "UNet2DModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BIN_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
INDEX_SUFFIX = ".index.json"  # a sharded checkpoint: WEIGHTS_NAME + INDEX_SUFFIX lists its files

# UNet2DModel.__init__'s defaults (diffusers 0.42), which apply to the keys a config leaves out
# (configs written by older versions lack the newer keys). The tests check this table against
# the installed diffusers.
DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Block types of the family: down/up block name -> whether it has attention.
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}


class DiffusersFormatError(ValueError):
    """A diffusers folder, config or state_dict ddpm_fast cannot use; the message says why."""


# ----------------------------------------------------------------------------- configs


def _field_error(field, value, expected):
    return DiffusersFormatError(f"UNet2DModel config: {field}={value!r} is not supported "
                                f"(ddpm_fast's UNet needs {expected})")


def _block_types(field, value, known):
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"UNet2DModel config: {field} must be a non-empty list of block names, got {describe(value)}")
    names = []
    for name in value:
        # diffusers' get_down_block / get_up_block read "UNetRes<name>" as <name>.
        name = name[len("UNetRes"):] if isinstance(name, str) and name.startswith("UNetRes") else name
        if name not in known:
            raise _field_error(field, list(value), f"each of {sorted(known)}")
        names.append(name)
    return names


def _sample_size(value):
    """diffusers' sample_size (an int, or [height, width]) as one side; square images only."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if value is None or isinstance(value, (list, tuple)):
        raise _field_error("sample_size", value, "the side of a square image, an int")
    return check_int("sample_size", value, minimum=1)


def unet_config_from_diffusers(config):
    """The :class:`UNet` keyword arguments (without fused/backend) of a UNet2DModel config dict.

    Raises DiffusersFormatError naming the field for anything outside the DDPM family (other
    block types or embeddings, class conditioning, scale-shift ResBlocks, centred input, another
    activation, non-mirrored up blocks, unknown keys, ...): nothing is silently dropped.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (a UNet2DModel config), got {describe(config)}")
    class_name = config.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise _field_error("_class_name", class_name, f"{CLASS_NAME!r}")
    # Keys starting with "_" are diffusers' bookkeeping (_diffusers_version, _name_or_path, ...).
    unknown = [key for key in config if not key.startswith("_") and key not in DIFFUSERS_DEFAULTS]
    if unknown:
        raise DiffusersFormatError(f"UNet2DModel config: unknown key {unknown[0]!r} (value "
                                   f"{config[unknown[0]]!r}); ddpm_fast reads UNet2DModel's keys: "
                                   f"{', '.join(DIFFUSERS_DEFAULTS)}")
    c = {**DIFFUSERS_DEFAULTS, **{key: value for key, value in config.items() if not key.startswith("_")}}

    def require(field, ok, expected):
        if not ok:
            raise _field_error(field, c[field], expected)

    require("center_input_sample", c["center_input_sample"] is False, "False")
    require("time_embedding_type", c["time_embedding_type"] == "positional", "'positional' (sinusoidal)")
    require("act_fn", c["act_fn"] in ("silu", "swish"), "'silu'")
    require("mid_block_type", c["mid_block_type"] == "UNetMidBlock2D", "'UNetMidBlock2D'")
    check_number("mid_block_scale_factor", c["mid_block_scale_factor"])
    require("mid_block_scale_factor", c["mid_block_scale_factor"] == 1, "1")
    require("resnet_time_scale_shift", c["resnet_time_scale_shift"] == "default", "'default'")
    require("downsample_type", c["downsample_type"] == "conv", "'conv'")
    require("upsample_type", c["upsample_type"] == "conv", "'conv'")
    require("class_embed_type", c["class_embed_type"] is None, "None (no class conditioning)")
    require("num_class_embeds", c["num_class_embeds"] is None, "None (no class conditioning)")
    # num_train_timesteps sizes the "learned" embedding only; the positional one has no table.
    if c["num_train_timesteps"] is not None:
        check_int("num_train_timesteps", c["num_train_timesteps"], minimum=1)

    down = _block_types("down_block_types", c["down_block_types"], DOWN_BLOCKS)
    up = _block_types("up_block_types", c["up_block_types"], UP_BLOCKS)
    attention = [DOWN_BLOCKS[name] for name in down]
    mirrored = ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention)]
    require("up_block_types", up == mirrored, f"the mirror of down_block_types={list(down)}: {mirrored}")
    widths = c["block_out_channels"]
    if isinstance(widths, str) or not isinstance(widths, (list, tuple)) or len(widths) != len(down):
        raise _field_error("block_out_channels", widths, f"a list of {len(down)} ints, one per down block")
    widths = [check_int(f"block_out_channels[{i}]", width, minimum=1) for i, width in enumerate(widths)]
    num_groups = check_int("norm_num_groups", c["norm_num_groups"], minimum=1)
    require("block_out_channels", all(width % num_groups == 0 for width in widths),
            f"widths divisible by norm_num_groups={num_groups}")
    require("attn_norm_num_groups", c["attn_norm_num_groups"] in (None, num_groups),
            f"None or norm_num_groups={num_groups}")
    require("time_embedding_dim", c["time_embedding_dim"] in (None, 4 * widths[0]),
            f"None or 4 * block_out_channels[0] = {4 * widths[0]}")
    if isinstance(c["downsample_padding"], bool) or c["downsample_padding"] not in (0, 1):
        raise _field_error("downsample_padding", c["downsample_padding"], "0 (TF-style) or 1")
    image_size = _sample_size(c["sample_size"])
    if image_size % 2 ** (len(widths) - 1):
        raise _field_error("sample_size", c["sample_size"],
                           f"a multiple of 2 ** (len(block_out_channels) - 1) = {2 ** (len(widths) - 1)}")
    return dict(
        in_channels=check_int("in_channels", c["in_channels"], minimum=1),
        out_channels=check_int("out_channels", c["out_channels"], minimum=1),
        image_size=image_size,
        block_out_channels=widths,
        num_res_blocks=check_int("layers_per_block", c["layers_per_block"], minimum=1),
        attn_resolutions=[image_size // 2 ** level for level, attn in enumerate(attention) if attn],
        dropout=c["dropout"],
        num_groups=num_groups,
        norm_eps=c["norm_eps"],
        attention_head_dim=c["attention_head_dim"],
        flip_sin_to_cos=c["flip_sin_to_cos"],
        freq_shift=c["freq_shift"],
        downsample_padding=c["downsample_padding"],
        mid_attention=check_bool("add_attention", c["add_attention"]),
    )


def unet_config_to_diffusers(unet_or_config):
    """The UNet2DModel config dict (with ``_class_name``) of a UNet or of its ``config`` dict.

    Every key is written, so diffusers' defaults do not matter. Raises DiffusersFormatError for a
    network diffusers cannot express: UNet2DModel's input convolution and timestep embedding
    have the first level's width, so ``ch`` must equal it (``ch_mult[0] == 1``).
    """
    if isinstance(unet_or_config, UNet):
        model = unet_or_config
    elif isinstance(unet_or_config, Mapping):
        with torch.device("meta"):  # for the derived sizes and the checks; allocates nothing
            model = UNet(**unet_or_config)
    else:
        raise TypeError(f"unet_or_config must be a ddpm_fast UNet or its config dict, got {describe(unet_or_config)}")
    config, widths = model.config, list(model.block_out_channels)
    if model.ch != widths[0]:
        raise DiffusersFormatError(
            f"diffusers' UNet2DModel cannot express this UNet: its input convolution and timestep embedding "
            f"have the width of the first level (block_out_channels[0]), this model has ch={model.ch} and a "
            f"first level of {widths[0]} channels (ch_mult={config['ch_mult']}; the first multiplier must be 1)")
    attention = [level in model.attn_levels for level in range(model.num_levels)]
    return {
        "_class_name": CLASS_NAME,
        "sample_size": config["image_size"],
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "freq_shift": config["freq_shift"],
        "flip_sin_to_cos": config["flip_sin_to_cos"],
        "down_block_types": ["AttnDownBlock2D" if attn else "DownBlock2D" for attn in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention)],
        "block_out_channels": widths,
        "layers_per_block": config["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": config["downsample_padding"],
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": config["dropout"],
        "act_fn": "silu",
        "attention_head_dim": config["attention_head_dim"],
        "norm_num_groups": config["num_groups"],
        "attn_norm_num_groups": None,
        "norm_eps": config["norm_eps"],
        "resnet_time_scale_shift": "default",
        "add_attention": config["mid_attention"],
        "class_embed_type": None,
        "num_class_embeds": None,
        "num_train_timesteps": None,
    }


# ----------------------------------------------------------------------------- state_dicts

# (ddpm_fast module, diffusers module, kind); {i} and {j} stand for block indices.
_MODULES = [
    ("time_embed.0", "time_embedding.linear_1", "plain"),
    ("time_embed.2", "time_embedding.linear_2", "plain"),
    ("conv_in", "conv_in", "plain"),
    ("down.{i}.blocks.{j}", "down_blocks.{i}.resnets.{j}", "resnet"),
    ("down.{i}.attns.{j}", "down_blocks.{i}.attentions.{j}", "attention"),
    ("down.{i}.downsample.conv", "down_blocks.{i}.downsamplers.0.conv", "plain"),
    ("mid.0", "mid_block.resnets.0", "resnet"),
    ("mid.1", "mid_block.attentions.0", "attention"),
    ("mid.2", "mid_block.resnets.1", "resnet"),
    ("up.{i}.blocks.{j}", "up_blocks.{i}.resnets.{j}", "resnet"),
    ("up.{i}.attns.{j}", "up_blocks.{i}.attentions.{j}", "attention"),
    ("up.{i}.upsample.conv", "up_blocks.{i}.upsamplers.0.conv", "plain"),
    ("norm_out", "conv_norm_out", "plain"),
    ("conv_out", "conv_out", "plain"),
]
# Submodules of a ResBlock (ResnetBlock2D) and of an AttnBlock (Attention; qkv is apart).
_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "proj_out": "to_out.0"}
_QKV = ("to_q", "to_k", "to_v")
# diffusers' names before its Attention class, found in the converted original checkpoints.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PARAMS = ("weight", "bias")


def _regex(template):
    body = template.replace(".", r"\.").replace("{i}", r"(?P<i>\d+)").replace("{j}", r"(?P<j>\d+)")
    return re.compile(body + r"\.(?P<rest>.+)")


_OURS = [(_regex(ours), theirs, kind) for ours, theirs, kind in _MODULES]
_THEIRS = [(_regex(theirs), ours, kind) for ours, theirs, kind in _MODULES]


def _split(key, rules, what):
    """(other side's module prefix, kind, submodule or "", parameter name) of a state_dict key."""
    for regex, other, kind in rules:
        match = regex.fullmatch(key)
        if match:
            module, _, param = match.group("rest").rpartition(".")
            if param in _PARAMS and (kind == "plain") == (module == ""):
                return other.format(**match.groupdict()), kind, module, param
    raise DiffusersFormatError(f"unexpected key {key!r} in {what}")


def _rename_deprecated(state_dict):
    """diffusers' state_dict with the pre-Attention names (query, key, value, proj_attn) renamed."""
    renamed = {}
    for key, tensor in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        block, _, module = prefix.rpartition(".")
        if module in _DEPRECATED_ATTENTION and ".attentions." in f".{block}.":
            key = f"{block}.{_DEPRECATED_ATTENTION[module]}.{leaf}"
        renamed[key] = tensor
    return renamed


def unet_state_dict_to_diffusers(state_dict):
    """A UNet state_dict in UNet2DModel's names and shapes (tensors are views where possible)."""
    converted = {}
    for key, tensor in state_dict.items():
        prefix, kind, module, param = _split(key, _OURS, "a ddpm_fast UNet state_dict")
        if kind == "plain":
            converted[f"{prefix}.{param}"] = tensor
        elif kind == "resnet" and module in _RESNET:
            converted[f"{prefix}.{_RESNET[module]}.{param}"] = tensor
        elif kind == "attention" and module == "qkv":  # [3C, C, 1, 1] -> three Linear [C, C]
            for name, part in zip(_QKV, tensor.chunk(3, dim=0)):
                converted[f"{prefix}.{name}.{param}"] = part.flatten(1) if param == "weight" else part
        elif kind == "attention" and module in _ATTENTION:
            linear = module == "proj_out" and param == "weight"  # a 1x1 convolution as a Linear
            converted[f"{prefix}.{_ATTENTION[module]}.{param}"] = tensor.flatten(1) if linear else tensor
        else:
            raise DiffusersFormatError(f"unexpected key {key!r} in a ddpm_fast UNet state_dict")
    return converted


def unet_state_dict_from_diffusers(state_dict):
    """A UNet2DModel state_dict in UNet's names and shapes (also with the pre-Attention names)."""
    converted, qkv = {}, {}
    resnet = {theirs: ours for ours, theirs in _RESNET.items()}
    attention = {theirs: ours for ours, theirs in _ATTENTION.items()}
    for key, tensor in _rename_deprecated(state_dict).items():
        prefix, kind, module, param = _split(key, _THEIRS, "a UNet2DModel state_dict")
        if kind == "plain":
            converted[f"{prefix}.{param}"] = tensor
        elif kind == "resnet" and module in resnet:
            converted[f"{prefix}.{resnet[module]}.{param}"] = tensor
        elif kind == "attention" and module in _QKV:
            qkv.setdefault((prefix, param), {})[module] = tensor
        elif kind == "attention" and module in attention:
            conv = module == "to_out.0" and param == "weight"  # a Linear as a 1x1 convolution
            converted[f"{prefix}.{attention[module]}.{param}"] = tensor[:, :, None, None] if conv else tensor
        else:
            raise DiffusersFormatError(f"unexpected key {key!r} in a UNet2DModel state_dict")
    for (prefix, param), parts in qkv.items():
        missing = [name for name in _QKV if name not in parts]
        if missing:
            theirs = _split(f"{prefix}.qkv.{param}", _OURS, "")[0]
            raise DiffusersFormatError(f"the UNet2DModel state_dict has no {theirs}.{missing[0]}.{param}")
        stacked = torch.cat([parts[name] for name in _QKV], dim=0)
        converted[f"{prefix}.qkv.{param}"] = stacked[:, :, None, None] if param == "weight" else stacked
    return converted


# ----------------------------------------------------------------------------- folders and models


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DiffusersFormatError(f"cannot read {path!r}: {error}") from None
    if not isinstance(value, dict):
        raise DiffusersFormatError(f"{path!r} holds {type(value).__name__}, expected a JSON object")
    return value


def _read_weights_file(path):
    """A state_dict from one .safetensors file or one weights-only .bin (torch.save) file."""
    from safetensors.torch import load_file

    try:
        if path.endswith(".safetensors"):
            state_dict = load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DiffusersFormatError(f"cannot read weights {path!r} (truncated or not a state_dict): "
                                   f"{first_line}") from None
    except Exception as error:  # safetensors' own SafetensorError derives from Exception only
        raise DiffusersFormatError(f"cannot read weights {path!r}: {error}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state_dict.items()):
        raise DiffusersFormatError(f"{path!r} does not hold a state_dict (names to tensors)")
    return state_dict


def _read_weights(folder):
    """The folder's weights: safetensors first (as diffusers does), then .bin; either may be sharded."""
    for name in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return _read_weights_file(path)
        index_path = path + INDEX_SUFFIX
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise DiffusersFormatError(f"{index_path!r} has no weight_map")
            state_dict = {}
            for shard in sorted(set(weight_map.values())):
                state_dict.update(_read_weights_file(os.path.join(folder, os.path.basename(str(shard)))))
            return state_dict
    raise DiffusersFormatError(f"{folder!r} holds no weights: expected {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME}")


def _existing_folder(name, folder, what):
    """``folder`` as a str; a TypeError naming ``name`` unless it is a path, an error unless it is a folder."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"{name} must be the path of {what}, got {describe(folder)}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DiffusersFormatError(f"{folder!r} is not a folder" if os.path.exists(folder)
                                   else f"{folder!r} does not exist")
    return folder


def read_unet_folder(folder):
    """(config dict, state_dict in diffusers' names) of a ``UNet2DModel.save_pretrained`` folder."""
    folder = _existing_folder("folder", folder, "a UNet2DModel folder")
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        hint = (" (a pipeline folder? its UNet is in unet/)"
                if os.path.isfile(os.path.join(folder, "unet", CONFIG_NAME)) else "")
        raise DiffusersFormatError(f"{folder!r} holds no {CONFIG_NAME}: a UNet2DModel folder holds {CONFIG_NAME} "
                                   f"and {WEIGHTS_NAME} (or {BIN_WEIGHTS_NAME}){hint}")
    return _read_json(config_path), _read_weights(folder)


def _diffusers_model_contents(model):
    """(config dict, state_dict) of a diffusers UNet2DModel object (imports diffusers)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        UNet2DModel = None
    if UNet2DModel is None or not isinstance(model, UNet2DModel):
        raise TypeError(f"model_or_path must be the path of a UNet2DModel folder or a diffusers UNet2DModel, "
                        f"got {describe(model)}")
    return dict(model.config), model.state_dict()


def _check_weights_fit(state_dict, expected, where):
    """Every expected key present, nothing else, each a floating tensor of the expected shape."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong = [f"{key} has shape {list(state_dict[key].shape)}, expected {list(expected[key].shape)}"
             for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    not_float = [f"{key} is {state_dict[key].dtype}" for key in expected
                 if key in state_dict and not state_dict[key].is_floating_point()]
    problems = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else [])
    problems += [f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"] if unexpected else []
    problems += wrong[:3] + not_float[:3]
    if problems:
        raise DiffusersFormatError(f"the weights of {where} do not fit its config: {'; '.join(problems)}")


def load_unet(model_or_path, fused=True, backend="auto"):
    """A :class:`UNet` (float32, on the CPU, in eval mode) from a diffusers UNet2DModel.

    ``model_or_path``: the path of a ``UNet2DModel.save_pretrained`` folder (config.json and
    diffusion_pytorch_model.safetensors, or .bin, read weights-only), or a UNet2DModel object.
    ``fused``/``backend`` as for UNet. Its weights are copied, never shared with the object.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        config, state_dict = read_unet_folder(model_or_path)
        where = repr(os.fspath(model_or_path))
    else:
        config, state_dict = _diffusers_model_contents(model_or_path)
        where = "the UNet2DModel"
    return _build_unet(config, state_dict, where, fused, backend)


def _build_unet(config, state_dict, where, fused, backend):
    """The UNet of a UNet2DModel config and its state_dict (diffusers' names); ``where`` names it in errors."""
    kwargs = unet_config_from_diffusers(config)
    with torch.device("meta"):  # no initialisation: every parameter is assigned below
        model = UNet(**kwargs, fused=fused, backend=backend)
    state_dict = _rename_deprecated(state_dict)
    _check_weights_fit(state_dict, unet_state_dict_to_diffusers(model.state_dict()), where)
    weights = {key: tensor.to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
               for key, tensor in unet_state_dict_from_diffusers(state_dict).items()}
    model.load_state_dict(weights, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError("internal error: a UNet tensor was left out of its state_dict")
    return model.eval()


def save_unet(unet, folder):
    """Writes ``unet`` as a UNet2DModel folder (config.json, diffusion_pytorch_model.safetensors),
    which ``UNet2DModel.from_pretrained(folder)`` loads; returns the folder's path.

    The weights keep the model's dtype. Raises DiffusersFormatError for a network diffusers
    cannot express (see :func:`unet_config_to_diffusers`).
    """
    if not isinstance(unet, UNet):
        raise TypeError(f"unet must be a ddpm_fast UNet, got {describe(unet)}")
    from safetensors.torch import save

    config = unet_config_to_diffusers(unet)
    # safetensors takes contiguous tensors that share no memory (q, k and v are views of qkv).
    tensors = {key: tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for key, tensor in unet_state_dict_to_diffusers(unet.state_dict()).items()}
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, CONFIG_NAME), config)
    atomic_write(os.path.join(folder, WEIGHTS_NAME), lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    return folder


def _write_json(path, value):
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------- schedulers

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# The keys of the schedulers ddpm_fast reads, with their __init__ defaults (diffusers 0.42),
# which apply to the keys a config leaves out. The tests check these tables against the
# installed diffusers.
_SCHEDULER_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
SCHEDULER_DEFAULTS = {
    "DDPMScheduler": {**_SCHEDULER_COMMON, "variance_type": "fixed_small", "clip_sample": True,
                      "clip_sample_range": 1.0},
    "DDIMScheduler": {**_SCHEDULER_COMMON, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True},
    "DPMSolverMultistepScheduler": {
        **_SCHEDULER_COMMON, "timestep_spacing": "linspace", "variance_type": None, "solver_order": 2,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
        "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
}
DEFAULT_SCHEDULER = "DDPMScheduler"  # the class of a config dict without _class_name
# A config may hold keys of the other two schedulers too: diffusers' from_config keeps the keys of
# the config it converts (DPMSolverMultistepScheduler.from_config of a DDPMScheduler config holds
# clip_sample and variance_type), and converting again brings them back into effect. ddpm_fast
# has one diffusion for all its samplers, so each key configures the sampler it belongs to
# whatever the class (a DDPMScheduler config's use_karras_sigmas sets the DPM-Solver++ noise
# levels, as DPMSolverMultistepScheduler.from_config of it would); keys the config leaves out take
# the defaults of the class they belong to, the config's own class first.
_SCHEDULER_KEYS = set().union(*SCHEDULER_DEFAULTS.values())

PREDICTION_TYPES = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}  # diffusers -> ddpm_fast
# The fixed variances. The "_log" variants name the same variances (diffusers' DDPMScheduler
# interpolates learned ones in log space). None: no choice made, DDPMScheduler's fixed_small.
VARIANCE_TYPES = {None: "posterior", "fixed_small": "posterior", "fixed_small_log": "posterior",
                  "fixed_large": "beta", "fixed_large_log": "beta"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# The noise-level families of DPMSolverMultistepScheduler other than the schedule's own and Karras'.
_OTHER_SIGMAS = ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                 "use_dynamic_shifting")


def _one_of(value, choices):
    """value in choices, for any value (a list from a json file is not hashable)."""
    return isinstance(value, (str, type(None))) and value in choices


def _betas_tensor(where, value):
    """trained_betas (a list, array or tensor of numbers) as a float64 tensor."""
    try:
        betas = torch.as_tensor(value.tolist() if hasattr(value, "tolist") else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where}: trained_betas must be a list of numbers or null, got {describe(value)}") from None
    if betas.dim() != 1:
        raise DiffusersFormatError(f"{where}: trained_betas must be a flat list, got shape {list(betas.shape)}")
    return betas


def diffusion_config_from_diffusers(config, class_name=None):
    """The :class:`GaussianDiffusion` keyword arguments of a scheduler config dict.

    ``class_name``: the scheduler class (DDPMScheduler, DDIMScheduler or
    DPMSolverMultistepScheduler); by default the config's ``_class_name``, else DDPMScheduler.
    Keys the config leaves out take that class's defaults, as in diffusers; the keys of the other
    two schedulers configure those schedulers' samplers and default to theirs (see the comment
    above _SCHEDULER_KEYS).

    Mapping (diffusers -> ddpm_fast):
        num_train_timesteps, beta_start, beta_end, beta_schedule  -> the betas: "linear" ->
            schedule="linear"; "squaredcos_cap_v2" -> schedule="cosine" (the same betas_for_alpha_bar,
            beta_start/beta_end inert); "scaled_linear" -> betas=linspace(sqrt(start), sqrt(end))^2
        trained_betas            -> betas= (beta_start, beta_end, beta_schedule inert); its length
                                    must be num_train_timesteps
        prediction_type          -> epsilon -> "epsilon", sample -> "x0", v_prediction -> "v"
        variance_type            -> fixed_small, fixed_small_log, None -> "posterior" (beta tilde);
                                    fixed_large, fixed_large_log -> "beta"
        clip_sample              -> sampler_defaults.clip_denoised (clip_sample_range must be 1.0 when
                                    clipping, inert otherwise); a DPMSolverMultistepScheduler config
                                    never clips (that class ignores the clip_sample from_config brings)
        timestep_spacing, steps_offset -> sampler_defaults.spacing, .steps_offset
        solver_order, lower_order_final, use_karras_sigmas, final_sigmas_type -> sampler_defaults.order,
                                    .lower_order_final, .karras_sigmas, .final_sigma
    Inert, so accepted: dynamic_thresholding_ratio and sample_max_value (thresholding off),
    flow_shift and time_shift_type (no flow sigmas, no dynamic shifting), euler_at_final with
    final_sigmas_type "zero" (that last step is first order anyway), a lambda_min_clipped below
    every log-SNR of the schedule (it clips no timestep), solver_type "midpoint" and
    algorithm_type "dpmsolver++" (ddpm_fast's solver), set_alpha_to_one=True (ddpm_fast's DDIM
    ends on x_0). Keys starting with "_" are diffusers' bookkeeping.
    Everything else ddpm_fast cannot express raises DiffusersFormatError naming the key and its
    value: thresholding, learned variances, zero terminal SNR, set_alpha_to_one=False, other
    solvers, solver orders or noise levels, a clipping lambda_min_clipped, unknown keys, other
    scheduler classes. Wrong value types raise TypeError naming the key.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (a scheduler config), got {describe(config)}")
    class_name = config.get("_class_name", DEFAULT_SCHEDULER) if class_name is None else class_name
    if class_name not in SCHEDULER_DEFAULTS:
        raise DiffusersFormatError(f"scheduler class {class_name!r} is not supported: ddpm_fast reads "
                                   f"{', '.join(SCHEDULER_DEFAULTS)}")
    where = f"{class_name} config"
    unknown = [key for key in config if not key.startswith("_") and key not in _SCHEDULER_KEYS]
    if unknown:
        raise DiffusersFormatError(f"{where}: unknown key {unknown[0]!r} (value {config[unknown[0]]!r}); ddpm_fast "
                                   f"reads the keys of {', '.join(SCHEDULER_DEFAULTS)}")
    defaults = {}
    for name in reversed(SCHEDULER_DEFAULTS):  # DDPMScheduler's shared defaults last, then the class's own
        defaults.update(SCHEDULER_DEFAULTS[name])
    c = {**defaults, **SCHEDULER_DEFAULTS[class_name], **{k: v for k, v in config.items() if not k.startswith("_")}}

    def unsupported(key, why):
        return DiffusersFormatError(f"{where}: {key}={c[key]!r} is not supported ({why})")

    def flag(key):
        return check_bool(f"{where}: {key}", c[key])

    if flag("rescale_betas_zero_snr"):
        raise unsupported("rescale_betas_zero_snr", "zero terminal SNR sets beta_T = 1; ddpm_fast's schedules keep "
                                                    "every beta below 1")
    if flag("thresholding"):
        raise unsupported("thresholding", "ddpm_fast has no dynamic thresholding; it clamps the predicted x_0 to "
                                          "[-1, 1] with clip_sample")
    schedule = _schedule_from_diffusers(c, where, unsupported)
    try:  # the betas, checked as GaussianDiffusion will check them
        betas = schedules.make_betas(**schedule)
    except (TypeError, ValueError) as error:
        raise DiffusersFormatError(f"{where}: {error}") from None
    if not _one_of(c["prediction_type"], PREDICTION_TYPES):
        raise unsupported("prediction_type", f"ddpm_fast reads {', '.join(map(repr, PREDICTION_TYPES))}")
    if _one_of(c["variance_type"], ("learned", "learned_range")):
        raise unsupported("variance_type", "a learned variance (the model predicts it too); ddpm_fast's reverse "
                                           "process has a fixed variance: fixed_small or fixed_large")
    if not _one_of(c["variance_type"], VARIANCE_TYPES):
        raise unsupported("variance_type", f"ddpm_fast reads {', '.join(map(repr, VARIANCE_TYPES))}")
    # DPMSolverMultistepScheduler never clips, and ddpm_fast's clipping applies to every sampler:
    # there the clip_sample that from_config carries along stays inert.
    clip = class_name != "DPMSolverMultistepScheduler" and flag("clip_sample")
    if clip and check_number(f"{where}: clip_sample_range", c["clip_sample_range"]) != 1.0:
        raise unsupported("clip_sample_range", "ddpm_fast clamps the predicted x_0 to [-1, 1]: 1.0, or "
                                               "clip_sample=False")
    if not flag("set_alpha_to_one"):
        raise unsupported("set_alpha_to_one", "ddpm_fast's DDIM ends on x_0 itself, as with True")
    if not _one_of(c["timestep_spacing"], schedules.SPACINGS):
        raise unsupported("timestep_spacing", f"ddpm_fast reads {', '.join(map(repr, schedules.SPACINGS))}")
    return dict(
        **schedule,
        prediction_type=PREDICTION_TYPES[c["prediction_type"]],
        variance_type=VARIANCE_TYPES[c["variance_type"]],
        sampler_defaults=SamplerDefaults(
            clip_denoised=clip, spacing=c["timestep_spacing"],
            steps_offset=check_int(f"{where}: steps_offset", c["steps_offset"], minimum=0),
            **_solver_from_diffusers(c, where, unsupported, flag, betas)),
    )


def _schedule_from_diffusers(c, where, unsupported):
    """The schedule keywords of GaussianDiffusion (and of schedules.make_betas)."""
    num_timesteps = check_int(f"{where}: num_train_timesteps", c["num_train_timesteps"], minimum=1)
    if c["trained_betas"] is not None:
        betas = _betas_tensor(where, c["trained_betas"])
        if len(betas) != num_timesteps:
            raise DiffusersFormatError(f"{where}: trained_betas has {len(betas)} values but num_train_timesteps="
                                       f"{num_timesteps}; diffusers' samplers step through num_train_timesteps "
                                       f"timesteps of these betas, so the two must agree")
        return dict(betas=betas)
    if c["beta_schedule"] == "squaredcos_cap_v2":  # diffusers' betas_for_alpha_bar is ddpm_fast's cosine schedule
        return dict(num_timesteps=num_timesteps, schedule="cosine")
    if c["beta_schedule"] not in ("linear", "scaled_linear"):
        raise unsupported("beta_schedule", f"ddpm_fast reads {', '.join(map(repr, BETA_SCHEDULES))} and trained_betas")
    start = check_number(f"{where}: beta_start", c["beta_start"], minimum=0.0, open_min=True)
    end = check_number(f"{where}: beta_end", c["beta_end"], minimum=0.0, open_min=True)
    if c["beta_schedule"] == "linear":
        return dict(num_timesteps=num_timesteps, beta_start=start, beta_end=end, schedule="linear")
    return dict(betas=torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2)


def _solver_from_diffusers(c, where, unsupported, flag, betas):
    """The DPM-Solver++ fields of SamplerDefaults from a DPMSolverMultistepScheduler config."""
    if c["algorithm_type"] != "dpmsolver++":
        raise unsupported("algorithm_type", "ddpm_fast's solver is DPM-Solver++ without noise: 'dpmsolver++'")
    if c["solver_type"] != "midpoint":
        raise unsupported("solver_type", "ddpm_fast's second-order update is the midpoint one: 'midpoint'")
    if check_int(f"{where}: solver_order", c["solver_order"]) not in (1, 2):
        raise unsupported("solver_order", "ddpm_fast's DPM-Solver++ has orders 1 and 2")
    for key in _OTHER_SIGMAS:
        if flag(key):
            raise unsupported(key, "ddpm_fast's DPM-Solver++ runs on the schedule's noise levels or on Karras "
                                   "et al.'s (use_karras_sigmas)")
    karras = flag("use_karras_sigmas")
    if not _one_of(c["final_sigmas_type"], schedules.FINAL_SIGMAS):
        raise unsupported("final_sigmas_type", f"ddpm_fast reads {', '.join(map(repr, schedules.FINAL_SIGMAS))}")
    if flag("euler_at_final") and c["final_sigmas_type"] != "zero":
        raise unsupported("euler_at_final", "ddpm_fast's last step is first order when it ends on sigma = 0 "
                                            "(final_sigmas_type='zero', where euler_at_final is inert) or, with "
                                            "lower_order_final, below 15 steps")
    clipped = c["lambda_min_clipped"]
    if not (isinstance(clipped, (int, float)) and not isinstance(clipped, bool) and clipped == -math.inf):
        clipped = check_number(f"{where}: lambda_min_clipped", clipped)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        log_snr = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod))  # diffusers' lambda_t
        dropped = int((log_snr < clipped).sum())
        if dropped:
            raise unsupported("lambda_min_clipped", f"it drops the {dropped} last of {len(betas)} timesteps, whose "
                                                    f"log-SNR lies below it; ddpm_fast's DPM-Solver++ spans every "
                                                    f"timestep: -inf, or a value <= {log_snr.min().item():.6g} "
                                                    f"(the schedule's least log-SNR), which drops none")
    if karras and c["trained_betas"] is not None and c["beta_schedule"] == "squaredcos_cap_v2":
        raise unsupported("beta_schedule", "with trained_betas and use_karras_sigmas diffusers truncates the Karras "
                                           "timesteps as for its cosine schedule, which ddpm_fast does only for its "
                                           "own cosine schedule: drop trained_betas, or use beta_schedule='linear' "
                                           "(inert with trained_betas)")
    return dict(order=c["solver_order"], lower_order_final=flag("lower_order_final"), karras_sigmas=karras,
                final_sigma=c["final_sigmas_type"])


# Keyword arguments of GaussianDiffusion that do not define the noise process.
_DIFFUSION_OVERRIDES = ("backend", "device", "sampler_defaults")


def _scheduler_contents(scheduler_or_config):
    """(config dict, class name or None) of a scheduler object, config dict or scheduler_config.json path."""
    if isinstance(scheduler_or_config, (str, os.PathLike)):
        path = os.fspath(scheduler_or_config)
        if os.path.isdir(path):
            path = os.path.join(path, SCHEDULER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise DiffusersFormatError(f"{path!r} does not exist: expected a {SCHEDULER_CONFIG_NAME} (or a folder "
                                       f"holding one)")
        return _read_json(path), None
    if isinstance(scheduler_or_config, Mapping):
        return dict(scheduler_or_config), None
    try:
        import diffusers
    except ImportError:
        diffusers = None
    for name in SCHEDULER_DEFAULTS:
        if diffusers is not None and isinstance(scheduler_or_config, getattr(diffusers, name)):
            return dict(scheduler_or_config.config), name
    raise TypeError(f"scheduler_or_config must be a diffusers {', '.join(SCHEDULER_DEFAULTS)}, its config dict or "
                    f"the path of its {SCHEDULER_CONFIG_NAME}, got {describe(scheduler_or_config)}")


def diffusion_from_diffusers(scheduler_or_config, **overrides):
    """The :class:`GaussianDiffusion` of a diffusers scheduler (see :func:`diffusion_config_from_diffusers`).

    ``scheduler_or_config``: a DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler (diffusers
    is imported only for these), its config dict, or the path of a scheduler_config.json (or of
    the folder holding it). ``overrides``: ``backend``, ``device`` and ``sampler_defaults`` of the
    GaussianDiffusion; the noise process itself comes from the scheduler.

    Where the samplers differ: diffusers' DDIMScheduler with clip_sample=True keeps the model's
    own epsilon in its direction term unless ``use_clipped_model_output=True``; ddpm_fast re-derives
    epsilon from the clipped x_0 (as improved-diffusion does), which is diffusers' DDIM with
    use_clipped_model_output=True. And diffusers' DDIMScheduler steps from t to
    t - num_train_timesteps // num_steps whatever the spacing, which is its next timestep for
    "leading" spacing (its default) and for "trailing" when num_steps divides num_train_timesteps;
    ddpm_fast's DDIM always steps to the next timestep of the list.
    """
    extra = sorted(set(overrides) - set(_DIFFUSION_OVERRIDES))
    if extra:
        raise TypeError(f"diffusion_from_diffusers takes the overrides {', '.join(_DIFFUSION_OVERRIDES)} only (the "
                        f"noise process comes from the scheduler), got {', '.join(extra)}")
    config, class_name = _scheduler_contents(scheduler_or_config)
    return GaussianDiffusion(**{**diffusion_config_from_diffusers(config, class_name), **overrides})


def scheduler_config_to_diffusers(diffusion):
    """The DDPMScheduler config dict (with ``_class_name``) of a :class:`GaussianDiffusion`, exactly.

    Every key is written, so diffusers' defaults do not matter. The betas: beta_schedule "linear"
    (beta_start, beta_end) or "squaredcos_cap_v2" when they are those schedules' to the last bit,
    trained_betas (float64 values) otherwise. clip_sample, timestep_spacing and steps_offset come
    from ``diffusion.sampler_defaults``; its DPM-Solver++ fields must keep their defaults (those of
    DPMSolverMultistepScheduler, which a DDPMScheduler config cannot change), else
    DiffusersFormatError.
    """
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a ddpm_fast GaussianDiffusion, got {describe(diffusion)}")
    defaults, solver_defaults = diffusion.sampler_defaults, SamplerDefaults()
    for field in ("order", "lower_order_final", "karras_sigmas", "final_sigma"):
        if getattr(defaults, field) != getattr(solver_defaults, field):
            raise DiffusersFormatError(
                f"a DDPMScheduler config cannot express sampler_defaults.{field}={getattr(defaults, field)!r}: it "
                f"has no DPM-Solver++ keys, and DPMSolverMultistepScheduler.from_config of it takes "
                f"{field}={getattr(solver_defaults, field)!r}; export a diffusion with that value")
    betas = diffusion._float64["betas"]  # the exact float64 schedule (the public tables are float32)
    num_timesteps = diffusion.num_timesteps
    start, end = betas[0].item(), betas[-1].item()
    if start < end and torch.equal(schedules.linear_betas(num_timesteps, start, end), betas):
        schedule = {"beta_schedule": "linear", "beta_start": start, "beta_end": end, "trained_betas": None}
    elif torch.equal(schedules.cosine_betas(num_timesteps), betas):
        schedule = {"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02,
                    "trained_betas": None}
    else:
        schedule = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "trained_betas": betas.tolist()}
    return {
        "_class_name": DEFAULT_SCHEDULER,
        "num_train_timesteps": num_timesteps,
        **schedule,
        "variance_type": {"posterior": "fixed_small", "beta": "fixed_large"}[diffusion.variance_type],
        "clip_sample": defaults.clip_denoised,
        "clip_sample_range": 1.0,
        "prediction_type": {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}[diffusion.prediction_type],
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": defaults.spacing,
        "steps_offset": defaults.steps_offset,
        "rescale_betas_zero_snr": False,
    }


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
