"""The DDPM UNet (fused GroupNormSiLU vs nn.GroupNorm + SiLU) and the seed's SimpleUNet."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast.nn import GroupNormSiLU, SimpleUNet, UNet
from ddpm_fast.nn.unet import AttnBlock, timestep_embedding

TINY_SHAPE = (2, 3, 16, 16)  # the tiny preset at 16x16 input: attention runs on 8x8 maps, fast on CPU


def randomize(model, seed=0):
    """Random weights everywhere, including the zero-initialised output layers, so every
    parameter gets a gradient and the outputs are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:  # conv / linear weight: Glorot-like scale keeps activations O(1)
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def tiny_pair(backend, **overrides):
    """A tiny fused UNet with random weights, and the unfused one with the same weights."""
    fused = randomize(UNet.from_preset("tiny", backend=backend, **overrides))
    unfused = UNet.from_preset("tiny", fused=False, **overrides)
    unfused.load_state_dict(fused.state_dict())
    return fused, unfused


def inputs(shape=TINY_SHAPE, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randint(0, 1000, (shape[0],), generator=gen)


def forward_backward(model, x, t, grad_out):
    """Output, gradient w.r.t. x and parameter gradients, all as float64."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = model(x, t)
    y.backward(grad_out.to(y.dtype))
    grads = {name: p.grad.double() for name, p in model.named_parameters()}
    return y.detach().double(), x.grad.double(), grads


def max_err(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- architecture


def test_cifar10_parameter_count():
    # Ho et al. 2020's CIFAR-10 model: the reference TF implementation counts 35,746,307.
    with torch.device("meta"):
        model = UNet.from_preset("cifar10")
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert model.config["dropout"] == 0.1 and model.config["ch_mult"] == [1, 2, 2, 2]
    # Attention at 16x16: two blocks down, three up, one in the middle.
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 6


def test_presets_build_and_are_small():
    for name, n_attn in (("tiny", 4), ("digits", 4)):
        model = UNet.from_preset(name)
        assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
        assert sum(isinstance(m, AttnBlock) for m in model.modules()) == n_attn


def test_fused_and_unfused_share_state_dict_and_config():
    fused = UNet.from_preset("tiny")
    unfused = UNet.from_preset("tiny", fused=False)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    assert any(isinstance(m, GroupNormSiLU) for m in fused.modules())
    assert not any(isinstance(m, GroupNormSiLU) for m in unfused.modules())
    # UNet(**config) rebuilds it, also after a JSON round trip.
    config = json.loads(json.dumps(fused.config))
    rebuilt = UNet(**config)
    rebuilt.load_state_dict(fused.state_dict())
    assert rebuilt.config == fused.config
    assert unfused.config["fused"] is False


def test_from_preset_bad_name_lists_presets():
    with pytest.raises(ValueError, match="cifar10.*digits|digits.*cifar10") as info:
        UNet.from_preset("imagenet")
    assert "imagenet" in str(info.value) and "tiny" in str(info.value)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by num_groups=32"):
        UNet(ch=48)
    with pytest.raises(ValueError, match="image_size must be divisible"):
        UNet(image_size=30)
    with pytest.raises(ValueError, match="backend must be one of"):
        UNet.from_preset("tiny", backend="fast")


def test_bad_inputs_raise_clear_errors():
    model = UNet.from_preset("tiny")
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 3, height, width\], got \[2, 1, 16, 16\]"):
        model(torch.randn(2, 1, 16, 16), t)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(3, 16, 16), t)
    with pytest.raises(ValueError, match=r"divisible by 2 \*\* \(len\(ch_mult\) - 1\) = 2, got 15x16"):
        model(torch.randn(2, 3, 15, 16), t)
    with pytest.raises(ValueError, match=r"t must have shape \[batch\] = \[2\], got \[3\]"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="t must be a tensor of timesteps"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"t must be on x's device \(meta\), got cpu"):
        model(torch.randn(2, 3, 16, 16, device="meta"), t)


# A network using every configuration key beyond the presets' (diffusers' DDPM family).
EXTENDED = dict(in_channels=3, image_size=16, block_out_channels=[32, 48], num_res_blocks=1,
                attn_resolutions=[16, 8], dropout=0.0, num_groups=8, norm_eps=1e-6, attention_head_dim=16,
                flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, mid_attention=False)
NEW_KEYS = dict(block_out_channels=None, norm_eps=1e-5, attention_head_dim=None, flip_sin_to_cos=True,
                freq_shift=0, downsample_padding=1, mid_attention=True, num_classes=None)


def test_extended_config_rebuilds_from_json():
    model = randomize(UNet(**EXTENDED))
    config = json.loads(json.dumps(model.config))
    assert config["block_out_channels"] == [32, 48] and config["ch"] == 32 and config["ch_mult"] is None
    rebuilt = UNet(**config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t), model(x, t))
    # Attention at both levels (two heads of 16 at 16x16, three at 8x8), none in the middle.
    attns = [m for m in model.modules() if isinstance(m, AttnBlock)]
    assert sorted(m.num_heads for m in attns) == [2] * 3 + [3] * 3
    assert isinstance(model.mid[1], torch.nn.Identity)
    norms = [m for m in model.modules() if isinstance(m, (GroupNormSiLU, torch.nn.GroupNorm))]
    assert norms and all(m.eps == 1e-6 for m in norms)


def test_old_configs_without_the_new_keys_build_the_same_network():
    # The model config as `ddpm-fast train` wrote it before these keys existed.
    old = dict(in_channels=1, image_size=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
               dropout=0.0, num_groups=8, out_channels=1)
    model = UNet(**old)
    assert {key: model.config[key] for key in NEW_KEYS} == NEW_KEYS
    assert model.config == {**old, **NEW_KEYS, "fused": True, "backend": "auto"}
    assert model.state_dict().keys() == UNet.from_preset("digits").state_dict().keys()


def test_block_out_channels_is_ch_times_ch_mult():
    by_mult = randomize(UNet.from_preset("tiny"))
    by_widths = UNet(**{**UNet.PRESETS["tiny"], "ch": None, "ch_mult": None, "block_out_channels": [32, 64]})
    by_widths.load_state_dict(by_mult.state_dict())
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(by_widths(x, t), by_mult(x, t))
    assert UNet().config["ch"] == 128 and UNet().config["ch_mult"] == [1, 2, 2, 2]


@pytest.mark.parametrize("overrides, error, match", [
    (dict(block_out_channels=[32, 48], ch_mult=[1, 2]), ValueError, "ch_mult or block_out_channels, not both"),
    (dict(block_out_channels=[32, 40]), ValueError, r"divisible by num_groups=32, .*channels \[40\]"),
    (dict(block_out_channels=[]), TypeError, "block_out_channels must be a non-empty list"),
    (dict(block_out_channels=[32, 0]), ValueError, r"block_out_channels\[1\] must be an int >= 1, got 0"),
    (dict(ch_mult=[1, 2.0]), TypeError, r"ch_mult\[1\] must be an int"),
    (dict(attn_resolutions=16), TypeError, "attn_resolutions must be a list"),
    (dict(norm_eps=0.0), ValueError, "norm_eps must be a finite number > 0, got 0"),
    (dict(norm_eps="1e-6"), TypeError, "norm_eps must be a number"),
    (dict(attention_head_dim=12), ValueError, r"attention_head_dim must divide .* \[64\], got 12"),
    (dict(attention_head_dim=0), ValueError, "attention_head_dim must be an int >= 1"),
    (dict(flip_sin_to_cos=1), TypeError, "flip_sin_to_cos must be True or False"),
    (dict(freq_shift=16), ValueError, r"freq_shift must be less than ch // 2 = 16, got 16"),
    (dict(freq_shift=None), TypeError, "freq_shift must be a number"),
    (dict(downsample_padding=2), ValueError, r"downsample_padding must be an int in \[0, 1\], got 2"),
    (dict(mid_attention="yes"), TypeError, "mid_attention must be True or False"),
    (dict(num_res_blocks=0), ValueError, "num_res_blocks must be an int >= 1"),
    (dict(dropout=1.0), ValueError, "dropout must be a finite number in \\[0, 1\\), got 1"),
])
def test_bad_extended_arguments(overrides, error, match):
    widths = {"ch": None, "ch_mult": None} if "block_out_channels" in overrides else {}
    with pytest.raises(error, match=match):
        UNet(**{**UNet.PRESETS["tiny"], **widths, **overrides})


def test_multi_head_attention_is_per_head_softmax_attention():
    block = randomize(AttnBlock(64, num_groups=8, eps=1e-6, head_dim=16)).double()
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    q, k, v = block.qkv(block.norm(x)).flatten(2).chunk(3, dim=1)  # [B, C, HW] each
    heads = []
    for h in range(4):
        qh, kh, vh = (part[:, 16 * h:16 * (h + 1)] for part in (q, k, v))  # [B, 16, HW]
        weights = torch.softmax(qh.transpose(1, 2) @ kh / 16**0.5, dim=-1)  # [B, HW, HW]
        heads.append(vh @ weights.transpose(1, 2))
    expected = x + block.proj_out(torch.cat(heads, dim=1).reshape(x.shape))
    torch.testing.assert_close(block(x), expected)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(block(x_cl), expected)


def test_tf_style_downsample_pads_bottom_and_right():
    model = UNet(**EXTENDED)
    conv = model.down[0].downsample.conv
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
        assert torch.equal(model.down[0].downsample(x), expected)
        assert model.down[0].downsample(x).shape == (1, 32, 8, 8)


def test_set_backend_reaches_every_group_norm_silu():
    model = UNet.from_preset("tiny", backend="torch")
    model.set_backend("cpu")
    norms = [m for m in model.modules() if isinstance(m, GroupNormSiLU)]
    assert norms and all(m.backend == "cpu" for m in norms)
    assert model.config["backend"] == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("gpu")


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 6)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)


def test_timestep_embedding_tf_variant():
    # The TF DDPM code's: sines first, frequencies 10000 ** (-i / (half - 1)); odd dims end in a zero.
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 7, flip_sin_to_cos=False, freq_shift=1)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 2), 10000 ** (-2 / 2)])
    args = t[:, None] * freqs
    expected = torch.cat([torch.sin(args), torch.cos(args), torch.zeros(3, 1)], dim=1)
    torch.testing.assert_close(emb, expected)


# ----------------------------------------------------------------------------- numerics


def assert_close_to_float64(model, unfused, x, t, grad_out):
    """``model`` (float32, fused) against the same weights in float64: output, grad x and every
    parameter gradient at most twice as far from float64 as the eager float32 network (plus a
    floor of float32 rounding at the value's scale). Returns the errors relative to that scale."""
    reference = copy.deepcopy(unfused).double()
    y_ref, gx_ref, gp_ref = forward_backward(reference, x.double(), t, grad_out.double())
    y_u, gx_u, gp_u = forward_backward(unfused, x.contiguous(), t, grad_out.contiguous())
    y_f, gx_f, gp_f = forward_backward(model, x, t, grad_out)
    assert y_f.shape == x.shape and y_ref.abs().max() > 0.1

    def check(name, fused_value, eager_value, ref, scale):
        err_f, err_u = max_err(fused_value, ref), max_err(eager_value, ref)
        assert err_f <= 2 * err_u + 1e-6 * scale, f"{name}: fused error {err_f:.3g}, eager error {err_u:.3g}"
        return err_f / scale

    errors = {"output": check("output", y_f, y_u, y_ref, y_ref.abs().max().item()),
              "grad x": check("grad x", gx_f, gx_u, gx_ref, gx_ref.abs().max().item())}
    # Parameter gradients are measured at the scale of the largest one: with one channel per
    # group (32 channels, 32 groups) a bias before a GroupNorm has a gradient of exactly zero,
    # and the float32 rounding noise it gets is at the scale of its neighbours' gradients.
    scale = max(g.abs().max().item() for g in gp_ref.values())
    for name in gp_ref:
        errors[name] = check(f"grad {name}", gp_f[name], gp_u[name], gp_ref[name], scale)
    return errors


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fused_matches_unfused_forward_backward(backend):
    fused, unfused = tiny_pair(backend)
    x, t = inputs()
    grad_out = torch.randn(TINY_SHAPE, generator=torch.Generator().manual_seed(2))
    assert_close_to_float64(fused, unfused, x, t, grad_out)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_channels_last_gives_the_same_output(backend):
    fused, unfused = tiny_pair(backend)
    fused = fused.to(memory_format=torch.channels_last)
    x, t = inputs()
    x = x.to(memory_format=torch.channels_last)
    grad_out = torch.randn(TINY_SHAPE, generator=torch.Generator().manual_seed(2))
    grad_out = grad_out.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert fused(x, t).is_contiguous(memory_format=torch.channels_last)
    assert_close_to_float64(fused, unfused, x, t, grad_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_close_to_float64(dtype):
    fused, unfused = tiny_pair("auto")
    reference = UNet.from_preset("tiny", fused=False).double()
    reference.load_state_dict(fused.state_dict())
    x, t = inputs()
    with torch.no_grad():
        y_ref = reference(x.double(), t)
        with torch.autocast("cpu", dtype=dtype):
            y_f = fused(x, t)
            y_u = unfused(x, t)
    assert y_f.dtype == dtype and torch.isfinite(y_f).all()
    err_f, err_u = max_err(y_f.double(), y_ref), max_err(y_u.double(), y_ref)
    # Normalisation statistics stay in float32, so the fused network is no worse than eager
    # autocast, and the error is at the scale of the low-precision rounding.
    assert err_f <= 2 * err_u + 1e-3 * y_ref.abs().max().item(), (err_f, err_u)
    assert err_f <= 0.05 * y_ref.abs().max().item()


def test_training_step_under_bfloat16_autocast():
    model, _ = tiny_pair("auto")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, t = inputs()
    noise = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = model(x, t)
        loss = F.mse_loss(prediction.float(), noise)
    assert prediction.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_output_depends_on_timestep_and_dropout_in_train_mode():
    model, _ = tiny_pair("auto", dropout=0.1)
    x, t = inputs()
    model.eval()
    with torch.no_grad():
        y = model(x, t)
        assert not torch.allclose(y, model(x, (t + 500) % 1000))
        assert torch.equal(y, model(x, t))  # eval: dropout off, deterministic
        model.train()
        assert not torch.equal(y, model(x, t))


def test_digits_preset_forward():
    model = randomize(UNet.from_preset("digits"))
    x = torch.randn(4, 1, 8, 8)
    y = model(x, torch.randint(0, 1000, (4,)))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_fresh_model_starts_at_zero_output():
    # The last convolution is zero-initialised, as in the reference implementation.
    model = UNet.from_preset("tiny")
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t), torch.zeros_like(x))


# ----------------------------------------------------------------------------- SimpleUNet


def test_simple_unet_forward():
    model = SimpleUNet(in_channels=3, model_channels=32)
    x, t = inputs()
    y = model(x, t)
    assert y.shape == x.shape and torch.isfinite(y).all()
    emb = model.timestep_embedding(t)
    assert emb.shape == (2, 128)
    torch.testing.assert_close(emb, timestep_embedding(t, 128))
    y.sum().backward()
    assert model.input_blocks[0].weight.grad is not None


# ----------------------------------------------------------------------------- classes


def test_class_conditional_unet_adds_one_embedding_row_per_class_and_the_null_row():
    torch.manual_seed(0)
    plain = UNet.from_preset("digits")
    torch.manual_seed(0)
    model = UNet.from_preset("digits", num_classes=10)
    assert model.num_classes == 10 and model.null_class == 10 and plain.num_classes is plain.null_class is None
    assert model.class_embed.weight.shape == (11, 4 * model.ch)
    # The same network plus class_embed, starting from the same weights at the same seed.
    ours, theirs = model.state_dict(), plain.state_dict()
    assert set(ours) - set(theirs) == {"class_embed.weight"}
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    assert UNet(**model.config).state_dict().keys() == ours.keys()
    assert model.config["num_classes"] == 10 and json.loads(json.dumps(model.config)) == model.config


def test_labels_select_the_class_row_and_none_is_the_null_class():
    model = randomize(UNet.from_preset("digits", num_classes=3))
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        null = model(x, t)
        assert torch.equal(null, model(x, t, y=torch.full((4,), 3)))
        for label in range(3):
            assert not torch.allclose(model(x, t, y=torch.full((4,), label)), null)
        # Each sample uses its own label: a mixed batch is the samples of single-label batches.
        y = torch.tensor([0, 2, 3, 1])
        mixed = model(x, t, y=y)
        for i in range(4):
            torch.testing.assert_close(mixed[i:i + 1], model(x[i:i + 1], t[i:i + 1], y=y[i:i + 1]))
        # The class row is added to the timestep embedding after its MLP, before the SiLU.
        with torch.no_grad():
            model.class_embed.weight[1] = model.class_embed.weight[3]
        torch.testing.assert_close(model(x, t, y=torch.ones(4, dtype=torch.long)), null, rtol=0, atol=0)
    assert model(x, t, y=torch.tensor([0, 1, 2, 3], dtype=torch.int32)).shape == x.shape  # any integer dtype


@pytest.mark.parametrize("y, error, match", [
    (torch.tensor([0, 1, 2, 4]), ValueError, r"y must be an integer tensor .* in \[0, 3\] .*got values from 0 to 4"),
    (torch.tensor([-1, 0, 0, 0]), ValueError, r"in \[0, 3\] .*got values from -1 to 0"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "y must be an integer tensor .*got dtype torch.float32"),
    (torch.tensor([True, False, True, False]), TypeError, "y must be an integer tensor .*got dtype torch.bool"),
    (torch.tensor([0, 1]), ValueError, r"y must be .*of shape \[batch\] = \[4\] .*got shape \[2\]"),
    (torch.zeros(4, 1, dtype=torch.long), ValueError, r"got shape \[4, 1\]"),
    ([0, 1, 2, 3], TypeError, r"y must be an integer tensor .*got \[0, 1, 2, 3\] \(list\)"),
    (torch.zeros(4, dtype=torch.long, device="meta"), ValueError, "y must be on the device of the input"),
])
def test_bad_labels_name_y(y, error, match):
    model = UNet.from_preset("digits", num_classes=3)
    with pytest.raises(error, match=match):
        model(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), y=y)


def test_labels_for_an_unconditional_unet_are_refused():
    with pytest.raises(ValueError, match="y was given .* but this UNet has no classes"):
        UNet.from_preset("digits")(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), y=torch.zeros(2))
    for bad in (0, -3, 2.5, True):
        with pytest.raises((TypeError, ValueError), match="num_classes must be an int"):
            UNet.from_preset("digits", num_classes=bad)
