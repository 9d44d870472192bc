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
    class_embed                     class_embedding              (num_classes=K: num_class_embeds=K + 1)

A class-conditional UNet (``num_classes=K``) is a ``UNet2DModel`` with ``num_class_embeds=K + 1``
and ``class_embed_type=None``: the same ``nn.Embedding``, added to the timestep embedding at the
same place; its last row, label K, is ddpm_fast's null label (``model(x, t)``), which diffusers'
model is given as ``class_labels=torch.full((B,), K)``.

An attention block's ``norm`` is diffusers' ``group_norm``, its 1x1 convolution ``qkv``
[3C, C, 1, 1] is the three Linear layers ``to_q``, ``to_k``, ``to_v`` [C, C] stacked, and
``proj_out`` is ``to_out.0``. The names diffusers used before its Attention class (``query``,
``key``, ``value``, ``proj_attn``) are read too.

Reading a folder needs json and safetensors (or ``torch.load(weights_only=True)`` for a .bin)
only; diffusers is imported only when a diffusers object is passed. A config outside the family
raises :class:`DiffusersFormatError` (a ValueError) naming the field and its value.
"""

import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import torch

from ...images import atomic_write
from ...nn.unet import UNet
from ...validation import check_bool, check_int, check_number, describe
from ._files import DiffusersFormatError, _existing_folder, _read_json, _write_json

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
    block types or embeddings, class embeddings other than a table, scale-shift ResBlocks,
    centred input, another activation, non-mirrored up blocks, unknown keys, ...): nothing is
    silently dropped. ``num_class_embeds`` (with ``class_embed_type=None``) becomes
    ``num_classes = num_class_embeds - 1``: its last row is the null label.
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
    require("class_embed_type", c["class_embed_type"] is None,
            "None (a table of num_class_embeds rows, or no class conditioning)")
    num_classes = None
    if c["num_class_embeds"] is not None:
        check_int("num_class_embeds", c["num_class_embeds"], minimum=1)
        require("num_class_embeds", c["num_class_embeds"] >= 2,
                "None or K + 1 >= 2: K classes and the null label, the last row")
        num_classes = c["num_class_embeds"] - 1
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
        num_classes=num_classes,
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
        "num_class_embeds": None if model.num_classes is None else model.num_classes + 1,
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
    ("class_embed", "class_embedding", "plain"),
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
