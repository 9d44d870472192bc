"""ddpm_fast's UNet against diffusers' UNet2DModel: configs, weights and folders, both ways.

Every diffusers model here is built from a config with random weights; nothing is downloaded.
"""

import inspect
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: no hub look-ups at all

import pytest
import torch
from conftest import randomize_weights

pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ddpm_fast.interop import diffusers as interop  # noqa: E402
from ddpm_fast.nn import GroupNormSiLU, UNet  # noqa: E402
from ddpm_fast.nn.unet import AttnBlock  # noqa: E402
from ddpm_fast.train import model_config_for  # noqa: E402

# google/ddpm-cifar10-32's unet/config.json (Ho et al.'s CIFAR-10 network, converted).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# Attention at two resolutions (16 and 4) with several heads (2 and 4 of 16 channels),
# symmetric downsample padding, improved-diffusion's embedding (cosines first, no shift) and
# widths that are not multiples of the first.
SMALL_CONFIG = dict(sample_size=16, block_out_channels=[32, 48, 64], layers_per_block=1,
                    down_block_types=["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                    up_block_types=["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"],
                    norm_num_groups=8, attention_head_dim=16, downsample_padding=1, dropout=0.1)
# An odd embedding width (45), TF padding and embedding, 4 heads, no middle attention, 1 -> 2 channels.
ODD_CONFIG = dict(sample_size=8, in_channels=1, out_channels=2, block_out_channels=[45, 60], layers_per_block=2,
                  down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                  norm_num_groups=15, norm_eps=1e-6, attention_head_dim=15, downsample_padding=0,
                  flip_sin_to_cos=False, freq_shift=1, add_attention=False)
CONFIGS = {"cifar10": CIFAR10_CONFIG, "small": SMALL_CONFIG, "odd": ODD_CONFIG}
BATCH = {"cifar10": 1, "small": 2, "odd": 2}  # the 35.7M-parameter network runs at batch 1
TOLERANCE = 1e-4  # max |ours - diffusers| / max |diffusers|, float32


def inputs(in_channels, size, batch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=gen)
    return x, torch.tensor([7, 912][:batch])


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def diffusers_output(model, x, t):
    with torch.no_grad():
        return model(x, t).sample


def state_dicts_identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def reference():
    """name -> (diffusers model with random weights, x, t, its output); each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            model = randomize_weights(UNet2DModel(**CONFIGS[name])).eval()
            x, t = inputs(model.config.in_channels, model.config.sample_size, BATCH[name])
            cache[name] = (model, x, t, diffusers_output(model, x, t))
        return cache[name]

    return get


# ----------------------------------------------------------------------------- same outputs


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_same_output_as_diffusers(reference, name, fused, channels_last):
    model, x, t, expected = reference(name)
    ours = UNet.from_diffusers(model, fused=fused)
    assert any(isinstance(m, GroupNormSiLU) for m in ours.modules()) == fused
    # Checked apart: with activations of unit scale, eps 1e-5 for 1e-6 moves the output by ~1e-5 only.
    norms = [m for m in ours.modules() if isinstance(m, (GroupNormSiLU, torch.nn.GroupNorm))]
    assert {m.eps for m in norms} == {model.config.norm_eps}
    if channels_last:
        ours, x = ours.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        actual = ours(x, t)
    assert actual.shape == expected.shape and expected.abs().max() > 0.1
    error = relative_error(actual, expected)
    print(f"{name} {'fused' if fused else 'unfused'} {'channels_last' if channels_last else 'nchw'}: "
          f"max relative error {error:.2e}")
    assert error < TOLERANCE


def test_cifar10_is_the_paper_network(reference):
    # google/ddpm-cifar10-32 is the cifar10 preset with the TF code's numerics, parameter for parameter.
    model = reference("cifar10")[0]
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    kwargs = interop.unet_config_from_diffusers(CIFAR10_CONFIG)
    with torch.device("meta"):
        ours, preset = UNet(**kwargs), UNet.from_preset("cifar10")
    shapes = {key: tensor.shape for key, tensor in ours.state_dict().items()}
    assert shapes == {key: tensor.shape for key, tensor in preset.state_dict().items()}
    config = ours.config
    assert config["block_out_channels"] == [128, 256, 256, 256] and config["ch"] == 128
    assert config["attn_resolutions"] == [16] and config["num_res_blocks"] == 2 and config["num_groups"] == 32
    assert (config["norm_eps"], config["flip_sin_to_cos"], config["freq_shift"], config["downsample_padding"],
            config["dropout"], config["attention_head_dim"], config["mid_attention"]) == (1e-6, False, 1, 0, 0.0,
                                                                                         None, True)
    assert sum(isinstance(m, AttnBlock) for m in ours.modules()) == 6


def test_several_heads_are_built(reference):
    ours = UNet.from_diffusers(reference("small")[0])
    heads = sorted(m.num_heads for m in ours.modules() if isinstance(m, AttnBlock))
    assert heads == [2, 2, 2, 4, 4, 4, 4]  # 16x16: 1 down + 2 up; 4x4: 1 down, middle, 2 up
    assert not ours.training  # a loaded model is in eval mode, as from_pretrained's


# ----------------------------------------------------------------------------- folders


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_reads_a_save_pretrained_folder_without_diffusers(reference, tmp_path, monkeypatch, safe_serialization):
    model, x, t, expected = reference("small")
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    names = {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"}
    written = interop.WEIGHTS_NAME if safe_serialization else interop.BIN_WEIGHTS_NAME
    assert names & set(os.listdir(tmp_path)) == {written}
    from_object = UNet.from_diffusers(model)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    from_folder = UNet.from_diffusers(tmp_path)
    assert state_dicts_identical(from_folder.state_dict(), from_object.state_dict())
    assert from_folder.config == from_object.config
    with torch.no_grad():
        actual = from_folder(x, t)
    assert torch.equal(actual, from_object(x, t).detach())
    assert relative_error(actual, expected) < TOLERANCE


def test_reads_the_names_before_diffusers_attention_class(reference, tmp_path):
    # The converted original checkpoints name the attention layers query, key, value, proj_attn.
    model, x, t, expected = reference("small")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state_dict = {}
    for key, tensor in model.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        state_dict[key] = tensor.contiguous()
    assert any(".proj_attn." in key for key in state_dict)
    save_file(state_dict, str(tmp_path / interop.WEIGHTS_NAME))
    (tmp_path / interop.CONFIG_NAME).write_text(json.dumps(dict(model.config)))
    ours = UNet.from_diffusers(str(tmp_path))
    assert state_dicts_identical(ours.state_dict(), UNet.from_diffusers(model).state_dict())


def test_weights_are_copied_not_shared(reference):
    model = reference("small")[0]
    ours = UNet.from_diffusers(model)
    before = model.conv_in.weight.detach().clone()
    with torch.no_grad():
        ours.conv_in.weight.add_(1.0)
    assert torch.equal(model.conv_in.weight, before)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in ours.parameters())


# ----------------------------------------------------------------------------- class-conditional models

# SMALL_CONFIG with 4 classes and the null label: num_class_embeds = K + 1 = 5.
CLASS_CONFIG = dict(SMALL_CONFIG, num_class_embeds=5)


@pytest.fixture(scope="module")
def class_reference():
    """(diffusers UNet2DModel with 4 classes + the null row and random weights, x, t, labels)."""
    model = randomize_weights(UNet2DModel(**CLASS_CONFIG)).eval()
    x, t = inputs(3, 16, 2)
    return model, x, t


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_class_conditional_model_has_diffusers_outputs(class_reference, fused):
    model, x, t = class_reference
    ours = UNet.from_diffusers(model, fused=fused)
    assert ours.num_classes == 4 and ours.null_class == 4 and ours.config["num_classes"] == 4
    assert torch.equal(ours.class_embed.weight, model.class_embedding.weight)
    outputs = []
    for labels in ([0, 3], [2, 1], [4, 4]):  # [4, 4]: the null row, for both samples
        y = torch.tensor(labels)
        with torch.no_grad():
            expected = model(x, t, class_labels=y).sample
            actual = ours(x, t, y=y)
        assert relative_error(actual, expected) < TOLERANCE, labels
        outputs.append(actual)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # the labels matter
    with torch.no_grad():
        assert torch.equal(ours(x, t), outputs[2])  # y=None: the null row


def test_class_conditional_export_round_trip(class_reference, tmp_path):
    model, x, t = class_reference
    ours = UNet.from_diffusers(model)
    interop.save_unet(ours, tmp_path)
    config = json.loads((tmp_path / interop.CONFIG_NAME).read_text())
    assert config["num_class_embeds"] == 5 and config["class_embed_type"] is None
    assert "class_embedding.weight" in load_file(str(tmp_path / interop.WEIGHTS_NAME))
    loaded = UNet2DModel.from_pretrained(str(tmp_path)).eval()
    assert state_dicts_identical(loaded.state_dict(), model.state_dict())
    y = torch.tensor([1, 4])
    with torch.no_grad():
        assert relative_error(ours(x, t, y=y), loaded(x, t, class_labels=y).sample) < TOLERANCE
    assert UNet.from_diffusers(tmp_path).config == ours.config
    # A trained class-conditional model exports the same way.
    trained = UNet(**dict(model_config_for("digits", 1, 8), num_classes=10))
    assert interop.unet_config_to_diffusers(trained)["num_class_embeds"] == 11
    assert interop.unet_config_to_diffusers(UNet.from_preset("digits"))["num_class_embeds"] is None


def test_class_weights_must_match_the_config(class_reference):
    from ddpm_fast.interop.diffusers.unet import _build_unet

    state_dict = class_reference[0].state_dict()
    # Class weights in a model without classes, or none in one with classes: named.
    with pytest.raises(ValueError, match="unexpected class_embedding.weight"):
        _build_unet(dict(SMALL_CONFIG), state_dict, "the UNet2DModel", True, "auto")
    with pytest.raises(ValueError, match="missing class_embedding.weight"):
        _build_unet(CLASS_CONFIG, {k: v for k, v in state_dict.items() if k != "class_embedding.weight"},
                    "the UNet2DModel", True, "auto")


# ----------------------------------------------------------------------------- exporting

# Models `ddpm-fast train` makes: every preset, with the --ch / --ch-mult overrides.
TRAIN_CONFIGS = {
    "cifar10": model_config_for("cifar10", 3, 32),
    "tiny": model_config_for("tiny", 3, 32),
    "digits": model_config_for("digits", 1, 8),
    "tiny-ch64-mult122": model_config_for("tiny", 3, 16, ch=64, ch_mult=[1, 2, 2]),
    "digits-mult11": model_config_for("digits", 1, 8, ch_mult=[1, 1]),
}


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_trained_model_is_expressible(name):
    config = TRAIN_CONFIGS[name]
    exported = interop.unet_config_to_diffusers(config)
    with torch.device("meta"):
        ours, theirs = UNet(**config), UNet2DModel(**{k: v for k, v in exported.items() if k != "_class_name"})
    converted = interop.unet_state_dict_to_diffusers(ours.state_dict())
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    # Reading the exported config back builds the same network.
    kwargs = interop.unet_config_from_diffusers(exported)
    with torch.device("meta"):
        again = UNet(**kwargs)
    assert interop.unet_config_to_diffusers(again) == exported
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


# Our networks beyond the presets: several heads, TF padding and embedding, no middle attention.
EXPORT_CONFIGS = {
    "tiny": dict(TRAIN_CONFIGS["tiny"], image_size=16, attn_resolutions=[8]),
    "digits": TRAIN_CONFIGS["digits"],
    "extended": dict(in_channels=3, image_size=16, block_out_channels=[32, 48], num_res_blocks=1,
                     attn_resolutions=[16, 8], dropout=0.0, num_groups=8, norm_eps=1e-6, attention_head_dim=16,
                     flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, mid_attention=False),
}


@pytest.mark.parametrize("name", EXPORT_CONFIGS)
def test_export_round_trip_and_diffusers_loads_it(name, tmp_path):
    ours = randomize_weights(UNet(**EXPORT_CONFIGS[name])).eval()
    assert interop.save_unet(ours, tmp_path) == str(tmp_path)
    assert json.loads((tmp_path / interop.CONFIG_NAME).read_text())["_class_name"] == "UNet2DModel"
    # Our loader gives back the same tensors and the same outputs.
    back = UNet.from_diffusers(tmp_path)
    assert state_dicts_identical(back.state_dict(), ours.state_dict())
    x, t = inputs(ours.in_channels, EXPORT_CONFIGS[name]["image_size"], 2)
    with torch.no_grad():
        y = ours(x, t)
        assert torch.equal(back(x, t), y)
    # diffusers' own loader reads the folder, and its network computes ours.
    theirs = UNet2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    assert state_dicts_identical(load_file(str(tmp_path / interop.WEIGHTS_NAME)), theirs.state_dict())
    error = relative_error(y, diffusers_output(theirs, x, t))
    print(f"export {name}: max relative error {error:.2e}")
    assert error < TOLERANCE


def test_state_dict_conversion_is_lossless_both_ways():
    ours = randomize_weights(UNet(**EXPORT_CONFIGS["extended"]))
    converted = interop.unet_state_dict_to_diffusers(ours.state_dict())
    assert any(key.endswith(".to_k.weight") for key in converted)
    assert state_dicts_identical(interop.unet_state_dict_from_diffusers(converted), ours.state_dict())


def test_channels_last_model_exports(tmp_path):
    ours = randomize_weights(UNet(**EXPORT_CONFIGS["tiny"])).to(memory_format=torch.channels_last)
    interop.save_unet(ours, tmp_path)
    assert state_dicts_identical(UNet.from_diffusers(tmp_path).state_dict(),
                                 {k: v.contiguous() for k, v in ours.state_dict().items()})


def test_inexpressible_model_gets_a_clear_error(tmp_path):
    ours = UNet(**model_config_for("tiny", 3, 32, ch_mult=[2, 2]))
    with pytest.raises(ValueError, match=r"cannot express this UNet.*ch=32.*64 channels.*ch_mult=\[2, 2\]"):
        interop.save_unet(ours, tmp_path)
    assert not os.listdir(tmp_path)
    with pytest.raises(TypeError, match="unet must be a ddpm_fast UNet"):
        interop.save_unet(torch.nn.Linear(2, 2), tmp_path)


# ----------------------------------------------------------------------------- bad input


def test_defaults_are_diffusers_own():
    parameters = inspect.signature(UNet2DModel.__init__).parameters
    assert {name: p.default for name, p in parameters.items() if name != "self"} == interop.DIFFUSERS_DEFAULTS


@pytest.mark.parametrize("field, value", [
    ("center_input_sample", True),
    ("time_embedding_type", "fourier"),
    ("act_fn", "gelu"),
    ("mid_block_type", None),
    ("mid_block_scale_factor", 1.414),
    ("resnet_time_scale_shift", "scale_shift"),
    ("downsample_type", "resnet"),
    ("upsample_type", "resnet"),
    ("class_embed_type", "timestep"),
    ("class_embed_type", "identity"),
    ("num_class_embeds", 1),  # the null label alone: no class
    ("down_block_types", ["DownBlock2D", "AttnSkipDownBlock2D", "DownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),  # not the mirror
    ("block_out_channels", [128, 256, 256]),
    ("block_out_channels", [128, 256, 256, 250]),
    ("time_embedding_dim", 256),
    ("attn_norm_num_groups", 16),
    ("downsample_padding", 2),
    ("sample_size", None),
    ("sample_size", [32, 16]),
    ("sample_size", 36),  # not a multiple of 2 ** 3
    ("_class_name", "UNet2DConditionModel"),
])
def test_config_outside_the_family_names_the_field(field, value):
    with pytest.raises(ValueError) as info:
        interop.unet_config_from_diffusers({**CIFAR10_CONFIG, field: value})
    assert f"{field}={value!r}" in str(info.value)


@pytest.mark.parametrize("overrides, error, match", [
    ({"cross_attention_dim": 512}, ValueError, "unknown key 'cross_attention_dim' \\(value 512\\)"),
    ({"layers_per_block": 0}, ValueError, "layers_per_block must be an int >= 1, got 0"),
    ({"norm_num_groups": "32"}, TypeError, "norm_num_groups must be an int"),
    ({"add_attention": "no"}, TypeError, "add_attention must be True or False"),
    ({"attention_head_dim": 96}, ValueError, r"attention_head_dim must divide .* \[256\], got 96"),
    ({"flip_sin_to_cos": 0}, TypeError, "flip_sin_to_cos must be True or False"),
    ({"norm_eps": -1.0}, ValueError, "norm_eps must be a finite number"),
])
def test_bad_config_values_name_the_field(overrides, error, match):
    config = {**CIFAR10_CONFIG, **overrides}
    with pytest.raises(error, match=match):
        with torch.device("meta"):
            UNet(**interop.unet_config_from_diffusers(config))


def test_bad_folders_say_what_is_wrong(reference, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        UNet.from_diffusers(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        UNet.from_diffusers(tmp_path / "file")
    pipeline = tmp_path / "pipeline"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "unet" / "config.json").write_text(json.dumps(SMALL_CONFIG))
    with pytest.raises(ValueError, match=r"holds no config.json.*its UNet is in unet/"):
        UNet.from_diffusers(pipeline)
    with pytest.raises(ValueError, match=r"holds no weights: expected diffusion_pytorch_model.safetensors"):
        UNet.from_diffusers(pipeline / "unet")
    (pipeline / "unet" / interop.WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read weights"):
        UNet.from_diffusers(pipeline / "unet")
    (pipeline / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        UNet.from_diffusers(pipeline / "unet")
    with pytest.raises(TypeError, match="a diffusers UNet2DModel, got"):
        UNet.from_diffusers(torch.nn.Linear(2, 2))


def test_weights_that_do_not_fit_the_config(reference, tmp_path):
    model = reference("small")[0]
    state_dict = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    (tmp_path / interop.CONFIG_NAME).write_text(json.dumps(dict(model.config)))

    def check(weights, match):
        save_file(weights, str(tmp_path / interop.WEIGHTS_NAME))
        with pytest.raises(ValueError, match=match):
            UNet.from_diffusers(tmp_path)

    check({k: v for k, v in state_dict.items() if k != "mid_block.attentions.0.to_k.weight"},
          "do not fit its config: missing mid_block.attentions.0.to_k.weight")
    check({**state_dict, "conv_in.weight": torch.zeros(32, 3, 5, 5)},
          r"conv_in.weight has shape \[32, 3, 5, 5\], expected \[32, 3, 3, 3\]")
    check({**state_dict, "down_blocks.7.resnets.0.conv1.bias": torch.zeros(3)},
          "unexpected down_blocks.7.resnets.0.conv1.bias")
    check({**state_dict, "class_embedding.weight": torch.zeros(3)}, "unexpected class_embedding.weight")
    # The conversion alone names what it cannot place.
    with pytest.raises(ValueError, match="unexpected key 'class_embedding.linear_1.weight' in a UNet2DModel"):
        interop.unet_state_dict_from_diffusers({**state_dict, "class_embedding.linear_1.weight": torch.zeros(3)})
    without_v = {k: v for k, v in state_dict.items() if k != "down_blocks.0.attentions.0.to_v.bias"}
    with pytest.raises(ValueError, match="has no down_blocks.0.attentions.0.to_v.bias"):
        interop.unet_state_dict_from_diffusers(without_v)
    with pytest.raises(ValueError, match="unexpected key 'down.0.blocks.0.conv9.weight' in a ddpm_fast UNet"):
        interop.unet_state_dict_to_diffusers({"down.0.blocks.0.conv9.weight": torch.zeros(1)})
