"""The DDPM UNet of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", appendix B).

A PyTorch port of the reference TF model (diffusion_tf/models/unet.py): a sinusoidal timestep
embedding through a two-layer MLP, ResBlocks with the embedding added after their first
convolution, self-attention at the resolutions listed in ``attn_resolutions`` and in the middle,
channel multipliers per resolution and dropout. Every GroupNorm-then-SiLU pair is one
:class:`GroupNormSiLU` (the fused kernel); ``fused=False`` builds the same network with
``nn.GroupNorm`` + SiLU and the same state_dict, so both can be compared weight for weight.

Differences from the TF code that change no parameter, by default: the downsampling convolution
pads symmetrically (as improved-diffusion does; ``downsample_padding=0`` gives TF's padding), the
timestep embedding puts the cosines first with frequencies 10000 ** (-i / half) (improved-
diffusion's; ``flip_sin_to_cos=False, freq_shift=1`` gives TF's) and the attention's q, k, v are
one 1x1 convolution. With those options the whole family of diffusers' DDPM ``UNet2DModel`` is
expressible (see :mod:`ddpm_fast.interop.diffusers`): any widths per level
(``block_out_channels``), GroupNorm epsilon, several attention heads, the middle block with or
without attention.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..validation import check_bool, check_class_labels, check_int, check_number, describe
from .group_norm_silu import GroupNormSiLU

NUM_GROUPS = 32  # GroupNorm groups, as in the paper (the default of UNet(num_groups=...))
NORM_EPS = 1e-5  # GroupNorm epsilon (nn.GroupNorm's; the TF code and diffusers' DDPM models use 1e-6)
DEFAULT_CH, DEFAULT_CH_MULT = 128, (1, 2, 2, 2)


def timestep_embedding(t, dim, max_period=10000, flip_sin_to_cos=True, freq_shift=0):
    """Sinusoidal embedding [B, dim] of timesteps t [B], float32.

    Frequencies exp(-ln(max_period) * i / (half - freq_shift)) for i < half = dim // 2; cosines
    first with ``flip_sin_to_cos`` (improved-diffusion's order, with freq_shift 0), sines first
    without (the TF DDPM code's, with freq_shift 1); an odd dim ends in a zero column. The same
    formula as diffusers' get_timestep_embedding.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    cos, sin = torch.cos(args), torch.sin(args)
    embedding = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNormThenSiLU(nn.GroupNorm):
    """The unfused pair: nn.GroupNorm then SiLU, with nn.GroupNorm's (and GroupNormSiLU's) state_dict."""

    def forward(self, x):
        return F.silu(super().forward(x))


def norm_silu(channels, fused, backend, num_groups=NUM_GROUPS, eps=NORM_EPS):
    if fused:
        return GroupNormSiLU(num_groups, channels, eps=eps, backend=backend)
    return GroupNormThenSiLU(num_groups, channels, eps=eps)


class ResBlock(nn.Module):
    """x + conv(dropout(norm_silu(conv(norm_silu(x)) + temb_proj(emb)))), with a 1x1 shortcut if channels change."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout, fused, backend, num_groups=NUM_GROUPS, eps=NORM_EPS):
        super().__init__()
        self.norm1 = norm_silu(in_ch, fused, backend, num_groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = norm_silu(out_ch, fused, backend, num_groups, eps)
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
    """Self-attention over all H*W positions, with a residual connection.

    One head by default (the paper's); ``head_dim`` splits the channels into heads of that many
    (channel c in head c // head_dim, as diffusers' Attention does).
    """

    def __init__(self, channels, num_groups=NUM_GROUPS, eps=NORM_EPS, head_dim=None):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)  # no SiLU here: a plain GroupNorm
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.num_heads = 1 if head_dim is None else channels // head_dim

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))
        # [B, C, H, W] -> [B, HW, C]: a view for channels_last input, no copy.
        q, k, v = (part.flatten(2).transpose(1, 2) for part in qkv.split(C, dim=1))
        if self.num_heads > 1:  # [B, HW, C] -> [B, heads, HW, C / heads], still views
            q, k, v = (part.unflatten(2, (self.num_heads, -1)).transpose(1, 2) for part in (q, k, v))
        # One head stays a 3-D call: SDPA's CPU kernels round 3-D and 4-D inputs differently, and
        # single-head models keep their exact outputs. The fused attention kernels keep the
        # softmax in float32 for fp16/bf16 inputs; the scale is (C / heads) ** -0.5.
        h = F.scaled_dot_product_attention(q, k, v)
        if self.num_heads > 1:
            h = h.transpose(1, 2).flatten(2)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3x3 convolution with stride 2. ``padding=1`` pads every side by one; ``padding=0`` pads one
    row and column at the bottom and right only (TF's "SAME" padding, as the original DDPM
    checkpoints were trained with; diffusers' downsample_padding=0)."""

    def __init__(self, channels, padding=1):
        super().__init__()
        self.pad_bottom_right = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.pad_bottom_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _int_list(name, value, allow_empty=False):
    """A list or tuple of positive ints, returned as a list (JSON-able, for the config)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not (value or allow_empty):
        raise TypeError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of positive ints, "
                        f"got {describe(value)}")
    return [check_int(f"{name}[{i}]", item, minimum=1) for i, item in enumerate(value)]


class UNet(nn.Module):
    """The DDPM noise-prediction network: ``model(x, t)`` returns a tensor of x's shape.

    x: [B, in_channels, H, W] with H and W divisible by 2 ** (levels - 1); t: [B] timesteps
    (int64, not normalised). Attention is placed where the feature map of an ``image_size``
    input has a side in ``attn_resolutions``.

    Level widths are ``ch * ch_mult`` (ch_mult defaults to (1, 2, 2, 2)), or any list given as
    ``block_out_channels`` (then ``ch``, the width of the input convolution and the base of the
    4 * ch timestep embedding, defaults to its first entry). ``num_res_blocks`` ResBlocks per
    level going down, one more going up. ``num_groups`` and ``norm_eps`` set every GroupNorm;
    ``attention_head_dim`` splits attention into heads of that many channels (None: one head);
    ``flip_sin_to_cos`` and ``freq_shift`` choose the timestep embedding's variant (see
    :func:`timestep_embedding`); ``downsample_padding`` 1 pads the strided convolutions
    symmetrically, 0 as TF does; ``mid_attention`` puts attention between the two middle
    ResBlocks. ``fused`` and ``backend`` choose how GroupNorm + SiLU runs, not the network.

    Class conditioning: ``num_classes=K`` adds ``class_embed``, an ``nn.Embedding(K + 1, 4 * ch)``
    whose row for the label is added to the timestep embedding after its MLP (before the SiLU
    the ResBlocks apply; where diffusers' ``UNet2DModel`` with ``num_class_embeds=K + 1`` adds
    ``class_embedding``). Labels 0 .. K - 1 are the classes; row ``K`` (``model.null_class``) is
    the null label, the unconditional model of classifier-free guidance. Such a model is called
    ``model(x, t, y=labels)``; ``y=None`` means the null label for every sample.
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

    def __init__(self, in_channels=3, out_channels=None, ch=None, ch_mult=None, num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, image_size=32, fused=True, backend="auto",
                 num_groups=NUM_GROUPS, *, block_out_channels=None, norm_eps=NORM_EPS, attention_head_dim=None,
                 flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_attention=True, num_classes=None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        ch, ch_mult, block_out_channels, widths = self._resolve_widths(ch, ch_mult, block_out_channels)
        levels_name = "block_out_channels" if ch_mult is None else "ch_mult"  # for messages
        attn_resolutions = _int_list("attn_resolutions", attn_resolutions, allow_empty=True)
        self._check_config(in_channels, out_channels, ch, widths, num_res_blocks, dropout, image_size, num_groups,
                           norm_eps, flip_sin_to_cos, freq_shift, downsample_padding, mid_attention, levels_name)
        backends.check_name(backend)
        if num_classes is not None:
            check_int("num_classes", num_classes, minimum=1)
        # Levels with attention: where an image_size input's feature map has a side in attn_resolutions.
        attn_levels = tuple(level for level in range(len(widths)) if image_size // 2 ** level in attn_resolutions)
        if attention_head_dim is not None:
            check_int("attention_head_dim", attention_head_dim, minimum=1)
            attn_channels = sorted({widths[level] for level in attn_levels}
                                   | ({widths[-1]} if mid_attention else set()))
            if any(c % attention_head_dim for c in attn_channels):
                raise ValueError(f"attention_head_dim must divide the channels of every attention block "
                                 f"{attn_channels}, got {attention_head_dim}")
        self._config = dict(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=ch_mult,
                            num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                            dropout=dropout, image_size=image_size, fused=bool(fused), backend=backend,
                            num_groups=num_groups, block_out_channels=block_out_channels, norm_eps=norm_eps,
                            attention_head_dim=attention_head_dim, flip_sin_to_cos=flip_sin_to_cos,
                            freq_shift=freq_shift, downsample_padding=downsample_padding,
                            mid_attention=mid_attention, num_classes=num_classes)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.ch, self.block_out_channels = ch, tuple(widths)
        self.num_levels, self.attn_levels, self._levels_name = len(widths), attn_levels, levels_name
        self.flip_sin_to_cos, self.freq_shift = flip_sin_to_cos, freq_shift
        temb_ch = 4 * ch

        def res_block(cin, cout):
            return ResBlock(cin, cout, temb_ch, dropout, fused, backend, num_groups, norm_eps)

        def attn_block(channels):
            return AttnBlock(channels, num_groups, norm_eps, attention_head_dim)

        # Timestep MLP; the SiLU every ResBlock applies to the embedding is done once, at its end.
        self.time_embed = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch), nn.SiLU())
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Downsampling path; skip_chs records the channels of every saved skip connection.
        self.down = nn.ModuleList()
        skip_chs, cur = [ch], ch
        for level, width in enumerate(widths):
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.blocks.append(res_block(cur, width))
                cur = width
                stage.attns.append(attn_block(cur) if level in self.attn_levels else nn.Identity())
                skip_chs.append(cur)
            if level != self.num_levels - 1:
                stage.downsample = Downsample(cur, downsample_padding)
                skip_chs.append(cur)
            self.down.append(stage)

        self.mid = nn.ModuleList([res_block(cur, cur), attn_block(cur) if mid_attention else nn.Identity(),
                                  res_block(cur, cur)])

        # Upsampling path: one more block per level than going down, each taking a skip connection.
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.blocks.append(res_block(cur + skip_chs.pop(), width))
                cur = width
                stage.attns.append(attn_block(cur) if level in self.attn_levels else nn.Identity())
            if level != 0:
                stage.upsample = Upsample(cur)
            self.up.append(stage)

        self.norm_out = norm_silu(cur, fused, backend, num_groups, norm_eps)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        self._init_weights()

        # Classes: K rows and the null row K. Built last, so that the rest of a conditional network
        # starts from the weights of the unconditional one at the same seed; N(0, 1) rows, as
        # nn.Embedding (and diffusers' class_embedding) start.
        self.num_classes = num_classes
        self.null_class = num_classes  # the index of the null (unconditional) label; None without classes
        if num_classes is not None:
            self.class_embed = nn.Embedding(num_classes + 1, temb_ch)

    @staticmethod
    def _resolve_widths(ch, ch_mult, block_out_channels):
        """(ch, ch_mult, block_out_channels, level widths): widths from ch * ch_mult, or given."""
        if block_out_channels is None:
            ch = DEFAULT_CH if ch is None else check_int("ch", ch, minimum=1)
            ch_mult = _int_list("ch_mult", DEFAULT_CH_MULT if ch_mult is None else ch_mult)
            return ch, ch_mult, None, [ch * mult for mult in ch_mult]
        if ch_mult is not None:
            raise ValueError(f"give ch_mult or block_out_channels, not both; got ch_mult={describe(ch_mult)} "
                             f"and block_out_channels={describe(block_out_channels)}")
        block_out_channels = _int_list("block_out_channels", block_out_channels)
        ch = block_out_channels[0] if ch is None else check_int("ch", ch, minimum=1)
        return ch, None, block_out_channels, list(block_out_channels)

    @staticmethod
    def _check_config(in_channels, out_channels, ch, widths, num_res_blocks, dropout, image_size, num_groups,
                      norm_eps, flip_sin_to_cos, freq_shift, downsample_padding, mid_attention, levels_name):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("image_size", image_size), ("num_groups", num_groups),
                            ("num_res_blocks", num_res_blocks)):
            check_int(name, value, minimum=1)
        bad = [c for c in [ch] + widths if c % num_groups]
        if bad:
            raise ValueError(f"ch and every level's width ({levels_name}) must be divisible by num_groups="
                             f"{num_groups}, got ch={ch}, widths {widths} (channels {bad})")
        factor = 2 ** (len(widths) - 1)
        if image_size % factor:
            raise ValueError(f"image_size must be divisible by 2 ** (len({levels_name}) - 1) = {factor}, "
                             f"got {image_size}")
        check_number("dropout", dropout, 0.0, 1.0, open_max=True)
        check_number("norm_eps", norm_eps, 0.0, open_min=True)
        check_bool("flip_sin_to_cos", flip_sin_to_cos)
        check_number("freq_shift", freq_shift)
        if ch // 2 and ch // 2 - freq_shift <= 0:  # the embedding divides by (ch // 2 - freq_shift)
            raise ValueError(f"freq_shift must be less than ch // 2 = {ch // 2}, got {freq_shift}")
        check_int("downsample_padding", downsample_padding, minimum=0, maximum=1)
        check_bool("mid_attention", mid_attention)

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
            raise ValueError(f"x's height and width must be divisible by 2 ** (len({self._levels_name}) - 1) = "
                             f"{factor}, got {x.shape[2]}x{x.shape[3]}")
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [batch] = [{x.shape[0]}], got {list(t.shape)}")
        if t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"t must be a tensor of timesteps (int64), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"t must be on x's device ({x.device}), got {t.device}")

    def _labels(self, y, x):
        """The class labels of a batch: y checked, or the null label for every sample when y is None."""
        if self.num_classes is None:
            if y is not None:
                raise ValueError(f"y was given ({describe(y)}) but this UNet has no classes (it was built "
                                 f"without num_classes); call model(x, t), or build UNet(..., num_classes=K)")
            return None
        if y is None:
            return torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        return check_class_labels(y, x.shape[0], self.num_classes, x.device)

    def forward(self, x, t, y=None):
        """The prediction for x at timesteps t; y: class labels [B] in [0, num_classes] (num_classes:
        the null label), or None (the null label) for a class-conditional model; None otherwise."""
        self._check_input(x, t)
        y = self._labels(y, x)
        emb = timestep_embedding(t, self.time_embed[0].in_features, flip_sin_to_cos=self.flip_sin_to_cos,
                                 freq_shift=self.freq_shift)
        emb = self.time_embed[:3](emb.to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.class_embed(y).to(emb.dtype)
        emb = self.time_embed[3](emb)

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
