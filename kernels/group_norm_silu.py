"""Fused GroupNorm + SiLU in Triton, forward and backward.

    z = gamma * (x - mean_g) * rstd_g + beta,    y = silu(z) = z * sigmoid(z)

x is viewed as [N, C, S] (S = product of the spatial sizes) through three strides, so NCHW and
channels_last inputs are both read in place. One program owns GPP consecutive groups of one
sample: a [BLOCK_S, BLOCK_C] tile spans spatial positions by the channels of those groups.
With channels_last several groups per program make each spatial row a contiguous run of
memory; with NCHW one group is already contiguous, so GPP = 1.

Two paths, chosen by the launcher:

* one tile (the group fits on chip, the usual UNet case): x is read once and y written once;
  mean and variance come from the tile in registers, the variance from (x - mean).
* chunked (large groups): a first sweep merges per-tile (count, mean, M2) with Chan's
  parallel Welford update, a second sweep writes y. The backward likewise takes one sweep
  for the group sums and a second for grad_x.

Backward (xhat and z recomputed from x, mean, rstd; s = sigmoid(z)):

    g       = grad_y * s * (1 + z * (1 - s))                       (d silu / dz)
    grad_x  = rstd * (gamma*g - mean_g(gamma*g) - xhat * mean_g(gamma*g*xhat))
    grad_gamma[c] = sum_{n,s} g * xhat,   grad_beta[c] = sum_{n,s} g

The per-(n, c) sums of g and g*xhat give both the group means (weighted by gamma) and the
parameter gradients: the kernel writes them to an [N, C] float32 buffer and torch sums it
over n, a fixed-order reduction, so the result has the same bits on every run (no atomics).
"""

import math

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements of one tensor a program keeps on chip in the one-tile path (16 warps: 32 fp32
# registers per thread per tensor).
_MAX_TILE = 16384
# The backward keeps x, dy and what it computes from them live across its reductions: on 16
# warps, 16384 fp32 elements need more than the 128 registers per thread they allow, and even
# 8192 spill on sm_80 (ptxas holds them to 64 registers). So its tile is at most 8192 elements,
# on 32 warps above 4096 (42 to 58 registers, no spills, sm_80 and sm_90).
_MAX_TILE_BACKWARD = 8192
# Tile size of the chunked path, which streams a group through in several tiles.
_CHUNK_TILE = 4096
# channels_last: bytes of contiguous channels a program should read per spatial position.
_ROW_BYTES = 128
# ... but not at the cost of parallelism: on a GPU, keep at least this many programs per SM.
_MIN_PROGRAMS_PER_SM = 2

# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _silu_parts(z):
    """(silu(z), d silu / dz) from one sigmoid: s = sigmoid(z), silu' = s * (1 + z * (1 - s))."""
    s = 1.0 / (1.0 + tl.exp(-z))
    return z * s, s * (1.0 + z * (1.0 - s))


@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """float32 v in the output dtype, rounded to nearest even. bfloat16 is rounded by hand:
    the CPU interpreter's cast truncates, and this gives the GPU's rounding on both."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return v.to(dtype)


@triton.jit
def _tile(s0, c0, S, CSPAN, stride_s, stride_c, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets (from the program's first channel) and mask of the tile at (s0, c0)."""
    s = s0 + tl.arange(0, BLOCK_S)
    c = c0 + tl.arange(0, BLOCK_C)
    offsets = s[:, None] * stride_s + c[None, :] * stride_c
    mask = (s[:, None] < S) & (c[None, :] < CSPAN)
    return offsets, mask


@triton.jit
def _group_map(c0, CG, CSPAN, BLOCK_C: tl.constexpr, GPP_BLOCK: tl.constexpr):
    """[BLOCK_C, GPP_BLOCK] float one-hot: column c of the tile belongs to group j."""
    c = c0 + tl.arange(0, BLOCK_C)
    j = tl.arange(0, GPP_BLOCK)
    return (((c // CG)[:, None] == j[None, :]) & (c < CSPAN)[:, None]).to(tl.float32)


@triton.jit
def _to_groups(onehot, per_column):
    """Per-column values [BLOCK_C] summed into their groups [GPP_BLOCK]."""
    return tl.sum(onehot * per_column[:, None], axis=0)


@triton.jit
def _to_columns(onehot, per_group):
    """Per-group values [GPP_BLOCK] spread over the tile's columns [BLOCK_C]."""
    return tl.sum(onehot * per_group[None, :], axis=1)


@triton.jit
def _affine(w_ptr, b_ptr, c0, CSPAN, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """gamma and beta of the tile's columns in float32 (1 and 0 without weight / bias)."""
    c = c0 + tl.arange(0, BLOCK_C)
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + c, mask=c < CSPAN, other=0.0).to(tl.float32)
    else:
        gamma = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        beta = tl.load(b_ptr + c, mask=c < CSPAN, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros([BLOCK_C], tl.float32)
    return gamma, beta


# ----------------------------------------------------------------------------- forward


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    S, C, G, CG, CSPAN, BLOCKS_PER_SAMPLE, eps,
    sxn, sxc, sxs, syn, syc, sys,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_TILE: tl.constexpr,
    GPP: tl.constexpr, GPP_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    n = (pid // BLOCKS_PER_SAMPLE).to(tl.int64)
    first_c = (pid % BLOCKS_PER_SAMPLE) * CSPAN  # first channel of this program's groups
    x_ptr += n * sxn + first_c.to(tl.int64) * sxc
    y_ptr += n * syn + first_c.to(tl.int64) * syc
    w_ptr += first_c
    b_ptr += first_c
    j = tl.arange(0, GPP_BLOCK)
    stat_offsets = n * G + first_c // CG + j
    group_size = CG * S * 1.0  # elements per group, as float32

    if ONE_TILE:
        # The groups fit on chip: one read of x, statistics from (x - mean), one write of y.
        offsets, mask = _tile(0, 0, S, CSPAN, sxs, sxc, BLOCK_S, BLOCK_C)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        onehot = _group_map(0, CG, CSPAN, BLOCK_C, GPP_BLOCK)
        mean = _to_groups(onehot, tl.sum(x, axis=0)) / group_size
        centred = tl.where(mask, x - _to_columns(onehot, mean)[None, :], 0.0)
        var = _to_groups(onehot, tl.sum(centred * centred, axis=0)) / group_size
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        gamma, beta = _affine(w_ptr, b_ptr, 0, CSPAN, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
        scale = _to_columns(onehot, rstd) * gamma
        y, _ = _silu_parts(centred * scale[None, :] + beta[None, :])
        y_offsets, _ = _tile(0, 0, S, CSPAN, sys, syc, BLOCK_S, BLOCK_C)
        tl.store(y_ptr + y_offsets, _rounded(y, y_ptr.dtype.element_ty), mask=mask)
    else:
        # Sweep 1: per-tile count, mean and M2 (from the tile's own mean) merged with Chan's
        # update, so no E[x^2] - mean^2 cancellation however large the group.
        count = tl.zeros([GPP_BLOCK], tl.float32)
        mean = tl.zeros([GPP_BLOCK], tl.float32)
        m2 = tl.zeros([GPP_BLOCK], tl.float32)
        for c0 in range(0, CSPAN, BLOCK_C):
            onehot = _group_map(c0, CG, CSPAN, BLOCK_C, GPP_BLOCK)
            for s0 in range(0, S, BLOCK_S):
                offsets, mask = _tile(s0, c0, S, CSPAN, sxs, sxc, BLOCK_S, BLOCK_C)
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                tile_count = _to_groups(onehot, tl.sum(mask.to(tl.float32), axis=0))
                tile_mean = _to_groups(onehot, tl.sum(x, axis=0)) / tl.maximum(tile_count, 1.0)
                centred = tl.where(mask, x - _to_columns(onehot, tile_mean)[None, :], 0.0)
                tile_m2 = _to_groups(onehot, tl.sum(centred * centred, axis=0))
                new_count = count + tile_count
                weight = tile_count / tl.maximum(new_count, 1.0)
                delta = tile_mean - mean
                mean += delta * weight
                m2 += tile_m2 + delta * delta * count * weight
                count = new_count
        rstd = 1.0 / tl.sqrt_rn(m2 / group_size + eps)
        # Sweep 2: normalise, affine, SiLU.
        for c0 in range(0, CSPAN, BLOCK_C):
            onehot = _group_map(c0, CG, CSPAN, BLOCK_C, GPP_BLOCK)
            gamma, beta = _affine(w_ptr, b_ptr, c0, CSPAN, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
            mean_c = _to_columns(onehot, mean)
            scale = _to_columns(onehot, rstd) * gamma
            for s0 in range(0, S, BLOCK_S):
                offsets, mask = _tile(s0, c0, S, CSPAN, sxs, sxc, BLOCK_S, BLOCK_C)
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                y, _ = _silu_parts((x - mean_c[None, :]) * scale[None, :] + beta[None, :])
                y_offsets, _ = _tile(s0, c0, S, CSPAN, sys, syc, BLOCK_S, BLOCK_C)
                tl.store(y_ptr + y_offsets, _rounded(y, y_ptr.dtype.element_ty), mask=mask)

    tl.store(mean_ptr + stat_offsets, mean, mask=j < GPP)
    tl.store(rstd_ptr + stat_offsets, rstd, mask=j < GPP)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr,
    S, C, G, CG, CSPAN, BLOCKS_PER_SAMPLE,
    sdyn, sdyc, sdys, sxn, sxc, sxs, sdxn, sdxc, sdxs,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_TILE: tl.constexpr,
    GPP: tl.constexpr, GPP_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    n = (pid // BLOCKS_PER_SAMPLE).to(tl.int64)
    first_c = (pid % BLOCKS_PER_SAMPLE) * CSPAN
    dy_ptr += n * sdyn + first_c.to(tl.int64) * sdyc
    x_ptr += n * sxn + first_c.to(tl.int64) * sxc
    dx_ptr += n * sdxn + first_c.to(tl.int64) * sdxc
    w_ptr += first_c
    b_ptr += first_c
    dw_ptr += n * C + first_c  # per-(n, c) partial sums, [N, C] float32
    db_ptr += n * C + first_c
    j = tl.arange(0, GPP_BLOCK)
    mean = tl.load(mean_ptr + n * G + first_c // CG + j, mask=j < GPP, other=0.0)
    rstd = tl.load(rstd_ptr + n * G + first_c // CG + j, mask=j < GPP, other=0.0)
    group_size = CG * S * 1.0  # elements per group, as float32

    if ONE_TILE:
        offsets, mask = _tile(0, 0, S, CSPAN, sxs, sxc, BLOCK_S, BLOCK_C)
        dy_offsets, _ = _tile(0, 0, S, CSPAN, sdys, sdyc, BLOCK_S, BLOCK_C)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)
        onehot = _group_map(0, CG, CSPAN, BLOCK_C, GPP_BLOCK)
        gamma, beta = _affine(w_ptr, b_ptr, 0, CSPAN, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
        rstd_c = _to_columns(onehot, rstd)
        xhat = (x - _to_columns(onehot, mean)[None, :]) * rstd_c[None, :]
        _, dsilu = _silu_parts(xhat * gamma[None, :] + beta[None, :])
        g = tl.where(mask, dy * dsilu, 0.0)
        sum_g = tl.sum(g, axis=0)
        sum_gx = tl.sum(g * xhat, axis=0)
        c = tl.arange(0, BLOCK_C)
        if HAS_WEIGHT:
            tl.store(dw_ptr + c, sum_gx, mask=c < CSPAN)
        if HAS_BIAS:
            tl.store(db_ptr + c, sum_g, mask=c < CSPAN)
        mean_gg = _to_columns(onehot, _to_groups(onehot, gamma * sum_g) / group_size)
        mean_ggx = _to_columns(onehot, _to_groups(onehot, gamma * sum_gx) / group_size)
        dx = rstd_c[None, :] * (gamma[None, :] * g - mean_gg[None, :] - xhat * mean_ggx[None, :])
        dx_offsets, _ = _tile(0, 0, S, CSPAN, sdxs, sdxc, BLOCK_S, BLOCK_C)
        tl.store(dx_ptr + dx_offsets, _rounded(dx, dx_ptr.dtype.element_ty), mask=mask)
    else:
        # Sweep 1: per-channel sums of g and g*xhat (the parameter-gradient partials) and
        # their gamma-weighted group sums.
        group_gg = tl.zeros([GPP_BLOCK], tl.float32)
        group_ggx = tl.zeros([GPP_BLOCK], tl.float32)
        for c0 in range(0, CSPAN, BLOCK_C):
            onehot = _group_map(c0, CG, CSPAN, BLOCK_C, GPP_BLOCK)
            gamma, beta = _affine(w_ptr, b_ptr, c0, CSPAN, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
            mean_c = _to_columns(onehot, mean)
            rstd_c = _to_columns(onehot, rstd)
            sum_g = tl.zeros([BLOCK_C], tl.float32)
            sum_gx = tl.zeros([BLOCK_C], tl.float32)
            for s0 in range(0, S, BLOCK_S):
                offsets, mask = _tile(s0, c0, S, CSPAN, sxs, sxc, BLOCK_S, BLOCK_C)
                dy_offsets, _ = _tile(s0, c0, S, CSPAN, sdys, sdyc, BLOCK_S, BLOCK_C)
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean_c[None, :]) * rstd_c[None, :]
                _, dsilu = _silu_parts(xhat * gamma[None, :] + beta[None, :])
                g = tl.where(mask, dy * dsilu, 0.0)
                sum_g += tl.sum(g, axis=0)
                sum_gx += tl.sum(g * xhat, axis=0)
            c = c0 + tl.arange(0, BLOCK_C)
            if HAS_WEIGHT:
                tl.store(dw_ptr + c, sum_gx, mask=c < CSPAN)
            if HAS_BIAS:
                tl.store(db_ptr + c, sum_g, mask=c < CSPAN)
            group_gg += _to_groups(onehot, gamma * sum_g)
            group_ggx += _to_groups(onehot, gamma * sum_gx)
        # Sweep 2: grad_x.
        for c0 in range(0, CSPAN, BLOCK_C):
            onehot = _group_map(c0, CG, CSPAN, BLOCK_C, GPP_BLOCK)
            gamma, beta = _affine(w_ptr, b_ptr, c0, CSPAN, BLOCK_C, HAS_WEIGHT, HAS_BIAS)
            mean_c = _to_columns(onehot, mean)
            rstd_c = _to_columns(onehot, rstd)
            mean_gg = _to_columns(onehot, group_gg / group_size)
            mean_ggx = _to_columns(onehot, group_ggx / group_size)
            for s0 in range(0, S, BLOCK_S):
                offsets, mask = _tile(s0, c0, S, CSPAN, sxs, sxc, BLOCK_S, BLOCK_C)
                dy_offsets, _ = _tile(s0, c0, S, CSPAN, sdys, sdyc, BLOCK_S, BLOCK_C)
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean_c[None, :]) * rstd_c[None, :]
                _, dsilu = _silu_parts(xhat * gamma[None, :] + beta[None, :])
                g = dy * dsilu
                dx = rstd_c[None, :] * (gamma[None, :] * g - mean_gg[None, :] - xhat * mean_ggx[None, :])
                dx_offsets, _ = _tile(s0, c0, S, CSPAN, sdxs, sdxc, BLOCK_S, BLOCK_C)
                tl.store(dx_ptr + dx_offsets, _rounded(dx, dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _describe(t):
    return f"{t.dtype} tensor of shape {list(t.shape)} on {t.device}"


def _check_input(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape [N, C, *spatial], got {list(t.shape)}")


def _check_groups(num_groups, num_channels):
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if num_channels % num_groups:
        raise ValueError(f"the number of channels C must be divisible by num_groups, "
                         f"got C={num_channels} and num_groups={num_groups}")


def _check_param(name, p, x):
    if p is None:
        return None
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    if not p.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {p.dtype}")
    if p.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape [C] = [{x.shape[1]}], got {list(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}), got {p.device}")
    return p.contiguous()


def _flat_strides(t):
    """(stride_n, stride_c, stride_s) of t seen as [N, C, S], or None if its spatial dims do not
    collapse into one stride (NCHW, channels_last and broadcast tensors all do)."""
    stride_s, expected = 1, None
    for size, stride in reversed(list(zip(t.shape[2:], t.stride()[2:]))):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return None
        stride_s = stride if expected is None else stride_s
        expected = stride * size
    return t.stride(0), t.stride(1), stride_s


def _indexable(t):
    """t itself when the kernels can index it in place, else a contiguous copy (rare layouts)."""
    return t if _flat_strides(t) is not None else t.contiguous()


def _output_like(x):
    """An empty tensor with x's shape, dtype and memory format (NCHW or channels_last)."""
    out = torch.empty_like(x)
    return out if _flat_strides(out) is not None else torch.empty_like(x, memory_format=torch.contiguous_format)


def _strides(t, num_channels, spatial):
    stride_n, stride_c, stride_s = _flat_strides(t)
    # The kernels index within one sample in int32 (the sample's base offset is int64).
    if (num_channels - 1) * stride_c + (spatial - 1) * stride_s >= 2**31:
        raise ValueError(f"one sample of a {_describe(t)} spans 2**31 elements or more, which the "
                         f"Triton kernels do not index")
    return stride_n, stride_c, stride_s


def _next_pow2(v):
    return 1 << max(int(v) - 1, 0).bit_length()


def _multi_processor_count(device):
    """SMs of a CUDA device; 0 for the CPU interpreter, where fewer, larger programs are cheaper."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _plan(x, num_groups, backward=False):
    """Launch configuration of the forward or backward kernel: groups per program, tile shape,
    one tile or chunked, warps."""
    max_tile = _MAX_TILE_BACKWARD if backward else _MAX_TILE
    num_channels, spatial = x.shape[1], math.prod(x.shape[2:])
    cg = num_channels // num_groups
    _, stride_c, stride_s = _flat_strides(x)
    channels_inner = stride_c == 1 and stride_s != 1 and spatial > 1  # channels_last
    one_tile = _next_pow2(spatial) * _next_pow2(cg) <= max_tile
    gpp = 1
    if channels_inner:
        # Several groups per program, so each spatial position is one contiguous run of channels;
        # gpp divides num_groups so every program owns whole groups.
        tile_limit = max_tile if one_tile else _CHUNK_TILE
        min_programs = _MIN_PROGRAMS_PER_SM * _multi_processor_count(x.device)
        for d in range(2, num_groups + 1):
            if num_groups % d or d * cg * x.element_size() > _ROW_BYTES or x.shape[0] * num_groups // d < min_programs:
                continue
            if (_next_pow2(spatial) if one_tile else 1) * _next_pow2(d * cg) <= tile_limit:
                gpp = d
    cspan = gpp * cg
    if one_tile:
        block_s, block_c = _next_pow2(spatial), _next_pow2(cspan)
    elif channels_inner:  # fill the contiguous axis first
        block_c = min(_next_pow2(cspan), _CHUNK_TILE)
        block_s = min(_next_pow2(spatial), _CHUNK_TILE // block_c)
    else:
        block_s = min(_next_pow2(spatial), _CHUNK_TILE)
        block_c = min(_next_pow2(cspan), _CHUNK_TILE // block_s)
    tile = block_s * block_c
    num_warps = 4 if tile <= 1024 else 8 if tile <= 4096 else 32 if backward else 16
    return dict(CG=cg, CSPAN=cspan, BLOCKS_PER_SAMPLE=num_groups // gpp, ONE_TILE=one_tile, GPP=gpp,
                GPP_BLOCK=_next_pow2(gpp), BLOCK_S=block_s, BLOCK_C=block_c, num_warps=num_warps)


def forward(x, weight, bias, num_groups, eps):
    """y = silu(group_norm(x)) with the per-(sample, group) mean and rstd, each [N, G] float32.

    x: [N, C, *spatial] float32/float16/bfloat16, NCHW or channels_last (y keeps its format);
    weight, bias: [C] tensors or None (gamma = 1, beta = 0).
    """
    _check_input("x", x)
    num_channels = x.shape[1]
    _check_groups(num_groups, num_channels)
    weight = _check_param("weight", weight, x)
    bias = _check_param("bias", bias, x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    batch, spatial = x.shape[0], math.prod(x.shape[2:])
    if num_channels == 0 or spatial == 0:
        raise ValueError(f"x must have non-empty channel and spatial dimensions, got {list(x.shape)}")
    x = _indexable(x)
    y = _output_like(x)
    mean = torch.empty(batch, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty(batch, num_groups, device=x.device, dtype=torch.float32)
    if batch == 0:
        return y, mean, rstd
    plan = _plan(x, num_groups)
    _forward_kernel[(batch * plan["BLOCKS_PER_SAMPLE"],)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        spatial, num_channels, num_groups, plan.pop("CG"), plan.pop("CSPAN"), plan.pop("BLOCKS_PER_SAMPLE"),
        float(eps), *_strides(x, num_channels, spatial), *_strides(y, num_channels, spatial),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **plan,
    )
    return y, mean, rstd


def backward(grad_y, x, weight, bias, mean, rstd, num_groups):
    """(grad_x, grad_weight, grad_bias) of y = silu(group_norm(x)), from x and the saved stats.

    grad_x has x's dtype and memory format; grad_weight / grad_bias have the dtype of weight /
    bias, and are empty [0] tensors when weight / bias is None. Deterministic.
    """
    _check_input("x", x)
    _check_input("grad_y", grad_y)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {list(x.shape)}, got {list(grad_y.shape)}")
    if grad_y.device != x.device:
        raise ValueError(f"grad_y must be on x's device ({x.device}), got {grad_y.device}")
    num_channels = x.shape[1]
    _check_groups(num_groups, num_channels)
    weight = _check_param("weight", weight, x)
    bias = _check_param("bias", bias, x)
    batch = x.shape[0]
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if not isinstance(stat, torch.Tensor) or stat.dtype != torch.float32 \
                or stat.shape != (batch, num_groups) or stat.device != x.device:
            got = _describe(stat) if isinstance(stat, torch.Tensor) else type(stat).__name__
            raise ValueError(f"{name} must be a float32 tensor of shape [N, G] = [{batch}, {num_groups}] "
                             f"on {x.device}, got {got}")
    spatial = math.prod(x.shape[2:])
    if num_channels == 0 or spatial == 0:
        raise ValueError(f"x must have non-empty channel and spatial dimensions, got {list(x.shape)}")
    x, grad_y = _indexable(x), _indexable(grad_y)
    grad_x = _output_like(x)
    # Per-(n, c) partial sums, then a fixed-order sum over n: same bits on every run.
    dw_part = torch.empty(batch, num_channels, device=x.device, dtype=torch.float32) if weight is not None else None
    db_part = torch.empty(batch, num_channels, device=x.device, dtype=torch.float32) if bias is not None else None
    if batch:
        plan = _plan(x, num_groups, backward=True)
        _backward_kernel[(batch * plan["BLOCKS_PER_SAMPLE"],)](
            grad_y, x, grad_x, weight if weight is not None else x, bias if bias is not None else x,
            mean.contiguous(), rstd.contiguous(),
            dw_part if dw_part is not None else mean, db_part if db_part is not None else mean,
            spatial, num_channels, num_groups, plan.pop("CG"), plan.pop("CSPAN"), plan.pop("BLOCKS_PER_SAMPLE"),
            *_strides(grad_y, num_channels, spatial), *_strides(x, num_channels, spatial),
            *_strides(grad_x, num_channels, spatial),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **plan,
        )
    grad_weight = dw_part.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    grad_bias = db_part.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return grad_x, grad_weight, grad_bias
