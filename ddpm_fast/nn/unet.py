"""The DDPM UNet of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", appendix B).

A PyTorch port of the reference TF model (diffusion_tf/models/unet.py): a sinusoidal timestep
embedding through a two-layer MLP, ResBlocks with the embedding added after their first
convolution, self-attention at the resolutions listed in ``attn_resolutions`` and in the middle,
channel multipliers per resolution and dropout. Every GroupNorm-then-SiLU pair is one
:class:`GroupNormSiLU` (the fused kernel); ``fused=False`` builds the same network with
``nn.GroupNorm`` + SiLU and the same state_dict, so both can be compared weight for weight.

Differences from the TF code that change no parameter: the downsampling convolution pads
symmetrically (as improved-diffusion does) and the attention's q, k, v are one 1x1 convolution.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from .group_norm_silu import GroupNormSiLU

NUM_GROUPS = 32  # GroupNorm groups, as in the paper (the default of UNet(num_groups=...))


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [B, dim] of timesteps t [B] (improved-diffusion's formula), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNormThenSiLU(nn.GroupNorm):
    """The unfused pair: nn.GroupNorm then SiLU, with nn.GroupNorm's (and GroupNormSiLU's) state_dict."""

    def forward(self, x):
        return F.silu(super().forward(x))


def norm_silu(channels, fused, backend, num_groups=NUM_GROUPS):
    if fused:
        return GroupNormSiLU(num_groups, channels, backend=backend)
    return GroupNormThenSiLU(num_groups, channels)


class ResBlock(nn.Module):
    """x + conv(dropout(norm_silu(conv(norm_silu(x)) + temb_proj(emb)))), with a 1x1 shortcut if channels change."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout, fused, backend, num_groups=NUM_GROUPS):
        super().__init__()
        self.norm1 = norm_silu(in_ch, fused, backend, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = norm_silu(out_ch, fused, backend, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        # emb has had its SiLU applied already (once for all blocks).
        h = self.conv1(self.norm1(x))
        h = h + self.temb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, channels, num_groups=NUM_GROUPS):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels)  # no SiLU here: a plain GroupNorm
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))
        # [B, C, H, W] -> [B, HW, C]: a view for channels_last input, no copy.
        q, k, v = (part.flatten(2).transpose(1, 2) for part in qkv.split(C, dim=1))
        # The fused attention kernels keep the softmax in float32 for fp16/bf16 inputs.
        h = F.scaled_dot_product_attention(q, k, v)  # scale C ** -0.5, as in the paper
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The DDPM noise-prediction network: ``model(x, t)`` returns a tensor of x's shape.

    x: [B, in_channels, H, W] with H and W divisible by 2 ** (len(ch_mult) - 1); t: [B]
    timesteps (int64, not normalised). Attention is placed where the feature map of an
    ``image_size`` input has a side in ``attn_resolutions``.
    """

    PRESETS = {
        # Ho et al. 2020, CIFAR-10: 35,746,307 parameters.
        "cifar10": dict(in_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                        attn_resolutions=(16,), dropout=0.1),
        # A few hundred thousand parameters: CPU tests and demos.
        "tiny": dict(in_channels=3, image_size=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(16,), dropout=0.0),
        # sklearn's 8x8 digits: the model shipped in the package.
        # 8 groups: with 32 groups of one channel each, GroupNorm would cancel the time embedding.
        "digits": dict(in_channels=1, image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,), dropout=0.0, num_groups=8),
    }

    def __init__(self, in_channels=3, out_channels=None, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, image_size=32, fused=True, backend="auto",
                 num_groups=NUM_GROUPS):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        out_channels = in_channels if out_channels is None else out_channels
        self._check_config(in_channels, out_channels, ch, ch_mult, num_res_blocks, dropout, image_size, num_groups)
        backends.check_name(backend)
        self._config = dict(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=list(ch_mult),
                            num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                            dropout=dropout, image_size=image_size, fused=bool(fused), backend=backend,
                            num_groups=num_groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_levels = len(ch_mult)
        temb_ch = 4 * ch

        def res_block(cin, cout):
            return ResBlock(cin, cout, temb_ch, dropout, fused, backend, num_groups)

        # Timestep MLP; the SiLU every ResBlock applies to the embedding is done once, at its end.
        self.time_embed = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch), nn.SiLU())
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Downsampling path; skip_chs records the channels of every saved skip connection.
        self.down = nn.ModuleList()
        skip_chs, cur, resolution = [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.blocks.append(res_block(cur, ch * mult))
                cur = ch * mult
                stage.attns.append(AttnBlock(cur, num_groups) if resolution in attn_resolutions else nn.Identity())
                skip_chs.append(cur)
            if level != self.num_levels - 1:
                stage.downsample = Downsample(cur)
                skip_chs.append(cur)
                resolution //= 2
            self.down.append(stage)

        self.mid = nn.ModuleList([res_block(cur, cur), AttnBlock(cur, num_groups), res_block(cur, cur)])

        # Upsampling path: one more block per level than going down, each taking a skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.blocks.append(res_block(cur + skip_chs.pop(), ch * mult))
                cur = ch * mult
                stage.attns.append(AttnBlock(cur, num_groups) if resolution in attn_resolutions else nn.Identity())
            if level != 0:
                stage.upsample = Upsample(cur)
                resolution *= 2
            self.up.append(stage)

        self.norm_out = norm_silu(cur, fused, backend, num_groups)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        self._init_weights()

    @staticmethod
    def _check_config(in_channels, out_channels, ch, ch_mult, num_res_blocks, dropout, image_size, num_groups):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("ch", ch),
                            ("image_size", image_size), ("num_groups", num_groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_res_blocks, int) or num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be a positive int, got {num_res_blocks!r}")
        if not ch_mult or not all(isinstance(m, int) and m >= 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
        bad = [ch * m for m in ch_mult if (ch * m) % num_groups]
        if bad:
            raise ValueError(f"every ch * ch_mult must be divisible by num_groups={num_groups}, "
                             f"got ch={ch}, ch_mult={ch_mult} (channels {bad})")
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size must be divisible by 2 ** (len(ch_mult) - 1) = {factor}, got {image_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")

    def _init_weights(self):
        # As the TF reference: Glorot-uniform weights, zero biases, and zero for the last layer
        # of every residual branch and of the network, so each block starts as the identity.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.conv2.weight)
            elif isinstance(module, AttnBlock):
                nn.init.zeros_(module.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)

    @classmethod
    def from_preset(cls, name, fused=True, **overrides):
        """The network of preset ``name`` (see ``UNet.PRESETS``), with constructor overrides."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; presets are: {', '.join(sorted(cls.PRESETS))}")
        return cls(**{**cls.PRESETS[name], "fused": fused, **overrides})

    @property
    def config(self):
        """The constructor arguments as a JSON-able dict: ``UNet(**model.config)`` rebuilds the network."""
        return {key: list(value) if isinstance(value, list) else value for key, value in self._config.items()}

    def set_backend(self, name):
        """Sets the backend of every fused GroupNormSiLU (no effect on an unfused network's math)."""
        backends.check_name(name)
        for module in self.modules():
            if isinstance(module, GroupNormSiLU):
                module.backend = name
        self._config["backend"] = name
        return self

    def _check_input(self, x, t):
        if not isinstance(x, torch.Tensor) or not isinstance(t, torch.Tensor):
            raise TypeError(f"x and t must be torch.Tensors, got {type(x).__name__} and {type(t).__name__}")
        factor = 2 ** (self.num_levels - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [batch, {self.in_channels}, height, width], got {list(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x's height and width must be divisible by 2 ** (len(ch_mult) - 1) = {factor}, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [batch] = [{x.shape[0]}], got {list(t.shape)}")
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"t must be a tensor of timesteps (int64), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"t must be on x's device ({x.device}), got {t.device}")

    def forward(self, x, t):
        self._check_input(x, t)
        emb = timestep_embedding(t, self.time_embed[0].in_features)
        emb = self.time_embed(emb.to(self.time_embed[0].weight.dtype))

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(h, emb))
                skips.append(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
                skips.append(h)

        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)

        for stage in self.up:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)

        return self.conv_out(self.norm_out(h))
